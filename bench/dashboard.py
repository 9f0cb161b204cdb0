"""Time every dashboard page's analytics queries: each runs `--loads` times (no cache), p95 printed per query.

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/waflow_bench .venv/bin/python bench/dashboard.py

The calls and arguments are the ones each page makes with its default filters (flow: the first one, date
ranges: the page defaults (funnel and latency 7 days, states 30), stalled: idle 2 h, 1,000 rows, active and
archived users), plus a 30-day funnel, the stalled page with "Archived only" and with a step (the first
campaign's) outside the 24 h window, and the follow-up job's selection of one campaign (jobs.followups._stalled,
paged as run_campaign pages it, read-only: nothing is planned or queued). Every stalled, state and campaign
query covers archived sessions (core.lifecycle): in production most sessions are archived. Target: p95 < 1 s
for every query. Exit status 1 if a query misses it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from core import analytics, campaigns
from core.analytics import Filters, StalledQuery, refresh_rollups
from core.campaigns import SessionFacts
from core.config import Settings
from core.db import Database
from core.flows import default_flows_dir, load_flows
from core.migrate import ensure_schema
from core.models import Campaign
from jobs.followups import _stalled

TARGET_SECONDS = 1.0


def page_queries(db: Database, now: datetime) -> dict[str, list[tuple[str, Callable[[], Any]]]]:
    registry = load_flows(Settings().flows_dir or default_flows_dir())
    flow = registry.latest(registry.names()[0] if "lead_qualification" not in registry.names()
                           else "lead_qualification")
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    days30 = Filters(since=today - timedelta(days=30), until=today + timedelta(days=1))
    days14 = Filters(since=today - timedelta(days=14), until=today + timedelta(days=1))
    days7 = Filters(since=today - timedelta(days=7), until=today + timedelta(days=1))
    funnel7 = Filters(flow=flow.name, since=days7.since, until=days7.until)
    funnel30 = Filters(flow=flow.name, since=days30.since, until=days30.until)
    stalled = StalledQuery(now=now, idle_seconds=7200, limit=1000)
    first = campaigns.list_campaigns(db)[:1]
    stalled_archived = replace(stalled, status="archived")
    stalled_step = replace(stalled, step=first[0].step if first else flow.start, window="outside")
    day_ago = now - timedelta(hours=24)
    campaign_calls: list[tuple[str, Callable[[], Any]]] = [
        ("list_campaigns", lambda: campaigns.list_campaigns(db)),
        ("campaign_results", lambda: campaigns.campaign_results(db, None, now)),
    ]
    if first:
        campaign_calls += [
            ("failures_by_code", lambda: campaigns.failures_by_code(db, first[0].id)),
            ("preview_targets", lambda: campaigns.preview_targets(db, first[0].id, now)),
            ("followups selection", lambda: followup_selection(db, first[0].id, now)),
        ]
    return {
        "Overview": [
            ("has_traffic", lambda: analytics.has_traffic(db)),
            ("filter_options", lambda: analytics.filter_options(db)),
            ("session_counts", lambda: analytics.session_counts(db, Filters())),
            ("sessions_over_time 14d", lambda: analytics.sessions_over_time(db, days14, "day")),
            ("messages_per_hour 7d", lambda: analytics.messages_per_hour(db, now - timedelta(days=7), None)),
            ("webhook_totals 24h", lambda: analytics.webhook_totals(db, day_ago, None)),
            ("pending_queue", lambda: analytics.pending_queue(db, now)),
        ],
        "States": [
            ("state_distribution 30d", lambda: analytics.state_distribution(db, now, days30)),
        ],
        "Funnel": [
            ("funnel 7d", lambda: analytics.funnel(db, flow, funnel7)),
            ("funnel 7d by language", lambda: analytics.funnel(db, flow, funnel7, by="language")),
            ("time_to_complete 7d", lambda: analytics.time_to_complete(db, flow, funnel7)),
            ("dropped_users 7d", lambda: analytics.dropped_users(db, flow, flow.start, funnel7)),
            ("funnel 30d (wider range)", lambda: analytics.funnel(db, flow, funnel30)),
        ],
        "Transition latency": [
            ("transition_latency 7d", lambda: analytics.transition_latency(db, days7)),
            ("latency_samples 7d", lambda: analytics.latency_samples(db, days7)),
            ("latency_trend 7d", lambda: analytics.latency_trend(db, days7, "day")),
        ],
        "Stalled users": [
            ("stalled_users 2h", lambda: analytics.stalled_users(db, stalled)),
            ("stalled_count 2h", lambda: analytics.stalled_count(db, stalled)),
            ("stalled_users archived", lambda: analytics.stalled_users(db, stalled_archived)),
            ("stalled_count archived", lambda: analytics.stalled_count(db, stalled_archived)),
            ("stalled_users step outside", lambda: analytics.stalled_users(db, stalled_step)),
            ("stalled_count step outside", lambda: analytics.stalled_count(db, stalled_step)),
        ],
        "Campaigns": campaign_calls,
        "Health": [
            ("apply_latency 24h", lambda: analytics.apply_latency(db, day_ago, None, None)),
            ("apply_latency hourly", lambda: analytics.apply_latency(db, day_ago, None, "hour")),
            ("webhook_results hourly", lambda: analytics.webhook_results(db, day_ago, None, "hour")),
            ("outbox_backlog", lambda: analytics.outbox_backlog(db, now)),
            ("send_failures 24h", lambda: analytics.send_failures(db, day_ago)),
            ("job_runs", lambda: analytics.job_runs(db)),
            ("sender_pauses", lambda: analytics.sender_pauses(db)),
        ],
    }


def followup_selection(db: Database, campaign_id: int, now: datetime) -> list[SessionFacts]:
    """What one run of the follow-up job selects for a campaign: jobs.followups._stalled page after page (keyset
    paging, as run_campaign does), without planning or queueing anything."""
    with db.session() as s:
        campaign = s.get_one(Campaign, campaign_id)
        s.expunge(campaign)
    size = Settings().followups_batch_size
    selected: list[SessionFacts] = []
    after: tuple[datetime, str, str] | None = None
    while True:
        page = _stalled(db, campaign, now, size, after)
        selected += page
        if len(page) < size:
            return selected
        last = page[-1]
        after = (last.last_inbound_at, last.phone_number_id, last.user_id)


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    position = 0.95 * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="database URL (default: DATABASE_URL)")
    parser.add_argument("--loads", type=int, default=5)
    args = parser.parse_args()
    db = Database(args.url or Settings().database_url)
    ensure_schema(db)
    now = datetime.now(UTC)
    started = time.perf_counter()
    read = refresh_rollups(db)
    print(f"refresh_rollups (the job that keeps the funnel rollup current): {read:,} new transitions read in "
          f"{time.perf_counter() - started:.2f} s")
    slow = 0
    print(f"{'page':<20} {'query':<28} {'rows':>8} {'median s':>9} {'p95 s':>8}")
    for page, queries in page_queries(db, now).items():
        for name, call in queries:
            samples = []
            result: Any = None
            for _ in range(args.loads):
                started = time.perf_counter()
                result = call()
                samples.append(time.perf_counter() - started)
            rows = len(result) if hasattr(result, "__len__") else 1
            worst = p95(samples)
            flag = "" if worst < TARGET_SECONDS else "  <-- over 1 s"
            slow += worst >= TARGET_SECONDS
            print(f"{page:<20} {name:<28} {rows:>8} {statistics.median(samples):>9.3f} {worst:>8.3f}{flag}",
                  flush=True)
    db.dispose()
    print("all queries under 1 s (p95)" if not slow else f"{slow} query(ies) over 1 s (p95)")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
