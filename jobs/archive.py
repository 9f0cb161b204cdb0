"""Archive idle sessions in short, bounded batches, without ever waiting on a session being applied.

A session is idle when its user's last message (`last_inbound_at`) is older than `archive_after_hours`;
completed sessions are archived too. Archiving only flips `status` to "archived" and remembers the previous
status in `archived_from`: step, data and history stay, and the engine restores the session (resume or
restart, per flow) when the user writes again.

Each batch is one UPDATE over at most `archive_batch_size` sessions, taken oldest first per status:
PostgreSQL picks them with `FOR UPDATE SKIP LOCKED`, so a session whose messages are being applied right now
is skipped (the next run gets it if it is still idle) and the webhook never waits on the archiver.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, literal_column, select, text, tuple_, update

from core.config import Settings
from core.db import Database
from core.models import ChatSession

ARCHIVABLE = ("active", "completed")


def run_archive(
    db: Database,
    settings: Settings,
    now: datetime,
    *,
    batch_size: int | None = None,
    max_batches: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Archive every session idle since before now - archive_after_hours. `max_batches` bounds each worker."""
    cutoff = now - timedelta(hours=settings.archive_after_hours)
    size = batch_size or settings.archive_batch_size
    # PostgreSQL: parallel workers split the work through SKIP LOCKED; SQLite has one writer anyway.
    parallel = 1 if db.is_sqlite else max(1, workers or settings.archive_workers)
    counts: Counter[str] = Counter()
    for status in ARCHIVABLE:
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="archive") as pool:
            drains = [pool.submit(_drain, db, status, cutoff, now, size, max_batches) for _ in range(parallel)]
            for drain in drains:
                archived, batches = drain.result()
                counts[status] += archived
                counts["batches"] += batches
    never_messaged = archive_without_inbound(db, cutoff, now, size)
    return {
        "archived": counts["active"] + counts["completed"] + never_messaged,
        "from_active": counts["active"],
        "from_completed": counts["completed"],
        "without_inbound": never_messaged,
        "batches": counts["batches"],
        "cutoff": cutoff.isoformat(),
    }


def _drain(
    db: Database, status: str, cutoff: datetime, now: datetime, size: int, max_batches: int | None
) -> tuple[int, int]:
    archived = batches = 0
    cursor: datetime | None = None
    while max_batches is None or batches < max_batches:
        count, cursor = archive_batch(db, status, cutoff, now, size, after=cursor)
        batches += 1
        archived += count
        if count < size:  # nothing left, or what is left is locked (by a webhook or another worker)
            break
    return archived, batches


def archive_batch(
    db: Database, status: str, cutoff: datetime, now: datetime, size: int, *, after: datetime | None = None
) -> tuple[int, datetime | None]:
    """Archive up to `size` sessions of one status idle since before `cutoff`, oldest first.

    `after` continues from the previous batch: the (status, last_inbound_at) index is walked forward instead
    of re-reading, batch after batch, the entries of sessions already archived.
    """
    params = {"status": status, "cutoff": cutoff, "now": now, "size": size, "after": after}
    resume = "AND last_inbound_at >= :after" if after is not None else ""
    with db.begin() as conn:
        if db.is_postgres:
            # Durability of this commit is not needed: a batch lost in a crash is archived again by the next run.
            conn.execute(text("SET LOCAL synchronous_commit TO OFF"))
            # Rows are picked by physical id (ctid) so the update is a TID scan, not a join over the whole table;
            # the ctids are stable because the same statement holds the rows locked.
            sql = f"""
                UPDATE sessions SET status = 'archived', archived_from = status, archived_at = :now
                WHERE ctid = ANY(ARRAY(
                    SELECT ctid FROM sessions
                    WHERE status = :status AND last_inbound_at < :cutoff {resume}
                    ORDER BY last_inbound_at LIMIT :size
                    FOR UPDATE SKIP LOCKED))
                RETURNING last_inbound_at"""
            stamps = [row[0] for row in conn.execute(text(sql), params)]
        else:
            s = ChatSession
            conditions = [s.status == status, s.last_inbound_at < cutoff]
            if after is not None:
                conditions.append(s.last_inbound_at >= after)
            rowid = literal_column("rowid", Integer())
            idle = select(rowid).select_from(s).where(*conditions).order_by(s.last_inbound_at).limit(size)
            stmt = (
                update(s)
                .where(rowid.in_(idle.scalar_subquery()))
                .values(status="archived", archived_from=s.status, archived_at=now)
                .returning(s.last_inbound_at)
            )
            stamps = [row[0] for row in conn.execute(stmt) if row[0] is not None]
    return len(stamps), (max(stamps) if stamps else after)


def archive_without_inbound(db: Database, cutoff: datetime, now: datetime, size: int) -> int:
    """Sessions that never recorded a user message (imported or legacy rows) go by `updated_at`."""
    s = ChatSession
    total = 0
    while True:
        idle = (
            select(s.phone_number_id, s.user_id)
            .where(s.status.in_(ARCHIVABLE), s.last_inbound_at.is_(None), s.updated_at < cutoff)
            .limit(size)
            .with_for_update(skip_locked=True)
        )
        with db.begin() as conn:
            count = conn.execute(
                update(s)
                .where(tuple_(s.phone_number_id, s.user_id).in_(idle))
                .values(status="archived", archived_from=s.status, archived_at=now)
            ).rowcount
        total += count
        if count < size:
            return total
