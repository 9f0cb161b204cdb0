"""Analytics queries for the dashboard and the CLI: every number they show comes from a function in this package.

Each function takes the `Database` (plus filters) and returns a pandas DataFrame. The heavy lifting
(filtering, grouping, counting) runs in SQL through SQLAlchemy Core, the same statement on SQLite and
PostgreSQL. Percentiles run as `percentile_cont` on PostgreSQL and as pandas' linear quantile on
SQLite: both interpolate the same way, so the two backends give the same numbers.

Times that describe users are WhatsApp times (`transitions.at`, `sessions.last_inbound_at`), see
DESIGN.md; `applied_at` / `received_at` only feed the operational health figures.
"""

from core.analytics.common import Filters, funnel_path
from core.analytics.funnel import dropped_users, funnel, refresh_rollups, time_to_complete
from core.analytics.health import (
    apply_latency,
    job_runs,
    outbox_backlog,
    pending_queue,
    quarantine_counts,
    quarantined_recent,
    send_failures,
    sender_pauses,
    webhook_results,
    webhook_totals,
)
from core.analytics.latency import latency_samples, latency_trend, transition_latency
from core.analytics.overview import (
    filter_options,
    has_traffic,
    messages_per_hour,
    session_counts,
    sessions_over_time,
    state_distribution,
)
from core.analytics.stalled import StalledQuery, stalled_count, stalled_users
from core.flows import Flow

__all__ = [
    "Filters",
    "Flow",
    "StalledQuery",
    "apply_latency",
    "dropped_users",
    "filter_options",
    "funnel",
    "funnel_path",
    "has_traffic",
    "job_runs",
    "latency_samples",
    "latency_trend",
    "messages_per_hour",
    "outbox_backlog",
    "pending_queue",
    "quarantine_counts",
    "quarantined_recent",
    "refresh_rollups",
    "send_failures",
    "sender_pauses",
    "session_counts",
    "sessions_over_time",
    "stalled_count",
    "stalled_users",
    "state_distribution",
    "time_to_complete",
    "transition_latency",
    "webhook_results",
    "webhook_totals",
]
