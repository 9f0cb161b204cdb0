"""Analytics on both backends: real traffic through Engine.ingest/apply_pending, exact numbers asserted.

The story (lead_qualification: ask_name → ask_email → ask_city → done), T0 = 2026-11-02 10:00 UTC:
  u1 (PN1)  hi@0, Ana@60, ana@example.com@180, Madrid@480                      → completed
  u2 (PN1)  hi@100, Bob@400, "bad"@500 (reprompt), bob@example.io@1000          → stalled at ask_city
  u3 (PN1)  hi@200                                                              → stalled at ask_name
  u4 (PN2)  hi@300, Cy@3900                                                     → stalled at ask_email
  u5 (PN1)  STOP@250                                                            → opted out, never entered
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import insert, select, update
from sqlalchemy import text as sql

from core import analytics
from core.analytics import Filters, StalledQuery
from core.db import Database
from core.engine import Engine
from core.flows import FlowRegistry
from core.messages import InboundMessage
from core.models import Campaign, ChatSession, FollowUp, Outbox, StepReach, Transition, WebhookStat

T0 = int(datetime(2026, 11, 2, 10, 0, tzinfo=UTC).timestamp())
ROOT = Path(__file__).resolve().parent.parent

STORY: list[tuple[str, str, int, str]] = [
    ("PN1", "u1", 0, "hi"),
    ("PN1", "u1", 60, "Ana"),
    ("PN1", "u1", 180, "ana@example.com"),
    ("PN1", "u1", 480, "Madrid"),
    ("PN1", "u2", 100, "hi"),
    ("PN1", "u2", 400, "Bob"),
    ("PN1", "u2", 500, "bad"),
    ("PN1", "u2", 1000, "bob@example.io"),
    ("PN1", "u3", 200, "hi"),
    ("PN2", "u4", 300, "hi"),
    ("PN2", "u4", 3900, "Cy"),
    ("PN1", "u5", 250, "STOP"),
]


def at(offset: float) -> datetime:
    return datetime.fromtimestamp(T0 + offset, UTC)


def deliver(engine: Engine, phone: str, user: str, offset: int, text: str, *, apply: bool = True) -> None:
    """Store one message 1 s after it was sent and apply it 2 s later: apply latency is exactly 2 s."""
    message = InboundMessage(
        phone_number_id=phone, user_id=user, wamid=f"wamid.{user}.{offset}", timestamp=T0 + offset, kind="text",
        text=text,
    )
    engine.ingest([message], now=at(offset + 1))
    if apply:
        engine.apply_pending(message.session_key, now=at(offset + 3))


@pytest.fixture
def story(engine: Engine, db: Database) -> Database:
    for phone, user, offset, text in sorted(STORY, key=lambda item: item[2]):
        deliver(engine, phone, user, offset, text)
    with db.begin() as conn:
        # The shipped flows have no language step: u4 chose Spanish as a language step would record it.
        conn.execute(update(ChatSession).where(ChatSession.user_id == "u4").values(language="es"))
    return db


def lead(registry: FlowRegistry) -> analytics.Flow:
    return registry.latest("lead_qualification")


def rows(frame: pd.DataFrame, *columns: str) -> list[tuple[object, ...]]:
    return [tuple(None if pd.isna(v) else v for v in row) for row in frame[list(columns)].itertuples(index=False)]


SINCE = Filters(since=at(-86400), until=at(86400))


def test_funnel_reach_drop_off_and_median_time_to_next(story: Database, registry: FlowRegistry) -> None:
    frame = analytics.funnel(story, lead(registry), SINCE)
    assert rows(frame, "step", "reached", "went_on", "conversion_pct", "drop_off_pct", "median_seconds_to_next") == [
        ("ask_name", 4, 3, 100.0, 25.0, 300.0),
        ("ask_email", 3, 2, 75.0, 33.3, 360.0),
        ("ask_city", 2, 1, 50.0, 50.0, 300.0),
        ("done", 1, None, 25.0, None, None),
    ]


def test_funnel_conversion_window_and_date_range(story: Database, registry: FlowRegistry) -> None:
    windowed = analytics.funnel(story, lead(registry), SINCE, window_seconds=1000)
    # u4 reached ask_email 3600 s after entering: outside a 1000 s window.
    assert rows(windowed, "step", "reached", "went_on") == [
        ("ask_name", 4, 2), ("ask_email", 2, 2), ("ask_city", 2, 1), ("done", 1, None)
    ]
    late = analytics.funnel(story, lead(registry), Filters(since=at(150), until=at(86400)))
    # Only users who entered at or after T0+150: u3 and u4.
    assert rows(late, "step", "reached") == [("ask_name", 2), ("ask_email", 1), ("ask_city", 0), ("done", 0)]
    nobody = analytics.funnel(story, lead(registry), Filters(since=at(86400)))
    assert nobody.empty


def test_funnel_breakdowns_and_filters(story: Database, registry: FlowRegistry) -> None:
    by_number = analytics.funnel(story, lead(registry), SINCE, by="phone_number_id")
    assert rows(by_number, "segment", "step", "reached") == [
        ("PN1", "ask_name", 3), ("PN1", "ask_email", 2), ("PN1", "ask_city", 2), ("PN1", "done", 1),
        ("PN2", "ask_name", 1), ("PN2", "ask_email", 1), ("PN2", "ask_city", 0), ("PN2", "done", 0),
    ]
    by_language = analytics.funnel(story, lead(registry), SINCE, by="language")
    assert rows(by_language[by_language.step == "ask_email"], "segment", "reached", "went_on") == [
        ("en", 2, 2), ("es", 1, 0)
    ]
    spanish = analytics.funnel(story, lead(registry), Filters(language="es", since=SINCE.since))
    assert rows(spanish, "step", "reached") == [("ask_name", 1), ("ask_email", 1), ("ask_city", 0), ("done", 0)]
    pn2 = analytics.funnel(story, lead(registry), Filters(phone_number_id="PN2"))
    assert pn2["reached"].tolist() == [1, 1, 0, 0]


def test_time_to_complete_and_dropped_users(story: Database, registry: FlowRegistry) -> None:
    done = analytics.time_to_complete(story, lead(registry), SINCE)
    assert rows(done, "user_id", "seconds") == [("u1", 480.0)]
    at_email = analytics.dropped_users(story, lead(registry), "ask_email", SINCE)
    assert rows(at_email, "phone_number_id", "user_id", "current_step", "language") == [
        ("PN2", "u4", "ask_email", "es")
    ]
    assert at_email.loc[0, "reached_at"] == at(3900)
    at_name = analytics.dropped_users(story, lead(registry), "ask_name", SINCE)
    assert at_name["user_id"].tolist() == ["u3"]
    with pytest.raises(ValueError, match="not a non-final step"):
        analytics.dropped_users(story, lead(registry), "done", SINCE)


def test_transition_latency_percentiles_and_friction(story: Database) -> None:
    frame = analytics.transition_latency(story, SINCE)
    assert rows(frame, "from_step", "to_step", "n", "p50", "p90", "p99", "friction") == [
        # u2's move to ask_city came 500 s after its reprompted answer; u1's 120 s after its email.
        ("ask_email", "ask_city", 2, 310.0, 462.0, 496.2, True),
        ("ask_name", "ask_email", 3, 300.0, 2940.0, 3534.0, True),
        ("ask_city", "done", 1, 300.0, 300.0, 300.0, True),
    ]
    only_pn2 = analytics.transition_latency(story, Filters(phone_number_id="PN2"))
    assert rows(only_pn2, "from_step", "n", "p50") == [("ask_name", 1, 3600.0)]
    samples = analytics.latency_samples(story, SINCE, from_step="ask_name")
    assert sorted(samples["seconds"].tolist()) == [60.0, 300.0, 3600.0]
    trend = analytics.latency_trend(story, SINCE)
    assert rows(trend, "n", "p50") == [(6, 300.0)]
    assert trend.loc[0, "bucket"] == datetime(2026, 11, 2, tzinfo=UTC)


def test_state_distribution_and_overview(story: Database) -> None:
    now = at(7200)
    states = analytics.state_distribution(story, now)
    assert rows(states, "flow", "step", "users") == [
        ("lead_qualification", "ask_name", 2), ("lead_qualification", "ask_city", 1),
        ("lead_qualification", "ask_email", 1),
    ]
    city = states[states.step == "ask_city"].iloc[0]
    assert city["p50_hours_in_step"] == round((7200 - 1000) / 3600, 2)
    spanish = analytics.state_distribution(story, now, Filters(language="es"))
    assert rows(spanish, "step", "users") == [("ask_email", 1)]
    counts = analytics.session_counts(story)
    assert counts.loc[0, ["total", "active", "completed", "archived"]].tolist() == [5, 4, 1, 0]
    assert counts.loc[0, "completion_rate"] == 20.0
    over_time = analytics.sessions_over_time(story, SINCE)
    assert rows(over_time, "new_sessions", "completions") == [(4, 1)]
    per_hour = analytics.messages_per_hour(story)
    assert rows(per_hour, "messages") == [(11,), (1,)]
    assert per_hour["hour"].tolist() == [at(0), at(3600)]


def _followup(db: Database, user: str) -> None:
    with db.begin() as conn:
        campaign_id = conn.execute(
            insert(Campaign).values(name="nudge", flow="lead_qualification", step="ask_city", delay_seconds=3600)
        ).inserted_primary_key[0]
        conn.execute(
            insert(FollowUp).values(
                campaign_id=campaign_id, phone_number_id="PN1", user_id=user, attempt=1, step="ask_city",
                status="queued",
            )
        )


def test_stalled_users_window_opt_out_and_followups(story: Database) -> None:
    _followup(story, "u2")
    q = StalledQuery(now=at(7200), idle_seconds=3600)
    frame = analytics.stalled_users(story, q)
    assert rows(frame, "user_id", "step", "inside_window", "opted_out", "followups_sent") == [
        ("u3", "ask_name", True, False, 0),
        ("u5", "ask_name", True, True, 0),
        ("u2", "ask_city", True, False, 1),
    ]
    assert frame.loc[2, "idle_hours"] == round(6200 / 3600, 2)
    assert frame.loc[2, "window_expires_at"] == at(1000) + timedelta(hours=24)
    assert analytics.stalled_count(story, q) == 3
    subscribed = StalledQuery(now=at(7200), idle_seconds=3600, opted_out="no", step="ask_name")
    assert analytics.stalled_users(story, subscribed)["user_id"].tolist() == ["u3"]
    # A day later u4 is idle too, and everyone's window has closed (u4's by Meta's 131047 even before).
    later = at(3900 + 86400 + 60)
    outside = analytics.stalled_users(story, StalledQuery(now=later, idle_seconds=3600, window="outside"))
    assert outside["user_id"].tolist() == ["u3", "u5", "u2", "u4"]
    assert analytics.stalled_users(story, StalledQuery(now=later, idle_seconds=3600, window="inside")).empty
    with story.begin() as conn:
        conn.execute(update(ChatSession).where(ChatSession.user_id == "u4").values(window_closed_at=at(4000)))
    closed = analytics.stalled_users(story, StalledQuery(now=at(5000), idle_seconds=60, window="outside"))
    assert closed["user_id"].tolist() == ["u4"]
    assert analytics.stalled_count(story, StalledQuery(now=at(5000), idle_seconds=60, window="inside")) == 3


def test_health_numbers(story: Database, engine: Engine) -> None:
    deliver(engine, "PN1", "u3", 8000, "Dee", apply=False)
    pending = analytics.pending_queue(story, at(8001 + 30))
    assert pending.loc[0, "pending"] == 1
    assert pending.loc[0, "oldest_age_seconds"] == 30.0
    latency = analytics.apply_latency(story)
    assert rows(latency, "n", "p50", "p99") == [(12, 2.0, 2.0)]
    hourly = analytics.apply_latency(story, unit="hour")
    assert hourly["n"].tolist() == [11, 1]
    with story.begin() as conn:
        conn.execute(insert(WebhookStat), [
            {"bucket": at(0), "result": "accepted", "count": 10},
            {"bucket": at(60), "result": "accepted", "count": 5},
            {"bucket": at(60), "result": "duplicate", "count": 2},
            {"bucket": at(3600), "result": "rejected_signature", "count": 1},
        ])
        conn.execute(update(Outbox).where(Outbox.user_id == "u1").values(status="failed", error_code=131026))
        conn.execute(update(Outbox).where(Outbox.user_id == "u4").values(status="sent"))
    totals = analytics.webhook_totals(story)
    assert rows(totals, "result", "count") == [("accepted", 15), ("duplicate", 2), ("rejected_signature", 1)]
    per_hour = analytics.webhook_results(story, since=at(0), until=at(3600))
    assert rows(per_hour, "result", "count") == [("accepted", 15), ("duplicate", 2)]
    backlog = analytics.outbox_backlog(story, at(10000))
    statuses = dict(rows(backlog, "status", "messages"))
    assert statuses["failed"] == 4
    assert statuses["sent"] == 2
    assert sum(statuses.values()) == backlog["messages"].sum()
    failures = analytics.send_failures(story)
    assert rows(failures, "source", "error_code", "count") == [("send", "131026", 4)]


def test_empty_database_gives_empty_frames(db: Database, registry: FlowRegistry) -> None:
    now = at(0)
    assert not analytics.has_traffic(db)
    assert analytics.funnel(db, lead(registry), SINCE).empty
    assert analytics.transition_latency(db).empty
    assert analytics.latency_trend(db).empty
    assert analytics.state_distribution(db, now).empty
    assert analytics.stalled_users(db, StalledQuery(now=now, idle_seconds=60)).empty
    assert analytics.session_counts(db).loc[0, "completion_rate"] == 0.0
    assert analytics.sessions_over_time(db).empty
    assert analytics.messages_per_hour(db).empty
    assert analytics.apply_latency(db).loc[0, "n"] == 0
    assert analytics.send_failures(db).empty
    assert analytics.pending_queue(db, now).loc[0, "pending"] == 0


# ---------------------------------------------------------------------------------------------- CLI
def run_cli(database_url: str, flows_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"DATABASE_URL": database_url, "FLOWS_DIR": str(flows_dir), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "core", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_funnel_command_prints_the_dashboard_numbers(story: Database, database_url: str, flows_dir: Path,
                                                     registry: FlowRegistry) -> None:
    since = at(-86400).date().isoformat()
    result = run_cli(database_url, flows_dir, "funnel", "--flow", "lead_qualification", "--since", since,
                     "--format", "json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    expected = analytics.funnel(story, lead(registry), Filters(since=at(-86400).replace(hour=0, minute=0)))
    columns = ("step", "reached", "went_on", "drop_off_pct", "median_seconds_to_next")
    assert [tuple(r[c] for c in columns) for r in printed] == rows(expected, *columns)
    as_csv = run_cli(database_url, flows_dir, "funnel", "--flow", "lead_qualification", "--format", "csv")
    assert list(csv.DictReader(io.StringIO(as_csv.stdout)))[1]["reached"] == "3"
    table = run_cli(database_url, flows_dir, "funnel", "--flow", "lead_qualification")
    assert "ask_email" in table.stdout
    assert "33.3" in table.stdout
    bad = run_cli(database_url, flows_dir, "funnel", "--flow", "nope")
    assert bad.returncode != 0
    assert "nope" in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: no flow named 'nope'")


def test_export_stalled_command_writes_the_filtered_rows(story: Database, database_url: str, flows_dir: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "stalled.csv"
    result = run_cli(database_url, flows_dir, "export-stalled", "--step", "ask_name", "--idle", "2h",
                     "--flow", "lead_qualification", "--out", str(out))
    assert result.returncode == 0, result.stderr
    exported = list(csv.DictReader(out.open()))
    # Wall-clock now is far past T0: u3 and u5 are idle at ask_name (u4 moved on to ask_email).
    assert [(r["phone_number_id"], r["user_id"], r["step"]) for r in exported] == [("PN1", "u3", "ask_name"),
                                                                                  ("PN1", "u5", "ask_name")]
    assert "2 user(s)" in result.stdout
    bad = run_cli(database_url, flows_dir, "export-stalled", "--step", "ask_name", "--idle", "soon", "--out", str(out))
    assert bad.returncode == 2
    assert "soon" in bad.stderr


def test_funnel_rollup_is_refreshed_incrementally(story: Database, engine: Engine, registry: FlowRegistry) -> None:
    assert analytics.funnel(story, lead(registry), SINCE)["reached"].tolist() == [4, 3, 2, 1]
    assert analytics.refresh_rollups(story) == 0  # nothing new since the funnel above refreshed it
    deliver(engine, "PN1", "u3", 8000, "Dee")
    deliver(engine, "PN1", "u3", 8100, "dee@example.com")
    frame = analytics.funnel(story, lead(registry), SINCE)
    assert rows(frame, "step", "reached", "went_on", "median_seconds_to_next") == [
        ("ask_name", 4, 4, 1950.0),  # median of 60, 300, 3600 and u3's 7800 s
        ("ask_email", 4, 3, 120.0),
        ("ask_city", 3, 1, 300.0),
        ("done", 1, None, None),
    ]


def test_latency_samples_are_the_most_recent_by_whatsapp_time(story: Database, engine: Engine) -> None:
    # u6's messages are older than most of the story but applied last (the highest transition ids).
    deliver(engine, "PN2", "u6", 50, "hi")
    deliver(engine, "PN2", "u6", 70, "Eve")
    newest = analytics.latency_samples(story, SINCE, limit=2)
    assert rows(newest, "from_step", "to_step", "seconds") == [
        ("ask_name", "ask_email", 3600.0),  # u4 at 3900
        ("ask_email", "ask_city", 500.0),  # u2 at 1000
    ]
    assert sorted(analytics.latency_samples(story, SINCE)["seconds"].tolist()) == [
        20.0, 60.0, 120.0, 300.0, 300.0, 500.0, 3600.0
    ]


def _reach(db: Database, user: str) -> dict[str, tuple[datetime, datetime | None]]:
    with db.engine.connect() as conn:
        found = conn.execute(select(StepReach.step, StepReach.first_at, StepReach.entered_at)
                             .where(StepReach.user_id == user))
        return {step: (first, entered) for step, first, entered in found}


def _row_versions(db: Database, user: str) -> list[str]:
    with db.engine.connect() as conn:
        return list(conn.scalars(sql("SELECT xmin::text FROM analytics_step_reach WHERE user_id = :u ORDER BY step"),
                                 {"u": user}))


def test_rollup_rows_carry_entered_at_and_a_late_message_moves_it_earlier(story: Database) -> None:
    analytics.refresh_rollups(story)
    assert _reach(story, "u2") == {
        "ask_name": (at(100), at(100)), "ask_email": (at(400), at(100)), "ask_city": (at(1000), at(100)),
    }
    versions = _row_versions(story, "u1") if story.is_postgres else []
    # A message sent before u3's first one, delivered after it, as the engine logged it before late messages were
    # logged as late (tests/test_late_messages.py): u3 reached ask_email (and the flow) at 150.
    # A reprompt at a step u1 reached long ago changes nothing in the rollup, and writes no new row versions.
    with story.begin() as conn:
        conn.execute(insert(Transition).values(
            phone_number_id="PN1", user_id="u3", flow="lead_qualification", flow_version=1, from_step="ask_name",
            to_step="ask_email", outcome="advanced", wamid="wamid.u3.150", at=at(150), applied_at=at(153),
            elapsed_seconds=None, session_version=2, language="en",
        ))
        conn.execute(insert(Transition).values(
            phone_number_id="PN1", user_id="u1", flow="lead_qualification", flow_version=1, from_step="ask_email",
            to_step="ask_email", outcome="reprompted", wamid="wamid.late", at=at(9000), applied_at=at(9001),
            elapsed_seconds=1.0, session_version=9, language="en",
        ))
    assert analytics.refresh_rollups(story, now=at(9999)) == 2
    assert _reach(story, "u3") == {"ask_name": (at(200), at(150)), "ask_email": (at(150), at(150))}
    assert _reach(story, "u1")["ask_email"] == (at(60), at(0))
    if story.is_postgres:
        assert _row_versions(story, "u1") == versions


def test_journeys_left_behind_by_a_number_change_are_not_listed(story: Database, registry: FlowRegistry) -> None:
    # The engine renames the session (and its transitions) when a user changes number; the rollup keeps the
    # journey under the old id. Lists of users, and breakdowns by the session's language, leave it out.
    assert analytics.dropped_users(story, lead(registry), "ask_name", SINCE)["user_id"].tolist() == ["u3"]
    with story.begin() as conn:
        conn.execute(update(ChatSession).where(ChatSession.user_id == "u3").values(user_id="u3-new"))
    assert analytics.dropped_users(story, lead(registry), "ask_name", SINCE).empty
    by_language = analytics.funnel(story, lead(registry), SINCE, by="language")
    assert rows(by_language[by_language.step == "ask_name"], "segment", "reached") == [("en", 2), ("es", 1)]
    assert analytics.funnel(story, lead(registry), SINCE)["reached"].tolist() == [4, 3, 2, 1]
