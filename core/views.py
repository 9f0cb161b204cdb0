"""Read models for operators: the admin API and `sessions show` print exactly these shapes."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import Database
from core.models import (
    AuditEntry,
    Campaign,
    ChatSession,
    InboundEvent,
    MarketingOptOut,
    MessageStatus,
    MessageStatusEvent,
    Outbox,
    Transition,
)
from core.operator import outbox_target, session_target

SERVICE_WINDOW = timedelta(hours=24)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def window_expires_at(session: ChatSession) -> datetime | None:
    """End of the 24 h customer-service window opened by the user's last message (None: closed/never opened)."""
    if session.last_inbound_at is None:
        return None
    if session.window_closed_at is not None and session.window_closed_at >= session.last_inbound_at:
        return None
    return session.last_inbound_at + SERVICE_WINDOW


def session_view(db: Database, phone_number_id: str, user_id: str) -> dict[str, Any] | None:
    """The session, its inbound messages, transitions and outbound messages, all from one snapshot."""
    with db.snapshot() as s:
        session = s.get(ChatSession, (phone_number_id, user_id))
        if session is None or session.status == "new":
            return None
        key = (Transition.phone_number_id == phone_number_id, Transition.user_id == user_id)
        events = s.scalars(
            select(InboundEvent)
            .where(
                InboundEvent.phone_number_id == phone_number_id,
                InboundEvent.user_id == user_id,
                # Late ones too: logged (outcome "late" in the transitions), never taken as an answer.
                InboundEvent.result.in_(("applied", "late")),
            )
            .order_by(InboundEvent.timestamp, InboundEvent.id)
        ).all()
        transitions = s.scalars(select(Transition).where(*key).order_by(Transition.id)).all()
        outbound = s.execute(
            select(Outbox, Campaign.name)
            .outerjoin(Campaign, Campaign.id == Outbox.campaign_id)
            .where(Outbox.phone_number_id == phone_number_id, Outbox.user_id == user_id)
            .order_by(Outbox.id)
        ).all()
        actions = _operator_actions(s, phone_number_id, user_id, [o.id for o, _campaign in outbound])
        expires = window_expires_at(session)
        return {
            "phone_number_id": session.phone_number_id,
            "user_id": session.user_id,
            "flow": session.flow,
            "flow_version": session.flow_version,
            "step": session.current_step,
            "status": session.status,
            "version": session.version,
            "data": session.data,
            "language": session.language,
            "failure_count": session.failure_count,
            "profile_name": session.profile_name,
            "last_inbound_at": _iso(session.last_inbound_at),
            "window_expires_at": _iso(expires),
            "opted_out": session.opted_out,
            # Stopped marketing messages (131050 or the user_preferences webhook): no campaign templates.
            "marketing_opted_out": s.get(MarketingOptOut, (phone_number_id, user_id)) is not None,
            "created_at": _iso(session.created_at),
            "updated_at": _iso(session.updated_at),
            "completed_at": _iso(session.completed_at),
            "archived_at": _iso(session.archived_at),
            "inbound": [_inbound_item(e) for e in events],
            "transitions": [
                {
                    "from": t.from_step,
                    "to": t.to_step,
                    "outcome": t.outcome,
                    "wamid": t.wamid,
                    "at": _iso(t.at),
                    "applied_at": _iso(t.applied_at),
                    "restored": t.restored,
                }
                for t in transitions
            ],
            "outbound": [
                {
                    "id": o.id,
                    "kind": o.kind,
                    "text": o.text,
                    "template": o.template,
                    "campaign": campaign,
                    "status": o.status,
                    "wamid": o.wamid,
                }
                for o, campaign in outbound
            ],
            "operator_actions": actions,
        }


def _operator_actions(s: Session, phone_number_id: str, user_id: str, outbox_ids: list[int]) -> list[dict[str, Any]]:
    """Audit entries about this session and its outbound messages (resolved sends), oldest first."""
    targets = [session_target(phone_number_id, user_id), *(outbox_target(i) for i in outbox_ids)]
    entries = s.scalars(select(AuditEntry).where(AuditEntry.target.in_(targets)).order_by(AuditEntry.at, AuditEntry.id))
    return [{"at": _iso(e.at), "actor": e.actor, "action": e.action, "target": e.target, "reason": e.reason}
            for e in entries]


def _inbound_item(event: InboundEvent) -> dict[str, Any]:
    message = event.message
    return {
        "wamid": event.wamid,
        "timestamp": int(event.timestamp),
        "kind": event.kind,
        "text": message.get("text"),
        "choice_id": message.get("choice_id"),
        "context_id": message.get("context_id"),
        "result": event.result,  # applied | late (older than a message already applied)
    }


def outbound_view(db: Database, wamid: str) -> dict[str, Any] | None:
    with db.snapshot() as s:
        current = s.get(MessageStatus, wamid)
        history = s.scalars(
            select(MessageStatusEvent)
            .where(MessageStatusEvent.wamid == wamid)
            .order_by(MessageStatusEvent.timestamp, MessageStatusEvent.id)
        ).all()
        sent = s.scalars(select(Outbox).where(Outbox.wamid == wamid).limit(1)).first()
        if current is None and not history and sent is None:
            return None
        errors = [error for event in history for error in (event.errors or [])]
        status = current.status if current else (sent.status if sent else None)
        return {
            "wamid": wamid,
            "status": status,
            "errors": [{"code": e.get("code"), "title": e.get("title")} for e in errors],
            "history": [{"status": e.status, "timestamp": int(e.timestamp)} for e in history],
            "outbox_id": sent.id if sent else None,
        }
