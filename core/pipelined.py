"""PostgreSQL's hot paths on psycopg directly: storing inbound messages, and applying users' batches.

Storing is one fixed-shape statement (the messages as one JSON array, so it is prepared once whatever the
batch size) in autocommit: one round trip, a fraction of the client CPU SQLAlchemy's insertmanyvalues spent.

Applying runs the same user batches as core.batch, in one transaction of two round trips (psycopg's
pipeline mode) and two statements, whatever the number of users, through the functions of migration 0006:
1. `waflow_claim`: for each user in key order, insert the session if missing, lock it, read its pending
   messages (after the lock is granted, so every message committed before is seen) — first round trip;
2. decide in Python (core.batch, core.machine);
3. `waflow_write` with every user's writes, then COMMIT — second round trip.
Statement by statement, psycopg's client-side work per statement cost more than the server's work on it.
A number change (rare: it reads and moves rows mid-batch) and a message that fails to apply (rare: its
failure is counted, or it is quarantined, under the lock) take the Core path, so the happy path keeps its two
statements. A data error raised by `waflow_write` rolls everything back and becomes `WriteRefusedError`, for
the engine to find the message at fault.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

import psycopg
from pydantic_core import to_json
from sqlalchemy.exc import DBAPIError

from core import metrics
from core.batch import SESSIONS, STATE_COLUMNS, ApplyResult, Pending, SessionKey, UserBatch, WriteRefusedError
from core.db import first_line
from core.errors import DatabaseUnavailableError
from core.messages import InboundMessage
from core.models import UTCDateTime

if TYPE_CHECKING:
    from core.engine import Engine

_R = TypeVar("_R")


_CLAIM = "SELECT session, pending FROM waflow_claim(%s::jsonb, %s, %s)"
_WRITE = "SELECT waflow_write(%s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb, %s)"
# Columns the claim hands back as ISO text inside the session's JSON.
_DATETIMES = tuple(c.name for c in SESSIONS.c if isinstance(c.type, UTCDateTime))


def _json(value: object) -> str:
    # pydantic-core's serializer: several times faster than json.dumps with a default hook, and it writes
    # aware datetimes as ISO 8601, which timestamptz reads with their offset.
    return to_json(value).decode()


class _CorePathNeeded(Exception):
    """Raised before any write when the batch needs the Core path (a number change, a failed message)."""


class _Writes:
    """What every user batch of one transaction decided, gathered for one `waflow_write` call."""

    def __init__(self) -> None:
        self.sessions: list[dict[str, Any]] = []
        self.blanks: list[dict[str, Any]] = []
        self.transitions: list[dict[str, Any]] = []
        self.outbox: list[dict[str, Any]] = []
        self.marks: list[dict[str, Any]] = []

    def __bool__(self) -> bool:
        return bool(self.sessions or self.blanks or self.transitions or self.outbox or self.marks)

    def params(self, now: datetime) -> tuple[str, str, str, str, str, datetime]:
        return (_json(self.sessions), _json(self.blanks), _json(self.transitions), _json(self.outbox),
                _json(self.marks), now)


class PipelinedBatch(UserBatch):
    """One user's batch within `_apply_users`: its session comes from `waflow_claim`, its writes go to the
    transaction's shared `_Writes`."""

    def __init__(self, engine: Engine, key: SessionKey, now: datetime, writes: _Writes, *,
                 limit: int | None = None) -> None:
        super().__init__(engine, key, now, limit=limit)
        self.writes = writes

    def collect(self, session: dict[str, Any] | None, pending: list[Any] | None) -> tuple[
        dict[str, Any] | None, list[Pending]
    ] | None:
        if session is None:
            return None  # locked by another applier (SKIP LOCKED)
        for column in _DATETIMES:
            if session[column] is not None:
                # as the Core path's UTCDateTime hands them back
                session[column] = datetime.fromisoformat(session[column]).astimezone(UTC)
        return session, [Pending(i, InboundMessage.model_validate(m), step) for i, m, step in pending or ()]

    def _move_to(self, new_user_id: str) -> str:
        raise _CorePathNeeded

    def _failed(self, item: Pending, error: Exception) -> bool:
        # The claim does not read tries so far, and waflow_write does not count them: the Core path does both.
        raise _CorePathNeeded from error

    def _write(self, original_version: int) -> None:
        w = self.writes
        phone, user = self.key
        key = {"phone_number_id": phone, "user_id": user}
        change = self._state_change(original_version)
        if change == "update":
            w.sessions.append({**key, **{c: self.session[c] for c in STATE_COLUMNS}})
        elif change == "delete":
            w.blanks.append(key)
        w.transitions += self.transitions
        w.outbox += self.outbox
        w.marks += [{"id": i, "result": r} for i, r in self._marks()]


def apply_pipelined(
    engine: Engine, key: SessionKey, now: datetime, *, skip_locked: bool = False, limit: int | None = None
) -> ApplyResult | None:
    """Apply one user's pending batch (up to `limit` messages) in one pipelined transaction; None when it must
    take the Core path. A `WriteRefusedError` names the messages the refused batch held."""
    writes = _Writes()
    batch = PipelinedBatch(engine, key, now, writes, limit=limit)

    def work(conn: psycopg.Connection[Any], pipeline: psycopg.Pipeline) -> ApplyResult:
        return _apply_batches(conn, pipeline, [batch], writes, now, skip_locked=skip_locked)[key]

    try:
        return _transaction(engine, f"cannot apply messages of {key}", work)
    except WriteRefusedError as e:
        e.event_ids = batch.tried
        raise


def apply_pipelined_together(
    engine: Engine, keys: list[SessionKey], now: datetime
) -> dict[SessionKey, ApplyResult] | None:
    """Apply several users' pending batches in one transaction: every user's reads in one round trip, every
    write and COMMIT in another. Sessions are locked in key order with SKIP LOCKED, so two appliers never
    deadlock and a user held elsewhere comes back `skipped_locked`. None when one of them needs the Core
    path (a number change): nothing was written."""

    def work(conn: psycopg.Connection[Any], pipeline: psycopg.Pipeline) -> dict[SessionKey, ApplyResult]:
        return _apply_users(engine, conn, pipeline, keys, now, skip_locked=True)

    return _transaction(engine, f"cannot apply messages of {len(keys)} users", work)


def deliver_pipelined(
    engine: Engine, messages: list[InboundMessage], now: datetime
) -> tuple[set[tuple[str, str]], dict[SessionKey, ApplyResult]] | None:
    """Store messages and apply their users' pending batches in one transaction: the store joins the first
    round trip (before the locks), the writes and COMMIT the second. Nothing is stored unless everything is
    applied, so a caller that gets an error has lost nothing and simply delivers again. Users are locked in
    key order (waiting, not skipping: the caller wants its messages applied) and messages are inserted in
    wamid order, so two deliverers never deadlock on each other's rows. Returns the new messages' keys and
    each user's result; None when a batch needs the Core path (a number change, a message that fails to
    apply): nothing was written."""
    document = _document(messages)

    def work(
        conn: psycopg.Connection[Any], pipeline: psycopg.Pipeline
    ) -> tuple[set[tuple[str, str]], dict[SessionKey, ApplyResult]]:
        store = conn.cursor()
        store.execute(_STORE_EVENTS, (now, document))  # queued ahead of the reads: same round trip
        results = _apply_users(engine, conn, pipeline, [m.session_key for m in messages], now, skip_locked=False)
        return {(phone, wamid) for phone, wamid in store.fetchall()}, results

    return _transaction(engine, "cannot deliver messages", work)


def _apply_users(
    engine: Engine, conn: psycopg.Connection[Any], pipeline: psycopg.Pipeline, keys: list[SessionKey],
    now: datetime, *, skip_locked: bool,
) -> dict[SessionKey, ApplyResult]:
    writes = _Writes()
    batches = [PipelinedBatch(engine, key, now, writes) for key in sorted(set(keys))]
    return _apply_batches(conn, pipeline, batches, writes, now, skip_locked=skip_locked)


def _apply_batches(
    conn: psycopg.Connection[Any], pipeline: psycopg.Pipeline, batches: list[PipelinedBatch], writes: _Writes,
    now: datetime, *, skip_locked: bool,
) -> dict[SessionKey, ApplyResult]:
    """Every user's session and pending messages in one claim (queued behind whatever the caller queued, one
    round trip), locked in key order (`batches` are sorted by key, all of the same limit, writing to `writes`);
    then each user's decisions, and one write for all of them, queued for the caller's COMMIT."""
    limit = batches[0].limit + 1  # one more than a batch: tells whether more remain
    claim = conn.execute(_CLAIM, (_json([b.new_session_row() for b in batches]), limit, skip_locked))
    started = time.perf_counter()
    pipeline.sync()
    # The wait includes the statements' round trip: an upper bound of the lock wait.
    metrics.LOCK_WAIT.observe(time.perf_counter() - started)
    claimed = claim.fetchall()
    results = {batch.key: batch.finish(batch.collect(*row)) for batch, row in zip(batches, claimed, strict=True)}
    if writes:
        conn.execute(_WRITE, writes.params(now))
    return results


def _transaction(
    engine: Engine, doing: str, work: Callable[[psycopg.Connection[Any], psycopg.Pipeline], _R]
) -> _R | None:
    """`work` and COMMIT in one pipelined transaction; rolled back on any error, None on `_CorePathNeeded`,
    `WriteRefusedError` on a data or integrity error."""
    with _pooled(engine, doing) as conn:
        try:
            with conn.pipeline() as pipeline:
                result = work(conn, pipeline)
                # Queued behind the writes: the block's closing sync is then the transaction's last round trip
                # (conn.commit() syncs on its own, and leaving the pipeline syncs once more).
                conn.execute("COMMIT")
            return result
        except BaseException as e:
            if not conn.closed and not conn.broken:
                conn.rollback()
            if isinstance(e, _CorePathNeeded):
                return None
            if isinstance(e, (psycopg.DataError, psycopg.IntegrityError)):
                # A value refused, not an outage: the engine retries smaller to find the message it belongs to.
                raise WriteRefusedError(f"{doing}: {first_line(e)}") from e
            raise


@contextmanager
def _pooled(engine: Engine, doing: str) -> Iterator[psycopg.Connection[Any]]:
    """The psycopg connection under a pooled SQLAlchemy one. Database errors become DatabaseUnavailableError
    naming what was being done; a broken connection leaves the pool."""
    try:
        raw = engine.db.engine.raw_connection()
    except (psycopg.Error, DBAPIError) as e:
        raise DatabaseUnavailableError(f"{doing}: {first_line(e)}") from e
    conn = cast(psycopg.Connection[Any], raw.driver_connection)
    try:
        yield conn
    except psycopg.Error as e:
        if conn.closed or conn.broken:
            raw.invalidate(e)
        raise DatabaseUnavailableError(f"{doing}: {first_line(e)}") from e
    finally:
        raw.close()


_STORE_EVENTS = """
INSERT INTO inbound_events (phone_number_id, wamid, user_id, timestamp, kind, message, received_at)
SELECT m->>'phone_number_id', m->>'wamid', m->>'user_id', (m->>'timestamp')::bigint, m->>'kind', m, %s
FROM jsonb_array_elements(%s::jsonb) AS m
ON CONFLICT (phone_number_id, wamid) DO NOTHING
RETURNING phone_number_id, wamid
"""


def store_events(engine: Engine, messages: list[InboundMessage], now: datetime) -> set[tuple[str, str]]:
    """Insert inbound events (unique per batch) and return the (phone_number_id, wamid) of those that were new.
    The messages travel as one JSON array (serialized by pydantic's core) and the key columns are read
    from it on the server."""
    document = _document(messages)
    with _pooled(engine, "cannot store messages") as conn:
        conn.autocommit = True  # one statement, atomic on its own: no BEGIN/COMMIT round trips
        try:
            return {(phone, wamid) for phone, wamid in conn.execute(_STORE_EVENTS, (now, document)).fetchall()}
        finally:
            if not conn.closed:
                conn.autocommit = False


def _document(messages: list[InboundMessage]) -> str:
    """The messages as one JSON array (serialized by pydantic's core), in key order: two statements storing
    overlapping messages then take the unique index's entries in the same order and never deadlock."""
    ordered = sorted(messages, key=lambda m: (m.phone_number_id, m.wamid))
    return "[" + ",".join(m.model_dump_json() for m in ordered) + "]"
