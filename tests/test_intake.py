"""The webhook's group commit: bodies taken together are stored together and each gets its own answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.db import Database
from core.engine import Engine
from core.errors import DatabaseUnavailableError, PayloadError
from core.flows import FlowRegistry
from core.intake import Intake, IntakeWorker
from core.models import InboundEvent, MessageStatus
from tests.conftest import make_settings
from tests.test_webhook import PN, TS, USER, envelope, load, value

TEXT = load("text_ascii")


def _text(wamid: str, body: str = "hi", user: str = USER) -> dict[str, object]:
    return {"from": user, "id": wamid, "timestamp": str(TS), "type": "text", "text": {"body": body}}


def _stored(outcome: object) -> tuple[int, int]:
    assert isinstance(outcome, Intake)
    assert outcome.stored is not None
    return outcome.stored.stored, outcome.stored.duplicates


def test_one_batch_answers_each_body_its_own(db: Database, engine: Engine) -> None:
    retry = envelope(value([_text("wamid.TEXTASCII0000", "the same message, other bytes")]))
    two = envelope(value([_text("wamid.A"), _text("wamid.B", user="14155550102")]))
    statuses = load("statuses")
    other = envelope(value([_text("wamid.PAGE")]), object_="page")
    outcomes = IntakeWorker(engine, db).process([TEXT, retry, b"{not json", two, statuses, other, TEXT])
    assert _stored(outcomes[0]) == (1, 0)
    assert _stored(outcomes[1]) == (0, 1)  # the same wamid in the same commit: stored once, for the first
    assert isinstance(outcomes[2], PayloadError)
    assert _stored(outcomes[3]) == (2, 0)
    assert isinstance(outcomes[3], Intake)
    assert outcomes[3].stored is not None
    assert sorted(outcomes[3].stored.session_keys) == [(PN, USER), (PN, "14155550102")]
    assert isinstance(outcomes[4], Intake)
    assert len(outcomes[4].parsed.statuses) > 0
    assert isinstance(outcomes[5], Intake)
    assert outcomes[5].stored is None
    assert _stored(outcomes[6]) == (0, 1)
    with db.begin() as conn:
        assert conn.scalar(select(func.count()).select_from(InboundEvent)) == 3
        assert conn.scalar(select(func.count()).select_from(MessageStatus)) > 0


def test_a_database_error_answers_every_stored_body_and_spares_rejections(
    registry: FlowRegistry, flows_dir: Path
) -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"  # nothing listens on port 1
    db = Database(url)
    outcomes = IntakeWorker(Engine(db, registry, make_settings(url, flows_dir)), db).process(
        [TEXT, b"[]", load("statuses")]
    )
    assert isinstance(outcomes[0], DatabaseUnavailableError)
    assert isinstance(outcomes[1], PayloadError)
    assert isinstance(outcomes[2], DatabaseUnavailableError)
    db.dispose()


def test_concurrent_requests_through_the_thread(db: Database, engine: Engine) -> None:
    bodies = [envelope(value([_text(f"wamid.C{i}")])) for i in range(40)]
    worker = IntakeWorker(engine, db, max_requests=8)
    worker.start()

    async def take_all() -> list[Intake]:
        return await asyncio.gather(*(worker.take(body) for body in bodies + bodies[:5]))

    try:
        outcomes = asyncio.run(take_all())
        with pytest.raises(PayloadError):
            asyncio.run(worker.take(b"{"))
    finally:
        worker.stop()
    assert not worker.thread.is_alive()
    pairs = [_stored(outcome) for outcome in outcomes]
    assert sorted(pairs) == [(0, 1)] * 5 + [(1, 0)] * 40
    with db.begin() as conn:
        assert conn.scalar(select(func.count()).select_from(InboundEvent)) == 40
