"""Follow-up campaigns: selection, window rules, quiet hours, opt-out, exactly-once under overlap and crashes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

import jobs.followups as followups_job
from core import campaigns as api
from core.cli import main as cli_main
from core.config import Settings, get_settings
from core.db import Database
from core.engine import Engine
from core.errors import WaflowError
from core.flows import FlowRegistry
from core.messages import InboundMessage
from core.models import ChatSession, FollowUp, MessageStatus, Outbox
from jobs.followups import run_followups
from jobs.sender import run_sender
from tests import graph_server as g
from tests.conftest import make_settings
from tests.factories import PHONE, PHONE_2, text

# A Thursday; 10:00 UTC is 11:00 in Madrid, outside the quiet hours used below.
T0 = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)


def ts(at: datetime) -> int:
    return int(at.timestamp())


def deliver(engine: Engine, *messages: InboundMessage) -> None:
    for key in engine.ingest(list(messages)).session_keys:
        engine.apply_all(key)


def stall(engine: Engine, user: str, last_message_at: datetime, *, phone: str = PHONE, name: str = "Ana") -> None:
    """Through the real engine: the user says hi, gives a name, and stops at ask_email."""
    deliver(engine, text(user, "hi", ts(last_message_at) - 30, phone=phone))
    deliver(engine, text(user, name, ts(last_message_at), phone=phone))


def campaign(db: Database, registry: FlowRegistry, **overrides: Any) -> api.Campaign:
    fields: dict[str, Any] = {
        "name": "nudge", "flow": "lead_qualification", "step": "ask_email", "delay_seconds": 2 * 3600,
        "text": "Still there, {name}? What's your email?",
    }
    fields.update(overrides)
    return api.create_campaign(db, api.CampaignSpec(**fields), registry)


def followup_outbox(db: Database) -> list[Outbox]:
    with db.session() as s:
        return list(s.scalars(select(Outbox).where(Outbox.campaign_id.is_not(None)).order_by(Outbox.id)))


def followup_rows(db: Database) -> list[FollowUp]:
    with db.session() as s:
        return list(s.scalars(select(FollowUp).order_by(FollowUp.id)))


def test_text_followup_inside_the_window_is_queued_once(engine: Engine, db: Database, registry: FlowRegistry,
                                                        settings: Settings) -> None:
    # Real time, not T0: the follow-up goes after the flow's own replies (queued at real time), and the sender
    # rechecks the 24 h window when it sends (a text queued at T0 would be long out of it by now).
    now = datetime.now(UTC)
    stall(engine, "due", now - timedelta(hours=3))
    stall(engine, "recent", now - timedelta(hours=1))
    c = campaign(db, registry)
    assert run_followups(db, settings, now) == {"queued_text": 1}
    [row] = followup_outbox(db)
    assert row.user_id == "due"
    assert row.kind == "text"
    assert row.body == {"type": "text", "text": {"body": "Still there, Ana? What's your email?"}}
    assert row.text == "Still there, Ana? What's your email?"
    assert row.idempotency_key == f"followup:{c.id}:{PHONE}:due:1"
    assert (row.campaign_id, row.step, row.status) == (c.id, "ask_email", "queued")
    [followup] = followup_rows(db)
    assert (followup.attempt, followup.status, followup.outbox_id) == (1, "queued", row.id)
    assert run_followups(db, settings, now + timedelta(minutes=5)) == {}
    run_sender(db, settings.model_copy(update={"send_user_spacing_seconds": 0.0}), datetime.now(UTC))
    assert followup_outbox(db)[0].status == "sent"


def test_outside_the_window_a_template_goes_or_the_skip_is_recorded(engine: Engine, db: Database,
                                                                    registry: FlowRegistry, settings: Settings) -> None:
    stall(engine, "late", T0 - timedelta(hours=30), name="Bea")
    with_template = campaign(
        db, registry, name="with-template", template_name="lead_reminder", template_language="en_US",
        template_params=["{name}", "ACME"],
    )
    text_only = campaign(db, registry, name="text-only")
    assert run_followups(db, settings, T0) == {"queued_template": 1, "skipped": 1}
    [row] = followup_outbox(db)
    assert row.campaign_id == with_template.id
    assert row.kind == "template"
    assert row.body == {
        "type": "template",
        "template": {
            "name": "lead_reminder",
            "language": {"code": "en_US"},
            "components": [{"type": "body", "parameters": [{"type": "text", "text": "Bea"},
                                                           {"type": "text", "text": "ACME"}]}],
        },
    }
    skipped = [f for f in followup_rows(db) if f.campaign_id == text_only.id]
    assert [(f.status, f.outbox_id) for f in skipped] == [("skipped", None)]
    assert skipped[0].reason == "outside the 24 h window and no template configured"
    # Recorded once: later runs neither retry the skip nor pile up rows.
    assert run_followups(db, settings, T0 + timedelta(hours=1)) == {}
    assert len(followup_rows(db)) == 2


def test_a_131047_failure_closes_the_window_and_a_template_follows(engine: Engine, db: Database,
                                                                   registry: FlowRegistry, database_url: str,
                                                                   flows_dir: Path) -> None:
    now = datetime.now(UTC)
    stall(engine, "u1", now - timedelta(hours=3))
    campaign(db, registry, template_name="lead_reminder", template_language="en_US")
    with g.running() as graph:
        live = make_settings(database_url, flows_dir, send_mode="live", graph_api_url=graph.url,
                             whatsapp_access_token="t", send_user_spacing_seconds=0.0)
        graph.rule(lambda r: g.error(131047) if r.json.get("type") == "text" and "Still" in str(r.json) else None)
        assert run_followups(db, live, now) == {"queued_text": 1}
        run_sender(db, live, datetime.now(UTC))
        first = followup_outbox(db)[0]
        assert (first.status, first.error_code) == ("failed", 131047)
        assert run_followups(db, live, datetime.now(UTC)) == {"queued_template": 1}
        run_sender(db, live, datetime.now(UTC))
        kinds = [(r.kind, r.status) for r in followup_outbox(db)]
        assert kinds == [("text", "failed"), ("template", "sent")]
        assert [f.attempt for f in followup_rows(db)] == [1, 2]
        templates = [r for r in graph.requests if r.json.get("type") == "template"]
        assert len(templates) == 1
        assert templates[0].json["template"]["name"] == "lead_reminder"


def test_quiet_hours_defer_to_their_end_in_the_campaign_timezone(engine: Engine, db: Database,
                                                                 registry: FlowRegistry, settings: Settings) -> None:
    night = datetime(2026, 1, 15, 22, 30, tzinfo=UTC)  # 23:30 in Madrid
    stall(engine, "u1", night - timedelta(hours=3))
    c = campaign(db, registry, quiet_start="21:00", quiet_end="08:00", timezone="Europe/Madrid")
    # Quiet hours are per user now ("u1" has no number's zone: the campaign's timezone is the fallback).
    assert run_followups(db, settings, night) == {"not_due": 1}
    assert followup_outbox(db) == []
    preview = api.preview_targets(db, c.id, night)
    assert preview.loc[0, "due_at"] == datetime(2026, 1, 16, 7, 0, tzinfo=UTC)  # 08:00 Madrid
    assert run_followups(db, settings, datetime(2026, 1, 16, 6, 59, tzinfo=UTC)) == {"not_due": 1}
    assert run_followups(db, settings, datetime(2026, 1, 16, 7, 0, 1, tzinfo=UTC)) == {"queued_text": 1}


def test_opted_out_users_get_no_followups_but_replies_still_go(engine: Engine, db: Database, registry: FlowRegistry,
                                                               settings: Settings) -> None:
    now = datetime.now(UTC)
    stall(engine, "stays", now - timedelta(hours=3))
    stall(engine, "left", now - timedelta(hours=4))
    deliver(engine, text("left", "STOP", ts(now - timedelta(hours=3))))
    stall(engine, "late-stop", now - timedelta(hours=3))
    campaign(db, registry)
    with db.session() as s:
        assert s.get(ChatSession, (PHONE, "left")).opted_out is True  # type: ignore[union-attr]
    assert run_followups(db, settings, now) == {"queued_text": 2}
    assert sorted(r.user_id for r in followup_outbox(db)) == ["late-stop", "stays"]
    # STOP arrives after the follow-up was queued: the sender cancels it; the STOP confirmation still goes.
    deliver(engine, text("late-stop", "stop", ts(now)))
    run_sender(db, settings.model_copy(update={"send_user_spacing_seconds": 0.0}), datetime.now(UTC))
    by_user = {r.user_id: r.status for r in followup_outbox(db)}
    assert by_user == {"stays": "sent", "late-stop": "cancelled"}
    with db.session() as s:
        confirmation = s.scalars(
            select(Outbox).where(Outbox.user_id == "late-stop", Outbox.campaign_id.is_(None)).order_by(Outbox.id.desc())
        ).first()
        assert confirmation is not None
        assert confirmation.status == "sent"
        assert "won't get any more messages" in (confirmation.text or "")
    assert run_followups(db, settings, now + timedelta(hours=5)) == {}


def test_max_sends_spacing_and_a_reply_restarts_the_count(engine: Engine, db: Database, registry: FlowRegistry,
                                                          settings: Settings) -> None:
    stall(engine, "u1", T0 - timedelta(hours=5))
    campaign(db, registry, max_sends=2)
    assert run_followups(db, settings, T0) == {"queued_text": 1}
    assert run_followups(db, settings, T0 + timedelta(hours=1)) == {"not_due": 1}  # spaced by the delay
    assert run_followups(db, settings, T0 + timedelta(hours=2, seconds=1)) == {"queued_text": 1}
    assert run_followups(db, settings, T0 + timedelta(hours=9)) == {}
    # An invalid answer keeps the user in ask_email but is a reply: a new stall, a fresh count.
    deliver(engine, text("u1", "not an email", ts(T0 + timedelta(hours=9))))
    assert run_followups(db, settings, T0 + timedelta(hours=10)) == {}
    assert run_followups(db, settings, T0 + timedelta(hours=11, seconds=1)) == {"queued_text": 1}
    assert [f.attempt for f in followup_rows(db)] == [1, 2, 3]
    # A valid answer moves the user on: nothing more from a campaign on ask_email.
    deliver(engine, text("u1", "ana@example.com", ts(T0 + timedelta(hours=12))))
    assert run_followups(db, settings, T0 + timedelta(days=2)) == {}


def test_filters_by_business_number_and_language(engine: Engine, db: Database, registry: FlowRegistry,
                                                 settings: Settings) -> None:
    stall(engine, "a", T0 - timedelta(hours=3), phone=PHONE)
    stall(engine, "b", T0 - timedelta(hours=3), phone=PHONE_2)
    campaign(db, registry, name="only-2", filter_phone_number_id=PHONE_2)
    campaign(db, registry, name="spanish", filter_language="es")
    assert run_followups(db, settings, T0) == {"queued_text": 1}
    assert [(r.phone_number_id, r.user_id) for r in followup_outbox(db)] == [(PHONE_2, "b")]


@pytest.fixture
def many_stalled(engine: Engine, db: Database, registry: FlowRegistry) -> Iterator[list[str]]:
    users = [f"user{i:02d}" for i in range(12)]
    for i, user in enumerate(users):
        stall(engine, user, T0 - timedelta(hours=3, minutes=i))
    campaign(db, registry)
    return users


def test_two_overlapping_runs_queue_one_message_per_session(db: Database, settings: Settings,
                                                            many_stalled: list[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    both_decided = threading.Barrier(2, timeout=20)
    original = followups_job._queue_one
    waited = threading.local()

    def decide_then_wait(*args: Any, **kwargs: Any) -> str:
        if not getattr(waited, "done", False):
            waited.done = True
            both_decided.wait()  # both runs have chosen the same sessions and attempts before either writes
        return original(*args, **kwargs)

    monkeypatch.setattr(followups_job, "_queue_one", decide_then_wait)
    results: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda: results.append(run_followups(db, settings, T0))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 2
    assert sum(r.get("queued_text", 0) for r in results) == len(many_stalled)
    assert sum(r.get("duplicate", 0) for r in results) == len(many_stalled)
    rows = followup_outbox(db)
    assert sorted(r.user_id for r in rows) == many_stalled
    assert len({r.idempotency_key for r in rows}) == len(many_stalled)
    assert len(followup_rows(db)) == len(many_stalled)


def test_a_crash_midway_resumes_without_duplicates(db: Database, settings: Settings, many_stalled: list[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    original = followups_job._queue_one
    calls = {"n": 0}

    def crash_after_five(*args: Any, **kwargs: Any) -> str:
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("process killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(followups_job, "_queue_one", crash_after_five)
    with pytest.raises(RuntimeError, match="process killed"):
        run_followups(db, settings, T0)
    assert len(followup_outbox(db)) == 5
    monkeypatch.setattr(followups_job, "_queue_one", original)
    assert run_followups(db, settings, T0 + timedelta(seconds=30)) == {"queued_text": len(many_stalled) - 5}
    rows = followup_outbox(db)
    assert sorted(r.user_id for r in rows) == many_stalled
    assert {f.attempt for f in followup_rows(db)} == {1}


def test_preview_shows_who_when_and_as_what(engine: Engine, db: Database, registry: FlowRegistry) -> None:
    stall(engine, "due", T0 - timedelta(hours=3))
    stall(engine, "soon", T0 - timedelta(hours=1))
    stall(engine, "late", T0 - timedelta(hours=30))
    stall(engine, "gone", T0 - timedelta(hours=4))
    deliver(engine, text("gone", "unsubscribe", ts(T0 - timedelta(hours=3))))
    c = campaign(db, registry)
    frame = api.preview_targets(db, c.name, T0).set_index("user_id")
    assert list(api.preview_targets(db, c.id, T0).columns) == api.PREVIEW_COLUMNS
    assert frame.loc["due", "would_send_as"] == "text"
    assert frame.loc["due", "due_at"] == T0
    assert frame.loc["due", "window"] == "inside"
    assert frame.loc["soon", "due_at"] == T0 + timedelta(hours=1)
    assert frame.loc["late", "window"] == "outside"
    assert frame.loc["late", "would_send_as"] == "skip"
    assert frame.loc["gone", "opted_out"]
    assert frame.loc["gone", "would_send_as"] == "none"
    # An unsaved spec previews the same way (the dashboard's "what if").
    spec = api.CampaignSpec(name="x", flow="lead_qualification", step="ask_email", delay_seconds=600,
                            template_name="t", template_language="en")
    unsaved = api.preview_targets(db, spec, T0).set_index("user_id")
    assert unsaved.loc["late", "would_send_as"] == "template"


def test_preview_counts_each_sessions_own_followups(engine: Engine, db: Database, registry: FlowRegistry,
                                                    settings: Settings) -> None:
    for user in ("a", "b"):
        stall(engine, user, T0 - timedelta(hours=3))
    stall(engine, "fresh", T0 - timedelta(hours=1))
    c = campaign(db, registry, max_sends=2)
    campaign(db, registry, name="other")  # its follow-ups are not this campaign's history
    assert run_followups(db, settings, T0) == {"queued_text": 4}  # a and b, by each campaign
    frame = api.preview_targets(db, c.id, T0 + timedelta(minutes=30)).set_index("user_id")
    assert frame.index.tolist() == ["a", "b", "fresh"]
    assert frame["followups_sent"].tolist() == [1, 1, 0]
    # The second send is spaced by the delay after the first; the fresh stall is due at its own delay.
    assert frame["due_at"].tolist() == [T0 + timedelta(hours=2), T0 + timedelta(hours=2), T0 + timedelta(hours=1)]
    unsaved = api.preview_targets(db, api.spec_of(c), T0).set_index("user_id")
    assert unsaved["followups_sent"].tolist() == [0, 0, 0]


def test_results_per_campaign(engine: Engine, db: Database, registry: FlowRegistry, settings: Settings) -> None:
    now = datetime.now(UTC)
    stall(engine, "reader", now - timedelta(hours=3))
    stall(engine, "lost", now - timedelta(hours=3))
    stall(engine, "quiet", now - timedelta(hours=3))
    c = campaign(db, registry)
    other = campaign(db, registry, name="later", delay_seconds=10 * 3600)
    run_followups(db, settings, now)
    run_sender(db, settings.model_copy(update={"send_user_spacing_seconds": 0.0}), datetime.now(UTC))
    wamids = {r.user_id: r.wamid for r in followup_outbox(db)}
    with db.begin() as conn:
        conn.execute(insert(MessageStatus), [
            {"wamid": wamids["reader"], "phone_number_id": PHONE, "recipient_id": "reader", "status": "read",
             "rank": 3, "error_code": None, "status_at": now},
            {"wamid": wamids["quiet"], "phone_number_id": PHONE, "recipient_id": "quiet", "status": "delivered",
             "rank": 2, "error_code": None, "status_at": now},
            {"wamid": wamids["lost"], "phone_number_id": PHONE, "recipient_id": "lost", "status": "failed",
             "rank": 9, "error_code": 131026, "status_at": now},
        ])
    deliver(engine, text("reader", "ana@example.com", ts(now + timedelta(minutes=10))))
    results = api.campaign_results(db, None, now + timedelta(hours=1)).set_index("campaign")
    assert list(api.campaign_results(db, None, now).columns) == api.RESULT_COLUMNS
    row = results.loc["nudge"]
    assert (row.targeted, row.sent, row.delivered, row.read, row.failed) == (3, 3, 2, 1, 1)
    assert (row.replied, row.recovered, row.skipped) == (1, 1, 0)
    assert results.loc["later"].targeted == 0
    assert api.campaign_results(db, c.id, now).shape[0] == 1
    assert api.campaign_results(db, other.name, now).loc[0, "sent"] == 0
    failures = api.failures_by_code(db, c.id)
    assert failures.to_dict("records") == [{"code": 131026, "title": None, "count": 1}]


def test_campaign_api_validates_and_manages(db: Database, registry: FlowRegistry) -> None:
    c = campaign(db, registry)
    with pytest.raises(WaflowError, match="already exists"):
        campaign(db, registry)
    with pytest.raises(WaflowError, match="has no step 'nope'"):
        campaign(db, registry, name="x", step="nope")
    with pytest.raises(WaflowError, match="no flow named"):
        campaign(db, registry, name="y", flow="nope")
    assert api.get_campaign(db, "nudge").id == c.id
    assert api.get_campaign(db, str(c.id)).name == "nudge"
    with pytest.raises(WaflowError, match="no campaign"):
        api.get_campaign(db, "missing")
    assert api.set_active(db, "nudge", False).active is False
    assert api.update_campaign(db, c.id, max_sends=3, text="Hey {name}").max_sends == 3
    with pytest.raises(WaflowError, match="text .* or a template"):
        api.update_campaign(db, c.id, text=None)
    assert [x.name for x in api.list_campaigns(db)] == ["nudge"]
    assert api.get_campaign(db, c.id).text == "Hey {name}"


@pytest.mark.parametrize(
    ("text_", "seconds"), [("90s", 90), ("30m", 1800), ("2h", 7200), ("3d", 259200), ("1h30m", 5400), (" 2H ", 7200)]
)
def test_parse_duration(text_: str, seconds: int) -> None:
    assert api.parse_duration(text_) == seconds


@pytest.mark.parametrize("bad", ["", "2", "h", "2x", "0m", "-1h", "1.5h", "2h 30"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        api.parse_duration(bad)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"text": None}, "text .* or a template"),
        ({"quiet_start": "25:00", "quiet_end": "08:00"}, "HH:MM"),
        ({"quiet_start": "21:00"}, "both quiet_start and quiet_end"),
        ({"timezone": "Mars/Olympus"}, "unknown timezone"),
        ({"delay_seconds": 0}, "> 0"),
        ({"max_sends": 0}, ">= 1"),
        ({"template_name": "t"}, "template_language is required"),
    ],
)
def test_spec_validation(changes: dict[str, Any], message: str) -> None:
    fields = {"name": "n", "flow": "f", "step": "s", "delay_seconds": 60, "text": "hi", **changes}
    with pytest.raises(WaflowError, match=message):
        api.build_spec(**fields)


def test_cli(sqlite_url: str, flows_dir: Path, monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.setenv("FLOWS_DIR", str(flows_dir))
    get_settings.cache_clear()
    try:
        add = ["campaigns", "add", "--name", "nudge", "--flow", "lead_qualification", "--step", "ask_email",
               "--after", "2h", "--text", "Still there?", "--template", "reminder", "--language", "en_US",
               "--param", "{name}", "--quiet", "21:00-08:00", "--timezone", "Europe/Madrid"]
        assert cli_main(add) == 0
        assert "campaign 1 'nudge' created (active)" in capsys.readouterr().out
        assert cli_main(add) == 1
        assert "already exists" in capsys.readouterr().err
        assert cli_main([*add[:8], "--after", "2 hours", "--text", "x"]) == 1
        assert "--after: invalid duration" in capsys.readouterr().err
        assert cli_main(["campaigns", "list"]) == 0
        listing = capsys.readouterr().out
        assert "nudge" in listing
        assert "21:00-08:00 Europe/Madrid" in listing
        assert cli_main(["campaigns", "pause", "nudge"]) == 0
        assert api.get_campaign(Database(sqlite_url), "nudge").active is False
        assert cli_main(["campaigns", "resume", "1"]) == 0
        assert cli_main(["campaigns", "results", "nudge"]) == 0
        assert "targeted" in capsys.readouterr().out
        assert cli_main(["sending", "resume", PHONE]) == 1
        assert f"{PHONE} is not paused" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
