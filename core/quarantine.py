"""The quarantine: messages we could not take or could not apply, held with the reason until an operator acts.

Two stages put messages here:
- intake: a message of a correctly signed body breaks a bound (a NUL character, a value longer than its column,
  a number or a timestamp out of range). It is never stored with the other messages of the POST, so it cannot
  fail their statement; the POST still answers 200 (Meta would otherwise retry it for days).
- apply: a stored message failed to apply `APPLY_MAX_ATTEMPTS` times (a flow replaced without its old version, a
  value the flow cannot take, a bug). Its inbound event keeps `processed_at` set and result "quarantined", so it
  no longer holds the user's later messages, other users or the sweeper.

One row per poison however often it arrives (`fingerprint`); `seen` counts the arrivals. Retry puts a message
back on its path (intake: parsed again, then stored and applied as new; apply: pending again, applied exactly
once by the next apply or sweep); drop closes it. Both are written to the audit log.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, func, select, update
from sqlalchemy.engine import Connection

from core import audit
from core.db import Database, insert_for
from core.errors import WaflowError
from core.messages import RejectedMessage
from core.models import InboundEvent, QuarantinedMessage
from core.payloads import parse_webhook

if TYPE_CHECKING:
    from core.engine import Engine

STATUSES = ("held", "retried", "dropped")


def clean(value: object, limit: int) -> str | None:
    """A text PostgreSQL can store, cut to `limit`: NUL and lone surrogates escaped as JSON writes them."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    if "\x00" in text or any("\ud800" <= c <= "\udfff" for c in text):
        text = json.dumps(text)[1:-1]
    return text[:limit]


def payload_text(envelope: dict[str, Any]) -> str:
    """JSON text with every non-ASCII character escaped: a NUL or a lone surrogate becomes plain ASCII."""
    return json.dumps(envelope, ensure_ascii=True, sort_keys=True, separators=(",", ":"), default=str)


def record_rejected(db: Database, rejected: Sequence[RejectedMessage], now: datetime) -> int:
    """Hold intake rejects, one row each however often Meta retries them. Returns how many rows are new."""
    new = 0
    insert = insert_for(db.engine.dialect.name)
    with db.begin() as conn:
        for item in rejected:
            payload = payload_text(item.envelope)
            values = {
                "stage": "intake", "phone_number_id": clean(item.phone_number_id, 64),
                "user_id": clean(item.user_id, 128), "wamid": clean(item.wamid, 256), "reason": item.reason[:2000],
                "payload": payload, "fingerprint": "sha256:" + hashlib.sha256(payload.encode()).hexdigest(),
                "seen": 1, "status": "held", "first_seen_at": now, "last_seen_at": now,
            }
            stmt = insert(QuarantinedMessage).values(**values).on_conflict_do_update(
                index_elements=["fingerprint"],
                set_={"seen": QuarantinedMessage.seen + 1, "last_seen_at": now},
            ).returning(QuarantinedMessage.seen)
            if conn.execute(stmt).scalar() == 1:
                new += 1
    return new


def quarantine_event(conn: Connection, event: InboundEvent | Any, reason: str, now: datetime) -> None:
    """Hold a stored message that keeps failing to apply, in the caller's transaction: the event is marked
    processed (result "quarantined") so it stops holding the user's later messages."""
    insert = insert_for(conn.dialect.name)
    conn.execute(
        update(InboundEvent).where(InboundEvent.id == event.id)
        .values(processed_at=now, result="quarantined", apply_error=reason[:2000])
    )
    conn.execute(
        insert(QuarantinedMessage).values(
            stage="apply", phone_number_id=event.phone_number_id, user_id=event.user_id, wamid=event.wamid,
            event_id=event.id, reason=reason[:2000], payload=None, fingerprint=f"event:{event.id}", seen=1,
            status="held", first_seen_at=now, last_seen_at=now,
        ).on_conflict_do_update(
            index_elements=["fingerprint"],
            set_={"status": "held", "reason": reason[:2000], "last_seen_at": now,
                  "seen": QuarantinedMessage.seen + 1, "resolved_at": None, "resolved_by": None},
        )
    )


@dataclass(frozen=True)
class Held:
    id: int
    stage: str
    status: str
    phone_number_id: str | None
    user_id: str | None
    wamid: str | None
    reason: str
    seen: int
    first_seen_at: datetime
    last_seen_at: datetime


def list_quarantine(db: Database, status: str | None = "held", limit: int = 1000) -> list[Held]:
    """Quarantined messages, newest first (`status` None: every status)."""
    if status is not None and status not in STATUSES:
        raise WaflowError(f"unknown quarantine status {status!r}: use one of {', '.join(STATUSES)}")
    q = QuarantinedMessage
    stmt = select(q).order_by(q.last_seen_at.desc(), q.id.desc()).limit(limit)
    if status is not None:
        stmt = stmt.where(q.status == status)
    with db.session() as s:
        return [Held(r.id, r.stage, r.status, r.phone_number_id, r.user_id, r.wamid, r.reason, r.seen,
                     r.first_seen_at, r.last_seen_at) for r in s.scalars(stmt)]


def held_counts(db: Database) -> dict[str, int]:
    """Held messages per stage (the Health page and /metrics)."""
    q = QuarantinedMessage
    with db.engine.connect() as conn:
        rows = conn.execute(select(q.stage, func.count()).where(q.status == "held").group_by(q.stage)).all()
    return {"intake": 0, "apply": 0, **{stage: int(n) for stage, n in rows}}


def _held(conn: Connection, ids: Sequence[int]) -> list[Row[Any]]:
    rows = list(conn.execute(select(QuarantinedMessage.__table__).where(QuarantinedMessage.id.in_(ids))))
    found = {r.id for r in rows}
    missing = [i for i in ids if i not in found]
    if missing:
        raise WaflowError(f"no quarantined message with id {', '.join(map(str, missing))}")
    closed = [r.id for r in rows if r.status != "held"]
    if closed:
        raise WaflowError(f"quarantined message {', '.join(map(str, closed))} is not held any more (already "
                          "retried or dropped)")
    return rows


def drop(db: Database, ids: Sequence[int], *, actor: str, reason: str, now: datetime) -> int:
    """Close held messages for good (they stay listed as dropped). Refuses unknown or closed ids."""
    with db.begin() as conn:
        _held(conn, ids)
        for entry_id in ids:
            audit.record(conn, actor=actor, action="quarantine.drop", target=f"quarantine {entry_id}", reason=reason,
                         at=now)
        conn.execute(update(QuarantinedMessage).where(QuarantinedMessage.id.in_(ids))
                     .values(status="dropped", resolved_at=now, resolved_by=actor[:100]))
    return len(ids)


@dataclass(frozen=True)
class RetryResult:
    retried: int  # put back on their path
    still_rejected: list[tuple[int, str]]  # intake messages that break a bound again, with the reason


def retry(db: Database, engine: Engine, ids: Sequence[int], *, actor: str, reason: str,
          now: datetime) -> RetryResult:
    """Put held messages back: intake ones are parsed again and, if now acceptable, stored as new; apply ones are
    pending again. Then every affected user is applied (exactly once: the transition log is unique per wamid).

    Intake messages are stored before they are marked retried, each in the engine's own transaction (SQLite has
    one writer: storing inside this transaction would wait on itself). A crash in between leaves them held, and
    a second retry stores nothing twice (dedupe on the wamid)."""
    with db.engine.connect() as conn:
        rows = _held(conn, ids)
    still: list[tuple[int, str]] = []
    keys: list[tuple[str, str]] = []
    for row in rows:
        if row.stage != "apply":
            problem = _reparse(engine, row.payload or "{}", keys, now)
            if problem is not None:
                still.append((row.id, problem))
    stuck = {entry_id for entry_id, _ in still}
    retried = 0
    with db.begin() as conn:
        for row in _held(conn, ids):
            if row.id in stuck:
                conn.execute(update(QuarantinedMessage).where(QuarantinedMessage.id == row.id)
                             .values(reason=dict(still)[row.id][:2000]))
                continue
            if row.stage == "apply":
                event = conn.execute(select(InboundEvent.phone_number_id, InboundEvent.user_id)
                                     .where(InboundEvent.id == row.event_id)).first()
                if event is None:
                    still.append((row.id, "its stored message no longer exists"))
                    continue
                conn.execute(update(InboundEvent).where(InboundEvent.id == row.event_id).values(
                    processed_at=None, result=None, apply_attempts=0, apply_error=None))
                keys.append((event.phone_number_id, event.user_id))
            audit.record(conn, actor=actor, action="quarantine.retry", target=f"quarantine {row.id}", reason=reason,
                         at=now)
            conn.execute(update(QuarantinedMessage).where(QuarantinedMessage.id == row.id)
                         .values(status="retried", resolved_at=now, resolved_by=actor[:100]))
            retried += 1
    for key in dict.fromkeys(keys):
        engine.apply_all(key)
    return RetryResult(retried, still)


def _reparse(engine: Engine, payload: str, keys: list[tuple[str, str]], now: datetime) -> str | None:
    """Parse an intake reject again as a webhook of its own; store it if it is acceptable now. Returns why not."""
    body = json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "quarantine", "changes": [
        {"field": "messages", "value": json.loads(payload)}]}]}).encode()
    try:
        parsed = parse_webhook(body, now=now)  # a timestamp far ahead of the clock stays held
    except WaflowError as e:
        return str(e)
    if parsed.rejected:
        return parsed.rejected[0].reason
    if not parsed.messages:
        return "nothing in it can be stored"
    keys.extend(engine.ingest(parsed.messages).session_keys)
    return None
