"""Per-user serialization proven with real OS processes on PostgreSQL, and shown to be necessary."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import func, select

from core.db import Database
from core.models import ChatSession, Transition
from tests.concurrency_worker import deliver_all
from tests.conftest import PgServer
from tests.factories import BASE_TS, PHONE, text

HOT_USER = "14155550000"
PROCESSES = 8
HOT_PER_PROCESS = 50
OTHER_USERS = 200


def _plan(run: str) -> list[list[dict[str, object]]]:
    """8 workers: 50 distinct messages each for the hot user, plus a share of 200 other users (2 messages each)."""
    plans: list[list[dict[str, object]]] = [[] for _ in range(PROCESSES)]
    for worker in range(PROCESSES):
        for i in range(HOT_PER_PROCESS):
            ts = BASE_TS + i
            plans[worker].append(text(HOT_USER, f"hot {worker}-{i}", ts, wamid_=f"wamid.{run}.hot.{worker}.{i}"))
    for u in range(OTHER_USERS):
        user = f"1415600{u:04d}"
        for i in range(2):
            worker = (u + i) % PROCESSES
            plans[worker].append(text(user, f"m{i}", BASE_TS + i, wamid_=f"wamid.{run}.u{u}.{i}"))
    # interleave: hot-user and other-user messages alternate within every worker. Then all in one WhatsApp second:
    # across processes arrival order is arbitrary, and a message older than one applied is late (not counted).
    return [[m.model_copy(update={"timestamp": BASE_TS}).model_dump(mode="json")
             for m in sorted(p, key=lambda m: (m.timestamp, m.wamid))] for p in plans]


def _run(database_url: str, flows_dir: Path, lock_sessions: bool, run: str) -> int:
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 3.0  # spawn + imports take a moment; all workers then begin together
    with ctx.Pool(PROCESSES) as pool:
        jobs = [
            pool.apply_async(deliver_all, (database_url, str(flows_dir), plan, start_at, lock_sessions))
            for plan in _plan(run)
        ]
        return sum(job.get(timeout=240) for job in jobs)


def _sessions(db: Database) -> dict[str, tuple[int, int]]:
    with db.session() as s:
        rows = s.execute(select(ChatSession.user_id, ChatSession.version, ChatSession.data)).all()
    return {user: (version, int(data.get("count", 0))) for user, version, data in rows}


def test_hot_user_is_exact_under_eight_processes_and_naive_path_loses_updates(
    pg_url: str, flows_dir: Path, pg_server: PgServer
) -> None:
    applied = _run(pg_url, flows_dir, lock_sessions=True, run="locked")
    expected_total = PROCESSES * HOT_PER_PROCESS + OTHER_USERS * 2
    assert applied == expected_total
    db = Database(pg_url)
    sessions = _sessions(db)
    assert sessions[HOT_USER] == (400, 400)
    off = {u: vc for u, vc in sessions.items() if u != HOT_USER and vc != (2, 2)}
    assert off == {}
    assert len(sessions) == OTHER_USERS + 1
    with db.session() as s:
        per_wamid = Counter(s.scalars(select(Transition.wamid)).all())
        assert s.scalar(select(func.count()).select_from(Transition)) == expected_total
    assert set(per_wamid.values()) == {1}
    db.dispose()

    # Control: the same load through a naive read-then-write applier (no session lock), in a fresh database,
    # must lose updates: this proves the test above can fail.
    name = f"{pg_url.rsplit('/', 1)[1]}_naive"
    naive_url = pg_server.create(name, template=pg_server.template)
    try:
        _run(naive_url, flows_dir, lock_sessions=False, run="naive")
        naive_db = Database(naive_url)
        version, count = _sessions(naive_db)[HOT_USER]
        naive_db.dispose()
    finally:
        pg_server.drop(name)
    assert version < 400 or count < 400, "the naive path should have lost updates under this load"


def test_same_wamid_from_two_processes_applies_once(pg_url: str, flows_dir: Path) -> None:
    message = text("14155550123", "hi", BASE_TS, wamid_="wamid.dup.concurrent").model_dump(mode="json")
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 2.0
    with ctx.Pool(2) as pool:
        jobs = [pool.apply_async(deliver_all, (pg_url, str(flows_dir), [message], start_at, True)) for _ in range(2)]
        applied = sum(job.get(timeout=120) for job in jobs)
    assert applied == 1
    db = Database(pg_url)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Transition)) == 1
        session = s.get(ChatSession, (PHONE, "14155550123"))
        assert session is not None
        assert session.version == 1
    db.dispose()
