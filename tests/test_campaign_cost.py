"""Campaign cost: Meta's `pricing` on statuses is recorded per outbound message, campaign results count billable
messages by category, and the preview estimates paid (template) versus free (free-form) sends.

Status bodies are files under tests/data/pricing/. The campaign fixture, by hand (campaign "nudge"):
  u1  template follow-up, sent + delivered with pricing marketing/billable          → marketing 1, billable 1
  u2  template follow-up, sent with pricing marketing/billable, then read without  → marketing 2, billable 2
  u3  free-form follow-up, pricing service/not billable                            → service 1, billable 0
  u4  free-form follow-up, a status without pricing                                → not reported 1
  u5  follow-up whose send failed (no wamid, no status)                             → not counted
  u6  a reply outside the campaign (no follow-up), marketing/billable              → not counted
  u7  campaign "other", marketing/billable                                          → not counted
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import insert, select
from streamlit.testing.v1 import AppTest

from core import campaigns as api
from core.auth import hash_password
from core.cli import main as cli_main
from core.config import get_settings
from core.db import Database
from core.messages import Pricing, StatusUpdate
from core.models import ChatSession, FollowUp, MessageStatus, Outbox
from core.payloads import parse_webhook
from core.simulation import plan_statuses, status_body
from core.statuses import record_statuses

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "pricing"
PHONE = "100000000000111"
NOW = datetime.now(UTC).replace(microsecond=0)
MARKETING = Pricing(category="marketing", billable=True, model="PMP")
SERVICE = Pricing(category="service", billable=False, model="PMP")


def body(name: str) -> bytes:
    return (DATA / name).read_bytes()


def pricing_of(db: Database, wamid: str) -> tuple[str, Any, Any, Any]:
    with db.engine.connect() as conn:
        row = conn.execute(select(
            MessageStatus.status, MessageStatus.pricing_category, MessageStatus.pricing_billable,
            MessageStatus.pricing_model,
        ).where(MessageStatus.wamid == wamid)).one()
    return row[0], row[1], row[2], row[3]


# ------------------------------------------------------------------------------------------ parse and record
def test_pricing_parsed_and_recorded(db: Database) -> None:
    parsed = parse_webhook(body("sent_delivered.json"))
    assert parsed.notes == []
    assert [s.pricing for s in parsed.statuses] == [MARKETING, MARKETING, SERVICE]
    record_statuses(db, parsed.statuses)
    assert pricing_of(db, "wamid.PRICING01") == ("delivered", "marketing", True, "PMP")
    assert pricing_of(db, "wamid.PRICING02") == ("sent", "service", False, "PMP")


def test_pricing_not_erased_by_a_later_status_without_it(db: Database) -> None:
    record_statuses(db, parse_webhook(body("sent_delivered.json")).statuses)
    later = parse_webhook(body("read_without_pricing.json")).statuses
    assert [s.pricing for s in later] == [None]
    record_statuses(db, later)
    assert pricing_of(db, "wamid.PRICING01") == ("read", "marketing", True, "PMP")
    # A late "delivered" after "read" still brings its pricing (the rank stays "read").
    late = StatusUpdate(phone_number_id=PHONE, wamid="wamid.PRICING01", status="delivered", timestamp=1767268950,
                        pricing=Pricing(category="utility"))
    record_statuses(db, [late])
    assert pricing_of(db, "wamid.PRICING01") == ("read", "utility", True, "PMP")


def test_malformed_pricing_is_dropped_with_a_note_and_the_status_kept(db: Database) -> None:
    parsed = parse_webhook(body("malformed.json"))
    assert [s.wamid for s in parsed.statuses] == [f"wamid.PRICING0{n}" for n in (3, 4, 5, 6)]
    assert all(s.pricing is None for s in parsed.statuses)
    assert len(parsed.notes) == 4
    assert all("pricing dropped, status kept" in note for note in parsed.notes)
    assert "billable must be a boolean" in parsed.notes[0]
    assert "status.pricing.category is longer than 32 characters (33)" in parsed.notes[1]
    assert "pricing must be an object" in parsed.notes[2]
    assert "pricing_model must be a string" in parsed.notes[3]
    record_statuses(db, parsed.statuses)
    for n in (3, 4, 5, 6):
        assert pricing_of(db, f"wamid.PRICING0{n}") == ("sent", None, None, None)


# ------------------------------------------------------------------------------------------ campaign costs
class Fixture:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.ids = count(1)

    def campaign(self, name: str) -> int:
        spec = api.CampaignSpec(name=name, flow="lead_qualification", step="ask_email", delay_seconds=7200,
                                text="Still there?", template_name="nudge", template_language="en_US")
        return api.create_campaign(self.db, spec).id

    def message(self, campaign_id: int | None, user: str, kind: str, *, status: str = "sent",
                pricing: Pricing | None = None) -> None:
        """An outbound message (a follow-up of `campaign_id` unless None) and, if sent, its statuses."""
        n = next(self.ids)
        wamid = f"wamid.cost.{n}" if status == "sent" else None
        with self.db.begin() as conn:
            outbox_id = conn.execute(insert(Outbox).values(
                idempotency_key=f"cost:{n}", phone_number_id=PHONE, user_id=user, kind=kind, body={},
                campaign_id=campaign_id, status=status, wamid=wamid, created_at=NOW - timedelta(hours=5),
            )).inserted_primary_key[0]
            if campaign_id is not None:
                conn.execute(insert(FollowUp).values(
                    campaign_id=campaign_id, phone_number_id=PHONE, user_id=user, attempt=1, step="ask_email",
                    status="queued", outbox_id=outbox_id, created_at=NOW - timedelta(hours=5),
                ))
        if wamid is not None:
            at = int((NOW - timedelta(hours=4)).timestamp())
            record_statuses(self.db, [
                StatusUpdate(phone_number_id=PHONE, wamid=wamid, status="sent", timestamp=at, pricing=pricing),
                StatusUpdate(phone_number_id=PHONE, wamid=wamid, status="read", timestamp=at + 60),
            ])

    def session(self, user: str, idle: timedelta, *, opted_out: bool = False) -> None:
        with self.db.begin() as conn:
            conn.execute(insert(ChatSession).values(
                phone_number_id=PHONE, user_id=user, flow="lead_qualification", flow_version=1,
                current_step="ask_email", data={}, version=1, failure_count=0, language="en", status="active",
                last_inbound_at=NOW - idle, opted_out=opted_out,
            ))


def seed(db: Database) -> tuple[int, int]:
    f = Fixture(db)
    nudge, other = f.campaign("nudge"), f.campaign("other")
    f.message(nudge, "u1", "template", pricing=MARKETING)
    f.message(nudge, "u2", "template", pricing=MARKETING)
    f.message(nudge, "u3", "text", pricing=SERVICE)
    f.message(nudge, "u4", "text")
    f.message(nudge, "u5", "text", status="failed")
    f.message(None, "u6", "template", pricing=MARKETING)
    f.message(other, "u7", "template", pricing=MARKETING)
    # Stalled in ask_email now: two inside the 24 h window (free-form), two outside (template), one opted out.
    for user, hours in (("s1", 3), ("s2", 5), ("s3", 30), ("s4", 50)):
        f.session(user, timedelta(hours=hours))
    f.session("s5", timedelta(hours=30), opted_out=True)
    return nudge, other


def test_campaign_costs_equal_a_hand_count(db: Database) -> None:
    nudge, other = seed(db)
    costs = api.campaign_costs(db, nudge)
    assert list(costs.columns) == api.COST_COLUMNS
    assert costs.to_dict("records") == [
        {"category": "marketing", "messages": 2, "billable": 2},
        {"category": "not reported", "messages": 1, "billable": 0},
        {"category": "service", "messages": 1, "billable": 0},
    ]
    assert api.campaign_costs(db, "other").to_dict("records") == [
        {"category": "marketing", "messages": 1, "billable": 1},
    ]
    empty = api.campaign_costs(db, api.create_campaign(db, api.CampaignSpec(
        name="idle", flow="lead_qualification", step="ask_city", delay_seconds=60, text="Hi")).id)
    assert empty.empty
    assert list(empty.columns) == api.COST_COLUMNS
    assert other != nudge


def test_preview_cost_counts() -> None:
    frame = pd.DataFrame({"would_send_as": ["text", "template", "template", "skip", "none", "text", "template"]})
    estimate = api.preview_cost(frame)
    assert estimate == api.CostEstimate(templates=3, free_form=2, skipped=2)
    assert estimate.describe() == ("3 template send(s) (paid), 2 free-form send(s) (free inside the 24 h window), "
                                   "2 skipped")
    assert api.preview_cost(pd.DataFrame({"would_send_as": []})) == api.CostEstimate(0, 0, 0)


def test_preview_cost_of_a_real_preview(db: Database) -> None:
    nudge, _ = seed(db)
    preview = api.preview_targets(db, nudge, NOW)
    assert api.preview_cost(preview) == api.CostEstimate(templates=2, free_form=2, skipped=1)


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def cli_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_cli_results_and_preview_show_cost(db: Database, cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    seed(db)
    assert cli_main(["campaigns", "results"]) == 0
    out = capsys.readouterr().out
    heading = "cost (follow-ups by Meta pricing category):"
    assert heading in out
    table = out.split(heading, 1)[1].strip().splitlines()
    assert table[0].split() == ["campaign", "pricing", "category", "messages", "billable"]
    assert [line.split() for line in table[1:]] == [
        ["nudge", "marketing", "2", "2"], ["nudge", "not", "reported", "1", "0"], ["nudge", "service", "1", "0"],
        ["other", "marketing", "1", "1"],
    ]
    assert cli_main(["campaigns", "preview", "nudge"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("cost estimate: 2 template send(s) (paid), 2 free-form send(s) (free inside the "
                                   "24 h window), 1 skipped")
    assert "would_send_as" in out


def test_cli_results_without_pricing(db: Database, cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    api.create_campaign(db, api.CampaignSpec(name="idle", flow="lead_qualification", step="ask_city",
                                             delay_seconds=60, text="Hi"))
    assert cli_main(["campaigns", "results", "idle"]) == 0
    assert "no pricing reported yet" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ dashboard
def test_dashboard_campaigns_page_shows_cost(db: Database, database_url: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    seed(db)
    monkeypatch.setenv("DASHBOARD_USERS", f"alice:admin:{hash_password('alice-secret', iterations=1000)}")
    monkeypatch.setenv("DEMO_MODE", "false")
    monkeypatch.delenv("FLOWS_DIR", raising=False)
    monkeypatch.setenv("DATABASE_URL", database_url)
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=60)
    at.session_state["auth_user"] = {"name": "alice", "role": "admin"}
    at.switch_page("dashboard/pages/campaigns.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    at.selectbox(key="campaigns_pick").select("nudge").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Cost" in [h.value for h in at.subheader]
    cost = next(d.value for d in at.dataframe if "Pricing category" in d.value.columns)
    assert cost.to_dict("records") == [
        {"Pricing category": "marketing", "Messages": 2, "Billable": 2},
        {"Pricing category": "not reported", "Messages": 1, "Billable": 0},
        {"Pricing category": "service", "Messages": 1, "Billable": 0},
    ]
    estimate = [m.value for m in at.markdown if "Cost estimate" in m.value]
    assert estimate == ["**Cost estimate:** 2 template send(s) (paid), 2 free-form send(s) (free inside the 24 h "
                        "window), 1 skipped."]
    # The estimate sits above the preview table.
    blocks = [e for e in at.main if getattr(e, "value", None) is not None]
    kinds = [("estimate" if isinstance(e.value, str) and "Cost estimate" in e.value else
              "preview" if isinstance(e.value, pd.DataFrame) and "would_send_as" in e.value.columns else None)
             for e in blocks]
    assert kinds.index("estimate") < kinds.index("preview")



# ------------------------------------------------------------------------------------------ simulator
def test_simulated_statuses_give_the_demo_its_categories(db: Database) -> None:
    """The demo's statuses (core.simulation) carry pricing by message kind: a campaign's template is marketing and
    billable, a free-form follow-up a free service message; recorded, they fill the campaign's cost table."""
    f = Fixture(db)
    nudge = f.campaign("nudge")
    f.message(nudge, "u1", "template")
    f.message(nudge, "u2", "text")
    with db.engine.connect() as conn:
        outbound = [{"wamid": w, "status": "sent", "campaign": "nudge", "kind": k}
                    for w, k in conn.execute(select(Outbox.wamid, Outbox.kind).order_by(Outbox.id))]
    statuses = [s for s in plan_statuses(7, "u1", outbound, [], int(NOW.timestamp())) if s["status"] != "failed"]
    parsed = parse_webhook(status_body(PHONE, statuses))
    assert parsed.notes == []
    record_statuses(db, parsed.statuses)
    assert {s["id"] for s in statuses} == {o["wamid"] for o in outbound}  # seed 7: neither send fails
    assert api.campaign_costs(db, nudge).to_dict("records") == [
        {"category": "marketing", "messages": 1, "billable": 1},
        {"category": "service", "messages": 1, "billable": 0},
    ]
