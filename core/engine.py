"""Ingest inbound messages exactly once and apply each user's pending messages under that user's lock.

ingest: one INSERT ... ON CONFLICT DO NOTHING per batch (unique (phone_number_id, wamid)) → the dedupe.
apply_pending: one transaction per user batch: upsert + lock the session row, apply pending messages in
(timestamp, arrival) order through the flow, write state, transitions, outbox and processed marks together.
A crash anywhere leaves each message either fully applied or still pending for `process_pending`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Integer, Table, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import DBAPIError, OperationalError

from core import metrics
from core.config import Settings, get_settings
from core.db import Database, first_line, insert_for
from core.errors import DatabaseUnavailableError, UnknownFlowError
from core.flows import Flow, FlowRegistry, default_flows_dir, load_flows
from core.machine import Decision, Reply, SessionState, decide
from core.messages import FLOW_KINDS, InboundMessage
from core.models import ChatSession, InboundEvent, Outbox, Transition

log = logging.getLogger(__name__)

SessionKey = tuple[str, str]


@dataclass(frozen=True)
class IngestResult:
    stored: int
    duplicates: int
    session_keys: list[SessionKey]


@dataclass(frozen=True)
class ApplyResult:
    applied: int = 0
    transitions: int = 0
    skipped_locked: bool = False
    more_pending: bool = False


def ts_to_datetime(timestamp: int) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)



SESSIONS = cast(Table, ChatSession.__table__)
EVENTS = cast(Table, InboundEvent.__table__)
TRANSITIONS = cast(Table, Transition.__table__)
OUTBOX = cast(Table, Outbox.__table__)
STATE_COLUMNS = tuple(c for c in SESSIONS.c.keys() if c not in ("phone_number_id", "user_id", "created_at"))


class _Sql:
    """The apply path's statements, built once per dialect with bind parameters: each compiles once and is
    then served from SQLAlchemy's cache (building statements per message cost more CPU than the I/O)."""

    def __init__(self, dialect: str) -> None:
        dml = insert_for(dialect)
        key = (SESSIONS.c.phone_number_id == bindparam("k_phone"), SESSIONS.c.user_id == bindparam("k_user"))
        self.insert_session = dml(SESSIONS).on_conflict_do_nothing(index_elements=["phone_number_id", "user_id"])
        session = select(SESSIONS).where(*key)
        self.select_session = session
        self.lock_session = session.with_for_update()
        self.lock_session_or_skip = session.with_for_update(skip_locked=True)
        pending = (
            select(EVENTS.c.id, EVENTS.c.message)
            .where(
                EVENTS.c.phone_number_id == bindparam("k_phone"),
                EVENTS.c.user_id == bindparam("k_user"),
                EVENTS.c.processed_at.is_(None),
            )
            .order_by(EVENTS.c.timestamp, EVENTS.c.id)
            .limit(bindparam("k_limit", type_=Integer()))
        )
        self.pending = pending
        self.claim_pending = pending.with_for_update(skip_locked=True)
        self.update_session = (
            update(SESSIONS)
            .where(*key)
            .values({c: bindparam(f"v_{c}", type_=SESSIONS.c[c].type) for c in STATE_COLUMNS})
        )
        self.delete_blank = delete(SESSIONS).where(*key, SESSIONS.c.status == "new")
        self.insert_transition = insert(TRANSITIONS)
        self.insert_outbox = dml(OUTBOX).on_conflict_do_nothing(index_elements=["idempotency_key"])
        self.mark_event = (
            update(EVENTS)
            .where(EVENTS.c.id == bindparam("e_id"), EVENTS.c.processed_at.is_(None))
            .values(processed_at=bindparam("e_at", type_=EVENTS.c.processed_at.type), result=bindparam("e_result"))
        )


_SQL: dict[str, _Sql] = {}


def _sql(conn: Connection) -> _Sql:
    name = conn.dialect.name
    if name not in _SQL:
        _SQL[name] = _Sql(name)
    return _SQL[name]


class Engine:
    """The session engine. Stateless between calls: every process may run one."""

    def __init__(
        self,
        db: Database,
        flows: FlowRegistry | None = None,
        settings: Settings | None = None,
        *,
        lock_sessions: bool = True,
    ) -> None:
        self.db = db
        self.settings = settings or get_settings()
        self.flows = flows or load_flows(self.settings.flows_dir or default_flows_dir())
        # False only for the control experiment in the tests/benchmark: a naive read-then-write applier.
        self.lock_sessions = lock_sessions
        for flow_name in {self.settings.default_flow, *self.settings.routes.values()}:
            self.flows.latest(flow_name)  # an unknown routed flow fails at start-up, not on a user's message

    # ----------------------------------------------------------------------------------------- ingest
    def ingest(self, messages: Sequence[InboundMessage], *, now: datetime | None = None) -> IngestResult:
        """Store each message once. Returns the session keys that received new messages."""
        now = now or datetime.now(UTC)
        unique: dict[tuple[str, str], InboundMessage] = {}
        for message in messages:
            unique.setdefault((message.phone_number_id, message.wamid), message)
        if not unique:
            return IngestResult(0, len(messages), [])
        rows = [
            {
                "phone_number_id": m.phone_number_id,
                "wamid": m.wamid,
                "user_id": m.user_id,
                "timestamp": m.timestamp,
                "kind": m.kind,
                "message": m.model_dump(mode="json"),
                "received_at": now,
            }
            for m in unique.values()
        ]
        try:
            with self.db.single_statement() as conn:
                stmt = (
                    insert_for(conn.dialect.name)(InboundEvent)
                    .on_conflict_do_nothing(index_elements=["phone_number_id", "wamid"])
                    .returning(InboundEvent.phone_number_id, InboundEvent.wamid)
                )
                # Rows as parameters, not .values(rows): the statement's compiled form is then cached
                # (a multi-row VALUES is compiled again on every request), and SQLAlchemy still sends one
                # multi-row INSERT per 1000 rows ("insertmanyvalues").
                stored = {(r.phone_number_id, r.wamid) for r in conn.execute(stmt, rows)}
        except (OperationalError, DBAPIError) as e:
            raise DatabaseUnavailableError(f"cannot store messages: {first_line(e)}") from e
        keys: dict[SessionKey, None] = {}
        for dedupe_key, message in unique.items():
            if dedupe_key in stored:
                keys.setdefault(message.session_key, None)
        duplicates = len(messages) - len(stored)
        metrics.MESSAGES_STORED.inc(len(stored))
        metrics.DUPLICATES_DROPPED.inc(duplicates)
        return IngestResult(len(stored), duplicates, list(keys))

    # ------------------------------------------------------------------------------------------ apply
    def apply_pending(
        self, key: SessionKey, *, skip_locked: bool = False, now: datetime | None = None
    ) -> ApplyResult:
        """Apply one user's pending messages (up to the batch limit) in one transaction."""
        started = time.perf_counter()
        try:
            with self.db.begin() as conn:
                result = _UserBatch(self, conn, key, now or datetime.now(UTC)).run(skip_locked=skip_locked)
        except (OperationalError, DBAPIError) as e:
            raise DatabaseUnavailableError(f"cannot apply messages of {key}: {first_line(e)}") from e
        if result.applied:
            metrics.APPLY_LATENCY.observe(time.perf_counter() - started)
        return result

    def apply_all(self, key: SessionKey, *, skip_locked: bool = False) -> int:
        """Apply every pending message of one user, batch after batch."""
        total = 0
        while True:
            result = self.apply_pending(key, skip_locked=skip_locked)
            total += result.applied
            if not result.more_pending or result.skipped_locked:
                return total

    def pending_keys(self, *, limit: int = 1000, older_than: timedelta | None = None) -> list[SessionKey]:
        stmt = (
            select(InboundEvent.phone_number_id, InboundEvent.user_id)
            .where(InboundEvent.processed_at.is_(None))
            .group_by(InboundEvent.phone_number_id, InboundEvent.user_id)
            .limit(limit)
        )
        if older_than is not None:
            cutoff = datetime.now(UTC) - older_than
            stmt = stmt.having(func.min(InboundEvent.received_at) < cutoff)
        with self.db.engine.connect() as conn:
            return [(r.phone_number_id, r.user_id) for r in conn.execute(stmt)]

    def pending_count(self) -> int:
        with self.db.engine.connect() as conn:
            count = conn.scalar(select(func.count()).where(InboundEvent.processed_at.is_(None)))
        metrics.MESSAGES_PENDING.set(count or 0)
        return int(count or 0)

    def process_pending(self, *, older_than: timedelta | None = None, max_users: int | None = None) -> int:
        """Apply everything left pending (crash recovery, the sweeper). Users being applied elsewhere are skipped."""
        applied = 0
        seen = 0
        while True:
            keys = self.pending_keys(older_than=older_than)
            if not keys:
                return applied
            progress = 0
            for key in keys:
                progress += self.apply_all(key, skip_locked=True)
                seen += 1
                if max_users is not None and seen >= max_users:
                    return applied + progress
            applied += progress
            if progress == 0:
                return applied  # everything left is locked by another applier right now



@dataclass
class _Pending:
    id: int
    message: InboundMessage


class _UserBatch:
    """One transaction for one user: lock, apply pending messages in order, write everything together."""

    def __init__(self, engine: Engine, conn: Connection, key: SessionKey, now: datetime) -> None:
        self.engine = engine
        self.conn = conn
        self.key = key
        self.now = now
        self.session: dict[str, Any] = {}
        self.transitions: list[dict[str, Any]] = []
        self.outbox: list[dict[str, Any]] = []
        self.results: dict[str, list[int]] = {}
        self.sql = _sql(conn)

    def run(self, *, skip_locked: bool) -> ApplyResult:
        limit = self.engine.settings.apply_batch_limit
        if self.engine.lock_sessions:
            self._insert_session_if_missing()
            lock_started = time.perf_counter()
            row = self._select_session(for_update=True, skip_locked=skip_locked)
            metrics.LOCK_WAIT.observe(time.perf_counter() - lock_started)
            if row is None:
                return ApplyResult(skipped_locked=True)
            pending = self._pending(limit + 1, claim=False)
        else:
            pending = self._pending(limit + 1, claim=True)
            if not pending:
                return ApplyResult()
            self._insert_session_if_missing()
            row = self._select_session(for_update=False, skip_locked=False)
            assert row is not None
        more = len(pending) > limit
        pending = pending[:limit]
        self.session = dict(row._mapping)
        original_version = self.session["version"]
        for item in pending:
            if self._apply_one(item):
                break  # the session moved to a new number; later messages wait for the next batch
        self._write(original_version)
        applied = sum(len(ids) for ids in self.results.values())
        for result, ids in self.results.items():
            metrics.MESSAGES_APPLIED.labels(result).inc(len(ids))
        return ApplyResult(applied=applied, transitions=len(self.transitions), more_pending=more)

    # -- reads -----------------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        phone, user = self.key
        return {"k_phone": phone, "k_user": user}

    def _insert_session_if_missing(self) -> None:
        phone, user = self.key
        flow = self.engine.flows.latest(self.engine.settings.flow_for(phone))
        row = {
            "phone_number_id": phone,
            "user_id": user,
            "flow": flow.name,
            "flow_version": flow.version,
            "current_step": flow.start,
            "data": {},
            "version": 0,
            "failure_count": 0,
            "language": flow.default_language,
            "status": "new",
            "opted_out": False,
            "created_at": self.now,
            "updated_at": self.now,
        }
        self.conn.execute(self.sql.insert_session, row)

    def _select_session(self, *, for_update: bool, skip_locked: bool) -> Any:
        if not for_update:
            statement = self.sql.select_session
        else:
            statement = self.sql.lock_session_or_skip if skip_locked else self.sql.lock_session
        return self.conn.execute(statement, self._params()).first()

    def _pending(self, limit: int, *, claim: bool) -> list[_Pending]:
        statement = self.sql.claim_pending if claim else self.sql.pending
        rows = self.conn.execute(statement, {**self._params(), "k_limit": limit})
        return [_Pending(r.id, InboundMessage.model_validate(r.message)) for r in rows]

    def _context_step(self, message: InboundMessage) -> str | None:
        if not message.context_id:
            return None
        return self.conn.scalar(select(Outbox.step).where(Outbox.wamid == message.context_id).limit(1))

    # -- decide ----------------------------------------------------------------------------------
    def _apply_one(self, item: _Pending) -> bool:
        message = item.message
        if message.kind == "system" and message.new_user_id:
            self._mark(item.id, self._move_to(message.new_user_id))
            return True
        if message.kind not in FLOW_KINDS:
            self._mark(item.id, "ignored")  # reactions, unsupported, other system messages: stored, no transition
            return False
        flow = self._flow()
        state = None if self.session["status"] == "new" else self._state()
        language = self.engine.settings.language_for(message.user_id) if state is None else None
        decision = decide(flow, state, message, context_step=self._context_step(message), language=language)
        self._record(flow, message, decision)
        self._mark(item.id, "applied")
        return False

    def _flow(self) -> Flow:
        s = self.session
        registry = self.engine.flows
        if s["status"] in ("new", "completed"):
            # A new run of a flow starts on the latest version; a running session keeps the one it began with.
            latest = registry.latest(s["flow"])
            s["flow_version"] = latest.version
            return latest
        try:
            return registry.get(s["flow"], s["flow_version"])
        except UnknownFlowError:
            log.warning("flow %s v%s is gone; %s continues on the latest", s["flow"], s["flow_version"], self.key)
            latest = registry.latest(s["flow"])
            s["flow_version"] = latest.version
            return latest

    def _state(self) -> SessionState:
        s = self.session
        return SessionState(
            step=s["current_step"],
            data=dict(s["data"] or {}),
            failure_count=s["failure_count"],
            language=s["language"],
            status=s["status"],
        )

    def _record(self, flow: Flow, message: InboundMessage, decision: Decision) -> None:
        s = self.session
        at = ts_to_datetime(message.timestamp)
        previous_at = s.get("last_transition_at")
        elapsed = max(0.0, (at - previous_at).total_seconds()) if previous_at else None
        if decision.to_step != s["current_step"] or decision.outcome in ("started", "reset", "restored"):
            s["step_entered_at"] = at
        if decision.outcome == "restored" or s["status"] == "archived":
            s["archived_at"] = None
            s["archived_from"] = None
        if decision.status == "completed" and s["status"] != "completed":
            s["completed_at"] = at
        elif decision.status == "active":
            s["completed_at"] = None
        s.update(
            current_step=decision.to_step,
            data=decision.data,
            failure_count=decision.failure_count,
            language=decision.language,
            status=decision.status,
            version=s["version"] + 1,
            last_transition_at=at,
            last_inbound_at=max(s["last_inbound_at"], at) if s.get("last_inbound_at") else at,
            window_closed_at=None,
            updated_at=self.now,
        )
        if message.profile_name:
            s["profile_name"] = message.profile_name
        if decision.opted_out is not None:
            s["opted_out"] = decision.opted_out
            s["opted_out_at"] = at if decision.opted_out else None
        self.transitions.append(
            {
                "phone_number_id": s["phone_number_id"],
                "user_id": s["user_id"],
                "flow": flow.name,
                "flow_version": flow.version,
                "from_step": decision.from_step,
                "to_step": decision.to_step,
                "outcome": decision.outcome,
                "wamid": message.wamid,
                "at": at,
                "applied_at": self.now,
                "elapsed_seconds": elapsed,
                "session_version": s["version"],
                "language": decision.language,
            }
        )
        for index, reply in enumerate(decision.replies):
            self.outbox.append(self._outbox_row(message, reply, index))

    def _outbox_row(self, message: InboundMessage, reply: Reply, index: int) -> dict[str, Any]:
        return {
            # Derived from the wamid: re-applying the same message can never queue a second reply.
            "idempotency_key": f"reply:{message.phone_number_id}:{message.wamid}:{index}",
            "phone_number_id": self.session["phone_number_id"],
            "user_id": self.session["user_id"],
            "kind": reply.kind,
            "body": reply.body,
            "text": reply.text,
            "step": reply.step,
            "in_reply_to": message.wamid,
            "status": "queued",
            "attempts": 0,
            "next_attempt_at": self.now,
            "created_at": self.now,
        }

    def _mark(self, event_id: int, result: str) -> None:
        self.results.setdefault(result, []).append(event_id)

    # -- user_changed_number -----------------------------------------------------------------------
    def _move_to(self, new_user_id: str) -> str:
        phone, old_user = self.key
        if self.session["status"] == "new":
            return "ignored"  # nothing to move; never create a blank session for the new number
        taken = self.conn.scalar(
            select(ChatSession.user_id).where(ChatSession.phone_number_id == phone, ChatSession.user_id == new_user_id)
        )
        if taken is not None:
            log.warning("user %s changed number to %s, which already has a session; not merged", old_user, new_user_id)
            return "ignored"
        self._write_state(self.session["version"])
        for model in (ChatSession, Transition, Outbox):
            self.conn.execute(
                update(model)
                .where(model.phone_number_id == phone, model.user_id == old_user)
                .values(user_id=new_user_id)
            )
        self.conn.execute(
            update(InboundEvent)
            .where(
                InboundEvent.phone_number_id == phone,
                InboundEvent.user_id == old_user,
                InboundEvent.processed_at.is_not(None),
            )
            .values(user_id=new_user_id)
        )
        self.session["user_id"] = new_user_id
        self.session["moved"] = True
        return "moved"

    # -- write -------------------------------------------------------------------------------------
    def _write(self, original_version: int) -> None:
        if not self.session.get("moved"):
            self._write_state(original_version)
        if self.transitions:
            self.conn.execute(self.sql.insert_transition, _rows(self.transitions))
        if self.outbox:
            self.conn.execute(self.sql.insert_outbox, _rows(self.outbox))
        marks = [{"e_id": i, "e_at": self.now, "e_result": r} for r, ids in self.results.items() for i in ids]
        if marks:
            self.conn.execute(self.sql.mark_event, _rows(marks))

    def _write_state(self, original_version: int) -> None:
        s = self.session
        if s["status"] == "new":
            # Nothing applied (only reactions, say): no blank session is left behind.
            self.conn.execute(self.sql.delete_blank, self._params())
        elif s["version"] != original_version:
            values = {f"v_{c}": s[c] for c in STATE_COLUMNS}
            self.conn.execute(self.sql.update_session, {**self._params(), **values})


def _rows(rows: list[dict[str, Any]]) -> dict[str, Any] | list[dict[str, Any]]:
    # One row as plain parameters (execute), several as executemany; the statement itself never changes.
    return rows[0] if len(rows) == 1 else rows
