"""End to end: a real `python -m core serve` process on a loopback port, driven with `requests`.

One server per backend for the whole module (starting one costs seconds); tests use their own wamids and
users so they never see each other's messages. `Server` is reused by the fault tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import text

from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.flows import load_flows
from core.messages import InboundMessage
from core.signature import sign
from tests.conftest import ROOT, RUN_ID, PgServer, free_port, metric_total

DATA = Path(__file__).parent / "data" / "webhook"
SECRET = "test-app-secret"
EXAMPLE_SECRET = "acceptance-app-secret-0001"
VERIFY = "test-verify-token"
ADMIN_TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PN = "100000000000111"
TS = 1767268800


def server_env(database_url: str, flows_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WHATSAPP_", "DATABASE_URL", "ADMIN_TOKEN"))}
    env.update(
        DATABASE_URL=database_url,
        # Two secrets: the suite's own and the worked example's (rotation), so both sign valid requests.
        WHATSAPP_APP_SECRET=f"{SECRET},{EXAMPLE_SECRET}",
        WHATSAPP_VERIFY_TOKEN=VERIFY,
        ADMIN_TOKEN=ADMIN_TOKEN,
        FLOWS_DIR=str(flows_dir),
        DEFAULT_FLOW="counter",
        PENDING_SWEEP_INTERVAL_SECONDS="0.5",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Server:
    """A `python -m core serve` subprocess; its output goes to a log file shown when a test fails."""

    def __init__(self, env: dict[str, str], log_path: Path, *, workers: int = 1) -> None:
        self.env = env
        self.log_path = log_path
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = requests.Session()

    def start(self, timeout: float = 60.0) -> Server:
        log = self.log_path.open("ab")
        args = [sys.executable, "-m", "core", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.workers > 1:
            args += ["--workers", str(self.workers)]
        self.proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer /healthz within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.http.close()

    def post(self, body: bytes, *, secret: str | None = SECRET, headers: dict[str, str] | None = None,
             timeout: float = 10.0) -> requests.Response:
        sent = {"Content-Type": "application/json"}
        if secret is not None:
            sent["X-Hub-Signature-256"] = sign(body, secret)
        sent.update(headers or {})
        return self.http.post(self.url + "/webhook", data=body, headers=sent, timeout=timeout)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 10)
        return self.http.get(self.url + path, **kwargs)


def text_body(wamid: str, user: str, body: str, ts: int = TS, phone: str = PN) -> bytes:
    doc = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "109876543210001", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001111", "phone_number_id": phone},
            "contacts": [{"profile": {"name": "Load Test"}, "wa_id": user}],
            "messages": [{"from": user, "id": wamid, "timestamp": str(ts), "type": "text", "text": {"body": body}}],
        }}]}],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def transitions_by_wamid(db: Database, prefix: str) -> dict[str, int]:
    with db.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT wamid, count(*) FROM transitions WHERE wamid LIKE :p GROUP BY wamid"), {"p": prefix + "%"}
        ).all()
    return {r[0]: int(r[1]) for r in rows}


def wait_applied(db: Database, prefix: str, expected: int, timeout: float = 30.0) -> dict[str, int]:
    """Poll until `expected` distinct wamids with `prefix` have transitions and none is pending."""
    deadline = time.monotonic() + timeout
    while True:
        found = transitions_by_wamid(db, prefix)
        with db.engine.connect() as conn:
            pending = conn.scalar(
                text("SELECT count(*) FROM inbound_events WHERE wamid LIKE :p AND processed_at IS NULL"),
                {"p": prefix + "%"},
            )
        if (len(found) >= expected and not pending) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def fresh_database(backend: str, pg: PgServer | None, tmp: Path, sqlite_template: Path | None) -> tuple[str, Any]:
    """A migrated database of its own; returns its URL and a cleanup callable."""
    if backend == "sqlite":
        path = tmp / f"e2e-{uuid.uuid4().hex[:6]}.db"
        if sqlite_template is not None:
            shutil.copyfile(sqlite_template, path)
        return f"sqlite:///{path}", lambda: None
    assert pg is not None
    name = f"waflow_e2e_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    url = pg.create(name, template=pg.template)
    return url, lambda: pg.drop(name)


@contextmanager
def served_database(request: pytest.FixtureRequest, backend: str, tmp: Path, flows_dir: Path,
                    **env: str) -> Iterator[tuple[Server, Database]]:
    """A real server on a migrated database of its own (`backend`: sqlite or postgresql), and that database;
    both gone afterwards. For module-scoped fixtures: one server start per module and backend."""
    pg = request.getfixturevalue("pg_server") if backend == "postgresql" else None
    template = request.getfixturevalue("sqlite_template") if backend == "sqlite" else None
    url, cleanup = fresh_database(backend, pg, tmp, template)
    server = Server(server_env(url, flows_dir, **env), tmp / "server.log").start()
    db = Database(url)
    try:
        yield server, db
    finally:
        db.dispose()
        server.stop()
        cleanup()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, flows_dir: Path
) -> Iterator[tuple[Server, Database]]:
    with served_database(request, request.param, tmp_path_factory.mktemp("e2e"), flows_dir) as served:
        yield served


@pytest.fixture
def server(live: tuple[Server, Database]) -> Server:
    assert live[0].alive, live[0].log()
    return live[0]


@pytest.fixture
def live_db(live: tuple[Server, Database]) -> Database:
    return live[1]


def unique(prefix: str) -> str:
    return f"wamid.{prefix}.{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------------------------------- handshake


def test_handshake_table(server: Server) -> None:
    # The "no verify token configured" row needs a server of its own: it is proven on the ASGI app
    # (tests/test_webhook.py), which is the same code path.
    def hs(**params: str) -> requests.Response:
        return server.get("/webhook", params=params)

    ok = hs(**{"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "0012345"})
    assert (ok.status_code, ok.text) == (200, "0012345")
    wrong = hs(**{"hub.mode": "subscribe", "hub.verify_token": "nope", "hub.challenge": "S3CR3TCH"})
    assert wrong.status_code == 403
    assert "S3CR3TCH" not in wrong.text
    for params in (
        {"hub.verify_token": VERIFY, "hub.challenge": "S3CR3TCH"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY, "hub.challenge": "S3CR3TCH"},
        {"hub.mode": "subscribe", "hub.challenge": "S3CR3TCH"},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY},
    ):
        response = hs(**params)
        assert response.status_code in (400, 403), params
        assert "S3CR3TCH" not in response.text


# ---------------------------------------------------------------------------------------------- signature


def test_signature_cases_and_a_genuine_message_after_rejections(server: Server, live_db: Database) -> None:
    wamid = unique("SIG")
    body = text_body(wamid, "15550100001", "hello")
    good = sign(body, SECRET)
    changed = body.replace(b"hello", b"hellp")
    rejected = [
        {},
        {"X-Hub-Signature-256": "sha256=" + "0" * 64},
        {"X-Hub-Signature-256": sign(body, "wrong-secret")},
        {"X-Hub-Signature": "sha1=" + "a" * 40},
        {"X-Hub-Signature-256": sign(changed, SECRET)},
    ]
    for headers in rejected:
        response = server.post(body, secret=None, headers=headers)
        assert response.status_code == 401, headers
        assert set(response.json()) == {"error"}
    assert server.post(changed, secret=None, headers={"X-Hub-Signature-256": good}).status_code == 401
    with live_db.engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM inbound_events WHERE wamid = :w"), {"w": wamid}) == 0
    upper = "sha256=" + good.removeprefix("sha256=").upper()
    assert server.post(body, secret=None, headers={"X-Hub-Signature-256": upper}).json()["stored"] == 1
    assert server.post(body).json()["duplicates"] == 1
    assert wait_applied(live_db, wamid, 1) == {wamid: 1}


def test_worked_signature_example(server: Server, live_db: Database) -> None:
    body = (DATA / "signature_example.json").read_bytes()
    header = "sha256=cec7948a4e436db36ddb10c499f309c31ea80459c171e859b1b942803b74e7a4"
    response = server.post(body, secret=None, headers={"X-Hub-Signature-256": header})
    assert response.status_code == 200, response.text
    assert wait_applied(live_db, "wamid.TEST0001", 1) == {"wamid.TEST0001": 1}


# ---------------------------------------------------------------------------------------------- rejects


def test_malformed_and_oversized_bodies(server: Server, live_db: Database) -> None:
    with live_db.engine.connect() as conn:
        before = conn.scalar(text("SELECT count(*) FROM inbound_events"))
    for body in (b"", b"nope", b'{"object":"whatsapp_business_account"}', text_body("wamid.TRUNC", "1", "x")[:-5]):
        response = server.post(body)
        assert response.status_code == 400, body
        assert "error" in response.json()
    deep = b"[" * 500_000 + b"]" * 500_000
    started = time.perf_counter()
    response = server.post(deep)
    assert response.status_code == 400
    assert time.perf_counter() - started < 3
    big = text_body("wamid.BIG4MB", "15550100002", "x" * (4 * 1024 * 1024))
    try:
        assert server.post(big).status_code == 413
    except requests.ConnectionError:
        pytest.fail("the server dropped the connection instead of answering 413")
    assert server.get("/healthz").status_code == 200
    with live_db.engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM inbound_events")) == before


def test_nothing_to_act_on_is_200(server: Server) -> None:
    for name in ("empty_changes", "errors_only", "template_status_update", "object_page"):
        assert server.post((DATA / f"{name}.json").read_bytes()).status_code == 200, name


# ---------------------------------------------------------------------------------------------- delivery


def test_burst_applies_every_message_exactly_once(server: Server, live_db: Database) -> None:
    run = uuid.uuid4().hex[:8]
    prefix = f"wamid.BURST.{run}."
    users = [f"1555{run[:4]}{i:04d}" for i in range(20)]
    bodies = []
    for i in range(300):
        user = users[i % len(users)]
        wamid = f"{prefix}{i:05d}"
        bodies.append((wamid, user, text_body(wamid, user, f"message {i}", ts=TS + i)))
    # 5 % sent twice, with other bytes (as a Meta retry may be).
    resends = [(w, u, b.replace(b'"messages"', b' "messages"')) for w, u, b in bodies[::20]]

    def send(item: tuple[str, str, bytes]) -> int:
        return server.post(item[2], timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(send, bodies + resends))
    assert codes == [200] * len(codes)
    applied = wait_applied(live_db, prefix, len(bodies))
    assert applied == {w: 1 for w, _, _ in bodies}
    # The counter flow adds one per applied message: each user's count equals its messages.
    for user in users:
        session = server.get(f"/admin/sessions/{PN}/{user}", headers=ADMIN).json()
        assert session["data"]["count"] == 15
        assert session["version"] == 15
        timestamps = [m["timestamp"] for m in session["inbound"]]
        assert timestamps == sorted(timestamps)


def test_sweeper_applies_what_was_left_pending(server: Server, live_db: Database) -> None:
    wamid = unique("SWEEP")
    user = "15550100003"
    message = InboundMessage(phone_number_id=PN, user_id=user, wamid=wamid, timestamp=TS, kind="text", text="left")
    # Stored as a crashed server would have left it: ingested, never applied.
    flows = load_flows(Path(server.env["FLOWS_DIR"]))
    settings = Settings(database_url=server.env["DATABASE_URL"], flows_dir=Path(server.env["FLOWS_DIR"]),
                        default_flow="counter")
    assert Engine(live_db, flows, settings).ingest([message]).stored == 1
    assert wait_applied(live_db, wamid, 1, timeout=20) == {wamid: 1}


def test_statuses_and_admin_over_http(server: Server) -> None:
    wamid = unique("OUT")
    for status, ts in (("read", TS + 3), ("delivered", TS + 2)):
        doc = json.loads(text_body("unused", "1", "x"))
        value = doc["entry"][0]["changes"][0]["value"]
        del value["messages"], value["contacts"]
        value["statuses"] = [{"id": wamid, "status": status, "timestamp": str(ts), "recipient_id": "15550100004"}]
        assert server.post(json.dumps(doc).encode()).status_code == 200
    view = server.get(f"/admin/outbound/{wamid}", headers=ADMIN).json()
    assert view["status"] == "read"
    assert [h["status"] for h in view["history"]] == ["delivered", "read"]
    assert server.get(f"/admin/outbound/{wamid}").status_code == 401
    assert server.get(f"/admin/outbound/{wamid}", headers={"Authorization": "Bearer x"}).status_code == 401
    assert server.get("/admin/outbound/wamid.NEVER.SEEN", headers=ADMIN).status_code == 404
    assert server.get(f"/admin/sessions/{PN}/nobody", headers=ADMIN).status_code == 404


def test_health_and_metrics(server: Server) -> None:
    assert server.get("/healthz").json()["status"] == "ok"
    metrics = server.get("/metrics").text
    for name in ("waflow_webhook_requests_total", "waflow_signature_failures_total", "waflow_duplicates_dropped_total",
                 "waflow_messages_pending", "waflow_apply_seconds_bucket", "waflow_lock_wait_seconds_bucket"):
        assert name in metrics


def test_metrics_with_several_workers_count_every_process(pg_url: str, flows_dir: Path, tmp_path: Path) -> None:
    """`serve --workers 2`: whichever worker answers a scrape, it reports what both stored and applied."""
    server = Server(server_env(pg_url, flows_dir), tmp_path / "server.log", workers=2).start()
    try:
        bodies = [text_body(unique("MP"), f"1555300{i:04d}", "hi") for i in range(40)]
        with ThreadPoolExecutor(8) as pool:  # concurrent connections: the kernel hands them to both workers
            statuses = list(pool.map(lambda b: requests.post(
                server.url + "/webhook", data=b, timeout=10,
                headers={"Content-Type": "application/json", "X-Hub-Signature-256": sign(b, SECRET)}).status_code,
                bodies))
        assert statuses == [200] * 40
        deadline = time.monotonic() + 20
        scrapes: list[tuple[float, float]] = []
        while time.monotonic() < deadline:
            scrapes = [_stored_and_applied(requests.get(server.url + "/metrics", timeout=10).text) for _ in range(8)]
            if all(s == (40.0, 40.0) for s in scrapes):
                break
            time.sleep(0.3)
        assert scrapes == [(40.0, 40.0)] * 8, server.log()
    finally:
        server.stop()


def _stored_and_applied(exposition: str) -> tuple[float, float]:
    return (metric_total(exposition, "waflow_messages_stored_total"),
            metric_total(exposition, "waflow_messages_applied_total", result="applied"))
