"""PostgreSQL's pipelined apply path writes exactly what the Core path writes.

The same conversations go through SQLite (always the Core path) and PostgreSQL (pipelined, falling back to
Core for a number change); every row the engine writes must come out the same on both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

import core.engine as engine_module
from core.batch import ApplyResult
from core.db import Database
from core.engine import Engine
from core.flows import load_flows
from core.messages import InboundMessage
from core.models import ChatSession, InboundEvent, Outbox, Transition
from tests.conftest import make_settings
from tests.factories import BASE_TS, PHONE_2, button, of_kind, text

LEAD = "14155550101"
BOOKER = "14155550102"
BATCHER = "34600000003"  # a Spanish number: LANGUAGE_BY_PREFIX starts it in Spanish
MOVER = "14155550104"


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
    ]


def _run(url: str, flows_dir: Path, deliveries: list[list[InboundMessage]]) -> dict[str, list[tuple[Any, ...]]]:
    settings = make_settings(url, flows_dir, flow_routes=f"{PHONE_2}=service_booking", language_by_prefix="34=es")
    db = Database(url)
    engine = Engine(db, load_flows(flows_dir), settings)
    for delivery in deliveries:
        for key in engine.ingest(delivery).session_keys:
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
    real = engine_module.apply_pipelined

    def spy(*args: Any) -> ApplyResult | None:
        result = real(*args)
        taken.append(result)
        return result

    monkeypatch.setattr(engine_module, "apply_pipelined", spy)
    deliveries = _conversations()
    core_rows = _run(sqlite_url, flows_dir, deliveries)
    assert taken == []  # SQLite never pipelines
    pipelined_rows = _run(pg_url, flows_dir, deliveries)
    assert sum(r is not None and r.applied > 0 for r in taken) >= 10  # the pipelined path did the work...
    assert None in taken  # ...and handed the number change to the Core path
    for table, expected in core_rows.items():
        assert pipelined_rows[table] == expected, table
    sessions = {row[1]: row for row in core_rows["sessions"]}
    assert set(sessions) == {LEAD, BOOKER, BATCHER, "14155550999"}  # the mover's session moved
    assert len(core_rows["transitions"]) == 13
    # The tap on the old service button was answered as stale (its step came with the pending message).
    booker = [(t[4], t[5], t[6]) for t in core_rows["transitions"] if t[1] == BOOKER]
    assert sorted(booker, key=str) == sorted(
        [(None, "choose_service", "started"), ("choose_service", "choose_date", "advanced"),
         ("choose_date", "choose_date", "stale")], key=str)
