"""Dashboard sign-in: users from DASHBOARD_USERS (or Streamlit secrets), salted PBKDF2 hashes, two roles.

DASHBOARD_USERS="alice:admin:pbkdf2_sha256$600000$<salt hex>$<hash hex>,bob:viewer:pbkdf2_sha256$..."
Produce a hash with `python -m core hash-password`. There is no default password: only DEMO_MODE=true adds
demo/demo (admin), and the login page says so.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.config import Settings
from core.errors import WaflowError

ALGORITHM = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 600_000
ROLES = ("admin", "viewer")
DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
# Compared against when the user name is unknown, so a wrong name costs as much time as a wrong password.
_DUMMY_HASH = f"{ALGORITHM}$1000${'00' * 16}${'00' * 32}"


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
    user = users.get(name.strip())
    ok = verify_password(password, user.password_hash if user else _DUMMY_HASH)
    return user if ok and user is not None else None


def mask_number(value: str | None) -> str:
    """A phone number / user id with all but its last 4 characters hidden: 34600123456 -> •••••••3456."""
    if value is None:
        return ""
    text = str(value)
    if len(text) <= 4:
        return "•" * len(text)
    return "•" * (len(text) - 4) + text[-4:]
