"""A campaign's definition (validated `CampaignSpec`) and its storage: create, read, edit, pause.

`text` and each of `template_params` may hold placeholders (grammar in core.placeholders): `{key}` is filled
from the session's data, `{key|fallback}` falls back to `fallback` when the user has no value. A key must be
one the flow collects (a step's `key` or `increment`, in any version of the flow) or a session field
(SESSION_FIELDS: `profile_name`, the user's WhatsApp profile name). They are checked when a campaign is created
or edited, so a typo such as `{nme}` is refused there instead of reaching users; a user who lacks a value for a
placeholder without fallback is skipped at planning time (core.campaigns.planning), never sent the braces.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from sqlalchemy import (
    select,
)
from sqlalchemy.exc import IntegrityError

from core.db import Database
from core.errors import WaflowError
from core.flows import FlowRegistry
from core.machine import TEXT_BODY_MAX
from core.models import Campaign
from core.placeholders import KEY, PlaceholderError, parse

WINDOW_CLOSED_CODE = 131047
# Free text is only chosen if the window is still open this long after the decision (the sender needs time).
WINDOW_SAFETY = timedelta(minutes=5)

_DURATION_PART = re.compile(r"(\d+)\s*([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Longer is a typo, and would overflow datetime arithmetic and database integers.
MAX_DURATION_SECONDS = 3650 * 86400
_HHMM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")
# Placeholder keys filled from the session row rather than its data (core.campaigns.planning.placeholder_values).
SESSION_FIELDS = ("profile_name",)
# An edit touching one of these re-checks the placeholders; pausing a campaign with an old text still works.
_PLACEHOLDER_FIELDS = frozenset({"text", "template_params", "flow"})


def parse_duration(text: str) -> int:
    """'90s', '30m', '2h', '3d', '1h30m' -> seconds."""
    cleaned = text.strip().lower().replace(" ", "") if isinstance(text, str) else ""
    parts = _DURATION_PART.findall(cleaned)
    if not cleaned or "".join(n + u for n, u in parts) != cleaned:
        raise ValueError(f"invalid duration {text!r}: use a number with s, m, h or d, e.g. 90s, 30m, 2h, 3d, 1h30m")
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be longer than zero")
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"invalid duration {text[:40]!r}: at most 3650d (ten years)")
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


def _placeholder_texts(spec: CampaignSpec) -> list[tuple[str, str]]:
    texts = [("text", spec.text)] if spec.text is not None else []
    return texts + [(f"template parameter {i}", p) for i, p in enumerate(spec.template_params, start=1)]


def _check_placeholders(spec: CampaignSpec, flows: FlowRegistry | None) -> None:
    """Braces that are not placeholders, always; keys neither the flow nor the session has, when `flows` is given."""
    available = None if flows is None else available_keys(flows, spec.flow)
    for where, text in _placeholder_texts(spec):
        try:
            placeholders = parse(text)
        except PlaceholderError as e:
            raise WaflowError(f"invalid campaign {spec.name!r}: {where}: {e}") from e
        for placeholder in placeholders:
            if available is not None and placeholder.key not in available:
                raise WaflowError(
                    f"invalid campaign {spec.name!r}: unknown placeholder {{{placeholder.key}}} in {where}; "
                    f"available: {', '.join(f'{{{k}}}' for k in sorted(available))}"
                )


def available_keys(flows: FlowRegistry, flow_name: str) -> set[str]:
    """Keys a placeholder of a campaign on this flow may name: what any version of the flow stores, and the
    session fields. A session keeps the version it started with, so an older version's keys still have values."""
    keys = set(SESSION_FIELDS)
    for flow in flows:
        if flow.name == flow_name:
            for step in flow.steps.values():
                keys.update(k for k in (step.key, step.increment) if k is not None and KEY.fullmatch(k))
    return keys


def create_campaign(db: Database, spec: CampaignSpec, flows: FlowRegistry | None = None) -> Campaign:
    """Store a new campaign. Unknown flow/step or placeholder key (when `flows` is given), malformed
    placeholders or a taken name -> WaflowError, and nothing is stored."""
    _check_flow(spec, flows)
    _check_placeholders(spec, flows)
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
    """Change some fields; the result is validated as a whole (e.g. removing the text needs a template), and
    its placeholders again when the text, template parameters or flow change."""
    unknown = set(changes) - set(CampaignSpec.model_fields)
    if unknown:
        raise WaflowError(f"unknown campaign field(s): {', '.join(sorted(unknown))}")
    current = get_campaign(db, campaign_id)
    try:
        spec = CampaignSpec(**{**spec_of(current).model_dump(), **changes})
    except ValidationError as e:
        raise _spec_error(e) from e
    _check_flow(spec, flows)
    if _PLACEHOLDER_FIELDS & set(changes):
        _check_placeholders(spec, flows)
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
