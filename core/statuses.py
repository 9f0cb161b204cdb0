"""Delivery statuses of outbound messages: a monotonic record per wamid plus the full history.

Statuses never create a session or a transition. They are stored even for wamids we never recorded
sending: Meta can deliver the status before our send call returns, or the message came from another app
on the same number.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import Connection, and_, func, or_, update
from sqlalchemy.exc import DBAPIError, OperationalError

from core.db import Database, first_line, insert_for
from core.errors import DatabaseUnavailableError
from core.messages import StatusUpdate
from core.models import ChatSession, MessageStatus, MessageStatusEvent, Outbox

# sent → delivered → read only ever moves forward; failed is final. Others are history only.
RANK = {"sent": 1, "delivered": 2, "read": 3, "failed": 4}
OUTSIDE_WINDOW = 131047
UNDELIVERABLE = 131026
# Statuses that prove a message left: an "uncertain" send (its answer was lost, see jobs/sender.py) is then sent.
LEFT = ("sent", "delivered", "read")


def error_code(status: StatusUpdate) -> int | None:
    for error in status.errors:
        code = error.get("code")
        if isinstance(code, int):
            return code
        if isinstance(code, str) and code.isdigit():
            return int(code)
    return None


def record_statuses(db: Database, statuses: Sequence[StatusUpdate], *, now: datetime | None = None) -> int:
    """Store statuses idempotently (a redelivered webhook changes nothing). Returns rows newly recorded."""
    if not statuses:
        return 0
    now = now or datetime.now(UTC)
    try:
        with db.begin() as conn:
            return sum(_record(conn, status, now) for status in statuses)
    except (OperationalError, DBAPIError) as e:
        raise DatabaseUnavailableError(f"cannot store statuses: {first_line(e)}") from e


def _record(conn: Connection, status: StatusUpdate, now: datetime) -> int:
    at = datetime.fromtimestamp(status.timestamp, UTC)
    code = error_code(status)
    history = (
        insert_for(conn.dialect.name)(MessageStatusEvent)
        .values(
            wamid=status.wamid,
            phone_number_id=status.phone_number_id,
            status=status.status,
            timestamp=status.timestamp,
            errors=status.errors,
            received_at=now,
        )
        .on_conflict_do_nothing(index_elements=["wamid", "status", "timestamp"])
    )
    # Asked for by RETURNING: psycopg reports rowcount -1 for an INSERT that SQLAlchemy gave an implicit RETURNING.
    new = conn.execute(history.returning(MessageStatusEvent.id)).first() is not None
    rank = RANK.get(status.status)
    if rank is not None:
        stmt = insert_for(conn.dialect.name)(MessageStatus).values(
            wamid=status.wamid,
            phone_number_id=status.phone_number_id,
            recipient_id=status.recipient_id,
            status=status.status,
            rank=rank,
            error_code=code,
            status_at=at,
            updated_at=now,
        )
        # A late lower status (delivered after read) must never downgrade the record.
        stmt = stmt.on_conflict_do_update(
            index_elements=["wamid"],
            set_={
                "status": stmt.excluded.status,
                "rank": stmt.excluded.rank,
                "error_code": stmt.excluded.error_code,
                "status_at": stmt.excluded.status_at,
                "updated_at": stmt.excluded.updated_at,
            },
            where=MessageStatus.rank < stmt.excluded.rank,
        )
        conn.execute(stmt)
        _record_pricing(conn, status)
    _link_outbox(conn, status, at)
    if status.status == "failed":
        _on_failed(conn, status, code, at)
    return int(new)


def _record_pricing(conn: Connection, status: StatusUpdate) -> None:
    """Meta's pricing of the message (campaign cost), whatever the status's rank: a late "delivered" after "read"
    may be the one that carries it. A status without pricing (or without one of its fields) leaves it as it was."""
    pricing = status.pricing
    if pricing is None:
        return
    values = {
        column: value
        for column, value in (
            ("pricing_category", pricing.category),
            ("pricing_billable", pricing.billable),
            ("pricing_model", pricing.model),
        )
        if value is not None
    }
    conn.execute(update(MessageStatus).where(MessageStatus.wamid == status.wamid).values(**values))


def _link_outbox(conn: Connection, status: StatusUpdate, at: datetime) -> None:
    # biz_opaque_callback_data carries our outbox id: attach the wamid even if the send call has not returned.
    opaque = status.biz_opaque_callback_data
    if not (opaque and opaque.isdigit()):
        return
    ours = (Outbox.id == int(opaque), Outbox.phone_number_id == status.phone_number_id)
    if status.status in LEFT:
        # The send whose answer was lost did reach WhatsApp: settle it, so nobody resends or reports it. (A failed
        # status settles it through _on_failed once the wamid is attached below.)
        conn.execute(
            update(Outbox)
            .where(*ours, Outbox.status == "uncertain", or_(Outbox.wamid.is_(None), Outbox.wamid == status.wamid))
            .values(status="sent", wamid=status.wamid, error_code=None, error_title=None,
                    sent_at=func.coalesce(Outbox.sent_at, Outbox.send_started_at, at))
        )
    conn.execute(update(Outbox).where(and_(*ours, Outbox.wamid.is_(None))).values(wamid=status.wamid))


def _on_failed(conn: Connection, status: StatusUpdate, code: int | None, at: datetime) -> None:
    title = next((str(e.get("title") or e.get("message") or "") for e in status.errors), None)
    conn.execute(
        update(Outbox)
        .where(Outbox.wamid == status.wamid)
        .values(status="failed", error_code=code, error_title=title)
    )
    if code == OUTSIDE_WINDOW and status.recipient_id:
        # From now on only templates may reach this user, until they write again.
        conn.execute(
            update(ChatSession)
            .where(
                ChatSession.phone_number_id == status.phone_number_id,
                ChatSession.user_id == status.recipient_id,
            )
            .values(window_closed_at=at)
        )
