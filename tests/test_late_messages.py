"""Late messages have a defined meaning: logged, never taken as an answer, never moving time backwards.

A message older (WhatsApp timestamp) than one already applied to its session was delivered late. It gets a
transition with outcome "late" (from = to = the current step) and result "late" on its inbound event, visible in
the admin view; it sends nothing and changes no data, step or time. A late STOP is still honoured; a late START
is not (it could undo a later STOP). The same second is not late. The webhook's apply thread waits
APPLY_REORDER_WAIT_MS before applying a user's new messages, so a burst delivered out of order sorts itself.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import func, select

from core import analytics
from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.flows import FlowRegistry
from core.machine import SessionState, decide
from core.messages import InboundMessage
from core.models import ChatSession, InboundEvent, Outbox, StepReach, Transition
from core.views import session_view
from core.worker import ApplyWorker
from tests.conftest import metric_total
from tests.factories import BASE_TS, PHONE, text
from tests.test_webhook_e2e import ADMIN, PN, Server, server_env, text_body, wait_applied

USER = "14155550301"


def when(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def deliver(engine: Engine, *messages: InboundMessage) -> None:
    for message in messages:  # one webhook POST each, applied before the next arrives
        for key in engine.ingest([message]).session_keys:
            engine.apply_all(key)


def session(db: Database, user: str = USER) -> ChatSession:
    with db.session() as s:
        row = s.get(ChatSession, (PHONE, user))
        assert row is not None
        s.expunge(row)
        return row


def transitions(db: Database, user: str = USER) -> list[Transition]:
    with db.session() as s:
        rows = list(s.scalars(select(Transition).where(Transition.user_id == user).order_by(Transition.id)))
        s.expunge_all()
        return rows


def result_of(db: Database, wamid: str) -> str | None:
    with db.session() as s:
        return s.scalar(select(InboundEvent.result).where(InboundEvent.wamid == wamid))


def replies_to(db: Database, wamid: str) -> list[str | None]:
    with db.session() as s:
        return list(s.scalars(select(Outbox.text).where(Outbox.in_reply_to == wamid)))


# ------------------------------------------------------------------------------------------ the pure rule


def test_the_machine_decides_what_is_late(registry: FlowRegistry) -> None:
    flow = registry.latest("lead_qualification")
    state = SessionState(step="ask_email", data={"name": "Dora"}, last_message_at=BASE_TS + 20)
    late = decide(flow, state, text(USER, "dora@example.com", BASE_TS + 19))
    assert (late.outcome, late.from_step, late.to_step, late.data, late.replies, late.late) == (
        "late", "ask_email", "ask_email", {"name": "Dora"}, (), True)
    same_second = decide(flow, state, text(USER, "dora@example.com", BASE_TS + 20))
    assert (same_second.outcome, same_second.late) == ("advanced", False)
    stop = decide(flow, state, text(USER, "STOP", BASE_TS + 1))
    assert (stop.outcome, stop.opted_out, stop.late, stop.to_step) == ("opted_out", True, True, "ask_email")
    start = decide(flow, SessionState(step="ask_email", last_message_at=BASE_TS + 20), text(USER, "START", BASE_TS))
    assert (start.outcome, start.opted_out, start.replies) == ("late", None, ())
    assert decide(flow, None, text(USER, "hi", BASE_TS)).outcome == "started"  # a new session has nothing to be late to


# ------------------------------------------------------------------------------------------ through the engine


def test_dora_then_a_late_hi_keeps_the_name(engine: Engine, db: Database) -> None:
    hello, dora, hi = text(USER, "hello", BASE_TS), text(USER, "Dora", BASE_TS + 20), text(USER, "hi", BASE_TS + 10)
    deliver(engine, hello, dora, hi)
    row = session(db)
    assert (row.current_step, row.data, row.version) == ("ask_email", {"name": "Dora"}, 3)
    # No time moved backwards: every time the session holds is Dora's.
    assert row.last_inbound_at == row.last_transition_at == row.step_entered_at == when(BASE_TS + 20)
    log = transitions(db)
    assert [(t.from_step, t.to_step, t.outcome) for t in log] == [
        (None, "ask_name", "started"), ("ask_name", "ask_email", "advanced"), ("ask_email", "ask_email", "late")]
    assert [t.at for t in log] == sorted(t.at for t in log)
    assert (log[-1].wamid, log[-1].at, log[-1].elapsed_seconds) == (hi.wamid, when(BASE_TS + 20), None)
    assert replies_to(db, hi.wamid) == []
    assert result_of(db, hi.wamid) == "late"
    # The admin view lists it with its own timestamp (inbound, by WhatsApp time) and its outcome.
    view = session_view(db, PHONE, USER)
    assert view is not None
    assert [(m["text"], m["result"]) for m in view["inbound"]] == [
        ("hello", "applied"), ("hi", "late"), ("Dora", "applied")]
    assert view["transitions"][-1]["outcome"] == "late"
    assert view["window_expires_at"] == when(BASE_TS + 20 + 86400).isoformat()


def test_the_same_second_is_not_late(engine: Engine, db: Database) -> None:
    deliver(engine, text(USER, "hello", BASE_TS), text(USER, "Dora", BASE_TS + 20),
            text(USER, "dora@example.com", BASE_TS + 20))
    assert [t.outcome for t in transitions(db)] == ["started", "advanced", "advanced"]
    assert session(db).data == {"name": "Dora", "email": "dora@example.com"}


def test_a_late_stop_is_honoured_and_a_late_start_is_not(engine: Engine, db: Database) -> None:
    stop, start = text(USER, "STOP", BASE_TS + 15), text(USER, "START", BASE_TS + 16)
    deliver(engine, text(USER, "hello", BASE_TS), text(USER, "Dora", BASE_TS + 20), stop)
    row = session(db)
    assert (row.opted_out, row.opted_out_at) == (True, when(BASE_TS + 15))
    assert (row.current_step, row.data, row.last_inbound_at) == ("ask_email", {"name": "Dora"}, when(BASE_TS + 20))
    assert [(t.outcome, t.elapsed_seconds) for t in transitions(db)][-1] == ("opted_out", None)
    assert result_of(db, stop.wamid) == "late"
    assert len(replies_to(db, stop.wamid)) == 1  # the confirmation: the user learns the STOP took effect
    deliver(engine, start)
    row = session(db)
    assert (row.opted_out, row.opted_out_at) == (True, when(BASE_TS + 15))
    assert transitions(db)[-1].outcome == "late"
    assert replies_to(db, start.wamid) == []


def test_analytics_ignore_late_messages(engine: Engine, db: Database, registry: FlowRegistry) -> None:
    flow = registry.latest("lead_qualification")
    deliver(engine, text("u1", "hello", BASE_TS), text("u1", "Ana", BASE_TS + 60),
            text("u1", "ana@example.com", BASE_TS + 120), text("u1", "Sevilla", BASE_TS + 300))
    deliver(engine, text("u2", "hello", BASE_TS + 10), text("u2", "Bob", BASE_TS + 200))

    def numbers() -> list[Any]:
        figures = [analytics.funnel(db, flow), analytics.time_to_complete(db, flow), analytics.transition_latency(db)]
        with db.session() as s:  # the funnel's rollup, as the funnel's refresh left it
            columns = (StepReach.user_id, StepReach.step, StepReach.first_at, StepReach.entered_at)
            return [*figures, sorted(tuple(r) for r in s.execute(select(*columns)))]

    before = numbers()
    sessions_before = [(r.current_step, r.status, r.data) for r in (session(db, "u1"), session(db, "u2"))]
    # Without the rule these would restart u1's finished run and take u2's stale message as an email.
    deliver(engine, text("u1", "hi again", BASE_TS + 30), text("u2", "bob@example.com", BASE_TS + 100))
    assert [r.current_step for r in (session(db, "u1"), session(db, "u2"))] == ["done", "ask_email"]
    assert [(r.current_step, r.status, r.data) for r in (session(db, "u1"), session(db, "u2"))] == sessions_before
    with db.session() as s:
        assert s.scalar(select(func.count()).where(Transition.outcome == "late")) == 2
    after = numbers()
    for old, new in zip(before, after, strict=True):
        if isinstance(old, pd.DataFrame):
            pd.testing.assert_frame_equal(old, new)
        else:
            assert old == new


# ------------------------------------------------------------------------------------------ the reorder wait


def wait_until_applied(engine: Engine, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.pending_count() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.pending_count() == 0


def test_the_reorder_wait_sorts_a_reversed_burst(engine: Engine, db: Database) -> None:
    assert Settings.model_fields["apply_reorder_wait_ms"].default == 200
    deliver(engine, text(USER, "hello", BASE_TS))
    email, name = text(USER, "bob@example.com", BASE_TS + 20), text(USER, "Bob", BASE_TS + 10)
    worker = ApplyWorker(engine, threads=1, reorder_wait=0.5)
    worker.start()
    try:
        for message in (email, name):  # two POSTs, the later message first
            worker.submit(engine.ingest([message]).session_keys)
        wait_until_applied(engine)
    finally:
        worker.stop()
    assert session(db).data == {"name": "Bob", "email": "bob@example.com"}
    assert [t.outcome for t in transitions(db)] == ["started", "advanced", "advanced"]

    # Without the wait, what arrives after its user was applied is late: never taken as the answer it was.
    other = "14155550302"
    deliver(engine, text(other, "hello", BASE_TS))
    worker = ApplyWorker(engine, threads=1, reorder_wait=0)
    worker.start()
    try:
        worker.submit(engine.ingest([text(other, "carla@example.com", BASE_TS + 20)]).session_keys)
        wait_until_applied(engine)
        worker.submit(engine.ingest([text(other, "Carla", BASE_TS + 10)]).session_keys)
        wait_until_applied(engine)
    finally:
        worker.stop()
    assert session(db, other).data == {"name": "carla@example.com"}
    assert [t.outcome for t in transitions(db, other)] == ["started", "advanced", "late"]


# ------------------------------------------------------------------------------------------ the real webhook


def test_through_the_webhook_a_reversed_burst_sorts_and_a_late_message_changes_nothing(
    database_url: str, flows_dir: Path, tmp_path: Path
) -> None:
    env = server_env(database_url, flows_dir, DEFAULT_FLOW="lead_qualification")
    server = Server(env, tmp_path / "server.log").start()
    db = Database(database_url)
    user, prefix = "14155550303", f"wamid.LATE.{uuid.uuid4().hex[:8]}."
    try:
        assert server.post(text_body(prefix + "1", user, "hello", BASE_TS)).status_code == 200
        assert len(wait_applied(db, prefix, 1)) == 1
        # A burst delivered in reverse, one POST each, within the reorder wait (200 ms by default).
        assert server.post(text_body(prefix + "3", user, "dora@example.com", BASE_TS + 20)).status_code == 200
        assert server.post(text_body(prefix + "2", user, "Dora", BASE_TS + 10)).status_code == 200
        assert len(wait_applied(db, prefix, 3)) == 3
        # Then an older message, long after the wait: late.
        assert server.post(text_body(prefix + "0", user, "hi", BASE_TS + 5)).status_code == 200
        assert len(wait_applied(db, prefix, 4)) == 4
        view = server.get(f"/admin/sessions/{PN}/{user}", headers=ADMIN).json()
        metrics_text = server.get("/metrics").text
    except BaseException:
        print(server.log())
        raise
    finally:
        server.stop()
        db.dispose()
    assert (view["step"], view["data"]) == ("ask_city", {"name": "Dora", "email": "dora@example.com"})
    assert [t["outcome"] for t in view["transitions"]] == ["started", "advanced", "advanced", "late"]
    times = [t["at"] for t in view["transitions"]]
    assert times == sorted(times)
    assert view["last_inbound_at"] == when(BASE_TS + 20).isoformat()
    assert [(m["text"], m["result"]) for m in view["inbound"]] == [
        ("hello", "applied"), ("hi", "late"), ("Dora", "applied"), ("dora@example.com", "applied")]
    assert metric_total(metrics_text, "waflow_quarantine_held", stage="apply") == 0
    assert "waflow_quarantine_held" in metrics_text
