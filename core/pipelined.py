"""PostgreSQL's hot paths on psycopg directly: storing inbound messages, and applying a user's batch.

Storing is one fixed-shape statement (the messages as one JSON array, so it is prepared once whatever the
batch size) in autocommit: one round trip, a fraction of the client CPU SQLAlchemy's insertmanyvalues spent.

Applying runs the same user batch as core.batch, in two round trips with psycopg's pipeline mode.

One statement per round trip (BEGIN, insert-if-missing, lock, read pending, update, three inserts, COMMIT)
made the waits cost more than the work. In pipeline mode the client queues statements and the server still
runs them one after the other, each with its own snapshot, so the semantics are those of the Core path:
1. insert-if-missing, SELECT ... FOR UPDATE, read pending — one round trip; the pending read starts only
   once the lock is held, so it sees every message committed before;
2. decide in Python;
3. every write (one statement, see `_PgStatements.write`) and COMMIT — one round trip.
`apply_pipelined_together` does the same for several users in one transaction (the apply worker under load).
A number change (rare, reads and moves rows mid-batch) and the sweeper's SKIP LOCKED pass use the Core path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar, cast

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from sqlalchemy import JSON, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.expression import ClauseElement

from core import metrics
from core.batch import OUTBOX, TRANSITIONS, ApplyResult, Pending, SessionKey, Statements, UserBatch, statements
from core.db import first_line
from core.errors import DatabaseUnavailableError
from core.messages import InboundMessage

if TYPE_CHECKING:
    from core.engine import Engine

_R = TypeVar("_R")


class _Compiled:
    """A statement compiled once to psycopg's text; JSON parameters are wrapped for psycopg on the way."""

    def __init__(self, statement: ClauseElement, dialect: Dialect, column_keys: list[str] | None = None) -> None:
        if isinstance(statement, Insert):
            statement = statement.inline()  # no RETURNING of generated keys nobody reads
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=column_keys))
        self.sql = str(compiled)
        self.json = tuple(name for name, bind in compiled.binds.items() if isinstance(bind.type, JSON))
        # Values fixed in the statement itself (a JSON key, LIMIT 1) travel as parameters too.
        self.fixed = {compiled.bind_names[b]: b.value for b in compiled.binds.values() if not b.required}

    def params(self, values: dict[str, Any]) -> dict[str, Any]:
        if not self.json and not self.fixed:
            return values
        wrapped = {**self.fixed, **values}
        for name in self.json:
            if wrapped.get(name) is not None:
                wrapped[name] = Jsonb(wrapped[name])
        return wrapped


class _PgStatements:
    """`Statements` for PostgreSQL, compiled per parameter shape on first use."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.source: Statements = statements("postgresql")
        self.cache: dict[tuple[str, tuple[str, ...]], _Compiled] = {}
        self.write_sql: dict[object, str] = {}

    def get(self, name: str, params: dict[str, Any]) -> _Compiled:
        shape = (name, tuple(params))
        compiled = self.cache.get(shape)
        if compiled is None:
            statement = getattr(self.source, name)
            # An INSERT's columns are the parameters given; other statements name their own bind parameters.
            keys = list(params) if isinstance(statement, Insert) else None
            compiled = self.cache[shape] = _Compiled(statement, self.dialect, keys)
        return compiled

    def write(self, writes: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
        """All of a batch's writes as one statement: inserted rows travel as one JSON document per table
        (jsonb_to_recordset; dumping a JSON string costs the client a fraction of one array per column), so
        the text depends only on which kinds of write there are, and is prepared once per shape."""
        state = next((name for name in ("update_session", "delete_blank") if name in writes), None)
        inserts = {name: tuple(writes[name][0]) for name in _JSON_INSERTS if writes.get(name)}
        marks = bool(writes.get("mark_event"))
        shape = (state, tuple(inserts.items()), marks)
        sql = self.write_sql.get(shape)
        params: dict[str, Any] = {}
        ctes = []
        for name, columns in inserts.items():
            table, prefix, suffix = _JSON_INSERTS[name]
            params[f"{prefix}rows"] = json.dumps(writes[name], default=_json_default)
            if sql is None:
                names = ", ".join(columns)
                types = ", ".join(f"{c} {table.c[c].type.compile(dialect=self.dialect)}" for c in columns)
                ctes.append(f"{prefix}rows AS (INSERT INTO {table.name} ({names}) SELECT {names} "
                            f"FROM jsonb_to_recordset(%({prefix}rows)s::jsonb) AS r({types}){suffix})")
        if marks:
            rows = writes["mark_event"]
            params.update(e_at=rows[0]["e_at"], e_id=[r["e_id"] for r in rows], e_result=[r["e_result"] for r in rows])
            if sql is None:
                ctes.append(
                    "marks AS (UPDATE inbound_events SET processed_at = %(e_at)s, result = m.result "
                    "FROM unnest(%(e_id)s::bigint[], %(e_result)s::varchar[]) AS m(id, result) "
                    "WHERE inbound_events.id = m.id AND inbound_events.processed_at IS NULL)"
                )
        if state is not None:
            compiled = self.get(state, writes[state][0])
            params.update(compiled.params(writes[state][0]))
        if sql is None:
            main = compiled.sql if state is not None else "SELECT 1"
            sql = self.write_sql[shape] = (f"WITH {', '.join(ctes)} " if ctes else "") + main
        return sql, params


# Inserts whose rows go as one JSON document: (table, parameter prefix, conflict clause).
_JSON_INSERTS = {
    "insert_transition": (TRANSITIONS, "t_", ""),
    "insert_outbox": (OUTBOX, "o_", " ON CONFLICT (idempotency_key) DO NOTHING"),
}


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()  # aware UTC: timestamptz reads the offset
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


@cache
def _pg_statements(dialect: Dialect) -> _PgStatements:
    return _PgStatements(dialect)


class _CorePathNeeded(Exception):
    """Raised before any write when the batch needs the Core path (a number change)."""


class PipelinedBatch(UserBatch):
    """One user's batch on a connection in pipeline mode; `_apply_users` queues its reads and syncs."""

    def __init__(self, engine: Engine, conn: psycopg.Connection[Any], key: SessionKey, now: datetime) -> None:
        super().__init__(engine, key, now)
        self.conn = conn
        self.sql = _pg_statements(engine.db.engine.dialect)

    def _execute(self, cursor: psycopg.Cursor[Any], name: str, params: dict[str, Any]) -> None:
        statement = self.sql.get(name, params)
        cursor.execute(statement.sql, statement.params(params))

    def queue_reads(self, limit: int, *, skip_locked: bool) -> tuple[psycopg.Cursor[Any], psycopg.Cursor[Any]]:
        """Queue insert-if-missing, the lock and the pending read; results come after the next sync."""
        assert self.engine.lock_sessions  # the naive control takes the Core path
        params = self._params()
        self._execute(self.conn.cursor(), "insert_session", self._new_session_row())
        session = self.conn.cursor(row_factory=dict_row)
        self._execute(session, "lock_session_or_skip" if skip_locked else "lock_session", params)
        pending = self.conn.cursor()
        self._execute(pending, "pending", {**params, "k_limit": limit})
        return session, pending

    def collect(
        self, reads: tuple[psycopg.Cursor[Any], psycopg.Cursor[Any]]
    ) -> tuple[dict[str, Any] | None, list[Pending]] | None:
        session, pending = reads
        row = session.fetchone()
        if row is None:
            # Locked by another applier (SKIP LOCKED): the pending read ran anyway; its rows are not ours.
            pending.fetchall()
            return None
        for column, value in row.items():
            if isinstance(value, datetime):
                row[column] = value.astimezone(UTC)  # as the Core path's UTCDateTime hands them back
        return row, [Pending(i, InboundMessage.model_validate(m), step) for i, m, step in pending.fetchall()]

    def _move_to(self, new_user_id: str) -> str:
        raise _CorePathNeeded

    def _write(self, original_version: int) -> None:
        sql, params = self.sql.write(dict(self._writes(original_version)))
        self.conn.execute(sql, params)


def apply_pipelined(engine: Engine, key: SessionKey, now: datetime) -> ApplyResult | None:
    """Apply one user's pending batch in one pipelined transaction; None when it must take the Core path."""

    def work(conn: psycopg.Connection[Any], pipeline: psycopg.Pipeline) -> ApplyResult:
        return _apply_users(engine, conn, pipeline, [key], now, skip_locked=False)[key]

    return _transaction(engine, f"cannot apply messages of {key}", work)


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
    each user's result; None when a batch needs the Core path (a number change): nothing was written."""
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
    """Every user's reads in one round trip (with whatever the caller queued before), locked in key order,
    then each user's decisions and writes, queued for the caller's COMMIT."""
    batches = [PipelinedBatch(engine, conn, key, now) for key in sorted(set(keys))]
    reads = [batch.queue_reads(batch.limit + 1, skip_locked=skip_locked) for batch in batches]
    started = time.perf_counter()
    pipeline.sync()
    # The wait includes the statements' round trip: an upper bound of the lock wait.
    metrics.LOCK_WAIT.observe(time.perf_counter() - started)
    return {batch.key: batch.finish(batch.collect(r)) for batch, r in zip(batches, reads, strict=True)}


def _transaction(
    engine: Engine, doing: str, work: Callable[[psycopg.Connection[Any], psycopg.Pipeline], _R]
) -> _R | None:
    """`work` and COMMIT in one pipelined transaction; rolled back on any error, None on `_CorePathNeeded`."""
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
