"""Preview and results for the dashboard and the CLI: who would be targeted now, and what campaigns did."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import groupby
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    Interval,
    String,
    and_,
    case,
    cast,
    exists,
    false,
    func,
    literal_column,
    or_,
    select,
    text,
    true,
)

from core.campaigns.planning import SessionFacts, plan_followup
from core.campaigns.spec import CampaignLike, CampaignSpec, get_campaign, list_campaigns
from core.campaigns.targeting import FACT_COLUMNS, PastFollowUp, facts_of, history_of, load_guards, stall_filter
from core.config import get_settings
from core.db import Database
from core.models import Campaign, ChatSession, FollowUp, MessageStatus, MessageStatusEvent, Outbox, Transition

if TYPE_CHECKING:  # pandas is imported where used: the follow-up job never needs it
    import pandas as pd

PREVIEW_COLUMNS = [
    "phone_number_id", "user_id", "language", "last_inbound_at", "due_at", "window", "followups_sent",
    "opted_out", "would_send_as", "reason",
]


def preview_targets(
    db: Database, campaign: int | str | CampaignSpec, now: datetime, limit: int = 10_000
) -> pd.DataFrame:
    """Every session stalled in the campaign's step: when it would get a follow-up, and as what."""
    import pandas as pd
    target: CampaignLike = campaign if isinstance(campaign, CampaignSpec) else get_campaign(db, campaign)
    rows = []
    stalled = list(_stalled_with_histories(db, target, limit))
    settings = get_settings()
    with db.engine.connect() as conn:  # the guardrails' inputs (frequency cap, marketing opt-out), as the job reads
        guards = load_guards(conn, [(f.phone_number_id, f.user_id) for f, _ in stalled], now, settings.followup_cap,
                             timedelta(seconds=settings.followup_cap_window_seconds))
    for facts, past in stalled:
        history = history_of(past, facts.last_inbound_at)
        plan = plan_followup(target, facts, history, now, guards[(facts.phone_number_id, facts.user_id)])
        rows.append({
            "phone_number_id": facts.phone_number_id, "user_id": facts.user_id, "language": facts.language,
            "last_inbound_at": facts.last_inbound_at, "due_at": plan.due_at,
            "window": "inside" if plan.window_open else "outside", "followups_sent": history.sent_this_stall,
            "opted_out": facts.opted_out, "would_send_as": plan.action, "reason": plan.reason,
        })
    return pd.DataFrame(rows, columns=PREVIEW_COLUMNS)


def _stalled_with_histories(
    db: Database, target: CampaignLike, limit: int
) -> Iterator[tuple[SessionFacts, list[PastFollowUp]]]:
    """The first `limit` sessions stalled in the step (oldest last message first), each with the campaign's
    follow-ups to it (none for an unsaved spec): one statement, so both come from the same snapshot."""
    stalled = (
        select(*FACT_COLUMNS)
        .where(*stall_filter(target))
        .order_by(ChatSession.last_inbound_at, ChatSession.phone_number_id, ChatSession.user_id)
        .limit(limit)
        .subquery("stalled")
    )
    f = FollowUp
    campaign_id = target.id if isinstance(target, Campaign) else None
    followup = and_(f.campaign_id == campaign_id, f.phone_number_id == stalled.c.phone_number_id,
                    f.user_id == stalled.c.user_id)
    joined = stalled.outerjoin(f, followup if campaign_id is not None else false()).outerjoin(
        Outbox, Outbox.id == f.outbox_id
    )
    stmt = (
        select(stalled, f.attempt, f.status, f.stalled_since, f.created_at, Outbox.error_code)
        .select_from(joined)
        .order_by(stalled.c.last_inbound_at, stalled.c.phone_number_id, stalled.c.user_id)
    )
    with db.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    for _, group in groupby(rows, key=lambda row: (row.phone_number_id, row.user_id)):
        session = list(group)
        past = [PastFollowUp(r.attempt, r.status, r.stalled_since, r.created_at, r.error_code)
                for r in session if r.attempt is not None]
        yield facts_of(session[0]), past


RESULT_COLUMNS = [
    "campaign_id", "campaign", "active", "targeted", "sent", "delivered", "read", "failed", "replied", "recovered",
    "skipped", "cancelled",
]
# An answer that moves the user out of the follow-up's step (the counterpart of "stalled there").
RECOVERING_OUTCOMES = ("advanced", "completed")
COST_COLUMNS = ["category", "messages", "billable"]
# The category of a message whose statuses carried no pricing (yet): Meta sends it with sent/delivered.
NO_PRICING = "not reported"


def _plus_seconds(db: Database, at: Any, seconds: Any) -> Any:
    """`at` + `seconds` (an integer column) in SQL, exact to the microsecond on both backends."""
    if db.is_postgres:
        return at + seconds * literal_column("interval '1 second'", Interval)
    # SQLite keeps 'YYYY-MM-DD HH:MM:SS.ffffff' text: shift the whole seconds, keep the fraction (strftime would
    # round it to milliseconds, and .9995 up into the next second).
    shift = "+" + cast(seconds, String) + " seconds"
    whole = func.strftime("%Y-%m-%d %H:%M:%S", func.substr(at, 1, 19), shift, type_=String)
    return whole.concat(func.substr(at, 20))


def _result_counts(db: Database, campaign_ids: list[int], now: datetime) -> dict[int, dict[str, int]]:
    """RESULT_COLUMNS' counts per campaign id, aggregated in SQL (campaigns without follow-ups are absent).

    Per follow-up: sent, delivered, read, failed, replied (the user wrote after it, up to `now`) and recovered
    (advanced out of its step within the campaign's recovery window) count queued follow-ups; skipped counts
    the skipped ones, cancelled those the sender cancelled right before sending (jobs/sender.py: the user
    replied, moved on, completed or opted out, the campaign was paused, the window closed without a template);
    targeted counts the sessions. ix_transitions_session_at answers both "after it" checks, asked only where the
    session's last message can tell nothing: a user whose last message is older than the follow-up neither
    replied nor recovered, and one who wrote after it but before `now` replied (most follow-ups at scale go to
    users who never answer, so the log is read for few of them).
    """
    f, t = FollowUp, Transition
    queued = f.status == "queued"
    # Before the sender rechecked follow-ups it cancelled opt-outs on the outbox row only.
    cancelled = or_(f.status == "cancelled", and_(queued, Outbox.status == "cancelled"))
    after = and_(t.phone_number_id == f.phone_number_id, t.user_id == f.user_id, t.at > f.created_at, t.at <= now)
    last = ChatSession.last_inbound_at  # NULL when the session moved to a new number: ask the log then
    silent = and_(last.is_not(None), last <= f.created_at)
    replied = case((silent, false()), (and_(last.is_not(None), last <= now), true()), else_=exists().where(after))
    recovered = case((silent, false()), else_=exists().where(
        after, t.outcome.in_(RECOVERING_OUTCOMES), t.from_step == f.step,
        t.at <= _plus_seconds(db, f.created_at, Campaign.recovery_window_seconds),
    ))
    counted: dict[str, ColumnElement[bool]] = {
        "sent": and_(queued, Outbox.status == "sent"),
        "delivered": and_(queued, MessageStatus.status.in_(("delivered", "read"))),
        "read": and_(queued, MessageStatus.status == "read"),
        "failed": and_(queued, or_(Outbox.status == "failed", MessageStatus.status == "failed")),
        "replied": and_(queued, replied),
        "recovered": and_(queued, recovered),
        "skipped": f.status == "skipped",
        "cancelled": cancelled,
    }
    per_session = (
        select(f.campaign_id, *(func.count().filter(test).label(name) for name, test in counted.items()))
        .join(Campaign, Campaign.id == f.campaign_id)
        # Restricted to the campaigns' own rows so the planner reads them by ix_outbox_campaign, not every reply.
        .outerjoin(Outbox, and_(Outbox.id == f.outbox_id, Outbox.campaign_id.in_(campaign_ids)))
        .outerjoin(MessageStatus, MessageStatus.wamid == Outbox.wamid)
        .outerjoin(ChatSession, and_(ChatSession.phone_number_id == f.phone_number_id,
                                     ChatSession.user_id == f.user_id))
        .where(f.campaign_id.in_(campaign_ids))
        .group_by(f.campaign_id, f.phone_number_id, f.user_id)
        .subquery("per_session")
    )
    stmt = select(
        per_session.c.campaign_id, func.count().label("targeted"),
        *(func.sum(per_session.c[name]).label(name) for name in counted),
    ).group_by(per_session.c.campaign_id)
    with db.engine.connect() as conn:
        if db.is_postgres:
            # JIT compiling this sub-second aggregate cost more than it saved (0.7-1.4 s at 70,000 follow-ups).
            conn.execute(text("SET LOCAL jit = off"))
        return {
            row["campaign_id"]: {name: int(row[name]) for name in RESULT_COLUMNS[3:]}
            for row in conn.execute(stmt).mappings()
        }


def campaign_results(db: Database, campaign: int | str | None, now: datetime) -> pd.DataFrame:
    """One row per campaign: targeted, sent, delivered, read, failed, replied, recovered, skipped, cancelled."""
    import pandas as pd
    campaigns = [get_campaign(db, campaign)] if campaign is not None else list_campaigns(db)
    counts = _result_counts(db, [c.id for c in campaigns], now) if campaigns else {}
    none = dict.fromkeys(RESULT_COLUMNS[3:], 0)
    rows = [
        {"campaign_id": c.id, "campaign": c.name, "active": c.active, **counts.get(c.id, none)} for c in campaigns
    ]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def cancellations_by_reason(db: Database, campaign: int | str) -> pd.DataFrame:
    """Follow-ups of one campaign cancelled right before sending, by reason (most frequent first)."""
    import pandas as pd
    target = get_campaign(db, campaign)
    reason = func.coalesce(Outbox.error_title, FollowUp.reason).label("reason")
    stmt = (
        select(reason, func.count().label("count"))
        .select_from(FollowUp)
        .outerjoin(Outbox, Outbox.id == FollowUp.outbox_id)
        .where(
            FollowUp.campaign_id == target.id,
            or_(FollowUp.status == "cancelled", and_(FollowUp.status == "queued", Outbox.status == "cancelled")),
        )
        .group_by(reason)
        .order_by(func.count().desc(), reason)
    )
    with db.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return pd.DataFrame([{"reason": reason, "count": int(n)} for reason, n in rows], columns=["reason", "count"])


def failures_by_code(db: Database, campaign: int | str) -> pd.DataFrame:
    """Failed follow-ups of one campaign by Meta error code: send-time errors and failed delivery statuses."""
    import pandas as pd
    target = get_campaign(db, campaign)
    counts: dict[int | None, dict[str, Any]] = {}
    with db.engine.connect() as conn:
        sync = conn.execute(
            select(Outbox.error_code, Outbox.error_title, func.count())
            .where(Outbox.campaign_id == target.id, Outbox.status == "failed")
            .group_by(Outbox.error_code, Outbox.error_title)
        ).all()
        delivery = conn.execute(
            select(MessageStatus.wamid, MessageStatus.error_code)
            .join(Outbox, Outbox.wamid == MessageStatus.wamid)
            .where(Outbox.campaign_id == target.id, MessageStatus.status == "failed")
        ).all()
        titles = _status_titles(conn, [w for w, _ in delivery])
    for code, title, count in sync:
        entry = counts.setdefault(code, {"code": code, "title": title, "count": 0})
        entry["count"] += int(count)
    for wamid, code in delivery:
        entry = counts.setdefault(code, {"code": code, "title": titles.get(wamid), "count": 0})
        entry["title"] = entry["title"] or titles.get(wamid)
        entry["count"] += 1
    frame = pd.DataFrame(list(counts.values()), columns=["code", "title", "count"])
    return frame.sort_values("count", ascending=False, ignore_index=True) if not frame.empty else frame


def _status_titles(conn: Any, wamids: list[str]) -> dict[str, str]:
    if not wamids:
        return {}
    titles: dict[str, str] = {}
    events = conn.execute(
        select(MessageStatusEvent.wamid, MessageStatusEvent.errors)
        .where(MessageStatusEvent.wamid.in_(wamids), MessageStatusEvent.status == "failed")
    )
    for wamid, errors in events:
        for error in errors or []:
            if isinstance(error, dict) and error.get("title"):
                titles[wamid] = str(error["title"])
    return titles


@dataclass(frozen=True)
class CostEstimate:
    """What a preview would send: templates (paid, billed by their category), free-form messages (free inside
    the 24 h customer service window) and sessions that would get nothing (skipped or not eligible)."""

    templates: int
    free_form: int
    skipped: int

    def describe(self) -> str:
        return (f"{self.templates:,} template send(s) (paid), {self.free_form:,} free-form send(s) (free inside "
                f"the 24 h window), {self.skipped:,} skipped")


def preview_cost(frame: pd.DataFrame) -> CostEstimate:
    """The cost side of `preview_targets`: its rows counted by `would_send_as`."""
    counts = frame["would_send_as"].value_counts()
    templates, free_form = int(counts.get("template", 0)), int(counts.get("text", 0))
    return CostEstimate(templates=templates, free_form=free_form, skipped=len(frame) - templates - free_form)


def campaign_costs(db: Database, campaign: int | str) -> pd.DataFrame:
    """The campaign's follow-up messages Meta reported on, by pricing category (most messages first): messages
    and how many of them are billable. A message whose statuses carried no pricing counts as "not reported"."""
    import pandas as pd
    target = get_campaign(db, campaign)
    billable = func.count().filter(MessageStatus.pricing_billable.is_(True))
    stmt = (
        select(MessageStatus.pricing_category, func.count(), billable)
        .select_from(FollowUp)
        .join(Outbox, Outbox.id == FollowUp.outbox_id)
        .join(MessageStatus, MessageStatus.wamid == Outbox.wamid)
        .where(FollowUp.campaign_id == target.id)
        .group_by(MessageStatus.pricing_category)
    )
    with db.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    frame = pd.DataFrame(
        [{"category": category or NO_PRICING, "messages": int(n), "billable": int(paid)} for category, n, paid in rows],
        columns=COST_COLUMNS,
    )
    return frame.sort_values(["messages", "category"], ascending=[False, True], ignore_index=True)
