"""Dashboard sign-in: users from DASHBOARD_USERS (or Streamlit secrets), salted PBKDF2 hashes, two roles.

DASHBOARD_USERS="alice:admin:pbkdf2_sha256$600000$<salt hex>$<hash hex>,bob:viewer:pbkdf2_sha256$..."
Produce a hash with `python -m core hash-password`. There is no default password: only DEMO_MODE=true adds
demo/demo (admin), and the login page says so.

Guessing is slowed twice over: `LoginThrottle` makes every user name and every client wait, longer and longer,
after a few failed sign-ins, and a user name that does not exist costs the same PBKDF2 work as a wrong password
(so neither the answer nor its timing tells which names exist).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from core.config import Settings
from core.errors import WaflowError

ALGORITHM = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 600_000
ROLES = ("admin", "viewer")
DEMO_USER = "demo"
DEMO_PASSWORD = "demo"


class CredentialsError(WaflowError):
    """DASHBOARD_USERS (or the secrets) could not be read."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    password_hash: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    if not password:
        raise ValueError("password must not be empty")
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"{ALGORITHM}${iterations}${salt.hex()}${digest.hex()}"


def _parse_hash(encoded: str) -> tuple[int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != ALGORITHM:
        raise ValueError(f"password hash must look like {ALGORITHM}$iterations$salt_hex$hash_hex")
    try:
        iterations, salt, digest = int(parts[1]), bytes.fromhex(parts[2]), bytes.fromhex(parts[3])
    except ValueError as e:
        raise ValueError(f"malformed password hash: {e}") from e
    if iterations < 1 or not salt or not digest:
        raise ValueError("malformed password hash: empty salt/hash or iterations < 1")
    return iterations, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time comparison of the PBKDF2 of `password` with the stored hash."""
    iterations, salt, expected = _parse_hash(encoded)
    actual = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations, dklen=len(expected))
    return hmac.compare_digest(actual, expected)


def parse_users(spec: str) -> dict[str, User]:
    """'name:role:hash' entries separated by commas (or new lines)."""
    users: dict[str, User] = {}
    for raw in spec.replace("\n", ",").split(","):
        entry = raw.strip()
        if not entry:
            continue
        fields = entry.split(":")
        if len(fields) != 3 or not fields[0].strip():
            raise CredentialsError(f"DASHBOARD_USERS entry {fields[0]!r}... must be name:role:hash")
        name, role, encoded = (f.strip() for f in fields)
        if role not in ROLES:
            raise CredentialsError(f"DASHBOARD_USERS user {name!r}: role must be one of {', '.join(ROLES)}")
        try:
            _parse_hash(encoded)
        except ValueError as e:
            raise CredentialsError(f"DASHBOARD_USERS user {name!r}: {e}") from e
        users[name] = User(name, role, encoded)
    return users


def _secret_users(secrets_map: Mapping[str, Any] | None) -> dict[str, User]:
    """Streamlit secrets: `dashboard_users = "name:role:hash,..."` or a [dashboard_users] table name = "role:hash"."""
    if not secrets_map or "dashboard_users" not in secrets_map:
        return {}
    value = secrets_map["dashboard_users"]
    if isinstance(value, str):
        return parse_users(value)
    if isinstance(value, Mapping):
        return parse_users(",".join(f"{name}:{entry}" for name, entry in value.items()))
    raise CredentialsError("secrets: dashboard_users must be a string or a table")


def load_users(settings: Settings, secrets_map: Mapping[str, Any] | None = None) -> dict[str, User]:
    """Every user who may sign in: environment first, then secrets; the demo user only in demo mode."""
    users = {**_secret_users(secrets_map), **parse_users(settings.dashboard_users)}
    if settings.demo_mode and DEMO_USER not in users:
        users[DEMO_USER] = User(DEMO_USER, "admin", hash_password(DEMO_PASSWORD, iterations=1000))
    return users


def authenticate(users: Mapping[str, User], name: str, password: str) -> User | None:
    # An unknown name is checked against a dummy hash as costly as the costliest real one (worked out for every
    # name alike): it takes as long as a wrong password.
    dummy = _dummy_hash(_max_iterations(users))
    user = users.get(name.strip())
    ok = verify_password(password, user.password_hash if user else dummy)
    return user if ok and user is not None else None


def _max_iterations(users: Mapping[str, User]) -> int:
    return max((_parse_hash(u.password_hash)[0] for u in users.values()), default=DEFAULT_ITERATIONS)


@lru_cache(maxsize=8)
def _dummy_hash(iterations: int) -> str:
    return f"{ALGORITHM}${iterations}${'00' * 16}${'00' * 32}"


# ------------------------------------------------------------------------------------------- throttling
@dataclass
class _Failures:
    count: int
    last: float


class LoginThrottle:
    """Failed sign-ins per key (a user name, a client address), kept in process memory for every session.

    The first `free` failures of a key cost nothing; each one after makes the key wait before its next attempt:
    `base` seconds, doubling, at most `cap`. A key silent for `forget_after` seconds starts over; a success
    clears its user name (not its client: one valid account must not buy unlimited guesses at the others).
    At most `max_keys` keys are kept, the least recently failed ones dropped first, so a flood of made-up names
    cannot exhaust memory. Thread-safe: Streamlit runs each session's script on a thread of its own.
    """

    def __init__(self, *, free: int = 3, base: float = 1.0, cap: float = 60.0, forget_after: float = 900.0,
                 max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.base, self.cap, self.forget_after, self.max_keys = free, base, cap, forget_after, max_keys
        self.clock = clock
        self._failures: OrderedDict[str, _Failures] = OrderedDict()
        self._lock = threading.Lock()

    def delay(self, count: int) -> float:
        """How long a key with `count` failures waits after its last one."""
        return 0.0 if count < self.free else min(self.cap, self.base * 2 ** min(count - self.free, 32))

    def wait(self, keys: Iterable[str]) -> float:
        """Seconds before any of `keys` may try again (0: now)."""
        now = self.clock()
        with self._lock:
            waits = [self._remaining(self._failures.get(key), now) for key in keys]
        return max(waits, default=0.0)

    def failed(self, keys: Iterable[str]) -> None:
        now = self.clock()
        with self._lock:
            for key in keys:
                entry = self._failures.pop(key, None)
                if entry is None or now - entry.last > self.forget_after:
                    entry = _Failures(0, now)
                self._failures[key] = _Failures(entry.count + 1, now)  # re-inserted: now the most recent
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)

    def succeeded(self, user_key: str) -> None:
        with self._lock:
            self._failures.pop(user_key, None)

    def clear(self) -> None:
        with self._lock:
            self._failures.clear()

    def __len__(self) -> int:
        """How many keys are remembered."""
        return len(self._failures)

    def _remaining(self, entry: _Failures | None, now: float) -> float:
        if entry is None or now - entry.last > self.forget_after:
            return 0.0
        return max(0.0, entry.last + self.delay(entry.count) - now)


# One per process: every dashboard session (and every rerun) of this server counts against the same keys.
LOGIN_THROTTLE = LoginThrottle()


def user_key(name: str) -> str:
    # Case-folded: "Alice" and "alice " must not be separate budgets for guessing alice's password.
    return "user:" + name.strip().casefold()


def client_key(forwarded_for: str | None, remote_ip: str | None) -> str:
    """The client a sign-in comes from. Behind the proxy the README asks for, the last X-Forwarded-For entry is
    the address that proxy saw (a client can prepend entries, not append them); without one, the socket's peer."""
    forwarded = [part.strip() for part in (forwarded_for or "").split(",") if part.strip()]
    return "client:" + (forwarded[-1] if forwarded else remote_ip or "local")


def mask_number(value: str | None) -> str:
    """A phone number / user id with all but its last 4 characters hidden: 34600123456 -> •••••••3456."""
    if value is None:
        return ""
    text = str(value)
    if len(text) <= 4:
        return "•" * len(text)
    return "•" * (len(text) - 4) + text[-4:]
