"""Operator controls: reset a user, move them to a step, set or clear the opt-out, end a hand-off, settle an
uncertain send, retry or drop quarantined messages. The command line, the admin API and the dashboard all call
these functions, so the three surfaces refuse and record exactly the same things.

Each action validates first and refuses with one clear line (an `OperatorError`, whose `http_status` the admin API
answers with) before writing anything; then it changes the row and writes its audit entry in one transaction. The
session row is locked as the engine locks it (FOR UPDATE on PostgreSQL, the single writer on SQLite), so an action
never interleaves with a message being applied to the same user.

Operator actions write no transitions: those record what users did, and funnels and latency read them. The audit
log is the operators' history, and the session view shows it next to the transitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import audit, quarantine
from core.db import Database
from core.errors import UnknownFlowError, WaflowError
from core.flows import Flow, FlowRegistry
from core.models import ChatSession, Outbox, QuarantinedMessage, Transition

if TYPE_CHECKING:
    from core.engine import Engine

RESOLUTIONS = ("sent", "failed")


class OperatorError(WaflowError):
    """An action that makes no sense for what is in the database; nothing was written."""

    http_status = 422


class NotFoundError(OperatorError):
    http_status = 404


class ConflictError(OperatorError):
    """The target exists but is not in a state the action applies to."""

    http_status = 409


@dataclass(frozen=True)
class Done:
    """What an action did: `summary` is the one line the CLI prints and the dashboard shows."""

    action: str
    target: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


def session_target(phone_number_id: str, user_id: str) -> str:
    """The audit target of a session (the session view reads its entries back by it)."""
    return f"session {phone_number_id}/{user_id}"


def outbox_target(outbox_id: int) -> str:
    return f"outbox {outbox_id}"


def _reason(reason: str | None, action: str) -> str:
    if not reason or not reason.strip():
        raise OperatorError(f"{action}: give a reason (it is written to the audit log)")
    return reason.strip()


# ------------------------------------------------------------------------------------------- sessions
def _locked_session(s: Session, phone_number_id: str, user_id: str) -> ChatSession:
    session = s.get(ChatSession, (phone_number_id, user_id), with_for_update=True)
    # "new" is a row the engine created for a message it has not applied yet: nobody is there to act on.
    if session is None or session.status == "new":
        raise NotFoundError(f"no session for {phone_number_id}/{user_id}")
    return session


def _flow_of(flows: FlowRegistry, session: ChatSession) -> Flow:
    """The flow the session runs, as the engine picks it: its own version, or the latest if that one is gone."""
    try:
        try:
            return flows.get(session.flow, session.flow_version)
        except UnknownFlowError:
            return flows.latest(session.flow)
    except UnknownFlowError as e:
        raise ConflictError(f"flow {session.flow!r} of {session.phone_number_id}/{session.user_id} is not loaded: "
                            f"{e}") from e


def _check_step(flow: Flow, step: str | None) -> str:
    if not step or step not in flow.steps:
        raise OperatorError(f"flow {flow.name} v{flow.version} has no step {step!r}; its steps: "
                            f"{', '.join(flow.steps)}")
    return step


def _where(session: ChatSession) -> dict[str, Any]:
    return {"flow": session.flow, "flow_version": session.flow_version, "step": session.current_step,
            "status": session.status}


def _place(session: ChatSession, flow: Flow, step: str, now: datetime) -> None:
    """Put the session in `step` of `flow` with every state column coherent: a terminal step completes the run,
    any other makes it active (also an archived or completed one); failures start from zero in the new step."""
    finished_before = session.status == "completed" or (
        session.status == "archived" and session.archived_from == "completed")
    terminal = flow.step(step).terminal
    session.flow_version = flow.version
    session.current_step = step
    session.failure_count = 0
    session.status = "completed" if terminal else "active"
    if not terminal:
        session.completed_at = None
    elif not finished_before or session.completed_at is None:
        session.completed_at = now
    session.step_entered_at = now
    session.archived_at = None
    session.archived_from = None
    session.updated_at = now


def _record(s: Session, done: Done, *, actor: str, reason: str, now: datetime) -> Done:
    audit.record(s.connection(), actor=actor, action=done.action, target=done.target, reason=reason, at=now,
                 details=done.details)
    return done


def reset_session(db: Database, flows: FlowRegistry, phone_number_id: str, user_id: str, *, actor: str,
                  reason: str, now: datetime) -> Done:
    """Back to the start of the latest version of the session's flow, data cleared, failures zero, active."""
    why = _reason(reason, "reset")
    with db.session() as s:
        session = _locked_session(s, phone_number_id, user_id)
        try:
            flow = flows.latest(session.flow)
        except UnknownFlowError as e:
            raise ConflictError(f"cannot reset {phone_number_id}/{user_id}: {e}") from e
        before = _where(session)
        cleared = sorted(session.data or {})
        _place(session, flow, flow.start, now)
        session.data = {}
        done = Done("session.reset", session_target(phone_number_id, user_id),
                    f"reset {phone_number_id}/{user_id}: {before['step']} → {flow.start} "
                    f"({flow.name} v{flow.version}), data cleared",
                    {"from": before, "to": _where(session), "cleared_keys": cleared})
        return _record(s, done, actor=actor, reason=why, now=now)


def move_session(db: Database, flows: FlowRegistry, phone_number_id: str, user_id: str, step: str, *, actor: str,
                 reason: str, now: datetime) -> Done:
    """Into `step` of the session's flow, keeping its data. A terminal step completes the run."""
    why = _reason(reason, "move")
    with db.session() as s:
        session = _locked_session(s, phone_number_id, user_id)
        flow = _flow_of(flows, session)
        _check_step(flow, step)
        before = _where(session)
        _place(session, flow, step, now)
        done = Done("session.move", session_target(phone_number_id, user_id),
                    f"moved {phone_number_id}/{user_id}: {before['step']} → {step} (now {session.status})",
                    {"from": before, "to": _where(session)})
        return _record(s, done, actor=actor, reason=why, now=now)


def set_opt_out(db: Database, phone_number_id: str, user_id: str, opted_out: bool, *, actor: str, reason: str,
                now: datetime) -> Done:
    """Set (True) or clear (False) the opt-out flag; the conversation itself does not move."""
    word = "opt-out" if opted_out else "opt-in"
    why = _reason(reason, word)
    with db.session() as s:
        session = _locked_session(s, phone_number_id, user_id)
        if session.opted_out == opted_out:
            raise ConflictError(f"{phone_number_id}/{user_id} is already {'opted out' if opted_out else 'opted in'}")
        session.opted_out = opted_out
        session.opted_out_at = now if opted_out else None
        session.updated_at = now
        done = Done(f"session.{word}", session_target(phone_number_id, user_id),
                    f"{phone_number_id}/{user_id} {'opted out' if opted_out else 'opted in again'}",
                    {"opted_out": opted_out})
        return _record(s, done, actor=actor, reason=why, now=now)


def end_handoff(db: Database, flows: FlowRegistry, phone_number_id: str, user_id: str, *, step: str | None = None,
                actor: str, reason: str, now: datetime) -> Done:
    """Out of the flow's hand-off step: back to the step the user was handed off from, or to `step`."""
    why = _reason(reason, "end-handoff")
    with db.session() as s:
        session = _locked_session(s, phone_number_id, user_id)
        flow = _flow_of(flows, session)
        if flow.handoff_step is None or session.current_step != flow.handoff_step:
            where = f"in step {session.current_step!r}"
            handoff = f"its hand-off step is {flow.handoff_step!r}" if flow.handoff_step else "no hand-off step"
            raise ConflictError(f"{phone_number_id}/{user_id} is not in hand-off: {where} ({flow.name} has {handoff})")
        target = _check_step(flow, step) if step is not None else _handed_off_from(s, session, flow)
        if target == flow.handoff_step:
            raise OperatorError(f"end-handoff: {target!r} is the hand-off step itself; give another step")
        before = _where(session)
        _place(session, flow, target, now)
        done = Done("session.end-handoff", session_target(phone_number_id, user_id),
                    f"ended hand-off of {phone_number_id}/{user_id}: back to {target}",
                    {"from": before, "to": _where(session)})
        return _record(s, done, actor=actor, reason=why, now=now)


def _handed_off_from(s: Session, session: ChatSession, flow: Flow) -> str:
    origin = s.scalar(
        select(Transition.from_step)
        .where(Transition.phone_number_id == session.phone_number_id, Transition.user_id == session.user_id,
               Transition.outcome == "handoff")
        .order_by(Transition.id.desc())
        .limit(1)
    )
    if origin is None:
        raise ConflictError(f"{session.phone_number_id}/{session.user_id} has no hand-off transition to go back to: "
                            f"give a step ({', '.join(flow.steps)})")
    if origin not in flow.steps:
        raise ConflictError(f"the step {session.user_id} was handed off from ({origin!r}) is not in {flow.name} "
                            f"v{flow.version} any more: give a step ({', '.join(flow.steps)})")
    return origin


# ------------------------------------------------------------------------------------------- outbox
@dataclass(frozen=True)
class Uncertain:
    id: int
    phone_number_id: str
    user_id: str
    kind: str
    text: str | None
    template: str | None
    attempts: int
    send_started_at: datetime | None
    error_title: str | None
    wamid: str | None


def uncertain_sends(db: Database, limit: int = 500) -> list[Uncertain]:
    """Outbox rows whose send's answer was lost, oldest first: each waits for a status webhook or an operator."""
    o = Outbox
    with db.session() as s:
        rows = s.scalars(select(o).where(o.status == "uncertain").order_by(o.id).limit(limit))
        return [Uncertain(r.id, r.phone_number_id, r.user_id, r.kind, r.text, r.template, r.attempts,
                          r.send_started_at, r.error_title, r.wamid) for r in rows]


def resolve_send(db: Database, outbox_id: int, status: str, *, wamid: str | None = None, actor: str, reason: str,
                 now: datetime) -> Done:
    """Settle an uncertain send as `sent` (optionally with the wamid WhatsApp gave it) or `failed`."""
    why = _reason(reason, "resolve")
    if status not in RESOLUTIONS:
        raise OperatorError(f"resolve: status must be sent or failed, not {status!r}")
    wamid = (wamid or "").strip() or None
    if wamid is not None and status != "sent":
        raise OperatorError("resolve: a wamid only goes with status sent")
    with db.session() as s:
        row = s.get(Outbox, outbox_id, with_for_update=True)
        if row is None:
            raise NotFoundError(f"no outbound message with id {outbox_id}")
        if row.status != "uncertain":
            raise ConflictError(f"outbound message {outbox_id} is {row.status}, not uncertain: nothing to resolve")
        if status == "sent":
            _mark_sent(s, row, wamid, now)
        else:
            row.status = "failed"
            row.error_title = "marked failed by an operator (see the audit log)"
        done = Done(f"outbox.resolve-{status}", outbox_target(outbox_id),
                    f"outbound message {outbox_id} to {row.phone_number_id}/{row.user_id} marked {status}"
                    + (f" ({row.wamid})" if row.wamid else ""),
                    {"status": status, "wamid": row.wamid, "phone_number_id": row.phone_number_id,
                     "user_id": row.user_id})
        return _record(s, done, actor=actor, reason=why, now=now)


def _mark_sent(s: Session, row: Outbox, wamid: str | None, now: datetime) -> None:
    if wamid is not None and row.wamid is not None and wamid != row.wamid:
        raise ConflictError(f"outbound message {row.id} already has wamid {row.wamid}, not {wamid}")
    if wamid is not None and row.wamid is None:
        other = s.scalar(select(Outbox.id).where(Outbox.wamid == wamid, Outbox.id != row.id).limit(1))
        if other is not None:
            raise ConflictError(f"wamid {wamid} belongs to outbound message {other}")
        row.wamid = wamid
    row.status = "sent"
    # The request left when the send started; when exactly WhatsApp took it is what was lost.
    row.sent_at = row.sent_at or row.send_started_at or now
    row.error_code = None
    row.error_title = None


# ------------------------------------------------------------------------------------------- quarantine
@dataclass(frozen=True)
class Retried:
    summary: str
    retried: int
    still_rejected: list[tuple[int, str]]


def _held_ids(db: Database, ids: Sequence[int], action: str) -> list[int]:
    """The ids, checked so unknown and closed ones are refused with their own status (quarantine checks again
    in its transaction, for an operator acting at the same moment)."""
    wanted = list(dict.fromkeys(int(i) for i in ids))
    if not wanted:
        raise OperatorError(f"quarantine {action}: give at least one id")
    with db.session() as s:
        rows = s.execute(select(QuarantinedMessage.id, QuarantinedMessage.status)
                         .where(QuarantinedMessage.id.in_(wanted))).all()
    found = {int(i): str(status) for i, status in rows}
    missing = [i for i in wanted if i not in found]
    if missing:
        raise NotFoundError(f"no quarantined message with id {', '.join(map(str, missing))}")
    closed = [f"{i} ({found[i]})" for i in wanted if found[i] != "held"]
    if closed:
        raise ConflictError(f"quarantined message {', '.join(closed)} is not held any more")
    return wanted


def retry_quarantined(db: Database, engine: Engine, ids: Sequence[int], *, actor: str, reason: str,
                      now: datetime) -> Retried:
    why = _reason(reason, "quarantine retry")
    wanted = _held_ids(db, ids, "retry")
    try:
        result = quarantine.retry(db, engine, wanted, actor=actor, reason=why, now=now)
    except WaflowError as e:
        raise ConflictError(str(e)) from e
    summary = f"retried {result.retried} quarantined message(s)"
    if result.still_rejected:
        summary += "; still rejected: " + "; ".join(f"{i}: {problem}" for i, problem in result.still_rejected)
    return Retried(summary, result.retried, result.still_rejected)


def drop_quarantined(db: Database, ids: Sequence[int], *, actor: str, reason: str, now: datetime) -> Done:
    why = _reason(reason, "quarantine drop")
    wanted = _held_ids(db, ids, "drop")
    try:
        dropped = quarantine.drop(db, wanted, actor=actor, reason=why, now=now)
    except WaflowError as e:
        raise ConflictError(str(e)) from e
    return Done("quarantine.drop", ", ".join(f"quarantine {i}" for i in wanted),
                f"dropped {dropped} quarantined message(s)")
