"""Which sessions a campaign targets and what it already sent them: queries shared by the job and the preview."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Row,
    func,
    or_,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from core.campaigns.guardrails import UserGuard
from core.campaigns.planning import History, SessionFacts
from core.campaigns.spec import WINDOW_CLOSED_CODE, CampaignLike
from core.lifecycle import in_progress
from core.models import ChatSession, FollowUp, MarketingOptOut, Outbox


def stall_filter(campaign: CampaignLike) -> list[Any]:
    """Sessions sitting in the campaign's step, archived ones included (archived means idle, not gone: see
    core.lifecycle), with the campaign's optional filters."""
    conditions: list[Any] = [
        ChatSession.flow == campaign.flow,
        ChatSession.current_step == campaign.step,
        in_progress(),
        ChatSession.last_inbound_at.is_not(None),
    ]
    if campaign.filter_language:
        conditions.append(ChatSession.language == campaign.filter_language)
    if campaign.filter_phone_number_id:
        conditions.append(ChatSession.phone_number_id == campaign.filter_phone_number_id)
    return conditions


# What facts_of reads: select these instead of whole ChatSession objects when there are thousands of sessions.
FACT_COLUMNS = (
    ChatSession.phone_number_id, ChatSession.user_id, ChatSession.language, ChatSession.data,
    ChatSession.last_inbound_at, ChatSession.window_closed_at, ChatSession.opted_out, ChatSession.profile_name,
)


def facts_of(session: ChatSession | Row[Any]) -> SessionFacts:
    """From a ChatSession, or a row of FACT_COLUMNS."""
    assert session.last_inbound_at is not None
    return SessionFacts(
        phone_number_id=session.phone_number_id, user_id=session.user_id, language=session.language,
        data=dict(session.data or {}), last_inbound_at=session.last_inbound_at,
        window_closed_at=session.window_closed_at, opted_out=bool(session.opted_out),
        profile_name=session.profile_name,
    )


@dataclass(frozen=True)
class PastFollowUp:
    """One earlier follow-up of a campaign to a session, with its outbox row's Meta error code."""

    attempt: int
    status: str
    stalled_since: datetime | None
    created_at: datetime
    error_code: int | None


def history_of(rows: list[PastFollowUp], stalled_since: datetime) -> History:
    """From this campaign's follow-ups to one session."""
    if not rows:
        return History()
    this_stall = [f for f in rows if f.stalled_since == stalled_since]
    sent = [f for f in this_stall if f.status == "queued" and f.error_code != WINDOW_CLOSED_CODE]
    return History(
        next_attempt=max(f.attempt for f in rows) + 1,
        sent_this_stall=len(sent),
        skipped_this_stall=any(f.status == "skipped" for f in this_stall),
        last_sent_at=max((f.created_at for f in sent), default=None),
    )


def load_histories(
    s: Session | Connection, campaign_id: int, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], list[PastFollowUp]]:
    """This campaign's follow-ups to each of these sessions."""
    if not keys:
        return {}
    f = FollowUp
    stmt = (
        select(f.phone_number_id, f.user_id, f.attempt, f.status, f.stalled_since, f.created_at, Outbox.error_code)
        .outerjoin(Outbox, Outbox.id == f.outbox_id)
        .where(f.campaign_id == campaign_id, f.user_id.in_({user for _, user in keys}))
    )
    found: dict[tuple[str, str], list[PastFollowUp]] = {}
    for row in s.execute(stmt):
        past = PastFollowUp(row.attempt, row.status, row.stalled_since, row.created_at, row.error_code)
        found.setdefault((row.phone_number_id, row.user_id), []).append(past)
    return found


def load_guards(
    s: Session | Connection, keys: list[tuple[str, str]], now: datetime, cap: int, window: timedelta
) -> dict[tuple[str, str], UserGuard]:
    """Each session's guardrail inputs (core.campaigns.guardrails), for a whole batch: the follow-ups of every
    campaign queued to the user in the window (skipped, cancelled and failed ones never reached them) and the
    marketing opt-out. Two statements per batch, whatever its size."""
    if not keys:
        return {}
    users = {user for _, user in keys}
    f = FollowUp
    counted = (
        select(f.phone_number_id, f.user_id, func.count())
        .outerjoin(Outbox, Outbox.id == f.outbox_id)
        .where(
            f.user_id.in_(users), f.status == "queued", f.created_at > now - window,
            or_(Outbox.status.is_(None), Outbox.status != "failed"),
        )
        .group_by(f.phone_number_id, f.user_id)
    )
    recent = {(row[0], row[1]): int(row[2]) for row in s.execute(counted)}
    optouts = select(MarketingOptOut.phone_number_id, MarketingOptOut.user_id).where(MarketingOptOut.user_id.in_(users))
    opted = {(row[0], row[1]) for row in s.execute(optouts)}
    return {
        key: UserGuard(recent_followups=recent.get(key, 0), marketing_opted_out=key in opted, cap=cap,
                       cap_window=window)
        for key in keys
    }
