"""Follow-up campaigns: define, validate, preview who they would reach, and measure what they did.

The dashboard and the CLI manage campaigns only through these functions; `jobs/followups.py` sends them.
`plan_followup` is the one pure rule deciding when and how a stalled session gets a follow-up, used both
by the job and by `preview_targets`, so the preview shows exactly what the job will do. `recheck_followup` is
the pure rule the sender (`jobs/sender.py`) applies right before each try of a follow-up: send, switch to the
template, or cancel.
"""

from core.campaigns.guardrails import UserGuard, user_timezone
from core.campaigns.planning import (
    FollowUpPlan,
    History,
    SessionFacts,
    in_quiet_hours,
    plan_followup,
    quiet_end_after,
    window_expires,
)
from core.campaigns.recheck import (
    CANCEL_REASONS,
    LiveSession,
    QueuedFollowUp,
    Recheck,
    recheck_followup,
)
from core.campaigns.results import (
    COST_COLUMNS,
    PREVIEW_COLUMNS,
    RECOVERING_OUTCOMES,
    RESULT_COLUMNS,
    CostEstimate,
    campaign_costs,
    campaign_results,
    cancellations_by_reason,
    failures_by_code,
    preview_cost,
    preview_targets,
)
from core.campaigns.spec import (
    WINDOW_CLOSED_CODE,
    WINDOW_SAFETY,
    CampaignSpec,
    build_spec,
    create_campaign,
    get_campaign,
    list_campaigns,
    parse_duration,
    set_active,
    spec_of,
    update_campaign,
)
from core.campaigns.targeting import (
    FACT_COLUMNS,
    PastFollowUp,
    facts_of,
    history_of,
    load_guards,
    load_histories,
    stall_filter,
)

__all__ = [
    "CANCEL_REASONS",
    "COST_COLUMNS",
    "CampaignSpec",
    "CostEstimate",
    "FACT_COLUMNS",
    "FollowUpPlan",
    "History",
    "LiveSession",
    "PREVIEW_COLUMNS",
    "PastFollowUp",
    "QueuedFollowUp",
    "RECOVERING_OUTCOMES",
    "RESULT_COLUMNS",
    "Recheck",
    "SessionFacts",
    "WINDOW_CLOSED_CODE",
    "WINDOW_SAFETY",
    "build_spec",
    "campaign_costs",
    "campaign_results",
    "cancellations_by_reason",
    "create_campaign",
    "facts_of",
    "failures_by_code",
    "get_campaign",
    "history_of",
    "in_quiet_hours",
    "list_campaigns",
    "load_guards",
    "load_histories",
    "parse_duration",
    "plan_followup",
    "preview_cost",
    "preview_targets",
    "quiet_end_after",
    "recheck_followup",
    "set_active",
    "spec_of",
    "stall_filter",
    "update_campaign",
    "UserGuard",
    "user_timezone",
    "window_expires",
]
