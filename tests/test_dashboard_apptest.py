"""Dashboard pages through Streamlit's AppTest: sign-in gate, roles, every page, filters, the stalled CSV.

`seed_database` plays a few days of traffic through the real Engine (both shipped flows, two business
numbers, two languages, abandoned users, a reprompt, a campaign with a sent and a failed follow-up,
webhook stats and a pending message); the browser test seeds its database with it too.
"""

from __future__ import annotations

import io
import random
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import insert, update
from streamlit.testing.v1 import AppTest

from core import analytics, campaigns
from core.analytics import StalledQuery
from core.auth import hash_password, mask_number
from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.flows import default_flows_dir, load_flows
from core.messages import InboundMessage
from core.migrate import ensure_schema
from core.models import ChatSession, FollowUp, InboundEvent, MessageStatus, Outbox, WebhookStat

ROOT = Path(__file__).resolve().parent.parent
LEAD_NUMBER, BOOKING_NUMBER = "1001", "1002"
PAGES = {
    "overview": ["overview_sessions_chart", "overview_messages_chart"],
    "states": ["states_chart", "states_time_chart"],
    "funnel": ["funnel_chart", "funnel_breakdown_chart", "funnel_ttc_chart"],
    "latency": ["latency_bars_chart", "latency_hist_chart", "latency_trend_chart"],
    "stalled": ["stalled_chart"],
    "campaigns": ["campaigns_results_chart", "campaigns_failures_chart"],
    "health": ["health_webhooks_chart", "health_latency_chart", "health_outbox_chart", "health_failures_chart"],
}
LEAD = [("text", "hi"), ("text", "Ana Lopez"), ("text", "ana@example.com"), ("text", "Madrid")]
BOOKING = [("text", "hi"), ("choice", "haircut"), ("choice", "2026-12-02"), ("text", "10:30"),
           ("choice", "confirm_yes")]
PASSWORDS = {"alice": "alice-secret", "victor": "victor-secret"}


def _message(phone: str, user: str, n: int, at: datetime, kind: str, value: str) -> InboundMessage:
    fields = {"text": value} if kind == "text" else {"choice_id": value}
    return InboundMessage(phone_number_id=phone, user_id=user, wamid=f"wamid.{user}.{n}", timestamp=int(at.timestamp()),
                          kind="text" if kind == "text" else "interactive", **fields)


def _play(engine: Engine, message: InboundMessage) -> None:
    sent = datetime.fromtimestamp(message.timestamp, UTC)
    engine.ingest([message], now=sent + timedelta(seconds=1))
    engine.apply_pending(message.session_key, now=sent + timedelta(seconds=1, milliseconds=400))


def seed_database(url: str, now: datetime, users: int = 48) -> None:
    """Deterministic traffic over the 5 days before `now` (see the module docstring)."""
    settings = Settings(database_url=url, flow_routes=f"{BOOKING_NUMBER}=service_booking")
    db = Database(url)
    ensure_schema(db)
    engine = Engine(db, load_flows(default_flows_dir()), settings)
    rng = random.Random(42)
    for i in range(users):
        phone, script = (LEAD_NUMBER, LEAD) if i % 2 == 0 else (BOOKING_NUMBER, BOOKING)
        user = f"3460{i:07d}"
        at = now - timedelta(days=5) + timedelta(hours=i * 2.4)
        depth = [1, 2, 2, 3, len(script), len(script)][i % 6]
        for n, (kind, value) in enumerate(script[:depth]):
            if n:
                at += timedelta(seconds=rng.randint(20, 240 * n))
            if n == 2 and i % 5 == 0:  # an invalid answer first: a reprompt
                _play(engine, _message(phone, user, 90 + n, at, "text", "???"))
                at += timedelta(seconds=45)
            if at >= now:
                break
            _play(engine, _message(phone, user, n, at, kind, value))
    with db.begin() as conn:
        conn.execute(update(ChatSession).where(ChatSession.user_id.like("%3")).values(language="es"))
        conn.execute(update(ChatSession).where(ChatSession.user_id == "34600000008").values(opted_out=True))
        conn.execute(insert(WebhookStat), [
            {"bucket": (now - timedelta(hours=h)).replace(second=0, microsecond=0), "result": result, "count": count}
            for h in range(0, 24, 3)
            for result, count in (("accepted", 20 + h), ("duplicate", 2), ("rejected_signature", h % 2))
        ])
    _seed_campaign(db, now)
    # One message stored but not applied yet: the pending queue is not empty.
    engine.ingest([_message(LEAD_NUMBER, "34600009999", 0, now - timedelta(minutes=2), "text", "hi")],
                  now=now - timedelta(minutes=2))
    db.dispose()


def _seed_campaign(db: Database, now: datetime) -> None:
    spec = campaigns.CampaignSpec(name="nudge-email", flow="lead_qualification", step="ask_email",
                                  delay_seconds=7200, text="Still there? What's your email?")
    campaign = campaigns.create_campaign(db, spec)
    with db.begin() as conn:
        for n, (user, status, code) in enumerate((("34600000002", "sent", None), ("34600000014", "failed", 131026))):
            outbox_id = conn.execute(insert(Outbox).values(
                idempotency_key=f"seed:{n}", phone_number_id=LEAD_NUMBER, user_id=user, kind="text",
                body={"type": "text"}, text=spec.text, campaign_id=campaign.id, status=status,
                wamid=f"wamid.out.{n}", error_code=code, created_at=now - timedelta(hours=3),
            )).inserted_primary_key[0]
            conn.execute(insert(FollowUp).values(
                campaign_id=campaign.id, phone_number_id=LEAD_NUMBER, user_id=user, attempt=1, step="ask_email",
                status="queued", outbox_id=outbox_id, created_at=now - timedelta(hours=3),
            ))
        conn.execute(insert(MessageStatus).values(
            wamid="wamid.out.0", phone_number_id=LEAD_NUMBER, recipient_id="34600000002", status="delivered",
            rank=2, status_at=now - timedelta(hours=2),
        ))


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def seeded_template(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Path:
    path = tmp_path_factory.mktemp("dashboard") / "seeded.db"
    shutil.copyfile(sqlite_template, path)
    seed_database(f"sqlite:///{path}", datetime.now(UTC))
    return path


@pytest.fixture
def seeded_url(seeded_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "seeded.db"
    shutil.copyfile(seeded_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def users_env(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [f"alice:admin:{hash_password(PASSWORDS['alice'], iterations=1000)}",
               f"victor:viewer:{hash_password(PASSWORDS['victor'], iterations=1000)}"]
    monkeypatch.setenv("DASHBOARD_USERS", ",".join(entries))
    monkeypatch.setenv("DEMO_MODE", "false")
    monkeypatch.delenv("FLOWS_DIR", raising=False)


def app(url: str, monkeypatch: pytest.MonkeyPatch, role: str | None = "admin") -> AppTest:
    """The app on `url`; signed in as `role` (through the session, as after a real sign-in) unless None."""
    monkeypatch.setenv("DATABASE_URL", url)
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=60)
    if role:
        at.session_state["auth_user"] = {"name": "alice" if role == "admin" else "victor", "role": role}
    return at


def open_page(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"dashboard/pages/{page}.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "info", "error", "warning", "success", "caption", "title")
             for e in at.get(kind)]
    return "\n".join(str(p) for p in parts)


# st.dataframe keys do not reach AppTest's element tree: each table is found by a column only it has.
TABLES = {
    "funnel_table": "median_to_next",
    "states_table": "p50_hours_in_step",
    "stalled_table": "idle_hours",
    "campaigns_preview_table": "would_send_as",
}


def frame_of(at: AppTest, key: str) -> pd.DataFrame:
    return next(d.value for d in at.dataframe if TABLES[key] in d.value.columns)


# ----------------------------------------------------------------------------------------- sign-in
def test_login_gate_holds(seeded_url: str, users_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    at = app(seeded_url, monkeypatch, role=None)
    at.run()
    assert not at.exception
    assert at.get("plotly_chart") == []
    assert at.metric == []
    at.text_input(key="login_user").input("alice")
    at.text_input(key="login_password").input("wrong password")
    at.button[0].click()
    at.run()
    assert "Wrong user name or password" in texts(at)
    assert at.metric == []
    assert at.get("plotly_chart") == []
    assert at.dataframe == []
    assert "auth_user" not in at.session_state
    # An unknown user with the admin's password gets nothing either.
    at.text_input(key="login_user").input("mallory")
    at.text_input(key="login_password").input(PASSWORDS["alice"])
    at.button[0].click()
    at.run()
    assert at.metric == []
    at.text_input(key="login_user").input("alice")
    at.text_input(key="login_password").input(PASSWORDS["alice"])
    at.button[0].click()
    at.run()
    assert not at.exception
    assert at.session_state["auth_user"] == {"name": "alice", "role": "admin"}
    assert [m.label for m in at.metric][:2] == ["Active sessions", "Completed"]
    db = Database(seeded_url)
    counts = analytics.session_counts(db)
    db.dispose()
    assert [m.value for m in at.metric][:4] == [f"{int(counts.loc[0, k]):,}" for k in
                                                ("active", "completed", "archived", "total")]


def test_no_default_password_outside_demo_mode(seeded_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DASHBOARD_USERS", raising=False)
    monkeypatch.setenv("DEMO_MODE", "false")
    at = app(seeded_url, monkeypatch, role=None)
    at.run()
    assert "No dashboard users are configured" in texts(at)
    assert at.text_input == []  # no form to try demo/demo on


def test_demo_mode_signs_in_demo_and_says_so(seeded_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DASHBOARD_USERS", raising=False)
    monkeypatch.setenv("DEMO_MODE", "true")
    at = app(seeded_url, monkeypatch, role=None)
    at.run()
    assert "Demo mode" in texts(at)
    at.text_input(key="login_user").input("demo")
    at.text_input(key="login_password").input("demo")
    at.button[0].click()
    at.run()
    assert at.session_state["auth_user"] == {"name": "demo", "role": "admin"}


# ------------------------------------------------------------------------------------------ pages
@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_renders_with_its_charts(page: str, seeded_url: str, users_env: None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(app(seeded_url, monkeypatch), page)
    keys = {c.proto.id for c in at.get("plotly_chart")}
    for key in PAGES[page]:
        assert any(key in k for k in keys), (key, keys)
    assert "python -m core simulate" not in texts(at)


def test_every_page_explains_an_empty_database(sqlite_url: str, users_env: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    at = app(sqlite_url, monkeypatch)
    for page in PAGES:
        open_page(at, page)
        assert "python -m core simulate" in texts(at), page
        if page != "campaigns":
            assert at.get("plotly_chart") == [], page


def test_filters_change_results(seeded_url: str, users_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(app(seeded_url, monkeypatch), "funnel")
    lead = frame_of(at, "funnel_table")
    assert lead["step"].tolist() == ["ask_name", "ask_email", "ask_city", "done"]
    at.selectbox(key="funnel_flow").select("service_booking").run()
    booking = frame_of(at, "funnel_table")
    assert booking["step"].tolist()[0] == "choose_service"
    at.selectbox(key="funnel_language").select("es").run()
    spanish = frame_of(at, "funnel_table")
    assert 0 < spanish["reached"].iloc[0] < booking["reached"].iloc[0]

    at = open_page(at, "states")
    everyone = int(frame_of(at, "states_table")["users"].sum())
    at.selectbox(key="states_number").select(LEAD_NUMBER).run()
    lead_only = frame_of(at, "states_table")
    assert set(lead_only["flow"]) == {"lead_qualification"}
    assert 0 < int(lead_only["users"].sum()) < everyone


def _stalled_csv(at: AppTest) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(at.session_state["stalled_csv"]), dtype={"user_id": str, "phone_number_id": str})


def test_stalled_csv_is_exactly_the_filtered_rows(seeded_url: str, users_env: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(app(seeded_url, monkeypatch), "stalled")
    all_rows = _stalled_csv(at)
    at.selectbox(key="stalled_flow").select("lead_qualification").run()
    at.selectbox(key="stalled_step").select("ask_email").run()
    at.text_input(key="stalled_idle").input("3h").run()
    assert not at.exception
    exported = _stalled_csv(at)
    shown = frame_of(at, "stalled_table")
    assert 0 < len(exported) < len(all_rows)
    assert exported["user_id"].tolist() == shown["user_id"].tolist()
    assert set(exported["step"]) == {"ask_email"}
    db = Database(seeded_url)
    expected = analytics.stalled_users(db, StalledQuery(
        now=datetime.now(UTC).replace(second=0, microsecond=0), idle_seconds=3 * 3600, flow="lead_qualification",
        step="ask_email", limit=1000,
    ))
    db.dispose()
    assert exported["user_id"].tolist() == expected["user_id"].tolist()
    assert exported["followups_sent"].tolist() == expected["followups_sent"].tolist()
    assert exported["inside_window"].tolist() == expected["inside_window"].tolist()
    at.number_input(key="stalled_limit").set_value(2).run()
    assert _stalled_csv(at)["user_id"].tolist() == expected["user_id"].tolist()[:2]


def test_viewer_sees_masked_numbers_and_cannot_create_campaigns(seeded_url: str, users_env: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(app(seeded_url, monkeypatch, role="viewer"), "stalled")
    shown = frame_of(at, "stalled_table")
    exported = _stalled_csv(at)
    assert all(u.startswith("•") for u in shown["user_id"])
    assert exported["user_id"].tolist() == shown["user_id"].tolist()
    assert not any(str(u).startswith("3460") for u in exported["user_id"])
    assert "Only admins can create campaigns" in texts(at)
    at = open_page(at, "campaigns")
    assert "Only admins can create or change campaigns" in texts(at)
    assert all(u.startswith("•") for u in frame_of(at, "campaigns_preview_table")["user_id"])
    assert not [b for b in at.button if "Pause" in str(b.label)]

    admin = open_page(app(seeded_url, monkeypatch, role="admin"), "stalled")
    numbers = frame_of(admin, "stalled_table")["user_id"].tolist()
    assert numbers
    assert all(u.startswith("3460") for u in numbers)
    assert [mask_number(u) for u in numbers] == shown["user_id"].tolist()


def test_admin_creates_pauses_and_edits_a_campaign(seeded_url: str, users_env: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(app(seeded_url, monkeypatch), "campaigns")
    at.text_input(key="new_name").input("city-reminder")
    at.selectbox(key="new_flow").select("lead_qualification")
    at.selectbox(key="new_step").select("ask_city")
    at.text_input(key="new_delay").input("1d")
    at.text_area(key="new_text").input("Which city are you in?")
    next(b for b in at.button if b.label == "Create campaign").click()
    at.run()
    assert not at.exception
    assert "Created 'city-reminder'" in texts(at)
    db = Database(seeded_url)
    created = campaigns.get_campaign(db, "city-reminder")
    assert (created.step, created.delay_seconds, created.active) == ("ask_city", 86400, True)

    at.selectbox(key="campaigns_pick").select("city-reminder").run()
    at.button(key="campaigns_toggle").click().run()
    assert campaigns.get_campaign(db, "city-reminder").active is False
    assert "**city-reminder** is paused." in texts(at)
    preview = frame_of(at, "campaigns_preview_table")
    expected = campaigns.preview_targets(db, created.id, datetime.now(UTC))
    assert preview["user_id"].tolist() == expected["user_id"].tolist()

    at.text_input(key=f"edit{created.id}_delay").input("6h")
    next(b for b in at.button if b.label == "Save changes").click()
    at.run()
    assert "Saved 'city-reminder'" in texts(at), texts(at)
    assert campaigns.get_campaign(db, "city-reminder").delay_seconds == 6 * 3600
    db.dispose()


def test_stalled_selection_starts_a_campaign(seeded_url: str, users_env: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_page(app(seeded_url, monkeypatch), "stalled")
    at.selectbox(key="stalled_flow").select("service_booking").run()
    at.selectbox(key="stalled_step").select("choose_date").run()
    at.selectbox(key="stalled_language").select("es").run()
    next(b for b in at.button if b.label == "Create campaign").click()
    at.run()
    assert not at.exception
    db = Database(seeded_url)
    created = campaigns.get_campaign(db, "service_booking-choose_date-2h")
    assert (created.flow, created.step, created.delay_seconds, created.filter_language) == (
        "service_booking", "choose_date", 7200, "es"
    )
    db.dispose()


def test_health_warns_above_the_pending_threshold(seeded_url: str, users_env: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PENDING_WARNING_THRESHOLD", "0")
    at = open_page(app(seeded_url, monkeypatch), "health")
    assert any("above the warning threshold" in e.value for e in at.error)
    monkeypatch.setenv("PENDING_WARNING_THRESHOLD", "100")
    at.run()
    assert not at.error
    db = Database(seeded_url)
    with db.engine.connect() as conn:
        assert conn.scalar(InboundEvent.__table__.select().where(InboundEvent.processed_at.is_(None))
                           .with_only_columns(InboundEvent.id).limit(1)) is not None
    db.dispose()


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    """st.cache_data outlives an AppTest run: start every test from empty caches."""
    import streamlit as st

    st.cache_data.clear()


# ------------------------------------------------------------------------------------- core.auth
def test_password_hashes_roles_and_masking() -> None:
    from core.auth import CredentialsError, authenticate, load_users, parse_users, verify_password

    encoded = hash_password("s3cret", iterations=1000, salt=bytes(16))
    assert encoded.startswith("pbkdf2_sha256$1000$" + "00" * 16 + "$")
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret ", encoded)
    assert hash_password("s3cret", iterations=1000) != hash_password("s3cret", iterations=1000)  # salted
    users = parse_users(f"ann:admin:{encoded}, bo:viewer:{encoded}")
    assert authenticate(users, "ann", "s3cret").role == "admin"  # type: ignore[union-attr]
    assert authenticate(users, "bo", "s3cret").is_admin is False  # type: ignore[union-attr]
    assert authenticate(users, "ann", "nope") is None
    assert authenticate(users, "nobody", "s3cret") is None
    for bad in ("ann:root:" + encoded, "ann:admin:sha256$abc", "ann:admin", "ann:admin:pbkdf2_sha256$x$00$00"):
        with pytest.raises(CredentialsError):
            parse_users(bad)
    assert load_users(Settings(dashboard_users="", demo_mode=False)) == {}
    demo = load_users(Settings(dashboard_users="", demo_mode=True))
    assert authenticate(demo, "demo", "demo").role == "admin"  # type: ignore[union-attr]
    from_secrets = load_users(Settings(dashboard_users=""), {"dashboard_users": {"sec": f"viewer:{encoded}"}})
    assert from_secrets["sec"].role == "viewer"
    assert mask_number("34600123456") == "•••••••3456"
    assert mask_number("12") == "••"
