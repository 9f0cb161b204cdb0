"""Follow-up campaigns: define, validate, preview who they would reach, and measure what they did.

The dashboard and the CLI manage campaigns only through these functions; `jobs/followups.py` sends them.
`plan_followup` is the one pure rule deciding when and how a stalled session gets a follow-up, used both
by the job and by `preview_targets`, so the preview shows exactly what the job will do.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from itertools import groupby
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from sqlalchemy import (
    ColumnElement,
    Interval,
    Row,
    String,
    and_,
    cast,
    exists,
    false,
    func,
    literal_column,
    or_,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import Database
from core.errors import WaflowError
from core.flows import FlowRegistry
from core.machine import TEXT_BODY_MAX, render
from core.models import Campaign, ChatSession, FollowUp, MessageStatus, MessageStatusEvent, Outbox, Transition
from core.views import SERVICE_WINDOW

if TYPE_CHECKING:  # pandas is imported where used: the follow-up job never needs it
    import pandas as pd

WINDOW_CLOSED_CODE = 131047
# Free text is only chosen if the window is still open this long after the decision (the sender needs time).
WINDOW_SAFETY = timedelta(minutes=5)

_DURATION_PART = re.compile(r"(\d+)\s*([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_HHMM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")
_PARAM_KEY = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_duration(text: str) -> int:
    """'90s', '30m', '2h', '3d', '1h30m' -> seconds."""
    cleaned = text.strip().lower().replace(" ", "") if isinstance(text, str) else ""
    parts = _DURATION_PART.findall(cleaned)
    if not cleaned or "".join(n + u for n, u in parts) != cleaned:
        raise ValueError(f"invalid duration {text!r}: use a number with s, m, h or d, e.g. 90s, 30m, 2h, 3d, 1h30m")
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be longer than zero")
    return seconds


class CampaignSpec(BaseModel):
    """What an operator defines. Validated here, before anything reaches the database."""

    model_config = ConfigDict(extra="forbid")

    name: str
    flow: str
    step: str
    delay_seconds: int
    text: str | None = None
    template_name: str | None = None
    template_language: str | None = None
    template_params: list[str] = []
    max_sends: int = 1
    quiet_start: str | None = None
    quiet_end: str | None = None
    timezone: str = "UTC"
    active: bool = True
    filter_language: str | None = None
    filter_phone_number_id: str | None = None
    recovery_window_seconds: int = 48 * 3600

    @field_validator("name", "flow", "step")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("delay_seconds", "recovery_window_seconds")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be > 0 seconds")
        return value

    @field_validator("max_sends")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be >= 1")
        return value

    @field_validator("quiet_start", "quiet_end")
    @classmethod
    def _hhmm(cls, value: str | None) -> str | None:
        if value is not None and not _HHMM.fullmatch(value.strip()):
            raise ValueError(f"must be HH:MM (00:00-23:59), got {value!r}")
        return value.strip() if value else None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown timezone {value!r} (use an IANA name like Europe/Madrid)") from e
        return value

    @field_validator("text", "template_name", "template_language")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value if value and value.strip() else None

    @model_validator(mode="after")
    def _message_given(self) -> CampaignSpec:
        if self.text is None and self.template_name is None:
            raise ValueError("a campaign needs a text (inside the 24 h window) or a template (outside it), or both")
        if self.template_name is not None and self.template_language is None:
            raise ValueError("template_language is required with template_name (e.g. en_US)")
        if (self.quiet_start is None) != (self.quiet_end is None):
            raise ValueError("quiet hours need both quiet_start and quiet_end")
        if self.text is not None and len(self.text) > TEXT_BODY_MAX:
            raise ValueError(f"text is longer than WhatsApp's {TEXT_BODY_MAX} characters")
        return self


CampaignLike = Campaign | CampaignSpec


# --- CRUD ------------------------------------------------------------------------------------------------------


def _spec_error(e: ValidationError) -> WaflowError:
    problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'campaign'}: {err['msg']}" for err in e.errors())
    return WaflowError(f"invalid campaign: {problems}")


def _check_flow(spec: CampaignSpec, flows: FlowRegistry | None) -> None:
    if flows is None:
        return
    try:
        flow = flows.latest(spec.flow)
    except WaflowError as e:
        raise WaflowError(f"invalid campaign {spec.name!r}: {e}") from e
    if spec.step not in flow.steps:
        raise WaflowError(
            f"invalid campaign {spec.name!r}: flow {spec.flow!r} has no step {spec.step!r}; steps: {sorted(flow.steps)}"
        )


def create_campaign(db: Database, spec: CampaignSpec, flows: FlowRegistry | None = None) -> Campaign:
    """Store a new campaign. Unknown flow/step (when `flows` is given) or a taken name -> WaflowError."""
    _check_flow(spec, flows)
    try:
        with db.session() as s:
            campaign = Campaign(**spec.model_dump())
            s.add(campaign)
            s.flush()
            s.refresh(campaign)
            return campaign
    except IntegrityError as e:
        raise WaflowError(f"a campaign named {spec.name!r} already exists") from e


def get_campaign(db: Database, campaign: int | str) -> Campaign:
    """By id, or by name (a name made of digits also matches as an id when no campaign has that name)."""
    with db.session() as s:
        found: Campaign | None = None
        if isinstance(campaign, str):
            found = s.scalars(select(Campaign).where(Campaign.name == campaign)).first()
            if found is None and campaign.strip().isdigit():
                found = s.get(Campaign, int(campaign))
        else:
            found = s.get(Campaign, int(campaign))
        if found is None:
            raise WaflowError(f"no campaign {campaign!r}")
        return found


def list_campaigns(db: Database) -> list[Campaign]:
    with db.session() as s:
        return list(s.scalars(select(Campaign).order_by(Campaign.id)))


def spec_of(campaign: Campaign) -> CampaignSpec:
    return CampaignSpec(**{name: getattr(campaign, name) for name in CampaignSpec.model_fields})


def update_campaign(db: Database, campaign_id: int, flows: FlowRegistry | None = None, **changes: Any) -> Campaign:
    """Change some fields; the result is validated as a whole (e.g. removing the text needs a template)."""
    unknown = set(changes) - set(CampaignSpec.model_fields)
    if unknown:
        raise WaflowError(f"unknown campaign field(s): {', '.join(sorted(unknown))}")
    current = get_campaign(db, campaign_id)
    try:
        spec = CampaignSpec(**{**spec_of(current).model_dump(), **changes})
    except ValidationError as e:
        raise _spec_error(e) from e
    _check_flow(spec, flows)
    try:
        with db.session() as s:
            row = s.get(Campaign, current.id)
            assert row is not None
            for name, value in spec.model_dump().items():
                setattr(row, name, value)
            row.updated_at = datetime.now(UTC)
            s.flush()
            return row
    except IntegrityError as e:
        raise WaflowError(f"a campaign named {spec.name!r} already exists") from e


def set_active(db: Database, campaign: int | str, active: bool) -> Campaign:
    return update_campaign(db, get_campaign(db, campaign).id, active=active)


def build_spec(**fields: Any) -> CampaignSpec:
    """A CampaignSpec from loose input (CLI, forms), with errors as one WaflowError line."""
    try:
        return CampaignSpec(**fields)
    except ValidationError as e:
        raise _spec_error(e) from e


# --- planning (pure) -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionFacts:
    phone_number_id: str
    user_id: str
    language: str | None
    data: dict[str, Any]
    last_inbound_at: datetime
    window_closed_at: datetime | None
    opted_out: bool


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


def in_quiet_hours(campaign: CampaignLike, at: datetime) -> bool:
    if not campaign.quiet_start or not campaign.quiet_end:
        return False
    local = at.astimezone(ZoneInfo(campaign.timezone)).time()
    start, end = _hhmm(campaign.quiet_start), _hhmm(campaign.quiet_end)
    if start == end:
        return False
    return start <= local < end if start < end else (local >= start or local < end)


def quiet_end_after(campaign: CampaignLike, at: datetime) -> datetime:
    """`at` itself when it is outside quiet hours, else the first moment after them."""
    if not in_quiet_hours(campaign, at):
        return at
    assert campaign.quiet_end is not None
    zone = ZoneInfo(campaign.timezone)
    local = at.astimezone(zone)
    end = _hhmm(campaign.quiet_end)
    candidate = datetime.combine(local.date(), end, tzinfo=zone)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), end, tzinfo=zone)
    return candidate.astimezone(at.tzinfo)


def _hhmm(value: str) -> time:
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def window_expires(facts: SessionFacts) -> datetime | None:
    """Same rule as core.views.window_expires_at: a 131047 after the last message closes the window."""
    if facts.window_closed_at is not None and facts.window_closed_at >= facts.last_inbound_at:
        return None
    return facts.last_inbound_at + SERVICE_WINDOW


def plan_followup(campaign: CampaignLike, facts: SessionFacts, history: History, now: datetime) -> FollowUpPlan:
    """When and how this session gets its next follow-up from this campaign (pure: no I/O, no clock)."""
    delay = timedelta(seconds=campaign.delay_seconds)
    due = facts.last_inbound_at + delay
    if history.sent_this_stall and history.last_sent_at is not None:
        due = max(due, history.last_sent_at + delay)
    due = quiet_end_after(campaign, max(due, now))
    expires = window_expires(facts)
    window_open = expires is not None and expires > due + WINDOW_SAFETY
    if facts.opted_out:
        return FollowUpPlan(None, "none", "opted out", window_open)
    if history.sent_this_stall >= campaign.max_sends:
        return FollowUpPlan(None, "none", f"max sends reached ({campaign.max_sends})", window_open)
    if history.skipped_this_stall:
        return FollowUpPlan(None, "none", "skipped earlier in this stall", window_open)
    if window_open and campaign.text:
        text = render(campaign.text, facts.data)[:TEXT_BODY_MAX]
        body = {"type": "text", "text": {"body": text}}
        return FollowUpPlan(due, "text", None, window_open, kind="text", body=body, text=text)
    if campaign.template_name:
        return _template_plan(campaign, facts, due, window_open)
    reason = "outside the 24 h window and no template configured"
    return FollowUpPlan(due, "skip", reason, window_open)


def _template_plan(campaign: CampaignLike, facts: SessionFacts, due: datetime, window_open: bool) -> FollowUpPlan:
    values: list[str] = []
    for param in campaign.template_params or []:
        match = _PARAM_KEY.fullmatch(param)
        if match is None:
            values.append(param)
            continue
        value = facts.data.get(match[1])
        if value is None or str(value).strip() == "":
            reason = f"template parameter {param} is not in the session data"
            return FollowUpPlan(due, "skip", reason, window_open)
        values.append(str(value))
    template: dict[str, Any] = {"name": campaign.template_name, "language": {"code": campaign.template_language}}
    if values:
        template["components"] = [{"type": "body", "parameters": [{"type": "text", "text": v} for v in values]}]
    body = {"type": "template", "template": template}
    return FollowUpPlan(
        due, "template", None, window_open, kind="template", body=body,
        text=" | ".join(values) or None, template=f"{campaign.template_name} ({campaign.template_language})",
    )


# --- queries shared with the job -------------------------------------------------------------------------------


def stall_filter(campaign: CampaignLike) -> list[Any]:
    """Sessions sitting in the campaign's step (status active), with the campaign's optional filters."""
    conditions: list[Any] = [
        ChatSession.flow == campaign.flow,
        ChatSession.current_step == campaign.step,
        ChatSession.status == "active",
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
    ChatSession.last_inbound_at, ChatSession.window_closed_at, ChatSession.opted_out,
)


def facts_of(session: ChatSession | Row[Any]) -> SessionFacts:
    """From a ChatSession, or a row of FACT_COLUMNS."""
    assert session.last_inbound_at is not None
    return SessionFacts(
        phone_number_id=session.phone_number_id, user_id=session.user_id, language=session.language,
        data=dict(session.data or {}), last_inbound_at=session.last_inbound_at,
        window_closed_at=session.window_closed_at, opted_out=bool(session.opted_out),
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


# --- preview and results (DataFrames for the dashboard and the CLI) -----------------------------------------------


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
    for facts, past in _stalled_with_histories(db, target, limit):
        history = history_of(past, facts.last_inbound_at)
        plan = plan_followup(target, facts, history, now)
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
    "skipped",
]
# An answer that moves the user out of the follow-up's step (the counterpart of "stalled there").
RECOVERING_OUTCOMES = ("advanced", "completed")


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
    the skipped ones; targeted counts the sessions. ix_transitions_session_at answers both "after it" checks.
    """
    f, t = FollowUp, Transition
    queued = f.status == "queued"
    after = and_(t.phone_number_id == f.phone_number_id, t.user_id == f.user_id, t.at > f.created_at, t.at <= now)
    recovered = exists().where(
        after, t.outcome.in_(RECOVERING_OUTCOMES), t.from_step == f.step,
        t.at <= _plus_seconds(db, f.created_at, Campaign.recovery_window_seconds),
    )
    counted: dict[str, ColumnElement[bool]] = {
        "sent": and_(queued, Outbox.status == "sent"),
        "delivered": and_(queued, MessageStatus.status.in_(("delivered", "read"))),
        "read": and_(queued, MessageStatus.status == "read"),
        "failed": and_(queued, or_(Outbox.status == "failed", MessageStatus.status == "failed")),
        "replied": and_(queued, exists().where(after)),
        "recovered": and_(queued, recovered),
        "skipped": f.status == "skipped",
    }
    per_session = (
        select(f.campaign_id, *(func.count().filter(test).label(name) for name, test in counted.items()))
        .join(Campaign, Campaign.id == f.campaign_id)
        .outerjoin(Outbox, Outbox.id == f.outbox_id)
        .outerjoin(MessageStatus, MessageStatus.wamid == Outbox.wamid)
        .where(f.campaign_id.in_(campaign_ids))
        .group_by(f.campaign_id, f.phone_number_id, f.user_id)
        .subquery("per_session")
    )
    stmt = select(
        per_session.c.campaign_id, func.count().label("targeted"),
        *(func.sum(per_session.c[name]).label(name) for name in counted),
    ).group_by(per_session.c.campaign_id)
    with db.engine.connect() as conn:
        return {
            row["campaign_id"]: {name: int(row[name]) for name in RESULT_COLUMNS[3:]}
            for row in conn.execute(stmt).mappings()
        }


def campaign_results(db: Database, campaign: int | str | None, now: datetime) -> pd.DataFrame:
    """One row per campaign: targeted, sent, delivered, read, failed, replied, recovered, skipped."""
    import pandas as pd
    campaigns = [get_campaign(db, campaign)] if campaign is not None else list_campaigns(db)
    counts = _result_counts(db, [c.id for c in campaigns], now) if campaigns else {}
    none = dict.fromkeys(RESULT_COLUMNS[3:], 0)
    rows = [
        {"campaign_id": c.id, "campaign": c.name, "active": c.active, **counts.get(c.id, none)} for c in campaigns
    ]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


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
