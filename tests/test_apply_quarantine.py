"""What cannot be applied is tried a bounded number of times, then quarantined; nobody else ever waits on it.

The poison of choice is the real one: a flow file replaced without its old version, the step a session stands
in renamed. Its user's next message fails on every try: it is tried `APPLY_MAX_ATTEMPTS` times (the user's
later messages wait behind it, in order), then quarantined with the error, and after that the user's later
messages and everybody else's go on; the sweeper and `process-pending` report it and go on. On PostgreSQL a
value the database itself refuses (a data error, which rolls back a whole joint transaction) gets the same
treatment, and the pipelined path leaves exactly the rows the Core path leaves.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import core.engine as engine_module
from core import metrics
from core.analytics import quarantine_counts, quarantined_recent
from core.batch import ApplyResult
from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.errors import WaflowError
from core.flows import load_flows
from core.messages import InboundMessage
from core.models import ChatSession, InboundEvent, Outbox, QuarantinedMessage, Transition
from core.quarantine import retry
from jobs.sweeper import run_sweeper
from tests import factories
from tests.conftest import ROOT, make_settings, metric_total
from tests.factories import BASE_TS, PHONE, text
from tests.test_dashboard_apptest import app, open_page, texts, users_env  # noqa: F401 (a fixture)

STUCK = "14155550201"  # stands in the step the new flow file renamed
OTHER = "14155550202"
QUIZ_V1 = """
name: quiz
version: 1
start: ask_name
reset_keywords: [restart]
steps:
  - id: ask_name
    input: text
    key: name
    prompt: "Your name?"
    next: ask_city
  - id: ask_city
    input: text
    key: city
    prompt: "Your city, {name}?"
    next: done
  - id: done
    terminal: true
    prompt: "Thanks {name} from {city}!"
"""
# Version 2 renames ask_city; the file of version 1 is removed when it is deployed.
QUIZ_V2 = QUIZ_V1.replace("version: 1", "version: 2").replace("ask_city", "ask_town")


def now() -> datetime:
    return datetime.now(UTC)


def quiz_settings(database_url: str, flows: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"default_flow": "quiz", "sweeper_pending_age_seconds": 0, **overrides}
    return make_settings(database_url, flows, **values)


def quiz_engine(db: Database, flows: Path, **overrides: Any) -> Engine:
    return Engine(db, load_flows(flows), quiz_settings(str(db.url), flows, **overrides))


@pytest.fixture
def flows(tmp_path: Path) -> Path:
    directory = tmp_path / "flows"
    directory.mkdir()
    (directory / "quiz.yaml").write_text(QUIZ_V1)
    return directory


def replace_flow(flows: Path) -> None:
    """Deploy version 2 the careless way: its file in, version 1's file out."""
    (flows / "quiz_v2.yaml").write_text(QUIZ_V2)
    (flows / "quiz.yaml").unlink()


def stuck_user(db: Database, flows: Path) -> Engine:
    """STUCK stands in ask_city of version 1; returns an engine that loaded version 2 only."""
    v1 = quiz_engine(db, flows)
    for message in (text(STUCK, "hi", BASE_TS), text(STUCK, "Dora", BASE_TS + 10)):
        assert v1.deliver([message]).applied == 1
    replace_flow(flows)
    return quiz_engine(db, flows)


def event(db: Database, wamid: str) -> InboundEvent:
    with db.session() as s:
        row = s.scalars(select(InboundEvent).where(InboundEvent.wamid == wamid)).one()
        s.expunge(row)
        return row


def held(db: Database) -> list[QuarantinedMessage]:
    with db.session() as s:
        rows = list(s.scalars(select(QuarantinedMessage).order_by(QuarantinedMessage.id)))
        s.expunge_all()
        return rows


def session_of(db: Database, user: str) -> ChatSession:
    with db.session() as s:
        row = s.get(ChatSession, (PHONE, user))
        assert row is not None
        s.expunge(row)
        return row


def transitions_of(db: Database, wamid: str) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(Transition.outcome).where(Transition.wamid == wamid)))


def test_replaced_flow_is_tried_then_quarantined_and_retry_applies_it_once(db: Database, flows: Path) -> None:
    engine = stuck_user(db, flows)
    paris = text(STUCK, "Paris", BASE_TS + 20)
    engine.ingest([paris])

    # Try 1: the webhook's apply. It fails, is counted, and the message stays pending.
    assert engine.apply_user((PHONE, STUCK)) == ApplyResult(failed=1)
    first = event(db, paris.wamid)
    assert (first.processed_at, first.apply_attempts) == (None, 1)
    assert first.apply_error is not None
    assert "ask_city" in first.apply_error

    # Try 2: process-pending, which applies another user on the way and reports the failure.
    engine.ingest([text(OTHER, "hello", BASE_TS + 21)])
    report = engine.process_pending_report()
    assert (report.applied, report.failed, report.quarantined, report.errors) == (1, 1, 0, 0)
    assert event(db, paris.wamid).apply_attempts == 2
    assert session_of(db, OTHER).current_step == "ask_name"

    # Try 3 (APPLY_MAX_ATTEMPTS): the sweeper quarantines it, and goes on with its other work.
    engine.ingest([text(OTHER, "Olga", BASE_TS + 22)])
    result = run_sweeper(db, engine.settings, now(), engine=engine)
    assert (result["applied"], result["apply_failed"], result["quarantined"], result["apply_errors"]) == (1, 0, 1, 0)
    poisoned = event(db, paris.wamid)
    assert (poisoned.result, poisoned.apply_attempts) == ("quarantined", 3)
    assert poisoned.processed_at is not None
    [entry] = held(db)
    assert (entry.stage, entry.status, entry.wamid, entry.event_id) == ("apply", "held", paris.wamid, poisoned.id)
    assert "ask_city" in entry.reason
    assert "FlowDefinitionError" in entry.reason
    assert engine.pending_count() == 0
    assert engine.process_pending_report().failed == 0  # quarantined: never tried again on its own
    assert transitions_of(db, paris.wamid) == []
    assert session_of(db, STUCK).flow_version == 1  # what the failed tries decided was undone

    # Visible: /metrics and the Health page.
    assert engine.quarantine_count() == {"intake": 0, "apply": 1}
    assert metric_total(metrics.render().decode(), "waflow_quarantine_held", stage="apply") == 1
    assert dict(zip(*quarantine_counts(db).to_dict("list").values(), strict=True)) == {"intake": 0, "apply": 1}
    assert quarantined_recent(db)["wamid"].tolist() == [paris.wamid]

    # The fix: version 1 is back. Retrying applies the message exactly once, however often anything runs after.
    (flows / "quiz.yaml").write_text(QUIZ_V1)
    fixed = quiz_engine(db, flows)
    assert retry(db, fixed, [entry.id], actor="ops", reason="quiz v1 restored", now=now()).retried == 1
    fixed.process_pending()
    run_sweeper(db, fixed.settings, now(), engine=fixed)
    assert transitions_of(db, paris.wamid) == ["completed"]
    assert session_of(db, STUCK).data == {"name": "Dora", "city": "Paris"}
    retried = event(db, paris.wamid)
    assert (retried.result, retried.apply_attempts, retried.apply_error) == ("applied", 0, None)
    assert [h.status for h in held(db)] == ["retried"]
    with pytest.raises(WaflowError, match="not held any more"):
        retry(db, fixed, [entry.id], actor="ops", reason="twice", now=now())
    assert fixed.quarantine_count()["apply"] == 0


def test_later_messages_wait_behind_a_failing_one_then_go_on(db: Database, flows: Path) -> None:
    engine = stuck_user(db, flows)
    paris, restart = text(STUCK, "Paris", BASE_TS + 20), text(STUCK, "restart", BASE_TS + 21)
    engine.ingest([restart, paris])
    for attempt in (1, 2):
        assert engine.apply_user((PHONE, STUCK)) == ApplyResult(failed=1)
        # Per-user order: the later message is not applied ahead of the one that failed.
        assert (event(db, paris.wamid).apply_attempts, event(db, restart.wamid).processed_at) == (attempt, None)
    assert engine.apply_all((PHONE, STUCK)) == 1  # the third failure quarantines it; "restart" goes on
    assert event(db, paris.wamid).result == "quarantined"
    assert transitions_of(db, restart.wamid) == ["reset"]
    stuck = session_of(db, STUCK)
    assert (stuck.current_step, stuck.flow_version, stuck.data) == ("ask_name", 2, {})
    assert engine.pending_count() == 0


def test_attempts_follow_the_setting(db: Database, flows: Path) -> None:
    assert Settings.model_fields["apply_max_attempts"].default == 3
    stuck_user(db, flows)
    engine = quiz_engine(db, flows, apply_max_attempts=1)
    paris = text(STUCK, "Paris", BASE_TS + 20)
    engine.ingest([paris])
    assert engine.apply_user((PHONE, STUCK)) == ApplyResult(quarantined=1)
    assert (event(db, paris.wamid).result, event(db, paris.wamid).apply_attempts) == ("quarantined", 1)


def test_process_pending_command_reports_and_goes_on(database_url: str, db: Database, flows: Path) -> None:
    engine = stuck_user(db, flows)
    engine.ingest([text(STUCK, "Paris", BASE_TS + 20), text(OTHER, "hello", BASE_TS + 20)])
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "FLOWS_DIR", "DEFAULT_FLOW")}
    env.update(DATABASE_URL=database_url, FLOWS_DIR=str(flows), DEFAULT_FLOW="quiz", APPLY_MAX_ATTEMPTS="2")
    for expected in ("applied 1 pending message(s)\n1 message(s) failed to apply", "1 message(s) quarantined"):
        done = subprocess.run([sys.executable, "-m", "core", "process-pending"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout
    assert session_of(db, OTHER).current_step == "ask_name"
    assert [h.status for h in held(db)] == ["held"]


@pytest.mark.usefixtures("users_env")
def test_the_health_page_shows_what_is_held(sqlite_url: str, flows: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = Database(sqlite_url)
    stuck_user(db, flows)
    paris = text(STUCK, "Paris", BASE_TS + 20)
    engine = quiz_engine(db, flows, apply_max_attempts=1)
    engine.deliver([paris])
    db.dispose()
    # Streamlit installs the page as __main__ and leaves it there: processes spawned by later tests would run it.
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    page = open_page(app(sqlite_url, monkeypatch), "health")
    assert "Quarantine: 1 message(s) held, 1 that failed to apply" in texts(page)
    [listed] = [d.value for d in page.dataframe if "reason" in d.value.columns]
    assert listed["wamid"].tolist() == [paris.wamid]
    assert "ask_city" in listed["reason"][0]


# --------------------------------------------------------------------------- what the database refuses


def refused(user: str, body: str, ts: int) -> InboundMessage:
    """A message PostgreSQL stores (the profile name is inside its JSON) but refuses to write to the session:
    sessions.profile_name is varchar(256). Meta does not bound profile names; intake does not either."""
    return text(user, body, ts, profile_name="N" * 300)


def test_a_value_the_database_refuses_is_found_counted_and_quarantined(pg_url: str, flows: Path) -> None:
    db = Database(pg_url)
    engine = quiz_engine(db, flows)
    poison = refused(STUCK, "Dora", BASE_TS + 1)
    first, later = text(STUCK, "hi", BASE_TS), text(STUCK, "restart", BASE_TS + 2)
    others = [text(f"1415555030{i}", "hi", BASE_TS) for i in range(3)]
    joint: list[Any] = []
    real = engine_module.apply_pipelined_together

    def spy(*args: Any) -> Any:
        try:
            joint.append(real(*args))
        except Exception as e:
            joint.append(e)
            raise
        return joint[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_module, "apply_pipelined_together", spy)
        stored = engine.ingest([first, poison, later, *others])
        rest = engine.apply_together(stored.session_keys)
    # The joint transaction was refused as a whole: everybody was then applied one by one.
    assert [type(j).__name__ for j in joint] == ["WriteRefusedError"]
    assert sorted(rest) == sorted(stored.session_keys)
    for key in rest:
        engine.apply_all(key)
    assert all(session_of(db, m.user_id).current_step == "ask_name" for m in others)
    # One message per transaction found the one at fault: "hi" went through, "Dora" was counted, "restart" waits.
    assert transitions_of(db, first.wamid) == ["started"]
    assert event(db, poison.wamid).apply_attempts == 1
    assert "value too long" in (event(db, poison.wamid).apply_error or "")
    assert event(db, later.wamid).processed_at is None
    engine.process_pending()
    assert event(db, poison.wamid).apply_attempts == 2
    assert run_sweeper(db, engine.settings, now(), engine=engine)["quarantined"] == 1
    assert event(db, poison.wamid).result == "quarantined"
    assert transitions_of(db, later.wamid) == ["reset"]
    assert [(h.stage, h.wamid) for h in held(db)] == [("apply", poison.wamid)]
    assert engine.pending_count() == 0
    # Engine.deliver (store and apply in one transaction) stores what was refused and applies the rest.
    again = refused("14155550299", "hi", BASE_TS)
    delivered = engine.deliver([again, text("14155550298", "hi", BASE_TS)])
    assert (delivered.stored, delivered.applied) == (2, 1)
    assert event(db, again.wamid).apply_attempts == 1
    db.dispose()


# --------------------------------------------------------------------------------------------- parity


def _failing_story(url: str, flows: Path) -> dict[str, list[tuple[Any, ...]]]:
    db = Database(url)
    engine = stuck_user(db, flows)
    stuck = [text(STUCK, "Paris", BASE_TS + 20), text(STUCK, "restart", BASE_TS + 21)]
    posts = [[stuck[0], text(OTHER, "hello", BASE_TS + 20)], [stuck[1], text(OTHER, "Olga", BASE_TS + 22)],
             [text("14155550203", "hi", BASE_TS + 23)]]
    for post in posts:  # the webhook's way: store, then apply the users together where the database allows
        for key in engine.apply_together(engine.ingest(post).session_keys):
            engine.apply_all(key)
    engine.process_pending()
    engine.process_pending()
    # Ids and what derives from them (the order rows are inserted in differs) and the clock's times.
    skip = {"id", "event_id", "fingerprint", "created_at", "updated_at", "applied_at", "next_attempt_at",
            "processed_at", "received_at", "first_seen_at", "last_seen_at"}

    def rows(model: Any, *order: Any) -> list[tuple[Any, ...]]:
        columns = [c for c in model.__table__.columns if c.name not in skip]
        with db.begin() as conn:
            return [tuple(r) for r in conn.execute(select(*columns).order_by(*order))]

    dumped = {
        "sessions": rows(ChatSession, ChatSession.user_id),
        "transitions": rows(Transition, Transition.wamid),
        "outbox": rows(Outbox, Outbox.idempotency_key),
        "events": rows(InboundEvent, InboundEvent.wamid),
        "quarantine": rows(QuarantinedMessage, QuarantinedMessage.wamid),
    }
    db.dispose()
    return dumped


def test_pipelined_path_fails_and_quarantines_as_the_core_path_does(
    sqlite_url: str, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[ApplyResult | None] = []
    real = engine_module.apply_pipelined

    def spy(*args: Any, **kwargs: Any) -> ApplyResult | None:
        taken.append(real(*args, **kwargs))
        return taken[-1]

    monkeypatch.setattr(engine_module, "apply_pipelined", spy)
    stories = []
    flows = tmp_path / "flows"
    flows.mkdir()
    for url in (sqlite_url, pg_url):
        # The same directory both times: the error recorded names the flow file.
        (flows / "quiz_v2.yaml").unlink(missing_ok=True)
        (flows / "quiz.yaml").write_text(QUIZ_V1)
        monkeypatch.setattr(factories, "_counter", itertools.count(1))  # the same wamids both times
        stories.append(_failing_story(url, flows))
    core_rows, pipelined_rows = stories
    assert any(r is not None and r.applied for r in taken)  # PostgreSQL's happy path was pipelined...
    assert None in taken  # ...and the failing user's batches went to the Core path
    for table, expected in core_rows.items():
        assert pipelined_rows[table] == expected, table
    events = {row[1]: row for row in core_rows["events"]}
    assert sum(row.count("quarantined") for row in events.values()) == 1
    assert len(core_rows["quarantine"]) == 1
