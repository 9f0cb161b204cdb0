"""Campaign guardrails: a frequency cap across campaigns, quiet hours in the user's local time, marketing opt-out
(131050 on a send and the user_preferences webhook). Real engine, both backends, the fake Graph API server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from core import campaigns as api
from core.campaigns.guardrails import MARKETING_OPTED_OUT, UserGuard, user_timezone
from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.flows import FlowRegistry
from core.intake import record_preferences
from core.models import FollowUp, MarketingOptOut
from core.payloads import MarketingPreference, parse_webhook
from core.signature import sign
from core.views import session_view
from core.webhook import create_app
from jobs.followups import run_followups
from jobs.sender import run_sender
from tests import graph_server as g
from tests.conftest import make_settings
from tests.factories import PHONE
from tests.test_jobs_followups import campaign, followup_outbox, followup_rows, stall

SPAIN, MEXICO, NO_ZONE = "34612345678", "525512345678", "15551234567"
NIGHT = datetime(2026, 1, 15, 22, 30, tzinfo=UTC)  # 23:30 in Madrid, 16:30 in Mexico City
TEMPLATE = {"template_name": "lead_reminder", "template_language": "en_US"}


def optouts(db: Database) -> list[tuple[str, str, str]]:
    with db.session() as s:
        rows = s.scalars(select(MarketingOptOut).order_by(MarketingOptOut.user_id))
        return [(r.phone_number_id, r.user_id, r.source) for r in rows]


def test_user_timezone_comes_from_the_number_and_falls_back_to_the_campaign() -> None:
    assert user_timezone(SPAIN, "UTC") == "Europe/Madrid"  # Spain: Madrid and the Canaries, the most populous
    assert user_timezone(MEXICO, "UTC") == "America/Mexico_City"
    assert user_timezone(NO_ZONE, "Europe/Madrid") == "Europe/Madrid"  # valid prefix, no zone known
    assert user_timezone("u1", "Asia/Tokyo") == "Asia/Tokyo"  # not a number at all


def test_frequency_cap_counts_followups_of_every_campaign(engine: Engine, db: Database, registry: FlowRegistry,
                                                          settings: Settings) -> None:
    assert (settings.followup_cap, settings.followup_cap_window) == (3, "7d")  # the defaults
    now = datetime.now(UTC)
    stall(engine, SPAIN, now - timedelta(hours=3))
    stall(engine, MEXICO, now - timedelta(hours=3))
    for name in ("first", "second", "third", "fourth"):
        campaign(db, registry, name=name)
    # In one run, campaign after campaign: the fourth finds three follow-ups to each user.
    assert run_followups(db, settings, now) == {"queued_text": 6, "skipped": 2}
    skipped = sorted((f.user_id, f.reason) for f in followup_rows(db) if f.status == "skipped")
    capped = "frequency cap: 3 follow-ups in 7 days"
    assert skipped == [(SPAIN, capped), (MEXICO, capped)]
    # The preview of a fifth campaign shows the same rule, per user.
    fifth = campaign(db, registry, name="fifth")
    preview = api.preview_targets(db, fifth.id, now).set_index("user_id")
    assert (preview.loc[SPAIN, "would_send_as"], preview.loc[SPAIN, "reason"]) == ("skip", skipped[0][1])
    assert preview.loc[MEXICO, "would_send_as"] == "skip"
    # A cancelled follow-up never reached the user: it does not count.
    with db.begin() as conn:
        conn.execute(update(FollowUp).where(FollowUp.user_id == SPAIN, FollowUp.status == "queued")
                     .values(status="cancelled"))
    assert api.preview_targets(db, fifth.id, now).set_index("user_id").loc[SPAIN, "would_send_as"] == "text"
    # Outside the window nothing counts any more.
    later = api.preview_targets(db, fifth.id, now + timedelta(days=7, minutes=1)).set_index("user_id")
    assert later.loc[MEXICO, "reason"] != "frequency cap: 3 follow-ups in 7 days"


def test_quiet_hours_are_the_users_local_time(engine: Engine, db: Database, registry: FlowRegistry,
                                              settings: Settings) -> None:
    for user in (SPAIN, MEXICO, NO_ZONE):
        stall(engine, user, NIGHT - timedelta(hours=3))
    # The campaign's timezone is only the fallback (NO_ZONE's number gives none).
    c = campaign(db, registry, quiet_start="21:00", quiet_end="08:00", timezone="Asia/Tokyo")
    assert run_followups(db, settings, NIGHT) == {"queued_text": 1, "not_due": 2}
    assert [r.user_id for r in followup_outbox(db)] == [MEXICO]
    preview = api.preview_targets(db, c.id, NIGHT).set_index("user_id")
    assert preview.loc[SPAIN, "due_at"] == datetime(2026, 1, 16, 7, 0, tzinfo=UTC)  # 08:00 in Madrid
    # 22:30 UTC is 07:30 next day in Tokyo, in quiet hours there: due at 08:00 Tokyo (23:00 UTC).
    assert preview.loc[NO_ZONE, "due_at"] == datetime(2026, 1, 15, 23, 0, tzinfo=UTC)
    assert run_followups(db, settings, datetime(2026, 1, 15, 23, 0, 1, tzinfo=UTC)) == {"queued_text": 1,
                                                                                         "not_due": 1}


def test_131050_records_the_optout_skips_the_next_template_and_free_text_still_goes(
    engine: Engine, db: Database, registry: FlowRegistry, database_url: str, flows_dir: Path
) -> None:
    now = datetime.now(UTC)
    stall(engine, SPAIN, now - timedelta(hours=30))  # outside the 24 h window: templates only
    campaign(db, registry, name="first", **TEMPLATE)
    with g.running() as graph:
        live = make_settings(database_url, flows_dir, send_mode="live", graph_api_url=graph.url,
                             whatsapp_access_token="t", send_user_spacing_seconds=0.0)
        graph.rule(lambda r: g.error(131050) if r.json.get("type") == "template" else None)
        assert run_followups(db, live, now) == {"queued_template": 1}
        run_sender(db, live, datetime.now(UTC))
        [first] = followup_outbox(db)
        assert (first.status, first.error_code) == ("failed", 131050)
        assert optouts(db) == [(PHONE, SPAIN, "error_131050")]
        # The next template to that user is skipped with the reason, at planning.
        campaign(db, registry, name="second", **TEMPLATE)
        assert run_followups(db, live, datetime.now(UTC))["skipped"] == 1
        assert [f.reason for f in followup_rows(db) if f.status == "skipped"] == [MARKETING_OPTED_OUT]
        # Free text inside the 24 h window is a service message: it still goes to a user who stopped marketing.
        stall(engine, MEXICO, now - timedelta(hours=3))
        record_preferences(db, [MarketingPreference(PHONE, MEXICO, stop=True)], now)
        assert run_followups(db, live, datetime.now(UTC))["queued_text"] == 2  # both campaigns
        run_sender(db, live, datetime.now(UTC))
        texts = [(r.kind, r.status) for r in followup_outbox(db) if r.user_id == MEXICO]
        assert texts == [("text", "sent"), ("text", "sent")]


def test_sender_cancels_a_queued_template_for_a_user_who_stopped_marketing(
    engine: Engine, db: Database, registry: FlowRegistry, database_url: str, flows_dir: Path
) -> None:
    now = datetime.now(UTC)
    stall(engine, SPAIN, now - timedelta(hours=30))
    campaign(db, registry, **TEMPLATE)
    with g.running() as graph:
        live = make_settings(database_url, flows_dir, send_mode="live", graph_api_url=graph.url,
                             whatsapp_access_token="t", send_user_spacing_seconds=0.0)
        assert run_followups(db, live, now) == {"queued_template": 1}
        record_preferences(db, [MarketingPreference(PHONE, SPAIN, stop=True)], now)
        counts = run_sender(db, live, datetime.now(UTC))
        assert counts["cancelled_marketing_opted_out"] == 1
        assert [r.json.get("type") for r in graph.requests if r.json.get("type") == "template"] == []
    [row] = followup_outbox(db)
    assert (row.status, row.error_title) == ("cancelled", MARKETING_OPTED_OUT)
    assert [(f.status, f.reason) for f in followup_rows(db)] == [("cancelled", MARKETING_OPTED_OUT)]


def preferences_body(user: str, value: str, at: datetime) -> bytes:
    doc: dict[str, Any] = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA", "changes": [{"field": "user_preferences", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001111", "phone_number_id": PHONE},
            "contacts": [{"profile": {"name": "Ana"}, "wa_id": user}],
            "user_preferences": [{"wa_id": user, "detail": "User requested to stop marketing messages",
                                  "category": "marketing_messages", "value": value,
                                  "timestamp": str(int(at.timestamp()))}],
        }}]}],
    }
    return json.dumps(doc).encode()


@pytest.fixture
def client(settings: Settings, registry: FlowRegistry) -> Iterator[TestClient]:
    with TestClient(create_app(settings, flows=registry, background=False)) as test_client:
        yield test_client


def test_user_preferences_webhook_stops_and_resumes_marketing(engine: Engine, db: Database, client: TestClient,
                                                               settings: Settings) -> None:
    now = datetime.now(UTC)
    stall(engine, SPAIN, now - timedelta(hours=3))
    parsed = parse_webhook(preferences_body(SPAIN, "stop", now))
    assert parsed.preferences == [MarketingPreference(PHONE, SPAIN, True, int(now.timestamp()))]

    def post(body: bytes) -> None:
        response = client.post("/webhook", content=body,
                               headers={"X-Hub-Signature-256": sign(body, settings.whatsapp_app_secret)})
        assert response.status_code == 200, response.text

    post(preferences_body(SPAIN, "stop", now))
    assert optouts(db) == [(PHONE, SPAIN, "user_preferences")]
    view = session_view(db, PHONE, SPAIN)
    assert view is not None
    assert view["marketing_opted_out"] is True
    post(preferences_body(SPAIN, "stop", now))  # redelivered: still one row
    assert len(optouts(db)) == 1
    post(preferences_body(SPAIN, "resume", now + timedelta(minutes=5)))
    assert optouts(db) == []
    view = session_view(db, PHONE, SPAIN)
    assert view is not None
    assert view["marketing_opted_out"] is False


def test_the_guard_is_pure_input_to_plan_followup() -> None:
    facts = api.SessionFacts(PHONE, SPAIN, "en", {"name": "Ana"}, NIGHT - timedelta(hours=3), None, False)
    spec = api.CampaignSpec(name="c", flow="lead_qualification", step="ask_email", delay_seconds=3600,
                            text="Hi {name}", **TEMPLATE)
    opted = UserGuard(marketing_opted_out=True)
    assert api.plan_followup(spec, facts, api.History(), NIGHT, opted).action == "text"  # inside the window
    later = NIGHT + timedelta(days=2)
    plan = api.plan_followup(spec, facts, api.History(), later, opted)
    assert (plan.action, plan.reason) == ("skip", MARKETING_OPTED_OUT)
    assert api.plan_followup(spec, facts, api.History(), later, UserGuard()).action == "template"
    assert api.plan_followup(spec, facts, api.History(), NIGHT, UserGuard(recent_followups=3)).reason == (
        "frequency cap: 3 follow-ups in 7 days"
    )
