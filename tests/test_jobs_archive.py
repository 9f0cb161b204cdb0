"""Archive job and sweeper: idle sessions archived in batches, nothing lost, pending messages recovered."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select, text

from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.flows import FlowRegistry
from core.messages import InboundMessage
from core.models import ChatSession, InboundEvent
from core.views import session_view
from jobs.archive import run_archive
from jobs.sweeper import run_sweeper
from tests.conftest import make_settings
from tests.factories import PHONE
from tests.factories import text as msg

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def ts(at: datetime) -> int:
    return int(at.timestamp())


def deliver(engine: Engine, *messages: InboundMessage) -> None:
    for key in engine.ingest(list(messages)).session_keys:
        engine.apply_all(key)


def sessions(db: Database) -> dict[str, ChatSession]:
    with db.session() as s:
        return {x.user_id: x for x in s.scalars(select(ChatSession))}


def test_idle_and_completed_sessions_are_archived_in_batches(engine: Engine, db: Database, settings: Settings) -> None:
    for i in range(7):
        deliver(engine, msg(f"idle{i}", "hi", ts(NOW - timedelta(hours=30 + i))))
    deliver(engine, msg("recent", "hi", ts(NOW - timedelta(hours=2))))
    done_at = NOW - timedelta(hours=2)
    deliver(
        engine,
        msg("done", "hi", ts(done_at) - 40),
        msg("done", "Ana", ts(done_at) - 30),
        msg("done", "ana@example.com", ts(done_at) - 20),
        msg("done", "Sevilla", ts(done_at) - 10),
    )
    deliver(engine, msg("old-done", "hi", ts(NOW - timedelta(days=3))))
    deliver(engine, msg("old-done", "Bo", ts(NOW - timedelta(days=3)) + 1))
    deliver(engine, msg("old-done", "bo@example.com", ts(NOW - timedelta(days=3)) + 2))
    deliver(engine, msg("old-done", "Lima", ts(NOW - timedelta(days=3)) + 3))
    assert sessions(db)["old-done"].status == "completed"

    result = run_archive(db, settings, NOW, batch_size=3)
    assert result["archived"] == 8
    assert result["from_active"] == 7
    assert result["from_completed"] == 1
    assert result["batches"] >= 4  # 7 active in batches of 3, then the completed ones
    rows = sessions(db)
    assert {u for u, s in rows.items() if s.status == "archived"} == {f"idle{i}" for i in range(7)} | {"old-done"}
    assert rows["recent"].status == "active"
    assert rows["done"].status == "completed"  # completed, but not idle long enough yet
    assert rows["old-done"].archived_from == "completed"
    assert rows["idle0"].archived_from == "active"
    assert rows["idle0"].archived_at == NOW
    assert rows["idle0"].current_step == "ask_name"  # progress kept
    assert run_archive(db, settings, NOW)["archived"] == 0


def test_archived_user_who_writes_again_resumes_where_they_stopped(engine: Engine, db: Database,
                                                                   settings: Settings) -> None:
    start = NOW - timedelta(days=2)
    deliver(engine, msg("u1", "hi", ts(start)), msg("u1", "Ana", ts(start) + 10))
    assert run_archive(db, settings, NOW)["archived"] == 1
    view = session_view(db, PHONE, "u1")
    assert view is not None
    assert (view["status"], view["step"], view["data"]) == ("archived", "ask_email", {"name": "Ana"})

    deliver(engine, msg("u1", "hello again", ts(NOW)))
    view = session_view(db, PHONE, "u1")
    assert view is not None
    assert (view["status"], view["step"], view["data"]) == ("active", "ask_email", {"name": "Ana"})
    assert view["transitions"][-1]["outcome"] == "restored"
    assert view["archived_at"] is None
    deliver(engine, msg("u1", "ana@example.com", ts(NOW) + 5))
    view = session_view(db, PHONE, "u1")
    assert view is not None
    assert view["step"] == "ask_city"
    assert view["data"] == {"name": "Ana", "email": "ana@example.com"}


def test_archive_never_waits_on_a_session_being_applied(pg_url: str, flows_dir: Path, registry: FlowRegistry) -> None:
    """PostgreSQL (SQLite has one writer at a time, so there is no row lock to skip)."""
    settings = make_settings(pg_url, flows_dir)
    db = Database(pg_url)
    engine = Engine(db, registry, settings)
    for user in ("busy", "free"):
        deliver(engine, msg(user, "hi", ts(NOW - timedelta(days=2))))
    locked = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:  # what the engine does while applying a message: the session row locked
        with db.begin() as conn:
            conn.execute(text("SELECT 1 FROM sessions WHERE user_id = 'busy' FOR UPDATE"))
            locked.set()
            release.wait(10)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    assert locked.wait(10)
    started = time.monotonic()
    result = run_archive(db, settings, NOW)
    elapsed = time.monotonic() - started
    release.set()
    holder.join()
    assert elapsed < 8  # waiting on the lock would take the full 10 s hold
    assert result["archived"] == 1
    assert sessions(db)["busy"].status == "active"
    assert sessions(db)["free"].status == "archived"
    assert run_archive(db, settings, NOW)["archived"] == 1  # the next run gets it
    db.dispose()


def test_sweeper_applies_messages_left_pending(engine: Engine, db: Database, settings: Settings) -> None:
    # A webhook stored these and crashed before applying them.
    stored_at = datetime.now(UTC) - timedelta(minutes=5)
    first = engine.ingest([msg("u1", "hi", ts(NOW)), msg("u1", "Ana", ts(NOW) + 5)], now=stored_at)
    fresh = engine.ingest([msg("u2", "hi", ts(NOW))])  # just stored: its own worker is on it, not the sweeper's
    assert first.stored == 2
    assert fresh.stored == 1
    result = run_sweeper(db, settings, datetime.now(UTC), engine=engine)
    assert result["applied"] == 2
    view = session_view(db, PHONE, "u1")
    assert view is not None
    assert view["step"] == "ask_email"
    with db.session() as s:
        pending = s.scalars(select(InboundEvent.user_id).where(InboundEvent.processed_at.is_(None))).all()
    assert pending == ["u2"]
    assert run_sweeper(db, settings, datetime.now(UTC), engine=engine)["applied"] == 0
