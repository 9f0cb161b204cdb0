"""The README's run command, end to end: scripts/run.sh with a short simulation, headless, on a temp SQLite file
(and once on PostgreSQL, as production runs it).

Checks what a new user would see: the dashboard answers over HTTP while the demo runs, the database holds the
simulated funnel, and stopping (auto-exit, or Ctrl-C) leaves no process and no port behind.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import text

from core.db import Database
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "scripts" / "run.sh"
# Variables the demo sets itself: a developer's own values must not leak into the test.
SCRUBBED = ("WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN", "ADMIN_TOKEN", "FLOW_ROUTES", "SEND_MODE", "DEMO_MODE",
            "DASHBOARD_USERS", "WAFLOW_SIMULATE_USERS", "WAFLOW_EXIT_AFTER_SEED", "WAFLOW_SIMULATE_SPEED")

pytestmark = pytest.mark.slow


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment carries `marker` (our unique DATABASE_URL)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    db_path: Path
    marker: str
    web_port: int
    dash_port: int
    log_dir: Path
    dashboard_pages: dict[str, str] = field(default_factory=dict)
    output: str = ""


def _watch_dashboard(demo: Demo, stop: threading.Event) -> None:
    """Fetch the dashboard while the demo runs: health endpoint and the app page."""
    base = f"http://127.0.0.1:{demo.dash_port}"
    while not stop.is_set() and len(demo.dashboard_pages) < 2:
        for path in ("/_stcore/health", "/"):
            if path in demo.dashboard_pages:
                continue
            try:
                with urllib.request.urlopen(base + path, timeout=2) as response:
                    if response.status == 200:
                        demo.dashboard_pages[path] = response.read().decode("utf-8", "replace")
            except OSError:
                pass
        time.sleep(0.2)


StartDemo = Callable[..., Demo]


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[StartDemo]:
    started: list[Demo] = []

    def start(database_url: str | None = None, **extra: str) -> Demo:
        n = len(started)
        db_path, log_dir = tmp_path / f"demo-{n}.db", tmp_path / f"logs-{n}"
        marker = database_url or f"sqlite:///{db_path}"
        web_port, dash_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        env.update(DATABASE_URL=marker, WAFLOW_PORT=str(web_port), DASHBOARD_PORT=str(dash_port),
                   WAFLOW_LOG_DIR=str(log_dir), **extra)
        # A session of its own, like a terminal gives a command: Ctrl-C then goes to the script's group only.
        proc = subprocess.Popen(["bash", str(RUN)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        started.append(Demo(proc, db_path, marker, web_port, dash_port, log_dir))
        return started[-1]

    yield start
    for demo in started:
        if demo.proc.poll() is None:
            os.killpg(demo.proc.pid, signal.SIGKILL)
        for pid in _processes_with(demo.marker):
            os.kill(pid, signal.SIGKILL)


def _logs(demo: Demo) -> str:
    parts = [demo.output[-4000:]]
    for log in sorted(demo.log_dir.glob("*.log")):
        parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def _assert_everything_stopped(demo: Demo) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _processes_with(demo.marker):
        time.sleep(0.2)
    assert _processes_with(demo.marker) == [], _logs(demo)
    assert not _port_in_use(demo.web_port)
    assert not _port_in_use(demo.dash_port)


def test_run_command_seeds_a_funnel_serves_the_dashboard_and_exits_clean(start_demo: StartDemo) -> None:
    demo = start_demo(WAFLOW_SIMULATE_USERS="40", WAFLOW_SIMULATE_SPEED="0", WAFLOW_EXIT_AFTER_SEED="1")
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_dashboard, args=(demo, stop), daemon=True)
    watcher.start()
    try:
        demo.output, _ = demo.proc.communicate(timeout=150)
    finally:
        stop.set()
        watcher.join(5)
    assert demo.proc.returncode == 0, _logs(demo)

    out = demo.output
    assert f"Dashboard      http://127.0.0.1:{demo.dash_port}" in out
    assert "sign in: demo / demo" in out
    assert "ADMIN_TOKEN=demo-admin-token" in out
    assert "simulated 40 users" in out
    assert "FAILED" not in out, out
    assert demo.dashboard_pages.get("/_stcore/health") == "ok", _logs(demo)
    assert "<title>" in demo.dashboard_pages.get("/", ""), _logs(demo)
    _assert_everything_stopped(demo)

    with sqlite3.connect(demo.db_path) as db:
        flows = dict(db.execute("SELECT flow, COUNT(*) FROM sessions GROUP BY flow").fetchall())
        outcomes = dict(db.execute("SELECT outcome, COUNT(*) FROM transitions GROUP BY outcome").fetchall())
        completed = db.execute(
            "SELECT COUNT(*) FROM sessions WHERE status = 'completed' OR archived_from = 'completed'"
        ).fetchone()[0]
        events, duplicates = db.execute(
            "SELECT COUNT(*), COUNT(*) - COUNT(DISTINCT wamid) FROM inbound_events"
        ).fetchone()
        statuses = db.execute("SELECT COUNT(*) FROM message_status").fetchone()[0]
        replies, sent = db.execute(
            "SELECT COUNT(*), SUM(status IN ('sent', 'failed')) FROM outbox WHERE campaign_id IS NULL"
        ).fetchone()
    assert set(flows) == {"lead_qualification", "service_booking"}, flows
    assert sum(flows.values()) == 40
    assert outcomes.get("started", 0) == 40
    assert outcomes.get("advanced", 0) > 40
    assert outcomes.get("completed", 0) > 5
    assert completed > 5
    assert events > 150
    assert duplicates == 0
    assert statuses > 50  # the simulator reported delivery for what the sender sent
    assert sent >= 0.9 * replies, "the jobs process sends (dry-run) the bot's replies"


def test_ctrl_c_stops_every_process(start_demo: StartDemo) -> None:
    demo = start_demo(WAFLOW_SIMULATE_USERS="0")
    assert demo.proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 90
    for line in demo.proc.stdout:
        lines.append(line)
        if "press Ctrl-C to stop" in line or time.monotonic() > deadline:
            break
    demo.output = "".join(lines)
    assert "press Ctrl-C to stop" in demo.output, _logs(demo)
    assert _port_in_use(demo.web_port)
    assert _port_in_use(demo.dash_port)
    assert len(_processes_with(demo.marker)) >= 4  # the script, webhook, jobs, dashboard

    os.killpg(demo.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the foreground group
    rest, _ = demo.proc.communicate(timeout=30)
    demo.output += rest
    assert "stopping webhook jobs dashboard" in demo.output
    assert demo.proc.returncode == 130
    _assert_everything_stopped(demo)


def test_a_busy_port_is_refused_with_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}", WAFLOW_PORT=str(port),
                   DASHBOARD_PORT=str(free_port()), WAFLOW_LOG_DIR=str(tmp_path / "logs"))
        result = subprocess.run(["bash", str(RUN)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"run.sh: port {port} is in use: set WAFLOW_PORT to a free port"
    assert not (tmp_path / "w.db").exists(), "nothing is started or migrated"


def test_run_command_on_postgresql(start_demo: StartDemo, pg_url: str) -> None:
    """The same command with DATABASE_URL pointing at PostgreSQL: every process runs on it and the demo lands."""
    demo = start_demo(database_url=pg_url, WAFLOW_SIMULATE_USERS="20", WAFLOW_SIMULATE_SPEED="0",
                      WAFLOW_EXIT_AFTER_SEED="1")
    demo.output, _ = demo.proc.communicate(timeout=150)
    assert demo.proc.returncode == 0, _logs(demo)
    assert "simulated 20 users" in demo.output
    assert "FAILED" not in demo.output, demo.output
    assert f"Database       {pg_url}" in demo.output
    _assert_everything_stopped(demo)
    assert not demo.db_path.exists()  # nothing fell back to the embedded SQLite file

    db = Database(pg_url)
    try:
        with db.engine.connect() as conn:
            flows = dict(conn.execute(text("SELECT flow, COUNT(*) FROM sessions GROUP BY flow")).all())
            started = conn.scalar(text("SELECT COUNT(*) FROM transitions WHERE outcome = 'started'"))
            duplicates = conn.scalar(text("SELECT COUNT(*) - COUNT(DISTINCT wamid) FROM inbound_events"))
            pending = conn.scalar(text("SELECT COUNT(*) FROM inbound_events WHERE processed_at IS NULL"))
            statuses = conn.scalar(text("SELECT COUNT(*) FROM message_status"))
            jobs = set(conn.execute(text("SELECT DISTINCT job FROM job_runs")).scalars())
    finally:
        db.dispose()
    assert set(flows) == {"lead_qualification", "service_booking"}, flows
    assert sum(flows.values()) == 20
    assert started == 20
    assert duplicates == 0
    assert pending == 0
    assert statuses > 0  # the jobs process sent (dry-run) and the simulator reported delivery
    assert "sender" in jobs, jobs  # the jobs scheduler ran on PostgreSQL (the statuses above wait for its sends)
