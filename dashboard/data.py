"""Cached loaders: every number on a page comes from core.analytics (or core.campaigns) through here.

Each loader takes the database URL first, so two databases (tests, a switched DATABASE_URL) never share a
cache entry. `st.cache_data(ttl=...)` keeps a page fast while several people look at it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, fields
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import streamlit as st
from pydantic import ValidationError

from core import analytics, campaigns, operator, quarantine, views
from core.analytics import Filters, StalledQuery
from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.errors import UnknownFlowError, WaflowError
from core.flows import Flow, FlowRegistry, default_flows_dir, load_flows
from core.migrate import ensure_schema
from core.startup import settings_error

TTL = 60  # seconds
log = logging.getLogger(__name__)


def settings() -> Settings:
    return Settings()


@st.cache_resource(show_spinner=False)
def _database(url: str) -> Database:
    db = Database(url)
    ensure_schema(db)
    return db


@st.cache_resource(show_spinner=False)
def _registry(directory: str) -> FlowRegistry:
    return load_flows(directory)


def url() -> str:
    return settings().database_url


def db() -> Database:
    return _database(url())


def startup_problem() -> str | None:
    """Why no page can be shown (invalid settings, the database unreachable, flows that do not load), as a
    message for the page; None when all is well. Database and flow details go to the log only: this shows
    before anyone has signed in."""
    try:
        current = settings()
    except ValidationError as e:
        return f"The dashboard's settings are invalid: {settings_error(e)}. Fix the environment and restart it."
    try:
        _database(current.database_url).ping()
        registry()
    except WaflowError as e:
        log.warning("dashboard unavailable: %s", e)
        return ("The dashboard cannot reach its database or load its flows (the dashboard's log says why). "
                "Reload this page once that is fixed.")
    return None


def registry() -> FlowRegistry:
    return _registry(str(settings().flows_dir or default_flows_dir()))


def flow(name: str) -> Flow:
    return registry().latest(name)


def now() -> datetime:
    """The current minute: stable within a minute so cached entries are reused."""
    return datetime.now(UTC).replace(second=0, microsecond=0)


def clear() -> None:
    """After a change (campaign created/edited), every page must show it at once."""
    st.cache_data.clear()


# ---------------------------------------------------------------------------------------- analytics
@st.cache_data(ttl=TTL, show_spinner=False)
def has_traffic(database_url: str) -> bool:
    return analytics.has_traffic(_database(database_url))


@st.cache_data(ttl=TTL, show_spinner=False)
def filter_options(database_url: str) -> pd.DataFrame:
    return analytics.filter_options(_database(database_url))


@st.cache_data(ttl=TTL, show_spinner=False)
def session_counts(database_url: str, filters: Filters) -> pd.DataFrame:
    return analytics.session_counts(_database(database_url), filters)


@st.cache_data(ttl=TTL, show_spinner=False)
def sessions_over_time(database_url: str, filters: Filters, unit: str) -> pd.DataFrame:
    return analytics.sessions_over_time(_database(database_url), filters, unit)


@st.cache_data(ttl=TTL, show_spinner=False)
def messages_per_hour(database_url: str, since: datetime | None, until: datetime | None) -> pd.DataFrame:
    return analytics.messages_per_hour(_database(database_url), since, until)


@st.cache_data(ttl=TTL, show_spinner=False)
def state_distribution(database_url: str, at: datetime, filters: Filters) -> pd.DataFrame:
    return analytics.state_distribution(_database(database_url), at, filters)


@st.cache_data(ttl=TTL, show_spinner=False)
def funnel(database_url: str, flow_name: str, filters: Filters, window: float | None, by: str | None
           ) -> pd.DataFrame:
    return analytics.funnel(_database(database_url), flow(flow_name), filters, window, by)


@st.cache_data(ttl=TTL, show_spinner=False)
def time_to_complete(database_url: str, flow_name: str, filters: Filters, window: float | None) -> pd.DataFrame:
    return analytics.time_to_complete(_database(database_url), flow(flow_name), filters, window)


@st.cache_data(ttl=TTL, show_spinner=False)
def dropped_users(database_url: str, flow_name: str, step: str, filters: Filters, window: float | None
                  ) -> pd.DataFrame:
    return analytics.dropped_users(_database(database_url), flow(flow_name), step, filters, window)


@st.cache_data(ttl=TTL, show_spinner=False)
def transition_latency(database_url: str, filters: Filters) -> pd.DataFrame:
    return analytics.transition_latency(_database(database_url), filters)


@st.cache_data(ttl=TTL, show_spinner=False)
def latency_samples(database_url: str, filters: Filters, from_step: str | None, to_step: str | None
                    ) -> pd.DataFrame:
    return analytics.latency_samples(_database(database_url), filters, from_step, to_step)


@st.cache_data(ttl=TTL, show_spinner=False)
def latency_trend(database_url: str, filters: Filters, unit: str) -> pd.DataFrame:
    return analytics.latency_trend(_database(database_url), filters, unit)


@st.cache_data(ttl=TTL, show_spinner=False)
def stalled_users(database_url: str, query: StalledQuery) -> pd.DataFrame:
    return analytics.stalled_users(_database(database_url), query)


@st.cache_data(ttl=TTL, show_spinner=False)
def stalled_count(database_url: str, query: StalledQuery) -> int:
    return analytics.stalled_count(_database(database_url), query)


@st.cache_data(ttl=TTL, show_spinner=False)
def webhook_results(database_url: str, since: datetime | None, until: datetime | None, unit: str) -> pd.DataFrame:
    return analytics.webhook_results(_database(database_url), since, until, unit)


@st.cache_data(ttl=TTL, show_spinner=False)
def webhook_totals(database_url: str, since: datetime | None, until: datetime | None) -> pd.DataFrame:
    return analytics.webhook_totals(_database(database_url), since, until)


@st.cache_data(ttl=10, show_spinner=False)
def pending_queue(database_url: str, at: datetime) -> pd.DataFrame:
    return analytics.pending_queue(_database(database_url), at)


@st.cache_data(ttl=10, show_spinner=False)
def quarantine_counts(database_url: str) -> pd.DataFrame:
    return analytics.quarantine_counts(_database(database_url))


@st.cache_data(ttl=10, show_spinner=False)
def quarantined_recent(database_url: str, limit: int) -> pd.DataFrame:
    return analytics.quarantined_recent(_database(database_url), limit)


@st.cache_data(ttl=TTL, show_spinner=False)
def apply_latency(database_url: str, since: datetime | None, until: datetime | None, unit: str | None
                  ) -> pd.DataFrame:
    return analytics.apply_latency(_database(database_url), since, until, unit)


@st.cache_data(ttl=TTL, show_spinner=False)
def outbox_backlog(database_url: str, at: datetime) -> pd.DataFrame:
    return analytics.outbox_backlog(_database(database_url), at)


@st.cache_data(ttl=TTL, show_spinner=False)
def send_failures(database_url: str, since: datetime | None) -> pd.DataFrame:
    return analytics.send_failures(_database(database_url), since)


@st.cache_data(ttl=TTL, show_spinner=False)
def job_runs(database_url: str) -> pd.DataFrame:
    return analytics.job_runs(_database(database_url))


@st.cache_data(ttl=TTL, show_spinner=False)
def sender_pauses(database_url: str) -> pd.DataFrame:
    return analytics.sender_pauses(_database(database_url))


# ---------------------------------------------------------------------------------------- campaigns
@st.cache_data(ttl=TTL, show_spinner=False)
def campaign_list(database_url: str) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    for c in campaigns.list_campaigns(_database(database_url)):
        rows.append({"id": c.id, **campaigns.spec_of(c).model_dump()})
    columns = ["id", *campaigns.CampaignSpec.model_fields]
    return pd.DataFrame(rows, columns=columns)


@st.cache_data(ttl=TTL, show_spinner=False)
def campaign_results(database_url: str, at: datetime) -> pd.DataFrame:
    return campaigns.campaign_results(_database(database_url), None, at)


@st.cache_data(ttl=TTL, show_spinner=False)
def campaign_failures(database_url: str, campaign_id: int) -> pd.DataFrame:
    return campaigns.failures_by_code(_database(database_url), campaign_id)


@st.cache_data(ttl=TTL, show_spinner=False)
def campaign_preview(database_url: str, campaign_id: int, at: datetime) -> pd.DataFrame:
    return campaigns.preview_targets(_database(database_url), campaign_id, at)


@st.cache_data(ttl=TTL, show_spinner=False)
def campaign_costs(database_url: str, campaign_id: int) -> pd.DataFrame:
    return campaigns.campaign_costs(_database(database_url), campaign_id)


# ---------------------------------------------------------------------------------------- operator actions
# Never cached: an operator acts on what is there now. Each action returns its one-line summary (or raises
# core.operator.OperatorError with the refusal) and clears the caches, so every page shows the change at once.
def session_detail(phone_number_id: str, user_id: str) -> dict[str, Any] | None:
    return views.session_view(db(), phone_number_id, user_id)


def steps_of(flow_name: str, version: int) -> list[str]:
    """The steps of the flow version a session runs (the latest when that version is no longer loaded)."""
    try:
        return list(registry().get(flow_name, version).steps)
    except UnknownFlowError:
        return list(registry().latest(flow_name).steps)


def _acted(done: operator.Done) -> str:
    clear()
    return done.summary


def reset_session(phone_number_id: str, user_id: str, *, actor: str, reason: str) -> str:
    return _acted(operator.reset_session(db(), registry(), phone_number_id, user_id, actor=actor, reason=reason,
                                         now=datetime.now(UTC)))


def move_session(phone_number_id: str, user_id: str, step: str, *, actor: str, reason: str) -> str:
    return _acted(operator.move_session(db(), registry(), phone_number_id, user_id, step, actor=actor, reason=reason,
                                        now=datetime.now(UTC)))


def set_opt_out(phone_number_id: str, user_id: str, opted_out: bool, *, actor: str, reason: str) -> str:
    return _acted(operator.set_opt_out(db(), phone_number_id, user_id, opted_out, actor=actor, reason=reason,
                                       now=datetime.now(UTC)))


def end_handoff(phone_number_id: str, user_id: str, step: str | None, *, actor: str, reason: str) -> str:
    return _acted(operator.end_handoff(db(), registry(), phone_number_id, user_id, step=step, actor=actor,
                                       reason=reason, now=datetime.now(UTC)))


def uncertain_sends() -> pd.DataFrame:
    rows = [asdict(r) for r in operator.uncertain_sends(db())]
    return pd.DataFrame(rows, columns=[f.name for f in fields(operator.Uncertain)])


def resolve_send(outbox_id: int, status: str, wamid: str | None, *, actor: str, reason: str) -> str:
    return _acted(operator.resolve_send(db(), outbox_id, status, wamid=wamid, actor=actor, reason=reason,
                                        now=datetime.now(UTC)))


def quarantined_messages(status: str | None) -> pd.DataFrame:
    rows = [asdict(h) for h in quarantine.list_quarantine(db(), status)]
    return pd.DataFrame(rows, columns=[f.name for f in fields(quarantine.Held)])


def retry_quarantined(ids: list[int], *, actor: str, reason: str) -> operator.Retried:
    result = operator.retry_quarantined(db(), Engine(db(), registry(), settings()), ids, actor=actor, reason=reason,
                                        now=datetime.now(UTC))
    clear()
    return result


def drop_quarantined(ids: list[int], *, actor: str, reason: str) -> str:
    return _acted(operator.drop_quarantined(db(), ids, actor=actor, reason=reason, now=datetime.now(UTC)))
