"""Archived means idle, not gone: every read about where users are runs after the archive job and still sees them,
and a returning user's answer counts (core.lifecycle)."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core import analytics
from core import campaigns as api
from core.analytics import Filters, StalledQuery
from core.cli import main as cli_main
from core.config import Settings, get_settings
from core.db import Database
from core.engine import Engine
from core.flows import FlowRegistry
from core.messages import InboundMessage
from core.views import session_view
from jobs.archive import run_archive
from jobs.followups import run_followups
from jobs.sender import run_sender
from tests.factories import PHONE, text
from tests.test_webhook_e2e import ADMIN, Server, server_env, wait_applied

# Real time: `export-stalled` reads the clock; every other read here is given `NOW`.
NOW = datetime.now(UTC).replace(microsecond=0)


def ts(at: datetime) -> int:
    return int(at.timestamp())


def deliver(engine: Engine, *messages: InboundMessage) -> None:
    for key in engine.ingest(list(messages)).session_keys:
        engine.apply_all(key)


def stall_at_email(engine: Engine, user: str, last: datetime, name: str = "Ana") -> None:
    deliver(engine, text(user, "hi", ts(last) - 30), text(user, name, ts(last)))


@pytest.fixture
def population(engine: Engine, db: Database, settings: Settings) -> Database:
    """Three days ago: `old` stalled at ask_email, `done` completed; an hour ago `fresh` stalled at ask_email.
    The archive job then archives `old` (from active) and `done` (from completed)."""
    stall_at_email(engine, "old", NOW - timedelta(days=3))
    start = NOW - timedelta(days=3)
    deliver(engine, text("done", "hi", ts(start)), text("done", "Bo", ts(start) + 5),
            text("done", "bo@example.com", ts(start) + 10), text("done", "Lima", ts(start) + 15))
    stall_at_email(engine, "fresh", NOW - timedelta(hours=1), name="Cy")
    result = run_archive(db, settings, NOW)
    assert (result["from_active"], result["from_completed"]) == (1, 1)
    return db


def test_stalled_lists_cover_archived_users_with_their_status(population: Database) -> None:
    db = population
    everyone = analytics.stalled_users(db, StalledQuery(now=NOW, idle_seconds=1800))
    assert everyone[["user_id", "step", "status"]].values.tolist() == [
        ["old", "ask_email", "archived"], ["fresh", "ask_email", "active"],
    ]
    assert analytics.stalled_count(db, StalledQuery(now=NOW, idle_seconds=1800)) == 2
    two_days = StalledQuery(now=NOW, idle_seconds=2 * 86400, step="ask_email", window="outside")
    assert analytics.stalled_users(db, two_days)["user_id"].tolist() == ["old"]
    only = {status: analytics.stalled_users(db, StalledQuery(now=NOW, idle_seconds=60, status=status))
            for status in ("active", "archived")}
    assert only["active"]["user_id"].tolist() == ["fresh"]
    assert only["archived"]["user_id"].tolist() == ["old"]
    with pytest.raises(ValueError, match="unknown status filter"):
        analytics.stalled_users(db, StalledQuery(now=NOW, idle_seconds=60, status="gone"))


def test_state_distribution_counts_archived_users_in_their_step(population: Database) -> None:
    frame = analytics.state_distribution(population, NOW)
    assert frame[["step", "users", "active", "archived"]].values.tolist() == [["ask_email", 2, 1, 1]]
    recent = analytics.state_distribution(population, NOW, Filters(since=NOW - timedelta(days=1)))
    assert recent[["step", "users", "active", "archived"]].values.tolist() == [["ask_email", 1, 1, 0]]


def test_export_stalled_lists_archived_users(population: Database, database_url: str, flows_dir: Path,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("FLOWS_DIR", str(flows_dir))
    get_settings.cache_clear()
    out = tmp_path / "stalled.csv"
    try:
        assert cli_main(["export-stalled", "--step", "ask_email", "--idle", "2d", "--out", str(out)]) == 0
    finally:
        get_settings.cache_clear()
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["user_id"], r["status"], r["inside_window"]) for r in rows] == [("old", "archived", "False")]


def test_funnel_and_latency_are_the_same_before_and_after_archiving(engine: Engine, db: Database,
                                                                    settings: Settings, registry: FlowRegistry) -> None:
    stall_at_email(engine, "old", NOW - timedelta(days=3))
    stall_at_email(engine, "fresh", NOW - timedelta(hours=1))
    flow = registry.latest("lead_qualification")
    before = (analytics.funnel(db, flow), analytics.transition_latency(db))
    assert run_archive(db, settings, NOW)["archived"] == 1
    after = (analytics.funnel(db, flow), analytics.transition_latency(db))
    assert before[0].equals(after[0])
    assert before[1].equals(after[1])


def test_campaign_after_two_days_reaches_archived_users_with_the_template(
    population: Database, registry: FlowRegistry, settings: Settings
) -> None:
    db = population
    spec = api.CampaignSpec(name="late", flow="lead_qualification", step="ask_email", delay_seconds=2 * 86400,
                            text="Still there?", template_name="email_reminder", template_language="en_US")
    campaign = api.create_campaign(db, spec, registry)
    preview = api.preview_targets(db, campaign.id, NOW)
    assert preview[["user_id", "window", "would_send_as"]].values.tolist() == [
        ["old", "outside", "template"], ["fresh", "outside", "template"],  # fresh is due when its window is shut
    ]
    assert run_followups(db, settings, NOW) == {"queued_template": 1}  # fresh is not idle 2 days yet
    text_only = api.create_campaign(db, spec.model_copy(update={"name": "late-text", "template_name": None,
                                                                "template_language": None}), registry)
    assert run_followups(db, settings, NOW)["skipped"] == 1
    results = api.campaign_results(db, text_only.id, NOW)
    assert results.loc[0, ["targeted", "sent", "skipped"]].tolist() == [1, 0, 1]
    run_sender(db, settings, datetime.now(UTC))
    assert api.campaign_results(db, campaign.id, NOW).loc[0, ["targeted", "sent"]].tolist() == [1, 1]


def test_archived_user_who_answers_a_reminder_advances(population: Database, engine: Engine,
                                                      registry: FlowRegistry, settings: Settings) -> None:
    db = population
    spec = api.CampaignSpec(name="late", flow="lead_qualification", step="ask_email", delay_seconds=2 * 86400,
                            template_name="email_reminder", template_language="en_US")
    campaign = api.create_campaign(db, spec, registry)
    run_followups(db, settings, NOW)
    run_sender(db, settings, datetime.now(UTC))
    view = session_view(db, PHONE, "old")
    assert view is not None
    [reminder] = [o for o in view["outbound"] if o["campaign"] == "late"]
    assert reminder["status"] == "sent"

    answer_at = NOW + timedelta(minutes=10)
    deliver(engine, text("old", "ana@example.com", ts(answer_at), context_id=reminder["wamid"]))
    view = session_view(db, PHONE, "old")
    assert view is not None
    assert (view["status"], view["step"]) == ("active", "ask_city")
    assert view["data"] == {"name": "Ana", "email": "ana@example.com"}
    last = view["transitions"][-1]
    assert (last["from"], last["to"], last["outcome"], last["restored"]) == ("ask_email", "ask_city", "advanced", True)
    assert not any(t["restored"] for t in view["transitions"][:-1])
    replies = [o["text"] for o in view["outbound"] if o["campaign"] is None]
    assert "city" in replies[-1]
    assert "Welcome back" not in replies[-1]
    results = api.campaign_results(db, campaign.id, answer_at + timedelta(minutes=1))
    assert results.loc[0, ["targeted", "sent", "replied", "recovered"]].tolist() == [1, 1, 1, 1]
    funnel = analytics.funnel(db, registry.latest("lead_qualification")).set_index("step")
    assert funnel.loc["ask_email", "went_on"] == 2  # `done`, and `old` on returning


def test_archived_user_whose_message_is_no_answer_is_welcomed_back(population: Database, engine: Engine) -> None:
    deliver(engine, text("old", "hello again", ts(NOW)))
    view = session_view(population, PHONE, "old")
    assert view is not None
    assert (view["status"], view["step"], view["transitions"][-1]["outcome"]) == ("active", "ask_email", "restored")
    assert view["transitions"][-1]["restored"] is True
    assert "Welcome back" in view["outbound"][-1]["text"]


def test_a_completed_archived_user_starts_a_new_run(population: Database, engine: Engine) -> None:
    deliver(engine, text("done", "Dora", ts(NOW)))
    view = session_view(population, PHONE, "done")
    assert view is not None
    assert (view["status"], view["step"], view["data"]) == ("active", "ask_name", {})
    assert view["transitions"][-1]["outcome"] == "restored"


# ------------------------------------------------------------------------------------- through the real webhook
def _reply_body(wamid: str, user: str, body: str, ts_: int, context_id: str | None = None) -> bytes:
    message: dict[str, object] = {"from": user, "id": wamid, "timestamp": str(ts_), "type": "text",
                                  "text": {"body": body}}
    if context_id is not None:
        message["context"] = {"from": "15550001111", "id": context_id}
    doc = {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": PHONE},
        "contacts": [{"profile": {"name": "Ana"}, "wa_id": user}],
        "messages": [message],
    }}]}]}
    return json.dumps(doc, separators=(",", ":")).encode()


@pytest.mark.slow
def test_a_reply_to_a_reminder_through_the_webhook_advances_the_archived_user(
    database_url: str, flows_dir: Path, registry: FlowRegistry, settings: Settings, tmp_path: Path
) -> None:
    env = server_env(database_url, flows_dir, DEFAULT_FLOW="lead_qualification")
    server = Server(env, tmp_path / "server.log").start()
    db = Database(database_url)
    try:
        user, start = "34600111222", NOW - timedelta(days=3)
        for i, body in enumerate(("hi", "Ana")):
            assert server.post(_reply_body(f"wamid.ret.{i}", user, body, ts(start) + i)).status_code == 200
        assert len(wait_applied(db, "wamid.ret.", 2)) == 2
        assert run_archive(db, settings, NOW)["from_active"] == 1
        assert server.get(f"/admin/sessions/{PHONE}/{user}", headers=ADMIN).json()["status"] == "archived"

        spec = api.CampaignSpec(name="email-2d", flow="lead_qualification", step="ask_email",
                                delay_seconds=2 * 86400, template_name="email_reminder", template_language="en_US")
        campaign = api.create_campaign(db, spec, registry)
        assert run_followups(db, settings, NOW) == {"queued_template": 1}
        run_sender(db, settings, datetime.now(UTC))
        view = server.get(f"/admin/sessions/{PHONE}/{user}", headers=ADMIN).json()
        [reminder] = [o for o in view["outbound"] if o["campaign"] == "email-2d"]
        assert (reminder["kind"], reminder["status"]) == ("template", "sent")

        answered = server.post(_reply_body("wamid.ret.answer", user, "ana@example.com", ts(NOW) + 60,
                                           context_id=reminder["wamid"]))
        assert answered.status_code == 200
        assert len(wait_applied(db, "wamid.ret.", 3)) == 3
        view = server.get(f"/admin/sessions/{PHONE}/{user}", headers=ADMIN).json()
        assert (view["status"], view["step"], view["data"]["email"]) == ("active", "ask_city", "ana@example.com")
        last = view["transitions"][-1]
        assert (last["outcome"], last["restored"], last["wamid"]) == ("advanced", True, "wamid.ret.answer")
        results = api.campaign_results(db, campaign.id, NOW + timedelta(minutes=5))
        assert results.loc[0, ["sent", "replied", "recovered"]].tolist() == [1, 1, 1]
    finally:
        db.dispose()
        server.stop()
