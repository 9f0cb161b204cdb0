"""Fault injection on PostgreSQL against a real server process: kill -9 mid-burst, and a database outage.

Exactly-once is checked from the database: every message that got a 200 has exactly one transition, and
after re-sending whatever did not get a 200, every message has exactly one.

The outage test stops the machine's PostgreSQL for a few seconds (other test runs on this server see it
too) and always starts it again in a `finally`, waiting until it accepts connections.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import requests
from sqlalchemy import text

from core.db import Database
from core.signature import sign
from tests.conftest import PgServer, pg_admin_url
from tests.test_webhook_e2e import PN, SECRET, TS, Server, server_env, text_body, transitions_by_wamid

pytestmark = pytest.mark.slow

Outcome = int | str  # an HTTP status, or the name of the exception the client saw


class Burst:
    """Sender threads posting unique signed messages until stopped; records what each request got."""

    def __init__(self, server: Server, run: str, threads: int = 4, users_per_thread: int = 5) -> None:
        self.server = server
        self.run = run
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.bodies: dict[str, tuple[str, bytes]] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.threads = [
            threading.Thread(target=self._send, args=(t, users_per_thread), daemon=True) for t in range(threads)
        ]

    def start(self) -> Burst:
        for thread in self.threads:
            thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
            assert not thread.is_alive(), "a sender hung"

    def _send(self, index: int, users: int) -> None:
        http = requests.Session()
        n = 0
        while not self.stop.is_set():
            user = f"1555{index:02d}{n % users:04d}{self.run[:3]}"
            wamid = f"wamid.FAULT.{self.run}.{index}.{n:06d}"
            body = text_body(wamid, user, f"burst {n}", ts=TS + n)
            outcome: Outcome
            try:
                outcome = self.server_post(http, body)
            except requests.RequestException as e:
                outcome = type(e).__name__
                time.sleep(0.05)  # the server is down: do not spin
            with self.lock:
                self.bodies[wamid] = (user, body)
                self.outcomes[wamid] = outcome
            n += 1
        http.close()

    def server_post(self, http: requests.Session, body: bytes) -> int:
        headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sign(body, SECRET)}
        return http.post(self.server.url + "/webhook", data=body, headers=headers, timeout=15).status_code

    def acknowledged(self) -> list[str]:
        return [w for w, o in self.outcomes.items() if o == 200]

    def unacknowledged(self) -> list[str]:
        return [w for w, o in self.outcomes.items() if o != 200]


def resend_until_200(server: Server, burst: Burst, wamids: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    todo = list(wamids)
    while todo:
        assert time.monotonic() < deadline, f"{len(todo)} message(s) never got a 200:\n{server.log()}"
        retry = []
        for wamid in todo:
            try:
                if server.post(burst.bodies[wamid][1], timeout=15).status_code != 200:
                    retry.append(wamid)
            except requests.RequestException:
                retry.append(wamid)
        todo = retry
        if todo:
            time.sleep(0.5)


def wait_all_applied(db: Database, prefix: str, expected: int, timeout: float = 60.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        with db.engine.connect() as conn:
            pending = conn.scalar(
                text("SELECT count(*) FROM inbound_events WHERE wamid LIKE :p AND processed_at IS NULL"),
                {"p": prefix + "%"},
            )
        found = transitions_by_wamid(db, prefix)
        if (not pending and len(found) >= expected) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def assert_exactly_once(db: Database, burst: Burst, prefix: str) -> None:
    everything = list(burst.bodies)
    applied = wait_all_applied(db, prefix, len(everything))
    assert applied == dict.fromkeys(everything, 1)
    # The counter flow adds one per applied message: each session's count is its number of messages.
    per_user: dict[str, int] = {}
    for user, _ in burst.bodies.values():
        per_user[user] = per_user.get(user, 0) + 1
    with db.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT user_id, version FROM sessions WHERE phone_number_id = :pn"), {"pn": PN}
        ).all()
    versions = {r[0]: int(r[1]) for r in rows if r[0] in per_user}
    assert versions == per_user


@dataclass
class UnderBurst:
    env: dict[str, str]
    server: Server
    db: Database
    prefix: str
    burst: Burst


@contextmanager
def under_burst(pg_url: str, flows_dir: Path, tmp_path: Path) -> Iterator[UnderBurst]:
    """A real server on `pg_url` receiving a burst of signed POSTs; stopped (and the burst with it) at the end."""
    env = server_env(pg_url, flows_dir)
    server = Server(env, tmp_path / "server.log").start()
    db = Database(pg_url)
    run = uuid.uuid4().hex[:8]
    burst = Burst(server, run).start()
    try:
        yield UnderBurst(env, server, db, f"wamid.FAULT.{run}.", burst)
    finally:
        burst.stop.set()
        server.stop()
        db.dispose()


def test_kill_9_during_a_burst_loses_and_duplicates_nothing(pg_url: str, flows_dir: Path, tmp_path: Path) -> None:
    with under_burst(pg_url, flows_dir, tmp_path) as run:
        env, server, db, prefix, burst = run.env, run.server, run.db, run.prefix, run.burst
        time.sleep(1.5)
        server.kill9()
        time.sleep(0.5)
        burst.finish()
        acknowledged = burst.acknowledged()
        unacknowledged = burst.unacknowledged()
        assert len(acknowledged) >= 20, "the burst never got going"
        assert unacknowledged, "the kill should have cut some requests off"
        # Everything that got a 200 is durable, whether or not it was applied before the kill.
        with db.engine.connect() as conn:
            stored = {r[0] for r in conn.execute(text("SELECT wamid FROM inbound_events WHERE wamid LIKE :p"),
                                                 {"p": prefix + "%"})}
        assert set(acknowledged) <= stored

        restarted = Server(env, tmp_path / "server2.log")
        restarted.port, restarted.url = server.port, server.url
        restarted.start()
        try:
            # The restarted server's sweeper applies what the killed one left pending...
            applied = wait_all_applied(db, prefix, len(stored))
            assert {w: applied.get(w) for w in acknowledged} == dict.fromkeys(acknowledged, 1)
            # ...and Meta's retries of the requests that got no 200 apply each message exactly once.
            resend_until_200(restarted, burst, unacknowledged)
            assert_exactly_once(db, burst, prefix)
        finally:
            restarted.stop()


def _cluster() -> list[str]:
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir())
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"]


def _postgres_accepts_connections(timeout: float) -> bool:
    conninfo = pg_admin_url().replace("postgresql+psycopg://", "postgresql://")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            psycopg.connect(conninfo, connect_timeout=2).close()
            return True
        except psycopg.Error:
            time.sleep(0.2)
    return False


def _start_postgres() -> None:
    subprocess.run([*_cluster(), "start"], capture_output=True, timeout=60, check=False)
    if not _postgres_accepts_connections(60):
        subprocess.run([*_cluster(), "start"], capture_output=True, timeout=60, check=False)
        assert _postgres_accepts_connections(60), "PostgreSQL did not come back"


def test_database_outage_answers_only_503_and_loses_nothing(
    pg_url: str, flows_dir: Path, tmp_path: Path, pg_server: PgServer
) -> None:
    if not Path("/etc/postgresql").is_dir():
        pytest.skip("no local PostgreSQL cluster to stop")
    with under_burst(pg_url, flows_dir, tmp_path) as run:
        server, burst = run.server, run.burst
        try:
            time.sleep(1.0)
            before = len(burst.outcomes)
            subprocess.run([*_cluster(), "stop", "-m", "fast"], capture_output=True, timeout=60, check=False)
            try:
                time.sleep(2.0)
                health_during_outage = server.get("/healthz", timeout=10).status_code
            finally:
                _start_postgres()
                pg_server.admin.dispose()  # the suite's own pooled connections died with the server
            time.sleep(1.0)
            burst.finish()
            assert len(burst.outcomes) > before + 10, "the burst stalled during the outage"
            outcomes = set(burst.outcomes.values())
            assert outcomes <= {200, 503}, f"other answers than 200/503: {outcomes - {200, 503}}\n{server.log()}"
            assert 503 in outcomes, "the outage was not seen"
            assert health_during_outage == 503  # health says so too
            assert server.alive, server.log()
            resend_until_200(server, burst, burst.unacknowledged())
            assert_exactly_once(run.db, burst, run.prefix)
            assert server.get("/healthz").status_code == 200
        finally:
            if not _postgres_accepts_connections(1):  # restore the service even when the test fails
                _start_postgres()
                pg_server.admin.dispose()
