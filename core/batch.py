"""One user's batch: lock the session, apply its pending messages in order through the flow, write it all.

`UserBatch` is the transaction the engine runs per user on SQLAlchemy Core (SQLite, and PostgreSQL's
number-change and failure paths); `core.pipelined` runs the same batch on PostgreSQL in two round trips.
A crash anywhere leaves each message either fully applied or still pending for `process_pending`.

A message the flow cannot take (deciding it raised: a step renamed in a replaced flow file, a bug) is a
failure of that message, not of the batch: the messages before it are written, its failure is counted
(`inbound_events.apply_attempts`) in the same transaction and the batch stops there, so the user's later
messages keep waiting behind it in order. At its `APPLY_MAX_ATTEMPTS`-th failure it is quarantined instead
(core.quarantine) and the batch goes on. Failures the database raises while writing are the engine's to
isolate (core.engine): they roll back the whole transaction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Integer, Table, bindparam, delete, insert, select, update

from core import logsafe, metrics
from core.db import insert_for
from core.errors import UnknownFlowError, WaflowError
from core.flows import Flow
from core.machine import Decision, Reply, SessionState, decide
from core.messages import FLOW_KINDS, InboundMessage
from core.models import ChatSession, InboundEvent, Outbox, Transition
from core.quarantine import quarantine_event

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
    # Messages that failed to apply: counted and left pending (the batch stopped at the first one, its user's
    # later messages wait for the next try), or quarantined (the user's later messages went on).
    failed: int = 0
    quarantined: int = 0

    def __add__(self, later: ApplyResult) -> ApplyResult:
        """Two consecutive batches of one user: counts add up, the state is the later one's."""
        return ApplyResult(
            self.applied + later.applied, self.transitions + later.transitions, later.skipped_locked,
            later.more_pending, self.failed + later.failed, self.quarantined + later.quarantined,
        )


class WriteRefusedError(WaflowError):
    """The database refused what a batch wrote (a data or integrity error: SQLSTATE classes 22 and 23) and
    rolled the whole transaction back. `event_ids`: the messages that batch tried to apply."""

    def __init__(self, reason: str, event_ids: list[int] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.event_ids = event_ids or []


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
            select(EVENTS.c.id, EVENTS.c.message, context_step, EVENTS.c.apply_attempts)
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
    # Failed applies so far (read under the session's lock, so no other applier counts meanwhile).
    attempts: int = 0


def record_failure(conn: Connection, event_id: int, reason: str, max_attempts: int, now: datetime) -> str | None:
    """Count one failed apply of a pending message, under its user's lock; at `max_attempts` quarantine it.
    Returns "failed" (it gets another try), "quarantined", or None when it is no longer pending."""
    counted = conn.execute(
        update(EVENTS)
        .where(EVENTS.c.id == event_id, EVENTS.c.processed_at.is_(None))
        .values(apply_attempts=EVENTS.c.apply_attempts + 1, apply_error=reason[:2000])
        .returning(EVENTS.c.id, EVENTS.c.phone_number_id, EVENTS.c.user_id, EVENTS.c.wamid, EVENTS.c.apply_attempts)
    ).first()
    if counted is None:
        return None
    if counted.apply_attempts < max_attempts:
        return "failed"
    quarantine_event(conn, counted, reason, now)
    return "quarantined"


def failure_reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class UserBatch:
    """One transaction for one user: lock, apply pending messages in order, write everything together.

    The decisions live here; subclasses do the I/O: `_load` (lock the session, read what is pending),
    `_move_to` (a number change) and `_write`."""

    def __init__(self, engine: Engine, key: SessionKey, now: datetime, *, limit: int | None = None) -> None:
        self.engine = engine
        self.key = key
        self.now = now
        # Messages per batch; the engine takes one at a time to find the message a database error is about.
        self.limit = limit or engine.settings.apply_batch_limit
        self.session: dict[str, Any] = {}
        self.transitions: list[dict[str, Any]] = []
        self.outbox: list[dict[str, Any]] = []
        self.results: dict[str, list[int]] = {}
        self.failures: list[tuple[Pending, str]] = []  # messages the flow could not take, with the error
        self.quarantined = 0
        self.stopped_at_failure = False
        self.tried: list[int] = []  # ids of the messages this batch set out to apply
        self.original_version = 0  # the session's version when the batch read it (or last wrote it)
        self.written_transitions = 0  # written before the end of the batch (a number change flushes)

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
        self.tried = [item.id for item in pending]
        self.session = row
        self.original_version = self.session["version"]
        for item in pending:
            # A number change: later messages wait for the next batch. A failure with tries left: they wait
            # behind it, in order, for its next try.
            if self._apply_one(item):
                break
        self._write(self.original_version)
        applied = sum(len(ids) for ids in self.results.values())
        for result, ids in self.results.items():
            metrics.MESSAGES_APPLIED.labels(result).inc(len(ids))
        transitions = self.written_transitions + len(self.transitions)
        stopped = self.stopped_at_failure
        return ApplyResult(applied=applied, transitions=transitions, more_pending=more and not stopped,
                           failed=int(stopped), quarantined=self.quarantined)

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
        """Apply one message; True when the batch stops after it."""
        message = item.message
        if message.kind == "system" and message.new_user_id:
            self._mark(item.id, self._move_to(message.new_user_id))
            return True
        if message.kind not in FLOW_KINDS:
            self._mark(item.id, "ignored")  # reactions, unsupported, other system messages: stored, no transition
            return False
        session, transitions, outbox = dict(self.session), len(self.transitions), len(self.outbox)
        try:
            flow = self._flow()
            state = None if self.session["status"] == "new" else self._state()
            language = self.engine.settings.language_for(message.user_id) if state is None else None
            decision = decide(flow, state, message, context_step=item.context_step, language=language)
            self._record(flow, message, decision)
        except Exception as e:
            # No I/O above (the database is not in a failed state): whatever broke is this message's to carry.
            # What it had changed is undone, so the messages before it are written as they were decided.
            self.session = session
            del self.transitions[transitions:], self.outbox[outbox:]
            return self._failed(item, e)
        self._mark(item.id, "late" if decision.late else "applied")
        return False

    def _failed(self, item: Pending, error: Exception) -> bool:
        """Note a message the flow could not take. True (stop the batch) while it has tries left."""
        quarantine = item.attempts + 1 >= self.engine.settings.apply_max_attempts
        log.warning("message %s of %s failed to apply (try %d of %d%s): %s", logsafe.clean(item.message.wamid),
                    logsafe.key(self.key), item.attempts + 1, self.engine.settings.apply_max_attempts,
                    ", quarantined" if quarantine else "", logsafe.clean(failure_reason(error)), exc_info=error)
        self.failures.append((item, failure_reason(error)))
        self.quarantined += quarantine
        self.stopped_at_failure = not quarantine
        return self.stopped_at_failure

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
            log.warning("flow %s v%s is gone; %s continues on the latest", s["flow"], s["flow_version"],
                        logsafe.key(self.key))
            latest = registry.latest(s["flow"])
            s["flow_version"] = latest.version
            return latest

    def _state(self) -> SessionState:
        s = self.session
        last = s.get("last_inbound_at")
        return SessionState(
            step=s["current_step"],
            data=dict(s["data"] or {}),
            failure_count=s["failure_count"],
            language=s["language"],
            status=s["status"],
            last_message_at=int(last.timestamp()) if last else None,
        )

    def _record(self, flow: Flow, message: InboundMessage, decision: Decision) -> None:
        s = self.session
        at = ts_to_datetime(message.timestamp)
        if decision.late:
            # Logged at the session's latest time, not its own: the log and the session never run backwards
            # (the message keeps its own timestamp in inbound_events), and no time between steps is measured.
            logged_at, elapsed = max(at, s.get("last_transition_at") or at), None
        else:
            previous_at = s.get("last_transition_at")
            logged_at, elapsed = at, max(0.0, (at - previous_at).total_seconds()) if previous_at else None
            self._move_time(message, decision, at)
        if decision.opted_out is not None:
            if not (decision.late and s["opted_out"]):  # a late STOP keeps the time of an earlier one
                s["opted_out_at"] = at if decision.opted_out else None
            s["opted_out"] = decision.opted_out
        s.update(
            current_step=decision.to_step,
            data=decision.data,
            failure_count=decision.failure_count,
            language=decision.language,
            status=decision.status,
            version=s["version"] + 1,
            updated_at=self.now,
        )
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
                "at": logged_at,
                "applied_at": self.now,
                "elapsed_seconds": elapsed,
                "session_version": s["version"],
                "language": decision.language,
                "restored": decision.restored,
            }
        )
        for index, reply in enumerate(decision.replies):
            self.outbox.append(self._outbox_row(message, reply, index))

    def _move_time(self, message: InboundMessage, decision: Decision, at: datetime) -> None:
        """The session's times (and what goes with the user's newest message), before `decision` is taken in."""
        s = self.session
        if decision.to_step != s["current_step"] or decision.outcome in ("started", "reset", "restored"):
            s["step_entered_at"] = at
        if decision.outcome == "restored" or s["status"] == "archived":
            s["archived_at"] = None
            s["archived_from"] = None
        if decision.status == "completed" and s["status"] != "completed":
            s["completed_at"] = at
        elif decision.status == "active":
            s["completed_at"] = None
        s["last_transition_at"] = at
        s["last_inbound_at"] = max(s["last_inbound_at"], at) if s.get("last_inbound_at") else at
        s["window_closed_at"] = None
        if message.profile_name:
            s["profile_name"] = message.profile_name

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

    def __init__(
        self, engine: Engine, conn: Connection, key: SessionKey, now: datetime, *, limit: int | None = None
    ) -> None:
        super().__init__(engine, key, now, limit=limit)
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
        return [Pending(r.id, InboundMessage.model_validate(r.message), r.context_step, r.apply_attempts)
                for r in rows]

    # -- user_changed_number -----------------------------------------------------------------------
    def _move_to(self, new_user_id: str) -> str:
        phone, old_user = self.key
        if self.session["status"] == "new":
            return "ignored"  # nothing to move; never create a blank session for the new number
        taken = self.conn.scalar(
            select(ChatSession.user_id).where(ChatSession.phone_number_id == phone, ChatSession.user_id == new_user_id)
        )
        if taken is not None:
            log.warning("user %s changed number to %s, which already has a session; not merged",
                        logsafe.masked(old_user), logsafe.masked(new_user_id))
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
        max_attempts = self.engine.settings.apply_max_attempts
        for item, reason in self.failures:
            record_failure(self.conn, item.id, reason, max_attempts, self.now)

    def _flush(self) -> None:
        """Write everything decided so far; the processed marks are written again at the end, a no-op."""
        self._write(self.original_version)
        self.original_version = self.session["version"]
        self.written_transitions += len(self.transitions)
        self.transitions.clear()
        self.outbox.clear()
        self.failures.clear()


def _rows(rows: list[dict[str, Any]]) -> dict[str, Any] | list[dict[str, Any]]:
    # One row as plain parameters (execute), several as executemany; the statement itself never changes.
    return rows[0] if len(rows) == 1 else rows
