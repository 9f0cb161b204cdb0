"""Queue follow-ups to users stalled in a campaign's step: exactly one outbox message per attempt.

For each active campaign: sessions in (flow, step), status active, whose last
message is older than the delay, not opted out, with fewer than `max_sends` follow-ups of this campaign
since that message (a reply restarts the count; a 131047 failure does not count, so a template may follow).
`core.campaigns.plan_followup` decides text (inside the 24 h window), template (outside it), or skip (a
template is needed and none is configured: recorded with the reason, never retried in that stall). Quiet hours
are the user's own (their number's timezone), so a campaign runs around the clock and each user waits for their
morning. The guardrails (core.campaigns.guardrails) are read once per batch: a user over the frequency cap, or a
template to a user who stopped marketing messages, is skipped with the reason.

Exactly once, even when two runs overlap or one crashes midway: each session is written in its own short
transaction that inserts the FollowUp row (unique campaign + session + attempt) and its outbox row (unique
idempotency key "followup:<campaign>:<phone>:<user>:<attempt>") together, both ON CONFLICT DO NOTHING. The
loser of an overlap inserts nothing; a crash leaves every session either fully queued or untouched.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, select, tuple_, update

from core import logsafe
from core.campaigns import (
    WINDOW_CLOSED_CODE,
    FollowUpPlan,
    SessionFacts,
    facts_of,
    history_of,
    load_guards,
    load_histories,
    plan_followup,
    stall_filter,
)
from core.config import Settings
from core.db import Database, insert_for
from core.models import Campaign, ChatSession, FollowUp, Outbox

log = logging.getLogger(__name__)


def run_followups(
    db: Database, settings: Settings, now: datetime, *, batch_size: int | None = None
) -> dict[str, Any]:
    totals: Counter[str] = Counter()
    with db.session() as s:
        campaigns = list(s.scalars(select(Campaign).where(Campaign.active.is_(True)).order_by(Campaign.id)))
    cap = (settings.followup_cap, timedelta(seconds=settings.followup_cap_window_seconds))
    for campaign in campaigns:
        totals.update(run_campaign(db, campaign, now, batch_size or settings.followups_batch_size, cap))
    return dict(totals)


def run_campaign(
    db: Database, campaign: Campaign, now: datetime, batch_size: int, cap: tuple[int, timedelta]
) -> Counter[str]:
    counts: Counter[str] = Counter()
    after: tuple[datetime, str, str] | None = None
    while True:
        sessions = _stalled(db, campaign, now, batch_size, after)
        if not sessions:
            return counts
        with db.session() as s:
            keys = [(x.phone_number_id, x.user_id) for x in sessions]
            histories = load_histories(s, campaign.id, keys)
            guards = load_guards(s, keys, now, *cap)
        for facts in sessions:
            key = (facts.phone_number_id, facts.user_id)
            history = history_of(histories.get(key, []), facts.last_inbound_at)
            plan = plan_followup(campaign, facts, history, now, guards[key])
            if plan.action == "none" or plan.due_at is None or plan.due_at > now:
                counts["not_due"] += 1
                continue
            counts[_queue_one(db, campaign, facts, plan, history.next_attempt, now)] += 1
        last = sessions[-1]
        after = (last.last_inbound_at, last.phone_number_id, last.user_id)
        if len(sessions) < batch_size:
            return counts


def _stalled(
    db: Database, campaign: Campaign, now: datetime, limit: int, after: tuple[datetime, str, str] | None
) -> list[SessionFacts]:
    """Sessions due for this campaign by the SQL-checkable rules, oldest stall first (keyset paging)."""
    s, f = ChatSession, FollowUp
    this_stall = and_(
        f.campaign_id == campaign.id,
        f.phone_number_id == s.phone_number_id,
        f.user_id == s.user_id,
        f.stalled_since == s.last_inbound_at,
    )
    window_failed = exists().where(Outbox.id == f.outbox_id, Outbox.error_code == WINDOW_CLOSED_CODE)
    sent = select(func.count()).select_from(f).where(this_stall, f.status == "queued", ~window_failed)
    skipped = exists().where(this_stall, f.status == "skipped")
    order = (s.last_inbound_at, s.phone_number_id, s.user_id)
    stmt = (
        select(s)
        .where(
            *stall_filter(campaign),
            s.last_inbound_at <= now - timedelta(seconds=campaign.delay_seconds),
            s.opted_out.is_(False),
            sent.scalar_subquery() < campaign.max_sends,
            ~skipped,
        )
        .order_by(*order)
        .limit(limit)
    )
    if after is not None:
        stmt = stmt.where(tuple_(*order) > tuple_(*after))
    with db.session() as session:
        return [facts_of(x) for x in session.scalars(stmt)]


def _queue_one(
    db: Database, campaign: Campaign, facts: SessionFacts, plan: FollowUpPlan, attempt: int, now: datetime
) -> str:
    """One session, one transaction: the FollowUp row (the claim on this attempt) and its outbox message."""
    insert = insert_for(db.engine.dialect.name)
    key = (campaign.id, facts.phone_number_id, facts.user_id, attempt)
    with db.begin() as conn:
        followup_id = conn.execute(
            insert(FollowUp)
            .values(
                campaign_id=campaign.id, phone_number_id=facts.phone_number_id, user_id=facts.user_id,
                attempt=attempt, step=campaign.step, status="skipped" if plan.action == "skip" else "queued",
                reason=plan.reason, stalled_since=facts.last_inbound_at, created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["campaign_id", "phone_number_id", "user_id", "attempt"])
            .returning(FollowUp.id)
        ).scalar()
        if followup_id is None:
            return "duplicate"  # another run took this attempt first
        if plan.action == "skip":
            log.info("follow-up %s to %s/%s skipped: %s", campaign.name, key[1], logsafe.masked(key[2]),
                     logsafe.clean(plan.reason))
            return "skipped"
        outbox_id = conn.execute(
            insert(Outbox)
            .values(
                idempotency_key="followup:{}:{}:{}:{}".format(*key),
                phone_number_id=facts.phone_number_id, user_id=facts.user_id, kind=plan.kind, body=plan.body,
                text=plan.text, template=plan.template, campaign_id=campaign.id, step=campaign.step,
                status="queued", attempts=0, next_attempt_at=now, created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["idempotency_key"])
            .returning(Outbox.id)
        ).scalar()
        if outbox_id is None:
            # The key exists without its FollowUp row: only possible if someone edited rows by hand.
            raise RuntimeError(f"outbox key of follow-up {key} exists without its follow-up row")
        conn.execute(update(FollowUp).where(FollowUp.id == followup_id).values(outbox_id=outbox_id))
    return f"queued_{plan.action}"
