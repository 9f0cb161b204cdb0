"""One user's batch: lock the session, apply its pending messages in order through the flow, write it all.

`UserBatch` is the transaction the engine runs per user on SQLAlchemy Core (SQLite, and PostgreSQL's
sweeper and number-change paths); `core.pipelined` runs the same batch on PostgreSQL in two round trips.
A crash anywhere leaves each message either fully applied or still pending for `process_pending`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Integer, Table, bindparam, delete, insert, select, update

from core import metrics
from core.db import insert_for
from core.errors import UnknownFlowError
from core.flows import Flow
from core.machine import Decision, Reply, SessionState, decide
from core.messages import FLOW_KINDS, InboundMessage
from core.models import ChatSession, InboundEvent, Outbox, Transition

if TYPE_CHECKING:
    from core.engine import Engine

log = logging.getLogger(__name__)

SessionKey = tuple[str, str]


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


class Statements:
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
        # A reply to one of our prompts carries context.id: the prompt's step comes with the message, so a
        # tap on an old button costs no extra round trip.
        context_step = (
            select(OUTBOX.c.step)
            .where(OUTBOX.c.wamid == EVENTS.c.message["context_id"].as_string())
            .limit(1)
            .scalar_subquery()
            .label("context_step")
        )
        pending = (
            select(EVENTS.c.id, EVENTS.c.message, context_step)
            .where(
                EVENTS.c.phone_number_id == bindparam("k_phone"),
                EVENTS.c.user_id == bindparam("k_user"),
                EVENTS.c.processed_at.is_(None),
            )
            .order_by(EVENTS.c.timestamp, EVENTS.c.id)
            .limit(bindparam("k_limit", type_=Integer()))
        )
        self.pending = pending
        self.claim_pending = pending.with_for_update(skip_locked=True, of=EVENTS)
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


_STATEMENTS: dict[str, Statements] = {}


def statements(dialect: str) -> Statements:
    if dialect not in _STATEMENTS:
        _STATEMENTS[dialect] = Statements(dialect)
    return _STATEMENTS[dialect]


@dataclass
class Pending:
    id: int
    message: InboundMessage
    # The step of the prompt the user replied to (context.id → our outbox row), read with the message.
    context_step: str | None = None


class UserBatch:
    """One transaction for one user: lock, apply pending messages in order, write everything together.

    The decisions live here; subclasses do the I/O: `_load` (lock the session, read what is pending),
    `_move_to` (a number change) and `_write`."""

    def __init__(self, engine: Engine, key: SessionKey, now: datetime) -> None:
        self.engine = engine
        self.key = key
        self.now = now
        self.session: dict[str, Any] = {}
        self.transitions: list[dict[str, Any]] = []
        self.outbox: list[dict[str, Any]] = []
        self.results: dict[str, list[int]] = {}
        self.original_version = 0  # the session's version when the batch read it (or last wrote it)
        self.written_transitions = 0  # written before the end of the batch (a number change flushes)

    @property
    def limit(self) -> int:
        return self.engine.settings.apply_batch_limit

    def run(self, *, skip_locked: bool) -> ApplyResult:
        return self.finish(self._load(self.limit + 1, skip_locked=skip_locked))

    def finish(self, loaded: tuple[dict[str, Any] | None, list[Pending]] | None) -> ApplyResult:
        """Decide on what `_load` read (one more message than the limit, to tell whether more remain)."""
        limit = self.limit
        if loaded is None:
            return ApplyResult(skipped_locked=True)
        row, pending = loaded
        if row is None:
            return ApplyResult()
        more = len(pending) > limit
        pending = pending[:limit]
        self.session = row
        self.original_version = self.session["version"]
        for item in pending:
            if self._apply_one(item):
                break  # the session moved to a new number; later messages wait for the next batch
        self._write(self.original_version)
        applied = sum(len(ids) for ids in self.results.values())
        for result, ids in self.results.items():
            metrics.MESSAGES_APPLIED.labels(result).inc(len(ids))
        transitions = self.written_transitions + len(self.transitions)
        return ApplyResult(applied=applied, transitions=transitions, more_pending=more)

    def _load(self, limit: int, *, skip_locked: bool) -> tuple[dict[str, Any] | None, list[Pending]] | None:
        """The locked session row and up to `limit` pending messages; None when the row is locked and
        `skip_locked`; (None, []) when nothing is pending (only the naive control can tell before locking)."""
        raise NotImplementedError

    def _move_to(self, new_user_id: str) -> str:
        raise NotImplementedError

    def _write(self, original_version: int) -> None:
        raise NotImplementedError

    def new_session_row(self) -> dict[str, Any]:
        phone, user = self.key
        flow = self.engine.flows.latest(self.engine.settings.flow_for(phone))
        return {
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

    def _writes(self, original_version: int) -> list[tuple[str, list[dict[str, Any]]]]:
        """Everything the batch writes, as (statement name in `Statements`, parameter rows), in order."""
        writes = self._state_write(original_version)
        if self.transitions:
            writes.append(("insert_transition", self.transitions))
        if self.outbox:
            writes.append(("insert_outbox", self.outbox))
        marks = [{"e_id": i, "e_at": self.now, "e_result": r} for i, r in self._marks()]
        if marks:
            writes.append(("mark_event", marks))
        return writes

    def _state_change(self, original_version: int) -> str | None:
        """What the session row needs: "update", "delete" (a blank one) or None (unchanged, or moved away)."""
        s = self.session
        if s.get("moved"):
            return None
        if s["status"] == "new":
            # Nothing applied (only reactions, say): no blank session is left behind.
            return "delete"
        return "update" if s["version"] != original_version else None

    def _state_write(self, original_version: int) -> list[tuple[str, list[dict[str, Any]]]]:
        change = self._state_change(original_version)
        if change == "delete":
            return [("delete_blank", [self._params()])]
        if change == "update":
            return [("update_session", [{**self._params(), **{f"v_{c}": self.session[c] for c in STATE_COLUMNS}}])]
        return []

    def _marks(self) -> list[tuple[int, str]]:
        """(event id, result) of every message the batch handled."""
        return [(i, r) for r, ids in self.results.items() for i in ids]

    def _params(self) -> dict[str, Any]:
        phone, user = self.key
        return {"k_phone": phone, "k_user": user}

    # -- decide ----------------------------------------------------------------------------------
    def _apply_one(self, item: Pending) -> bool:
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
        decision = decide(flow, state, message, context_step=item.context_step, language=language)
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
                "restored": decision.restored,
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


class CoreBatch(UserBatch):
    """The batch on a SQLAlchemy Core connection, one statement at a time."""

    def __init__(self, engine: Engine, conn: Connection, key: SessionKey, now: datetime) -> None:
        super().__init__(engine, key, now)
        self.conn = conn
        self.sql = statements(conn.dialect.name)

    def _load(self, limit: int, *, skip_locked: bool) -> tuple[dict[str, Any] | None, list[Pending]] | None:
        if self.engine.lock_sessions:
            self.conn.execute(self.sql.insert_session, self.new_session_row())
            lock_started = time.perf_counter()
            lock = self.sql.lock_session_or_skip if skip_locked else self.sql.lock_session
            row = self.conn.execute(lock, self._params()).first()
            metrics.LOCK_WAIT.observe(time.perf_counter() - lock_started)
            if row is None:
                return None
            return dict(row._mapping), self._pending(limit, claim=False)
        # The naive control: read what is pending, then the session, with no lock between.
        pending = self._pending(limit, claim=True)
        if not pending:
            return None, []
        self.conn.execute(self.sql.insert_session, self.new_session_row())
        row = self.conn.execute(self.sql.select_session, self._params()).first()
        assert row is not None
        return dict(row._mapping), pending

    def _pending(self, limit: int, *, claim: bool) -> list[Pending]:
        statement = self.sql.claim_pending if claim else self.sql.pending
        rows = self.conn.execute(statement, {**self._params(), "k_limit": limit})
        return [Pending(r.id, InboundMessage.model_validate(r.message), r.context_step) for r in rows]

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
        self._flush()  # what this batch applied before the change is written, then moves with the rest
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
        for name, rows in self._writes(original_version):
            self.conn.execute(getattr(self.sql, name), _rows(rows))

    def _flush(self) -> None:
        """Write everything decided so far; the processed marks are written again at the end, a no-op."""
        self._write(self.original_version)
        self.original_version = self.session["version"]
        self.written_transitions += len(self.transitions)
        self.transitions.clear()
        self.outbox.clear()


def _rows(rows: list[dict[str, Any]]) -> dict[str, Any] | list[dict[str, Any]]:
    # One row as plain parameters (execute), several as executemany; the statement itself never changes.
    return rows[0] if len(rows) == 1 else rows
