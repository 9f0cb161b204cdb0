"""PostgreSQL's pipelined apply path writes exactly what the Core path writes.

The same conversations go through SQLite (always the Core path) and PostgreSQL (pipelined, falling back to
Core for a number change); every row the engine writes must come out the same on both."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy import text as sql_text

import core.engine as engine_module
from core.batch import STATE_COLUMNS, ApplyResult
from core.db import Database
from core.engine import Engine
from core.errors import DatabaseUnavailableError
from core.flows import load_flows
from core.messages import InboundMessage
from core.models import ChatSession, InboundEvent, Outbox, Transition
from tests.conftest import make_settings
from tests.factories import BASE_TS, PHONE, PHONE_2, button, of_kind, text

LEAD = "14155550101"
BOOKER = "14155550102"
BATCHER = "34600000003"  # a Spanish number: LANGUAGE_BY_PREFIX starts it in Spanish
MOVER = "14155550104"
NEWCOMER = "14155550105"


def _conversations() -> list[list[InboundMessage]]:
    """Deliveries in order; each inner list is one webhook POST (several messages for one user included)."""
    return [
        [text(LEAD, "hi", BASE_TS)],
        [text(LEAD, "Ana", BASE_TS + 5)],
        [text(LEAD, "not-an-email", BASE_TS + 9)],
        [of_kind(LEAD, "reaction", BASE_TS + 10, reacted_to="wamid.X", emoji="👍")],
        [text(LEAD, "ana@example.com", BASE_TS + 12)],
        [text(BOOKER, "hello", BASE_TS + 1, phone=PHONE_2)],
        [button(BOOKER, "haircut", BASE_TS + 20, phone=PHONE_2, context_id="wamid.OUT.service")],
        [button(BOOKER, "beard", BASE_TS + 25, phone=PHONE_2, context_id="wamid.OUT.service")],  # moved on
        # One POST, three messages of one user, shuffled: applied in timestamp order in one batch.
        [text(BATCHER, "b@example.com", BASE_TS + 32), text(BATCHER, "hola", BASE_TS + 30),
         text(BATCHER, "Bea", BASE_TS + 31)],
        [text(BATCHER, "start over", BASE_TS + 40)],
        [text(MOVER, "hi", BASE_TS + 50)],
        [of_kind(MOVER, "system", BASE_TS + 51, new_user_id="14155550999")],
        [text("14155550999", "Moe", BASE_TS + 52)],
        # One POST for several users (applied together on PostgreSQL), one of them with two messages.
        [text(LEAD, "Sevilla", BASE_TS + 60), button(BOOKER, "2026-12-02", BASE_TS + 61, phone=PHONE_2),
         text(BATCHER, "Bea", BASE_TS + 62), text(BATCHER, "bea@example.com", BASE_TS + 63),
         text(NEWCOMER, "hi", BASE_TS + 64)],
    ]


def _run(
    url: str, flows_dir: Path, deliveries: list[list[InboundMessage]], *, deliver: bool = False
) -> dict[str, list[tuple[Any, ...]]]:
    """Every delivery through ingest + joint apply (the webhook's way) or `Engine.deliver`; the rows written."""
    settings = make_settings(url, flows_dir, flow_routes=f"{PHONE_2}=service_booking", language_by_prefix="34=es")
    db = Database(url)
    engine = Engine(db, load_flows(flows_dir), settings)
    for delivery in deliveries:
        if deliver:
            result = engine.deliver(delivery)
            assert (result.stored, result.duplicates) == (len(delivery), 0)
        else:
            for key in engine.apply_together(engine.ingest(delivery).session_keys):
                engine.apply_all(key)
        with db.begin() as conn:  # the sender recorded the wamid of the first service prompt
            conn.execute(
                update(Outbox)
                .where(Outbox.user_id == BOOKER, Outbox.step == "choose_service", Outbox.wamid.is_(None))
                .values(wamid="wamid.OUT.service")
            )
    assert engine.pending_count() == 0
    skip = {"id", "created_at", "updated_at", "applied_at", "next_attempt_at", "processed_at", "received_at"}

    def rows(model: Any, *order: Any) -> list[tuple[Any, ...]]:
        columns = [c for c in model.__table__.columns if c.name not in skip]
        with db.begin() as conn:
            return [tuple(r) for r in conn.execute(select(*columns).order_by(*order))]

    dumped = {
        "sessions": rows(ChatSession, ChatSession.phone_number_id, ChatSession.user_id),
        "transitions": rows(Transition, Transition.wamid),
        "outbox": rows(Outbox, Outbox.idempotency_key),
        "events": rows(InboundEvent, InboundEvent.wamid),
    }
    db.dispose()
    return dumped


def test_pipelined_path_writes_what_the_core_path_writes(
    sqlite_url: str, pg_url: str, flows_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[ApplyResult | None] = []
    together: list[dict[Any, ApplyResult] | None] = []
    real, real_together = engine_module.apply_pipelined, engine_module.apply_pipelined_together

    def spy(*args: Any, **kwargs: Any) -> ApplyResult | None:
        result = real(*args, **kwargs)
        taken.append(result)
        return result

    def spy_together(*args: Any) -> dict[Any, ApplyResult] | None:
        results = real_together(*args)
        together.append(results)
        return results

    monkeypatch.setattr(engine_module, "apply_pipelined", spy)
    monkeypatch.setattr(engine_module, "apply_pipelined_together", spy_together)
    deliveries = _conversations()
    core_rows = _run(sqlite_url, flows_dir, deliveries)
    assert taken == []  # SQLite never pipelines
    assert together == []
    pipelined_rows = _run(pg_url, flows_dir, deliveries)
    assert sum(r is not None and r.applied > 0 for r in taken) >= 10  # the pipelined path did the work...
    assert None in taken  # ...and handed the number change to the Core path
    # The last POST's four users went through one joint transaction: 5 messages applied.
    assert len(together) == 1
    assert together[0] is not None
    assert sum(r.applied for r in together[0].values()) == 5
    for table, expected in core_rows.items():
        assert pipelined_rows[table] == expected, table
    sessions = {row[1]: row for row in core_rows["sessions"]}
    assert set(sessions) == {LEAD, BOOKER, BATCHER, NEWCOMER, "14155550999"}  # the mover's session moved
    assert len(core_rows["transitions"]) == 18
    # The tap on the old service button was answered as stale (its step came with the pending message).
    booker = [(t[4], t[5], t[6]) for t in core_rows["transitions"] if t[1] == BOOKER]
    assert sorted(booker, key=str) == sorted(
        [(None, "choose_service", "started"), ("choose_service", "choose_date", "advanced"),
         ("choose_date", "choose_date", "stale"), ("choose_date", "choose_time", "advanced")], key=str)


def test_deliver_writes_what_ingest_and_apply_write(
    sqlite_url: str, pg_url: str, flows_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    delivered: list[object] = []
    real = engine_module.deliver_pipelined

    def spy(*args: Any) -> object:
        result = real(*args)
        delivered.append(result)
        return result

    monkeypatch.setattr(engine_module, "deliver_pipelined", spy)
    deliveries = _conversations()
    core_rows = _run(sqlite_url, flows_dir, deliveries)
    assert delivered == []
    delivered_rows = _run(pg_url, flows_dir, deliveries, deliver=True)
    assert len(delivered) == len(deliveries)  # every delivery tried the one-transaction path...
    assert delivered.count(None) == 1  # ...and the number change fell back to ingest + apply
    for table, expected in core_rows.items():
        assert delivered_rows[table] == expected, table


def test_deliver_drops_duplicates_and_applies_once(database_url: str, flows_dir: Path) -> None:
    db = Database(database_url)
    engine = Engine(db, load_flows(flows_dir), make_settings(database_url, flows_dir))
    first = text(LEAD, "hi", BASE_TS)
    assert engine.deliver([first, first]) == engine_module.DeliverResult(stored=1, duplicates=1, applied=1)
    assert engine.deliver([first]) == engine_module.DeliverResult(stored=0, duplicates=1, applied=0)
    assert engine.deliver([]) == engine_module.DeliverResult(0, 0, 0)
    with db.begin() as conn:
        assert conn.scalar(select(ChatSession.version).where(ChatSession.user_id == LEAD)) == 1
        assert len(conn.execute(select(Transition.id)).all()) == 1
    db.dispose()


def test_deliver_of_more_than_a_batch_applies_everything(pg_url: str, flows_dir: Path) -> None:
    db = Database(pg_url)
    engine = Engine(db, load_flows(flows_dir), make_settings(pg_url, flows_dir, default_flow="counter",
                                                                  apply_batch_limit=3))
    messages = [text(LEAD, f"m{i}", BASE_TS + i) for i in range(8)]
    assert engine.deliver(messages).applied == 8
    assert engine.pending_count() == 0
    with db.begin() as conn:
        version, data = conn.execute(select(ChatSession.version, ChatSession.data)).one()
    assert (version, data["count"]) == (8, 8)
    db.dispose()


def test_failed_deliver_stores_nothing(pg_url: str, flows_dir: Path) -> None:
    """A real database error in the write phase (a trigger refusing one wamid): the message is not stored,
    so the caller, told of the error, delivers it again once the cause is gone and it applies once."""
    db = Database(pg_url)
    engine = Engine(db, load_flows(flows_dir), make_settings(pg_url, flows_dir))
    engine.deliver([text(LEAD, "hi", BASE_TS)])
    with db.begin() as conn:
        conn.execute(sql_text(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.wamid = 'wamid.refused' THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$"
        ))
        conn.execute(sql_text(
            "CREATE TRIGGER refuse BEFORE INSERT ON transitions FOR EACH ROW EXECUTE FUNCTION refuse()"
        ))
    refused = text(LEAD, "Ana", BASE_TS + 5, wamid_="wamid.refused")
    with pytest.raises(DatabaseUnavailableError, match="refused by the test"):
        engine.deliver([refused])
    with db.begin() as conn:
        assert conn.scalar(select(func.count()).select_from(InboundEvent)) == 1
        assert conn.scalar(select(ChatSession.current_step)) == "ask_name"
        conn.execute(sql_text("DROP TRIGGER refuse ON transitions"))
    assert engine.deliver([refused]) == engine_module.DeliverResult(stored=1, duplicates=0, applied=1)
    with db.begin() as conn:
        assert conn.execute(select(ChatSession.current_step, ChatSession.version)).one() == ("ask_email", 2)
    db.dispose()


def test_concurrent_deliveries_of_overlapping_users_never_deadlock(pg_url: str, flows_dir: Path) -> None:
    """Two threads deliver the same POSTs (duplicates) for three users, listed in opposite orders: every
    message is applied exactly once and neither waits forever on the other."""
    db = Database(pg_url, pool_size=4)
    engine = Engine(db, load_flows(flows_dir), make_settings(pg_url, flows_dir, default_flow="counter"))
    users = (LEAD, BOOKER, NEWCOMER)
    posts = [[text(u, f"m{i}", BASE_TS + i, wamid_=f"wamid.{u}.{i}") for u in users] for i in range(40)]

    def run(reverse: bool) -> int:
        return sum(engine.deliver(list(reversed(p)) if reverse else p).applied for p in posts)

    with ThreadPoolExecutor(2) as pool:
        applied = sum(pool.map(run, (False, True)))
    assert applied == 120
    with db.begin() as conn:
        rows = conn.execute(select(ChatSession.version, ChatSession.data)).all()
    assert sorted((v, d["count"]) for v, d in rows) == [(40, 40)] * 3
    db.dispose()


def _pg_engine(pg_url: str, flows_dir: Path) -> tuple[Database, Engine]:
    db = Database(pg_url)
    return db, Engine(db, load_flows(flows_dir), make_settings(pg_url, flows_dir))


def test_joint_apply_skips_a_user_locked_elsewhere(pg_url: str, flows_dir: Path) -> None:
    db, engine = _pg_engine(pg_url, flows_dir)
    for user in (LEAD, BOOKER):
        engine.apply_all(engine.ingest([text(user, "hi", BASE_TS)]).session_keys[0])
    keys = engine.ingest([text(LEAD, "Ana", BASE_TS + 5), text(BOOKER, "Bo", BASE_TS + 6)]).session_keys
    with db.begin() as conn:  # another applier holds BOOKER's session
        conn.execute(select(ChatSession).where(ChatSession.user_id == BOOKER).with_for_update())
        assert engine.apply_together(keys) == [(PHONE, BOOKER)]
    assert engine.pending_count() == 1
    assert engine.apply_all((PHONE, BOOKER)) == 1
    with db.begin() as conn:
        steps = dict(conn.execute(select(ChatSession.user_id, ChatSession.current_step)).all())
    assert steps == {LEAD: "ask_email", BOOKER: "ask_email"}
    db.dispose()


def test_joint_apply_with_a_number_change_writes_nothing_and_hands_back_every_user(
    pg_url: str, flows_dir: Path
) -> None:
    db, engine = _pg_engine(pg_url, flows_dir)
    for user in (LEAD, MOVER):
        engine.apply_all(engine.ingest([text(user, "hi", BASE_TS)]).session_keys[0])
    keys = engine.ingest([text(LEAD, "Ana", BASE_TS + 5),
                          of_kind(MOVER, "system", BASE_TS + 6, new_user_id="14155550999")]).session_keys
    assert sorted(engine.apply_together(keys)) == sorted(keys)
    assert engine.pending_count() == 2  # nothing applied: the joint transaction was rolled back
    assert sum(engine.apply_all(key) for key in keys) == 2
    with db.begin() as conn:
        users = set(conn.execute(select(ChatSession.user_id)).scalars())
    assert users == {LEAD, "14155550999"}
    db.dispose()


def test_the_write_function_updates_every_state_column(pg_url: str) -> None:
    # Migration 0006 names the session's columns one by one; a column added to the model and not there would
    # be decided by the engine and silently never written on PostgreSQL.
    db = Database(pg_url)
    with db.engine.connect() as conn:
        body = conn.scalar(sql_text("SELECT pg_get_functiondef('waflow_write'::regproc)"))
    db.dispose()
    assert [c for c in STATE_COLUMNS if f"{c} = n.{c}" not in body] == []


def test_process_pending_applies_users_jointly_and_skips_one_locked_elsewhere(
    pg_url: str, flows_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, engine = _pg_engine(pg_url, flows_dir)
    users = [f"1415770{i:04d}" for i in range(70)]
    engine.apply_all(engine.ingest([text(users[0], "hi", BASE_TS)]).session_keys[0])
    # Stored and never applied (a crash between the two): the sweeper's work.
    engine.ingest([text(users[0], "Ana", BASE_TS + 5), *(text(u, "hi", BASE_TS + 5) for u in users[1:])])
    groups: list[int] = []
    real = engine_module.apply_pipelined_together

    def spy(engine: Engine, keys: list[Any], now: Any) -> Any:
        groups.append(len(keys))
        return real(engine, keys, now)

    monkeypatch.setattr(engine_module, "apply_pipelined_together", spy)
    with db.begin() as conn:  # another applier holds the first user's session
        conn.execute(select(ChatSession).where(ChatSession.user_id == users[0]).with_for_update())
        assert engine.process_pending() == 69
    assert sorted(groups) == [6, 32, 32]
    assert engine.pending_count() == 1
    assert engine.process_pending() == 1
    with db.begin() as conn:
        steps = dict(conn.execute(select(ChatSession.user_id, ChatSession.current_step)).all())
        transitions = conn.scalar(select(func.count()).select_from(Transition))
    assert steps == {user: "ask_name" for user in users[1:]} | {users[0]: "ask_email"}
    assert transitions == 71
    db.dispose()
