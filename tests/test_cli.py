"""The operators' command line as a user runs it: `python -m core ...` subprocesses on both backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import text

from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.flows import FlowRegistry
from core.views import session_view
from tests import factories as f
from tests.conftest import ROOT, RUN_ID, PgServer


def run(*args: str, database_url: str, flows_dir: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    full_env.update(DATABASE_URL=database_url, **env)
    if flows_dir is not None:
        full_env["FLOWS_DIR"] = str(flows_dir)
    return subprocess.run(
        [sys.executable, "-m", "core", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def conversation(engine: Engine) -> None:
    """Two users through the lead flow, stored but not applied (as a crash would leave them)."""
    engine.ingest([
        f.text("14155550101", "hi", f.BASE_TS),
        f.text("14155550101", "Ana Lima", f.BASE_TS + 10),
        f.text("14155550101", "ana@example.com", f.BASE_TS + 20),
        f.text("447700900123", "hello", f.BASE_TS + 5),
        f.text("447700900123", "x", f.BASE_TS + 15),  # too short: reprompted
        f.of_kind("447700900123", "reaction", f.BASE_TS + 16, reacted_to="wamid.OUT", emoji="👍"),
    ])


def snapshot(db: Database) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    with db.engine.connect() as conn:
        sessions = conn.execute(text(
            "SELECT phone_number_id, user_id, flow, current_step, status, version, failure_count "
            "FROM sessions ORDER BY phone_number_id, user_id"
        )).all()
        transitions = conn.execute(text(
            "SELECT phone_number_id, user_id, from_step, to_step, outcome, wamid, at "
            "FROM transitions ORDER BY user_id, at, id"
        )).all()
    return [tuple(r) for r in sessions], [tuple(r) for r in transitions]


def test_migrate_creates_the_schema_and_is_idempotent(tmp_path: Path, pg_server: PgServer) -> None:
    name = f"waflow_cli_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    pg_url = pg_server.create(name)  # empty: no template
    try:
        for url in (f"sqlite:///{tmp_path}/new/dir/waflow.db", pg_url):
            for _ in range(2):
                result = run("migrate", database_url=url)
                assert result.returncode == 0, result.stderr
                assert result.stdout.startswith("schema at ")
            db = Database(url)
            with db.engine.connect() as conn:
                assert conn.scalar(text("SELECT count(*) FROM inbound_events")) == 0
            db.dispose()
    finally:
        pg_server.drop(name)


def test_process_pending_applies_each_message_once(
    database_url: str, registry: FlowRegistry, settings: Settings, flows_dir: Path
) -> None:
    db = Database(database_url)
    conversation(Engine(db, registry, settings))
    result = run("process-pending", database_url=database_url, flows_dir=flows_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "applied 6 pending message(s)"
    again = run("process-pending", database_url=database_url, flows_dir=flows_dir)
    assert again.stdout.strip() == "applied 0 pending message(s)"
    _, transitions = snapshot(db)
    assert len(transitions) == 5  # the reaction is applied without a transition
    assert len({t[5] for t in transitions}) == 5
    db.dispose()


def test_sessions_show_prints_the_admin_view(
    database_url: str, registry: FlowRegistry, settings: Settings, flows_dir: Path
) -> None:
    db = Database(database_url)
    engine = Engine(db, registry, settings)
    conversation(engine)
    engine.process_pending()
    result = run("sessions", "show", f.PHONE, "14155550101", database_url=database_url, flows_dir=flows_dir)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown == json.loads(json.dumps(session_view(db, f.PHONE, "14155550101"), default=str))
    assert (shown["step"], shown["data"]) == ("ask_city", {"name": "Ana Lima", "email": "ana@example.com"})
    missing = run("sessions", "show", f.PHONE, "nobody", database_url=database_url, flows_dir=flows_dir)
    assert missing.returncode == 1
    assert one_error_line(missing) == f"error: no session for {f.PHONE}/nobody"
    db.dispose()


def test_replay_reproduces_sessions_and_transitions(
    database_url: str, registry: FlowRegistry, settings: Settings, flows_dir: Path, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    source = Database(database_url)
    engine = Engine(source, registry, settings)
    conversation(engine)
    engine.process_pending()
    # The target is a brand-new database (no schema yet): replay migrates it.
    if source.is_postgres:
        pg: PgServer = request.getfixturevalue("pg_server")
        name = f"waflow_replay_{RUN_ID}_{uuid.uuid4().hex[:8]}"
        target_url = pg.create(name)
        request.addfinalizer(lambda: pg.drop(name))
    else:
        target_url = f"sqlite:///{tmp_path}/replayed.db"
    result = run("replay", "--from", database_url, "--to", target_url, database_url=database_url, flows_dir=flows_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "replayed 6 event(s), applied 6"
    target = Database(target_url)
    assert snapshot(target) == snapshot(source)
    assert len(snapshot(target)[1]) == 5
    # Replaying again into the same target adds nothing (the wamids are already there).
    again = run("replay", "--from", database_url, "--to", target_url, database_url=database_url, flows_dir=flows_dir)
    assert again.stdout.strip() == "replayed 0 event(s), applied 0"
    assert snapshot(target) == snapshot(source)
    target.dispose()
    source.dispose()


def test_replay_refuses_its_own_source(sqlite_url: str) -> None:
    result = run("replay", "--from", sqlite_url, "--to", sqlite_url, database_url=sqlite_url)
    assert one_error_line(result) == "error: replay needs a fresh target database, not the source itself"


BAD_ARGUMENTS = [
    ("bogus",),
    ("replay",),
    ("sessions", "show", "only-one"),
    ("serve", "--port", "not-a-number"),
]


def test_bad_arguments_exit_2_with_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/unused.db"
    with ThreadPoolExecutor(4) as pool:  # independent processes: run them side by side
        results = list(pool.map(lambda args: run(*args, database_url=url), BAD_ARGUMENTS))
    for args, result in zip(BAD_ARGUMENTS, results, strict=True):
        assert result.returncode == 2, (args, result.stderr)
        line = one_error_line(result)
        assert line.startswith("python -m core"), line
        assert "error:" in line
    assert not (tmp_path / "unused.db").exists()  # nothing was opened


UNREACHABLE = [
    (("migrate",), "postgresql+psycopg://postgres@127.0.0.1:1/waflow"),
    (("process-pending",), "postgresql://postgres@127.0.0.1:5432/waflow_does_not_exist_db"),
    (("sessions", "show", "1", "2"), "mysql://root@127.0.0.1/waflow"),
    (("migrate",), "sqlite:////proc/waflow-nope/waflow.db"),
    (("serve", "--port", "1"), "postgresql+psycopg://postgres@127.0.0.1:1/waflow"),
    (("replay", "--from", "postgresql+psycopg://postgres@127.0.0.1:1/waflow", "--to", "sqlite:///:memory:"),
     "sqlite:///:memory:"),
]


def test_unreachable_database_exits_1_with_one_line() -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda case: run(*case[0], database_url=case[1]), UNREACHABLE))
    for (command, url), result in zip(UNREACHABLE, results, strict=True):
        assert result.returncode == 1, (command, url, result.stderr)
        line = one_error_line(result)
        assert line.startswith("error: "), line
        assert "127.0.0.1" in line or "mysql" in line or "sqlite" in line, line
