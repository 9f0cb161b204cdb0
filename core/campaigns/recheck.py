"""Right before a follow-up leaves: is it still wanted, and can it still go as queued? Pure: no I/O, no clock.

A follow-up is decided when a user has been stalled in a step for the campaign's delay, but it is sent later,
sometimes much later (the sender interval, retries with backoff, a paused business number). By then the user may
have written, moved on, finished or opted out, an operator may have paused the campaign, and a free-text
follow-up may have left the 24 h customer-service window. The sender (jobs/sender.py) asks `recheck_followup`
on every try, in the transaction that marks the try started, and sends, switches to the template, or cancels.

The first matching cause wins, most telling first: no session (or campaign), opted out, completed, moved to
another step, replied (still in the step), campaign paused, a template to a user who stopped marketing messages
since it was queued (core.campaigns.guardrails); only then the window (a free text switched to the template is
cancelled for that user too). Archived sessions are ordinary
sessions here (archived means idle, still in its step: core.lifecycle).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from core.campaigns.guardrails import MARKETING_OPTED_OUT
from core.campaigns.planning import FollowUpPlan, SessionFacts, _template_plan, window_expires
from core.campaigns.spec import CampaignLike

# Cause (the key of the sender's "cancelled_<cause>" count) → the reason recorded on the outbox and follow-up rows.
CANCEL_REASONS = {
    "no_session": "user's session no longer exists",
    "opted_out": "user opted out",
    "completed": "user completed the flow",
    "moved": "user moved to another step",
    "replied": "user replied",
    "no_campaign": "campaign no longer exists",
    "paused": "campaign paused",
    "marketing_opted_out": MARKETING_OPTED_OUT,
    "window_closed": "24 h window closed and no template configured",
}


@dataclass(frozen=True)
class QueuedFollowUp:
    """The follow-up as it was queued: its outbox row's kind and the FollowUp row's step and stall."""

    kind: str  # text | template
    step: str
    # The session's last_inbound_at when the follow-up was decided (None: unknown, e.g. a row made by hand).
    stalled_since: datetime | None


@dataclass(frozen=True)
class LiveSession:
    """The session as it is at send time."""

    flow: str
    current_step: str
    status: str  # active | completed | archived (| new)
    archived_from: str | None
    facts: SessionFacts
    # WhatsApp time of the newest message stored but not applied yet: the user wrote even if the engine has not
    # caught up.
    pending_inbound_at: datetime | None = None
    marketing_opted_out: bool = False  # a row in marketing_optouts for this user and business number


@dataclass(frozen=True)
class Recheck:
    action: str  # send | template | cancel
    cause: str | None = None  # action cancel: a key of CANCEL_REASONS, or "window_closed" for a template skip
    reason: str | None = None
    plan: FollowUpPlan | None = None  # action template: what to send instead of the free text


SEND = Recheck("send")


def recheck_followup(
    campaign: CampaignLike | None, followup: QueuedFollowUp, session: LiveSession | None, now: datetime
) -> Recheck:
    """Send as queued, send the campaign's template instead of the free text, or cancel with the reason."""
    if session is None:
        return cancel("no_session")
    if campaign is None:  # not reachable through the API (nothing deletes campaigns), kept for rows made by hand
        return cancel("no_campaign")
    cause = _unwanted(campaign, followup, session)
    if cause is not None:
        return cancel(cause)
    if followup.kind != "text" or window_open(session.facts, now):
        return SEND
    return _template_instead(campaign, session, now)


def cancel(cause: str) -> Recheck:
    return Recheck("cancel", cause, CANCEL_REASONS[cause])


def _unwanted(campaign: CampaignLike, followup: QueuedFollowUp, session: LiveSession) -> str | None:
    if session.facts.opted_out:
        return "opted_out"
    if completed(session):
        return "completed"
    if (session.flow, session.current_step) != (campaign.flow, followup.step):
        return "moved"
    if wrote_since(session, followup.stalled_since):
        return "replied"
    if not campaign.active:
        return "paused"
    if followup.kind == "template" and session.marketing_opted_out:
        return "marketing_opted_out"
    return None


def completed(session: LiveSession) -> bool:
    """The run is over: completed, or archived after completing (core.lifecycle)."""
    return session.status == "completed" or (session.status == "archived" and session.archived_from == "completed")


def wrote_since(session: LiveSession, stalled_since: datetime | None) -> bool:
    """Any message of the user newer than the stall the follow-up was decided in, applied or still pending."""
    if stalled_since is None:
        return False
    pending = session.pending_inbound_at
    return session.facts.last_inbound_at > stalled_since or (pending is not None and pending > stalled_since)


def window_open(facts: SessionFacts, now: datetime) -> bool:
    """Free text may still go now. No safety margin: planning keeps one because the sender needs time after
    the decision; here the request leaves right after this check (and a retry is checked again)."""
    expires = window_expires(facts)
    return expires is not None and expires > now


def _template_instead(campaign: CampaignLike, session: LiveSession, now: datetime) -> Recheck:
    if not campaign.template_name:
        return cancel("window_closed")
    if session.marketing_opted_out:
        return cancel("marketing_opted_out")
    plan = _template_plan(campaign, session.facts, now, False)
    if plan.action != "template":
        return Recheck("cancel", "window_closed", plan.reason or CANCEL_REASONS["window_closed"])
    return Recheck("template", plan=plan)
