"""When and how a stalled session gets a follow-up: pure rules (quiet hours, 24 h window, templates, and the
guardrails of core.campaigns.guardrails: frequency cap, quiet hours in the user's local time, marketing opt-out).

Placeholders of the text and template parameters are filled strictly (core.placeholders.render_strict): a
user without a value for a placeholder that has no fallback is skipped with the reason, so no `{...}` is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from core.campaigns.guardrails import MARKETING_OPTED_OUT, NO_GUARD, UserGuard, cap_reason, user_timezone
from core.campaigns.spec import SESSION_FIELDS, WINDOW_SAFETY, CampaignLike
from core.errors import WaflowError
from core.machine import TEXT_BODY_MAX
from core.placeholders import has_value, render_strict
from core.views import SERVICE_WINDOW


@dataclass(frozen=True)
class SessionFacts:
    phone_number_id: str
    user_id: str
    language: str | None
    data: dict[str, Any]
    last_inbound_at: datetime
    window_closed_at: datetime | None
    opted_out: bool
    profile_name: str | None = None


@dataclass(frozen=True)
class History:
    """This campaign's follow-ups to one session."""

    next_attempt: int = 1
    sent_this_stall: int = 0  # queued follow-ups since the user's last message (a 131047 failure does not count)
    skipped_this_stall: bool = False
    last_sent_at: datetime | None = None


@dataclass(frozen=True)
class FollowUpPlan:
    due_at: datetime | None  # None: nothing more will be sent in this stall
    action: str  # text | template | skip | none
    reason: str | None
    window_open: bool
    kind: str | None = None
    body: dict[str, Any] | None = None
    text: str | None = None
    template: str | None = None


def in_quiet_hours(campaign: CampaignLike, at: datetime, zone: str | None = None) -> bool:
    """In the campaign's quiet hours at `at`, read in `zone` (the user's; None: the campaign's timezone)."""
    if not campaign.quiet_start or not campaign.quiet_end:
        return False
    local = at.astimezone(ZoneInfo(zone or campaign.timezone)).time()
    start, end = _hhmm(campaign.quiet_start), _hhmm(campaign.quiet_end)
    if start == end:
        return False
    return start <= local < end if start < end else (local >= start or local < end)


def quiet_end_after(campaign: CampaignLike, at: datetime, zone_name: str | None = None) -> datetime:
    """`at` itself when it is outside quiet hours (read in `zone_name`), else the first moment after them."""
    if not in_quiet_hours(campaign, at, zone_name):
        return at
    assert campaign.quiet_end is not None
    zone = ZoneInfo(zone_name or campaign.timezone)
    local = at.astimezone(zone)
    end = _hhmm(campaign.quiet_end)
    candidate = datetime.combine(local.date(), end, tzinfo=zone)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), end, tzinfo=zone)
    return candidate.astimezone(at.tzinfo)


def _hhmm(value: str) -> time:
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def placeholder_values(facts: SessionFacts) -> dict[str, Any]:
    """What placeholders are filled from: the session's data, and its fields (SESSION_FIELDS) where the data has
    no value of that name (a flow may collect its own `profile_name`, the name the user typed)."""
    values: dict[str, Any] = {field: getattr(facts, field) for field in SESSION_FIELDS}
    values.update((k, v) for k, v in facts.data.items() if has_value(v) or k not in values)
    return values


def window_expires(facts: SessionFacts) -> datetime | None:
    """Same rule as core.views.window_expires_at: a 131047 after the last message closes the window."""
    if facts.window_closed_at is not None and facts.window_closed_at >= facts.last_inbound_at:
        return None
    return facts.last_inbound_at + SERVICE_WINDOW


def plan_followup(
    campaign: CampaignLike, facts: SessionFacts, history: History, now: datetime, guard: UserGuard = NO_GUARD
) -> FollowUpPlan:
    """When and how this session gets its next follow-up from this campaign (pure: no I/O, no clock). `guard`:
    the user's follow-ups of every campaign in the cap window and marketing opt-out (read by the caller)."""
    delay = timedelta(seconds=campaign.delay_seconds)
    due = facts.last_inbound_at + delay
    if history.sent_this_stall and history.last_sent_at is not None:
        due = max(due, history.last_sent_at + delay)
    due = quiet_end_after(campaign, max(due, now), user_timezone(facts.user_id, campaign.timezone))
    expires = window_expires(facts)
    window_open = expires is not None and expires > due + WINDOW_SAFETY
    blocked = _blocked(campaign, facts, history)
    if blocked is not None:
        return FollowUpPlan(None, "none", blocked, window_open)
    capped = cap_reason(guard)
    if capped is not None:
        return FollowUpPlan(due, "skip", capped, window_open)
    if window_open and campaign.text:
        try:
            text = render_strict(campaign.text, placeholder_values(facts))[:TEXT_BODY_MAX]
        except WaflowError as e:
            return FollowUpPlan(due, "skip", str(e), window_open)
        body = {"type": "text", "text": {"body": text}}
        return FollowUpPlan(due, "text", None, window_open, kind="text", body=body, text=text)
    if campaign.template_name and guard.marketing_opted_out:
        return FollowUpPlan(due, "skip", MARKETING_OPTED_OUT, window_open)
    if campaign.template_name:
        return _template_plan(campaign, facts, due, window_open)
    reason = "outside the 24 h window and no template configured"
    return FollowUpPlan(due, "skip", reason, window_open)


def _blocked(campaign: CampaignLike, facts: SessionFacts, history: History) -> str | None:
    """Why nothing more goes to this session in this stall, or None."""
    if facts.opted_out:
        return "opted out"
    if history.sent_this_stall >= campaign.max_sends:
        return f"max sends reached ({campaign.max_sends})"
    if history.skipped_this_stall:
        return "skipped earlier in this stall"
    return None


def _template_plan(campaign: CampaignLike, facts: SessionFacts, due: datetime, window_open: bool) -> FollowUpPlan:
    values: list[str] = []
    data = placeholder_values(facts)
    for number, param in enumerate(campaign.template_params or [], start=1):
        try:
            value = render_strict(param, data)
        except WaflowError as e:
            return FollowUpPlan(due, "skip", f"template parameter {number}: {e}", window_open)
        if not value.strip():
            # Meta rejects an empty parameter; an empty fallback ({key|}) is meant for free text.
            return FollowUpPlan(due, "skip", f"template parameter {number} is empty", window_open)
        values.append(value)
    template: dict[str, Any] = {"name": campaign.template_name, "language": {"code": campaign.template_language}}
    if values:
        template["components"] = [{"type": "body", "parameters": [{"type": "text", "text": v} for v in values]}]
    body = {"type": "template", "template": template}
    return FollowUpPlan(
        due, "template", None, window_open, kind="template", body=body,
        text=" | ".join(values) or None, template=f"{campaign.template_name} ({campaign.template_language})",
    )
