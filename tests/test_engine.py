"""The session engine on SQLite and PostgreSQL: exactly once, in order, nothing lost."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select, update

from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.errors import DatabaseUnavailableError, UnknownFlowError
from core.flows import FlowRegistry
from core.messages import InboundMessage
from core.models import ChatSession, InboundEvent, Outbox, Transition
from core.views import session_view
from tests.conftest import make_settings
from tests.factories import BASE_TS, PHONE, PHONE_2, button, of_kind, text

USER = "14155550101"


def deliver(engine: Engine, *messages: InboundMessage) -> int:
    result = engine.ingest(list(messages))
    return sum(engine.apply_all(key) for key in result.session_keys)


def session_row(db: Database, user: str = USER, phone: str = PHONE) -> ChatSession | None:
    with db.session() as s:
        return s.get(ChatSession, (phone, user))


def transition_count(db: Database, **where: str) -> int:
    with db.session() as s:
        stmt = select(func.count()).select_from(Transition).filter_by(**where)
        return int(s.scalar(stmt) or 0)


def test_lead_flow_end_to_end(engine: Engine, db: Database) -> None:
    deliver(engine, text(USER, "hi", BASE_TS))
    deliver(engine, text(USER, "Ana María", BASE_TS + 10))
    deliver(engine, text(USER, "not-an-email", BASE_TS + 20))
    deliver(engine, text(USER, "ana@example.com", BASE_TS + 30))
    deliver(engine, text(USER, "Sevilla", BASE_TS + 95))
    view = session_view(db, PHONE, USER)
    assert view is not None
    assert view["status"] == "completed"
    assert view["step"] == "done"
    assert view["data"] == {"name": "Ana María", "email": "ana@example.com", "city": "Sevilla"}
    assert view["version"] == 5
    outcomes = [(t["from"], t["to"], t["outcome"]) for t in view["transitions"]]
    assert outcomes == [
        (None, "ask_name", "started"),
        ("ask_name", "ask_email", "advanced"),
        ("ask_email", "ask_email", "reprompted"),
        ("ask_email", "ask_city", "advanced"),
        ("ask_city", "done", "completed"),
    ]
    assert [m["text"] for m in view["inbound"]] == ["hi", "Ana María", "not-an-email", "ana@example.com", "Sevilla"]
    # one reply per message, each linked to the message that caused it
    assert len(view["outbound"]) == 5
    assert all(o["status"] == "queued" for o in view["outbound"])
    assert view["window_expires_at"] == datetime.fromtimestamp(BASE_TS + 95 + 86400, UTC).isoformat()
    with db.session() as s:
        elapsed = s.scalars(select(Transition.elapsed_seconds).order_by(Transition.id)).all()
    assert elapsed == [None, 10.0, 10.0, 10.0, 65.0]


def test_same_wamid_twice_applies_once(engine: Engine, db: Database) -> None:
    first = text(USER, "hi", BASE_TS)
    again = text(USER, "hi (retried delivery, other bytes)", BASE_TS, wamid_=first.wamid)
    assert engine.ingest([first]).stored == 1
    result = engine.ingest([again, again])
    assert (result.stored, result.duplicates, result.session_keys) == (0, 2, [])
    engine.process_pending()
    engine.process_pending()
    assert transition_count(db) == 1
    row = session_row(db)
    assert row is not None
    assert row.version == 1


def test_shuffled_batch_applies_in_timestamp_order(engine: Engine, db: Database) -> None:
    messages = [
        text(USER, "hi", BASE_TS),
        text(USER, "Bob", BASE_TS + 1),
        text(USER, "bob@example.com", BASE_TS + 2),
        text(USER, "Lima", BASE_TS + 3),
    ]
    shuffled = messages[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != messages
    deliver(engine, *shuffled)
    with db.session() as s:
        wamids = s.scalars(select(Transition.wamid).order_by(Transition.id)).all()
    assert wamids == [m.wamid for m in messages]
    row = session_row(db)
    assert row is not None
    assert row.data == {"name": "Bob", "email": "bob@example.com", "city": "Lima"}


def test_crash_between_store_and_apply_leaves_message_pending(engine: Engine, db: Database) -> None:
    engine.ingest([text(USER, "hi", BASE_TS), text("14155550102", "hello", BASE_TS)])
    # the process "dies" here: nothing applied yet
    assert engine.pending_count() == 2
    assert transition_count(db) == 0
    assert engine.process_pending() == 2
    assert engine.process_pending() == 0
    assert transition_count(db) == 2
    assert engine.pending_count() == 0


def test_failed_apply_rolls_back_everything(db: Database, registry: FlowRegistry, settings: Settings) -> None:
    engine = Engine(db, registry, settings)
    engine.ingest([text(USER, "hi", BASE_TS)])

    class Boom(Exception):
        pass

    def explode(*_args: object, **_kwargs: object) -> None:
        raise Boom

    original = engine.__class__.apply_pending
    from core.batch import UserBatch

    # Both write paths (Core and pipelined) ask what the session row needs before writing anything.
    real_state_change = UserBatch._state_change
    UserBatch._state_change = explode  # type: ignore[method-assign,assignment]
    try:
        with pytest.raises(Boom):
            engine.apply_pending((PHONE, USER))
    finally:
        UserBatch._state_change = real_state_change  # type: ignore[method-assign]
    assert original is engine.__class__.apply_pending
    assert session_row(db) is None
    assert engine.pending_count() == 1
    assert engine.process_pending() == 1
    assert transition_count(db) == 1


def test_reactions_statuses_unsupported_never_transition(engine: Engine, db: Database) -> None:
    deliver(engine, of_kind(USER, "reaction", BASE_TS, reacted_to="wamid.OUT1", emoji="👍"))
    assert session_row(db) is None  # no blank session for a reaction
    deliver(engine, text(USER, "hi", BASE_TS + 1))
    deliver(
        engine,
        of_kind(USER, "unsupported", BASE_TS + 2, errors=[{"code": 131051, "title": "Message type unknown"}]),
        of_kind(USER, "reaction", BASE_TS + 3, reacted_to="wamid.OUT1", emoji=None),
    )
    row = session_row(db)
    assert row is not None
    assert row.version == 1
    assert transition_count(db) == 1
    with db.session() as s:
        results = {kind: result for kind, result in s.execute(select(InboundEvent.kind, InboundEvent.result))}
    assert results == {"reaction": "ignored", "text": "applied", "unsupported": "ignored"}


def test_user_changed_number_moves_session(engine: Engine, db: Database) -> None:
    deliver(engine, text(USER, "hi", BASE_TS), text(USER, "Carla", BASE_TS + 1))
    change = of_kind(USER, "system", BASE_TS + 2, new_user_id="14155559999", text="User changed number")
    deliver(engine, change)
    assert session_row(db) is None
    moved = session_row(db, "14155559999")
    assert moved is not None
    assert (moved.current_step, moved.data, moved.version) == ("ask_email", {"name": "Carla"}, 2)
    deliver(engine, text("14155559999", "carla@example.com", BASE_TS + 3))
    moved = session_row(db, "14155559999")
    assert moved is not None
    assert moved.current_step == "ask_city"
    assert transition_count(db, user_id="14155559999") == 3
    # a message and the number change in one batch: what the message did moves with the session
    deliver(engine, text("14155551111", "hi", BASE_TS), text("14155551111", "Dana", BASE_TS + 1),
            of_kind("14155551111", "system", BASE_TS + 2, new_user_id="14155552222", text="User changed number"))
    assert session_row(db, "14155551111") is None
    moved = session_row(db, "14155552222")
    assert moved is not None
    assert (moved.status, moved.current_step, moved.data, moved.version) == ("active", "ask_email", {"name": "Dana"}, 2)
    assert transition_count(db, user_id="14155552222") == 2
    assert transition_count(db, user_id="14155551111") == 0
    # a number change for a user we never saw creates nothing
    deliver(engine, of_kind("14155550000", "system", BASE_TS, new_user_id="14155550001"))
    assert session_row(db, "14155550000") is None
    assert session_row(db, "14155550001") is None


def test_business_scoped_user_and_two_numbers_are_independent(engine: Engine, db: Database) -> None:
    bsuid = "US.13491208655302741918"
    deliver(engine, text(bsuid, "hi", BASE_TS), text(USER, "hi", BASE_TS, phone=PHONE_2))
    deliver(engine, text(USER, "hi", BASE_TS + 5))
    assert session_row(db, bsuid) is not None
    second = session_row(db, USER, PHONE_2)
    first = session_row(db, USER, PHONE)
    assert second is not None
    assert first is not None
    with db.session() as s:
        senders = s.execute(select(Outbox.phone_number_id, Outbox.user_id).order_by(Outbox.id)).all()
    assert sorted(senders) == sorted([(PHONE, bsuid), (PHONE_2, USER), (PHONE, USER)])


def test_archived_session_resumes_where_it_stopped(engine: Engine, db: Database) -> None:
    deliver(engine, text(USER, "hi", BASE_TS), text(USER, "Dana", BASE_TS + 1))
    with db.begin() as conn:
        conn.execute(
            update(ChatSession)
            .where(ChatSession.user_id == USER)
            .values(status="archived", archived_from="active", archived_at=datetime.now(UTC))
        )
    later = BASE_TS + 3 * 86400
    deliver(engine, text(USER, "hello again", later))
    row = session_row(db)
    assert row is not None
    assert (row.status, row.current_step, row.data, row.archived_at) == ("active", "ask_email", {"name": "Dana"}, None)
    view = session_view(db, PHONE, USER)
    assert view is not None
    assert view["transitions"][-1]["outcome"] == "restored"
    deliver(engine, text(USER, "dana@example.com", later + 5))
    row = session_row(db)
    assert row is not None
    assert row.current_step == "ask_city"


def test_stale_button_from_old_prompt(engine: Engine, db: Database, settings: Settings, registry: FlowRegistry) -> None:
    booking = Engine(db, registry, settings.model_copy(update={"default_flow": "service_booking"}))
    deliver(booking, text(USER, "hi", BASE_TS))
    with db.session() as s:
        first_prompt = s.scalars(select(Outbox).order_by(Outbox.id)).first()
        assert first_prompt is not None
        s.execute(update(Outbox).where(Outbox.id == first_prompt.id).values(wamid="wamid.OUT-PROMPT-1", status="sent"))
    deliver(booking, button(USER, "haircut", BASE_TS + 5, context_id="wamid.OUT-PROMPT-1"))
    row = session_row(db)
    assert row is not None
    assert row.current_step == "choose_date"
    # a second tap on the same old prompt must not advance again
    deliver(booking, button(USER, "beard", BASE_TS + 9, context_id="wamid.OUT-PROMPT-1"))
    row = session_row(db)
    assert row is not None
    assert (row.current_step, row.data["service"]) == ("choose_date", "haircut")
    view = session_view(db, PHONE, USER)
    assert view is not None
    assert view["transitions"][-1]["outcome"] == "stale"
    assert "moved on" in (view["outbound"][-1]["text"] or "")


def test_flow_version_is_pinned_per_session(
    db: Database, settings: Settings, flows_dir: Path, tmp_path: Path
) -> None:
    from core.flows import load_flows

    v1 = load_flows(flows_dir)
    engine_v1 = Engine(db, v1, settings)
    deliver(engine_v1, text(USER, "hi", BASE_TS), text(USER, "Eva", BASE_TS + 1))
    v2_dir = tmp_path / "flows"
    v2_dir.mkdir()
    for path in flows_dir.glob("*.yaml"):
        (v2_dir / path.name).write_text(path.read_text())
    source = (flows_dir / "lead_qualification.yaml").read_text()
    v2_text = source.replace("version: 1", "version: 2", 1).replace("What's the best email", "V2 email please", 1)
    (v2_dir / "lead_qualification_v2.yaml").write_text(v2_text)
    engine_v2 = Engine(db, load_flows(v2_dir), settings)
    deliver(engine_v2, text(USER, "eva@example.com", BASE_TS + 2), text("14155550109", "hi", BASE_TS + 3))
    old = session_row(db)
    new = session_row(db, "14155550109")
    assert old is not None
    assert new is not None
    assert (old.flow_version, new.flow_version) == (1, 2)
    with db.session() as s:
        versions = s.execute(select(Transition.user_id, Transition.flow_version)).all()
    assert sorted(set(versions)) == [("14155550101", 1), ("14155550109", 2)]


def test_bad_inputs_get_clear_errors(db: Database, registry: FlowRegistry, flows_dir: Path) -> None:
    with pytest.raises(ValidationError, match="user_id"):
        InboundMessage(phone_number_id=PHONE, user_id="", wamid="w1", timestamp=1, kind="text")
    with pytest.raises(ValidationError, match="timestamp must be Unix seconds"):
        InboundMessage(phone_number_id=PHONE, user_id=USER, wamid="w1", timestamp="12:00", kind="text")
    with pytest.raises(UnknownFlowError, match="nope"):
        Engine(db, registry, make_settings(str(db.url), flows_dir, default_flow="nope"))
    dead = Database("postgresql+psycopg://postgres@127.0.0.1:1/none")
    engine = Engine(dead, registry, make_settings("postgresql+psycopg://postgres@127.0.0.1:1/none", flows_dir))
    with pytest.raises(DatabaseUnavailableError, match="cannot store messages"):
        engine.ingest([text(USER, "hi", BASE_TS)])
    with pytest.raises(DatabaseUnavailableError, match="unreachable"):
        dead.ping()


def test_pending_older_than_is_left_to_live_workers(engine: Engine) -> None:
    engine.ingest([text(USER, "hi", BASE_TS)])
    assert engine.process_pending(older_than=timedelta(minutes=5)) == 0
    assert engine.process_pending() == 1


def test_new_session_language_from_the_number_prefix(
    db: Database, registry: FlowRegistry, flows_dir: Path
) -> None:
    settings = make_settings(str(db.url), flows_dir, language_by_prefix="34=es,3460=en")
    engine = Engine(db, registry, settings)
    deliver(engine, text("34611222333", "hola", BASE_TS), text("34600111222", "hi", BASE_TS), text(USER, "hi", BASE_TS))
    with db.session() as s:
        languages = dict(s.execute(select(ChatSession.user_id, ChatSession.language)).all())
        first_prompts = dict(s.execute(select(Outbox.user_id, Outbox.text)).all())
    assert languages == {"34611222333": "es", "34600111222": "en", USER: "en"}
    assert first_prompts["34611222333"].startswith("¡Hola!")
    assert first_prompts[USER].startswith("Hi!")
