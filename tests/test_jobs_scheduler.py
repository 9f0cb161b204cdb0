"""Scheduling: once per slot, singleton runs, `python -m jobs --once`, two live schedulers on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, insert, select

from core import campaigns as api
from core.db import Database
from core.engine import Engine
from core.flows import FlowRegistry
from core.messages import InboundMessage
from core.models import FollowUp, JobRun, Outbox
from jobs.runs import last_runs, run_job
from jobs.scheduler import EPOCH, slot_of
from tests import graph_server as g
from tests.conftest import ROOT, free_port, make_settings, metric_total
from tests.factories import text

NOW = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)


def deliver(engine: Engine, *messages: InboundMessage) -> None:
    for key in engine.ingest(list(messages)).session_keys:
        engine.apply_all(key)


def runs(db: Database) -> list[JobRun]:
    with db.session() as s:
        return list(s.scalars(select(JobRun).order_by(JobRun.id)))


def test_a_slot_runs_once_and_every_run_is_recorded(db: Database) -> None:
    calls: list[datetime] = []

    def job(now: datetime) -> dict[str, Any]:
        calls.append(now)
        return {"done": len(calls)}

    first = run_job(db, "demo", job, now=NOW, owner="a", run_key="demo:1")
    second = run_job(db, "demo", job, now=NOW, owner="b", run_key="demo:1")
    third = run_job(db, "demo", job, now=NOW + timedelta(seconds=60), owner="b", run_key="demo:2")
    assert (first.status, second.status, third.status) == ("ok", "skipped", "ok")
    assert calls == [NOW, NOW + timedelta(seconds=60)]
    [a, b] = runs(db)
    assert (a.owner, a.ok, a.result, a.run_key) == ("a", True, {"done": 1}, "demo:1")
    assert a.finished_at is not None
    assert (b.owner, b.run_key) == ("b", "demo:2")

    def broken(_now: datetime) -> dict[str, Any]:
        raise ValueError("boom")

    failed = run_job(db, "broken", broken, now=NOW, owner="a", run_key="broken:1")
    assert failed.status == "error"
    row = runs(db)[-1]
    assert row.ok is False
    assert row.result == {"error": "ValueError: boom"}
    assert {r["job"]: r["ok"] for r in last_runs(db)} == {"demo": True, "broken": False}


def test_a_running_job_is_never_started_twice(db: Database) -> None:
    started = threading.Event()
    finish = threading.Event()
    outcomes: list[str] = []

    def slow(_now: datetime) -> dict[str, Any]:
        started.set()
        finish.wait(10)
        return {}

    worker = threading.Thread(target=lambda: outcomes.append(run_job(db, "slow", slow, now=NOW, owner="a",
                                                                    run_key="slow:1").status))
    worker.start()
    assert started.wait(10)
    # Another process, the next slot: the first run is still going, so this one does not start.
    second = run_job(db, "slow", lambda now: {"ran": True}, now=NOW + timedelta(seconds=1), owner="b",
                     run_key="slow:2")
    finish.set()
    worker.join(10)
    assert outcomes == ["ok"]
    assert second.status == "skipped"
    assert [r.run_key for r in runs(db)] == ["slow:1"]


def test_slots_are_shared_by_every_process() -> None:
    assert slot_of(EPOCH + timedelta(seconds=30), 30) == 1
    assert slot_of(EPOCH + timedelta(seconds=59.999), 30) == 1
    assert slot_of(EPOCH + timedelta(seconds=60), 30) == 2
    assert slot_of(EPOCH + timedelta(seconds=1.5), 0.5) == 3


def _env(database_url: str, flows_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "SEND_", "GRAPH_", "WHATSAPP_"))}
    env.update({"DATABASE_URL": database_url, "FLOWS_DIR": str(flows_dir), "PYTHONPATH": str(ROOT), **extra})
    return env


def test_once_runs_one_job_and_exits(sqlite_url: str, flows_dir: Path, registry: FlowRegistry) -> None:
    db = Database(sqlite_url)
    engine = Engine(db, registry, make_settings(sqlite_url, flows_dir))
    deliver(engine, text("u1", "hi", int(time.time()) - 10))
    done = subprocess.run(
        [sys.executable, "-m", "jobs", "--once", "sender", "--log-level", "WARNING"], cwd=ROOT,
        env=_env(sqlite_url, flows_dir, SEND_USER_SPACING_SECONDS="0"), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["job"] == "sender"
    assert report["status"] == "ok"
    assert report["result"]["sent"] == 1
    with db.session() as s:
        [row] = s.scalars(select(Outbox)).all()
        assert (row.status, row.wamid) == ("sent", f"wamid.dryrun.{row.id}")
    assert [r.job for r in runs(db)] == ["sender"]
    bad = subprocess.run([sys.executable, "-m", "jobs", "--once", "nope"], cwd=ROOT,
                         env=_env(sqlite_url, flows_dir), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "invalid choice" in bad.stderr
    db.dispose()


def test_unreachable_database_is_one_clear_line(flows_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jobs", "--once", "archive"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=_env("postgresql://nobody@127.0.0.1:1/none", flows_dir),
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: database unreachable")


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_two_live_schedulers_run_each_job_once(pg_url: str, flows_dir: Path, registry: FlowRegistry,
                                               tmp_path: Path) -> None:
    db = Database(pg_url)
    settings = make_settings(pg_url, flows_dir)
    engine = Engine(db, registry, settings)
    now = int(time.time())
    for i in range(6):  # stalled in ask_email for 3 h: the follow-up campaign targets them
        deliver(engine, text(f"stalled{i}", "hi", now - 3 * 3600 - 20), text(f"stalled{i}", "Ana", now - 3 * 3600))
    api.create_campaign(db, api.CampaignSpec(name="nudge", flow="lead_qualification", step="ask_email",
                                             delay_seconds=7200, text="Still there, {name}?"), registry)
    with db.begin() as conn:  # a message queued by another tool, not by a session: sent once too
        conn.execute(insert(Outbox).values(
            idempotency_key="seed", phone_number_id="1", user_id="x", kind="text",
            body={"type": "text", "text": {"body": "seed"}}, status="queued", next_attempt_at=datetime.now(UTC),
        ))
    with g.running() as graph:
        env = _env(
            pg_url, flows_dir, SEND_MODE="live", GRAPH_API_URL=graph.url, WHATSAPP_ACCESS_TOKEN="tok",
            SEND_USER_SPACING_SECONDS="0", SENDER_INTERVAL_SECONDS="0.5", FOLLOWUPS_INTERVAL_SECONDS="1",
            ARCHIVE_INTERVAL_SECONDS="1", SWEEPER_INTERVAL_SECONDS="1",
        )
        logs = [tmp_path / f"scheduler{i}.log" for i in range(2)]
        ports = [free_port() for _ in logs]
        procs = [
            subprocess.Popen([sys.executable, "-m", "jobs"], cwd=ROOT, env={**env, "JOBS_METRICS_PORT": str(port)},
                             stdout=log.open("w"), stderr=subprocess.STDOUT)
            for log, port in zip(logs, ports, strict=True)
        ]
        try:
            _wait_for(lambda: all("started" in log.read_text() for log in logs), 90, "both schedulers to start")
            # Messages keep arriving while both schedulers run.
            for i in range(20):
                deliver(engine, text(f"new{i}", "hi", int(time.time())))
                time.sleep(0.1)
            time.sleep(4)
            # Each scheduler serves its own metrics: together they count every send once.
            def metrics_match_sends() -> bool:
                with db.session() as s:
                    total = s.scalar(select(func.count()).select_from(Outbox))
                    sent = s.scalar(select(func.count()).select_from(Outbox).where(Outbox.status == "sent"))
                counted = sum(metric_total(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text,
                                           "waflow_outbox_results_total", result="sent")
                              for port in ports)
                return bool(total) and counted == sent == total

            _wait_for(metrics_match_sends, 30, "the schedulers' metrics to count every send")
            procs[0].send_signal(signal.SIGINT)
            procs[1].send_signal(signal.SIGTERM)
            codes = [p.wait(60) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        output = [log.read_text() for log in logs]
        assert codes == [0, 0], output
        assert all("Scheduler has been shut down" in text_ for text_ in output)
        # Both fired the same slots: the loser of each race logged a skip instead of running it again.
        assert sum(text_.count("skipped: run ") + text_.count("skipped: another process") for text_ in output) > 0

        with db.session() as s:
            rows = list(s.scalars(select(Outbox).where(Outbox.idempotency_key != "seed")))
            followups = list(s.scalars(select(FollowUp)))
        # 26 users' replies + 6 follow-ups, every one sent exactly once.
        assert len([r for r in rows if r.campaign_id is not None]) == 6
        assert len(followups) == 6
        assert {(r.status, r.attempts) for r in rows} == {("sent", 1)}
        sent_ids = Counter(r.json["biz_opaque_callback_data"] for r in graph.requests)
        seed = [r for r in graph.requests if r.json["to"] == "x"]
        assert len(seed) == 1
        assert len(sent_ids) == len(rows) + 1
        assert set(sent_ids.values()) == {1}

    all_runs = [r for r in runs(db) if r.run_key is not None]
    owners = {r.owner for r in all_runs}
    assert len(owners) == 2, "both schedulers should have run some jobs"
    for job in ("archive", "followups", "sender", "sweeper"):
        job_runs = sorted((r for r in all_runs if r.job == job), key=lambda r: r.started_at)
        assert len(job_runs) >= 3, job
        assert len({r.run_key for r in job_runs}) == len(job_runs)
        for before, after in zip(job_runs, job_runs[1:], strict=False):
            assert before.finished_at is not None
            assert after.started_at >= before.finished_at - timedelta(milliseconds=5), (job, before.id, after.id)
    db.dispose()


