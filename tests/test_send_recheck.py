"""Every follow-up is rechecked right before it leaves (first try and every retry), on SQLite and PostgreSQL.

Users stall through the real engine, the real follow-up job queues the follow-ups, what happens next (a reply, a
valid answer, the last answer, STOP, an operator pausing the campaign, the window closing) happens through the
real engine, job or API, and the sender runs live against a real local HTTP server answering like the Graph API.
The decision itself (`core.campaigns.recheck_followup`) is unit-tested at the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, update

from core import campaigns as api
from core.cli import main as cli_main
from core.config import Settings, get_settings
from core.db import Database
from core.engine import Engine
from core.flows import FlowRegistry
from core.messages import InboundMessage
from core.models import ChatSession, FollowUp, Outbox
from jobs.archive import run_archive
from jobs.followups import run_followups
from jobs.sender import run_sender
from tests import graph_server as g
from tests.conftest import make_settings
from tests.factories import PHONE, text

TEMPLATE = {"template_name": "lead_reminder", "template_language": "en_US", "template_params": ["{name}"]}


@pytest.fixture
def graph() -> Iterator[g.GraphServer]:
    with g.running() as server:
        yield server


@pytest.fixture
def live(database_url: str, flows_dir: Path, graph: g.GraphServer) -> Settings:
    return make_settings(
        database_url, flows_dir, send_mode="live", graph_api_url=graph.url, whatsapp_access_token="test-token",
        send_user_spacing_seconds=0.0, send_timeout_seconds=2.0, send_connect_timeout_seconds=2.0,
    )


@pytest.fixture
def live_engine(db: Database, registry: FlowRegistry, live: Settings) -> Engine:
    return Engine(db, registry, live)


def ts(at: datetime) -> int:
    return int(at.timestamp())


def deliver(engine: Engine, *messages: InboundMessage) -> None:
    for key in engine.ingest(list(messages)).session_keys:
        engine.apply_all(key)


def stall(engine: Engine, user: str, at: datetime, *answers: str) -> None:
    """Through the real engine: hi, a name (and any further answers), the last one at `at`."""
    said = ["hi", "Ana", *answers]
    for offset, body in enumerate(said, start=1 - len(said)):
        deliver(engine, text(user, body, ts(at) + offset))


def campaign(db: Database, registry: FlowRegistry, **overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "name": "nudge", "flow": "lead_qualification", "step": "ask_email", "delay_seconds": 2 * 3600,
        "text": "Still there, {name}? What's your email?",
    }
    fields.update(overrides)
    return api.create_campaign(db, api.CampaignSpec(**fields), registry)


def followups(db: Database, user: str) -> list[tuple[Outbox | None, FollowUp]]:
    """Each follow-up to `user` with its outbox row, oldest first."""
    with db.session() as s:
        rows = s.scalars(select(FollowUp).where(FollowUp.user_id == user).order_by(FollowUp.id)).all()
        return [(s.get(Outbox, f.outbox_id) if f.outbox_id else None, f) for f in rows]


def the_followup(db: Database, user: str) -> tuple[Outbox, FollowUp]:
    [(row, followup)] = followups(db, user)
    assert row is not None
    return row, followup


def replies(db: Database, user: str) -> list[Outbox]:
    """The flow's own messages to `user` (no campaign), oldest first."""
    with db.session() as s:
        return list(s.scalars(
            select(Outbox).where(Outbox.user_id == user, Outbox.campaign_id.is_(None)).order_by(Outbox.id)
        ))


def requests_for(graph: g.GraphServer, outbox_id: int) -> list[g.Request]:
    return [r for r in graph.requests if r.json.get("biz_opaque_callback_data") == str(outbox_id)]


def cancelled_metric() -> float:
    return REGISTRY.get_sample_value("waflow_outbox_results_total", {"result": "cancelled"}) or 0.0


def real_now() -> datetime:
    return datetime.now(UTC)


def test_a_reply_before_sending_cancels_the_followup_and_the_reply_still_goes(
    live_engine: Engine, db: Database, registry: FlowRegistry, live: Settings, graph: g.GraphServer
) -> None:
    now = real_now()
    stall(live_engine, "u1", now - timedelta(hours=3))
    campaign(db, registry)
    assert run_followups(db, live, now) == {"queued_text": 1}
    deliver(live_engine, text("u1", "not an email", ts(now)))  # still in ask_email, but the user wrote
    before = cancelled_metric()
    result = run_sender(db, live, real_now())
    assert result == {"sent": 3, "cancelled_replied": 1}  # two prompts and the reprompt; not the follow-up
    row, followup = the_followup(db, "u1")
    assert (row.status, row.error_title, row.attempts, row.send_started_at) == ("cancelled", "user replied", 0, None)
    assert (followup.status, followup.reason) == ("cancelled", "user replied")
    assert requests_for(graph, row.id) == []
    reprompt = replies(db, "u1")[-1]
    assert reprompt.id > row.id  # queued after the follow-up: the cancelled row did not hold it back
    assert reprompt.status == "sent"
    assert [r.wamid for r in requests_for(graph, reprompt.id)] == [reprompt.wamid]
    assert cancelled_metric() == before + 1
    # A new stall after the reply: the cancelled follow-up does not count against max_sends.
    again = now + timedelta(hours=2, seconds=1)
    assert run_followups(db, live, again) == {"queued_text": 1}
    assert run_sender(db, live, again) == {"sent": 1}
    assert [(r and r.status, f.status, f.attempt) for r, f in followups(db, "u1")] == [
        ("cancelled", "cancelled", 1), ("sent", "queued", 2),
    ]


def test_a_reply_between_retries_cancels_the_retry(
    live_engine: Engine, db: Database, registry: FlowRegistry, live: Settings, graph: g.GraphServer
) -> None:
    now = real_now()
    stall(live_engine, "u1", now - timedelta(hours=3))
    campaign(db, registry)
    run_followups(db, live, now)
    followup_id = str(the_followup(db, "u1")[0].id)
    graph.rule(lambda r: g.error(131000, status=500) if r.json.get("biz_opaque_callback_data") == followup_id else None)
    assert run_sender(db, live, real_now()) == {"sent": 2, "retry": 1}
    row, _ = the_followup(db, "u1")
    assert (row.status, row.attempts) == ("queued", 1)
    deliver(live_engine, text("u1", "not an email", ts(real_now())))
    assert run_sender(db, live, row.next_attempt_at + timedelta(milliseconds=1)) == {
        "cancelled_replied": 1, "sent": 1,
    }
    row, followup = the_followup(db, "u1")
    assert (row.status, row.error_title, row.attempts) == ("cancelled", "user replied", 1)
    assert followup.status == "cancelled"
    assert len(requests_for(graph, row.id)) == 1  # the first try only
    assert replies(db, "u1")[-1].status == "sent"


def test_a_message_stored_but_not_yet_applied_counts_as_a_reply(
    live_engine: Engine, db: Database, registry: FlowRegistry, live: Settings, graph: g.GraphServer
) -> None:
    now = real_now()
    stall(live_engine, "u1", now - timedelta(hours=3))
    campaign(db, registry)
    run_followups(db, live, now)
    [key] = live_engine.ingest([text("u1", "ana@example.com", ts(now))]).session_keys  # stored, not applied
    assert run_sender(db, live, real_now()) == {"sent": 2, "cancelled_replied": 1}
    row, _ = the_followup(db, "u1")
    assert requests_for(graph, row.id) == []
    live_engine.apply_all(key)
    assert run_sender(db, live, real_now()) == {"sent": 1}  # the flow's answer to it


def test_a_message_being_applied_during_the_check_is_waited_for(
    live_engine: Engine, db: Database, registry: FlowRegistry, live: Settings, graph: g.GraphServer
) -> None:
    """An apply holds the session row (PostgreSQL: FOR UPDATE; SQLite: the write lock) until it commits: the
    recheck waits for it instead of reading the state from before the message."""
    now = real_now()
    stall(live_engine, "u1", now - timedelta(hours=3))
    campaign(db, registry)
    run_followups(db, live, now)
    locked, done = threading.Event(), threading.Event()

    def apply_in_flight() -> None:
        with db.begin() as conn:
            key = (ChatSession.phone_number_id == PHONE, ChatSession.user_id == "u1")
            conn.execute(select(ChatSession.version).where(*key).with_for_update())
            locked.set()
            time.sleep(0.5)
            conn.execute(update(ChatSession).where(*key).values(last_inbound_at=now, version=ChatSession.version + 1))
        done.set()

    worker = threading.Thread(target=apply_in_flight)
    worker.start()
    assert locked.wait(10)
    result = run_sender(db, live, real_now())
    worker.join(10)
    assert done.is_set()
    assert result["cancelled_replied"] == 1
    assert requests_for(graph, the_followup(db, "u1")[0].id) == []


def test_a_user_who_moved_on_gets_no_followup(
    live_engine: Engine, db: Database, registry: FlowRegistry, live: Settings, graph: g.GraphServer
) -> None:
    now = real_now()
    stall(live_engine, "valid", now - timedelta(hours=3))
    stall(live_engine, "reset", now - timedelta(hours=3))
    campaign(db, registry)
    assert run_followups(db, live, now) == {"queued_text": 2}
    deliver(live_engine, text("valid", "ana@example.com", ts(now)), text("reset", "start over", ts(now)))
    result = run_sender(db, live, real_now())
    assert result["cancelled_moved"] == 2
    for user in ("valid", "reset"):
        row, followup = the_followup(db, user)
        assert (row.status, row.error_title, followup.reason) == (
            "cancelled", "user moved to another step", "user moved to another step",
        )
        assert requests_for(graph, row.id) == []
        assert {r.status for r in replies(db, user)} == {"sent"}


def test_a_user_who_completed_gets_no_followup_archived_or_not(
    live_engine: Engine, db: Database, registry: FlowRegistry, live: Settings, graph: g.GraphServer
) -> None:
    now = real_now()
    stall(live_engine, "done", now - timedelta(hours=3), "ana@example.com")
    stall(live_engine, "archived", now - timedelta(hours=3), "bea@example.com")
    campaign(db, registry, step="ask_city", delay_seconds=3600)
    assert run_followups(db, live, now) == {"queued_text": 2}
    # "archived" answered two hours ago (a late delivery keeps its WhatsApp time), so the archive job finds it idle.
    deliver(live_engine, text("done", "Madrid", ts(now)), text("archived", "Lima", ts(now - timedelta(hours=2))))
    assert run_archive(db, live.model_copy(update={"archive_after_hours": 1.5}), now)["from_completed"] == 1
    run_sender(db, live, real_now())
    for user in ("done", "archived"):
        row, followup = the_followup(db, user)
        assert (row.status, row.error_title, followup.status) == ("cancelled", "user completed the flow", "cancelled")
        assert requests_for(graph, row.id) == []
        assert "Thanks" in (replies(db, user)[-1].text or "")
        assert replies(db, user)[-1].status == "sent"


def test_an_archived_user_still_in_the_step_gets_the_followup(
    live_engine: Engine, db: Database, registry: FlowRegistry, live: Settings, graph: g.GraphServer
) -> None:
    now = real_now()
    stall(live_engine, "idle", now - timedelta(hours=3))
    campaign(db, registry)
    run_followups(db, live, now)
    assert run_archive(db, live.model_copy(update={"archive_after_hours": 1.0}), now)["from_active"] == 1
    assert run_sender(db, live, real_now()) == {"sent": 3}
    row, _ = the_followup(db, "idle")
    assert [r.wamid for r in requests_for(graph, row.id)] == [row.wamid]


def test_a_user_who_opted_out_gets_no_followup_but_the_confirmation(
    live_engine: Engine, db: Database, registry: FlowRegistry, live: Settings, graph: g.GraphServer
) -> None:
    now = real_now()
    stall(live_engine, "u1", now - timedelta(hours=3))
    campaign(db, registry)
    run_followups(db, live, now)
    deliver(live_engine, text("u1", "STOP", ts(now)))
    assert run_sender(db, live, real_now()) == {"sent": 3, "cancelled_opted_out": 1}
    row, followup = the_followup(db, "u1")
    assert (row.status, row.error_title, followup.reason) == ("cancelled", "user opted out", "user opted out")
    assert requests_for(graph, row.id) == []
    assert "won't get any more messages" in (replies(db, "u1")[-1].text or "")


def test_a_paused_campaign_sends_nothing_and_resumes_with_a_new_followup(
    live_engine: Engine, db: Database, registry: FlowRegistry, live: Settings, graph: g.GraphServer
) -> None:
    now = real_now()
    stall(live_engine, "u1", now - timedelta(hours=3))
    c = campaign(db, registry)
    run_followups(db, live, now)
    api.set_active(db, c.id, False)
    assert run_sender(db, live, real_now()) == {"sent": 2, "cancelled_paused": 1}
    row, followup = the_followup(db, "u1")
    assert (row.status, row.error_title, followup.status) == ("cancelled", "campaign paused", "cancelled")
    assert requests_for(graph, row.id) == []
    # Resumed: the user never got it, and is still stalled in the same stall.
    api.set_active(db, c.id, True)
    assert run_followups(db, live, real_now()) == {"queued_text": 1}
    assert run_sender(db, live, real_now()) == {"sent": 1}
    assert [(r and r.status, f.attempt) for r, f in followups(db, "u1")] == [("cancelled", 1), ("sent", 2)]


def test_window_closed_since_queueing_sends_the_template(
    live_engine: Engine, db: Database, registry: FlowRegistry, live: Settings, graph: g.GraphServer
) -> None:
    now = real_now()
    # The window is open 10 more minutes when the follow-up is queued (free text), closed when it is sent.
    stall(live_engine, "u1", now - timedelta(hours=23, minutes=50))
    campaign(db, registry, **TEMPLATE)
    assert run_followups(db, live, now) == {"queued_text": 1}
    assert run_sender(db, live, now + timedelta(minutes=11)) == {"sent": 3, "switched_to_template": 1}
    row, followup = the_followup(db, "u1")
    template = {"name": "lead_reminder", "language": {"code": "en_US"},
                "components": [{"type": "body", "parameters": [{"type": "text", "text": "Ana"}]}]}
    assert (row.status, row.kind, row.body, row.template) == (
        "sent", "template", {"type": "template", "template": template}, "lead_reminder (en_US)",
    )
    assert followup.status == "queued"  # it went: it counts as sent in the results
    [request] = requests_for(graph, row.id)
    assert (request.json["type"], request.json["template"]) == ("template", template)
    assert api.campaign_results(db, "nudge", real_now()).loc[0, ["sent", "cancelled"]].tolist() == [1, 0]


def test_window_closed_by_a_131047_without_a_template_cancels(
    live_engine: Engine, db: Database, registry: FlowRegistry, live: Settings, graph: g.GraphServer
) -> None:
    now = real_now()
    stall(live_engine, "u1", now - timedelta(hours=3))
    campaign(db, registry)
    run_followups(db, live, now)
    followup_id = str(the_followup(db, "u1")[0].id)
    # Meta refuses the flow's own messages as outside the window (the user's clock was off, say): that closes it.
    graph.rule(lambda r: None if r.json.get("biz_opaque_callback_data") == followup_id else g.error(131047))
    assert run_sender(db, live, real_now()) == {"failed": 2, "cancelled_window_closed": 1}
    row, followup = the_followup(db, "u1")
    reason = "24 h window closed and no template configured"
    assert (row.status, row.error_title, followup.status, followup.reason) == ("cancelled", reason, "cancelled", reason)
    assert requests_for(graph, row.id) == []


def test_window_closed_by_a_131047_with_a_template_sends_it(
    live_engine: Engine, db: Database, registry: FlowRegistry, live: Settings, graph: g.GraphServer
) -> None:
    now = real_now()
    stall(live_engine, "u1", now - timedelta(hours=3))
    campaign(db, registry, **TEMPLATE)
    run_followups(db, live, now)
    graph.rule(lambda r: g.error(131047) if r.json.get("type") == "text" else None)
    assert run_sender(db, live, real_now()) == {"failed": 2, "sent": 1, "switched_to_template": 1}
    row, _ = the_followup(db, "u1")
    assert (row.status, row.kind) == ("sent", "template")
    assert [r.json["type"] for r in requests_for(graph, row.id)] == ["template"]


def test_results_show_cancellations_and_why(
    live_engine: Engine, db: Database, registry: FlowRegistry, live: Settings, graph: g.GraphServer,
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    now = real_now()
    for user in ("kept", "replied", "left"):
        stall(live_engine, user, now - timedelta(hours=3))
    c = campaign(db, registry)
    run_followups(db, live, now)
    deliver(live_engine, text("replied", "not an email", ts(now)), text("left", "stop", ts(now)))
    result = run_sender(db, live, real_now())
    assert (result["cancelled_replied"], result["cancelled_opted_out"]) == (1, 1)
    results = api.campaign_results(db, c.id, real_now())
    assert list(results.columns) == api.RESULT_COLUMNS
    row = results.loc[0]
    assert (row.targeted, row.sent, row.failed, row.skipped, row.cancelled) == (3, 1, 0, 0, 2)
    reasons = api.cancellations_by_reason(db, c.name)
    assert reasons.to_dict("records") == [{"reason": "user opted out", "count": 1},
                                          {"reason": "user replied", "count": 1}]
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    try:
        assert cli_main(["campaigns", "results"]) == 0
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr().out
    assert "cancelled" in out.splitlines()[0]
    assert "cancelled before sending, nudge:" in out
    assert "user replied" in out
    assert "user opted out" in out


def test_replies_to_the_users_own_messages_are_never_rechecked(
    live_engine: Engine, db: Database, registry: FlowRegistry, live: Settings, graph: g.GraphServer
) -> None:
    now = real_now()
    campaign(db, registry)
    stall(live_engine, "u1", now - timedelta(minutes=1), "ana@example.com", "Madrid")  # completed, then STOP
    deliver(live_engine, text("u1", "stop", ts(now)))
    api.set_active(db, "nudge", False)
    assert run_sender(db, live, real_now()) == {"sent": 5}
    assert len(graph.sent_to("u1")) == 5


# -- the decision, pure ---------------------------------------------------------------------------------------

STALLED = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
NOW = STALLED + timedelta(hours=3)
SPEC = api.CampaignSpec(name="nudge", flow="lead_qualification", step="ask_email", delay_seconds=7200,
                        text="Still there, {name}?")
FACTS = api.SessionFacts(phone_number_id=PHONE, user_id="u1", language="en", data={"name": "Ana"},
                         last_inbound_at=STALLED, window_closed_at=None, opted_out=False)
SESSION = api.LiveSession(flow="lead_qualification", current_step="ask_email", status="active", archived_from=None,
                          facts=FACTS)
QUEUED = api.QueuedFollowUp(kind="text", step="ask_email", stalled_since=STALLED)


def session(**changes: Any) -> api.LiveSession:
    facts = {k: changes.pop(k) for k in ("last_inbound_at", "window_closed_at", "opted_out", "data") if k in changes}
    return replace(SESSION, facts=replace(FACTS, **facts), **changes)


def decide(live: api.LiveSession | None = SESSION, queued: api.QueuedFollowUp = QUEUED, now: datetime = NOW,
           **campaign_changes: Any) -> api.Recheck:
    target = SPEC.model_copy(update=campaign_changes) if campaign_changes else SPEC
    return api.recheck_followup(target, queued, live, now)


def test_still_stalled_inside_the_window_sends_as_queued() -> None:
    assert decide() == api.Recheck("send")
    assert decide(session(status="archived", archived_from="active")).action == "send"  # archived: idle, in step


@pytest.mark.parametrize(
    ("live", "cause"),
    [
        (None, "no_session"),
        (session(last_inbound_at=STALLED + timedelta(seconds=1)), "replied"),
        (session(pending_inbound_at=STALLED + timedelta(seconds=1)), "replied"),
        (session(current_step="ask_city", last_inbound_at=NOW), "moved"),
        (session(flow="service_booking"), "moved"),
        (session(status="completed", current_step="done", last_inbound_at=NOW), "completed"),
        (session(status="archived", archived_from="completed"), "completed"),
        (session(opted_out=True, last_inbound_at=NOW), "opted_out"),  # STOP is a message too: opted out wins
        (session(opted_out=True, status="completed"), "opted_out"),
    ],
)
def test_cancelled_when_the_user_is_no_longer_stalled(live: api.LiveSession | None, cause: str) -> None:
    assert decide(live) == api.Recheck("cancel", cause, api.CANCEL_REASONS[cause])


def test_a_reply_is_newer_than_the_stall_the_followup_was_decided_in() -> None:
    assert decide(session(pending_inbound_at=STALLED)).action == "send"  # a late copy of the stalling message
    assert decide(session(last_inbound_at=NOW), replace(QUEUED, stalled_since=None)).action == "send"  # unknown


def test_a_paused_or_missing_campaign_cancels() -> None:
    assert decide(active=False) == api.Recheck("cancel", "paused", "campaign paused")
    assert api.recheck_followup(None, QUEUED, SESSION, NOW).cause == "no_campaign"
    assert decide(session(last_inbound_at=NOW), active=False).cause == "replied"  # the user's reason is told first


def test_window_closed_switches_free_text_to_the_template() -> None:
    expires = STALLED + timedelta(hours=24)
    assert decide(now=expires - timedelta(seconds=1)).action == "send"  # no safety margin at send time
    for closed in (decide(now=expires), decide(session(window_closed_at=STALLED))):  # expired, or a 131047
        assert closed == api.Recheck("cancel", "window_closed", "24 h window closed and no template configured")
    check = decide(now=expires, template_name="lead_reminder", template_language="en_US", template_params=["{name}"])
    assert check.action == "template"
    assert check.plan is not None
    assert (check.plan.kind, check.plan.template, check.plan.text) == ("template", "lead_reminder (en_US)", "Ana")
    assert check.plan.body == {"type": "template", "template": {
        "name": "lead_reminder", "language": {"code": "en_US"},
        "components": [{"type": "body", "parameters": [{"type": "text", "text": "Ana"}]}],
    }}


def test_a_template_planning_skips_is_cancelled_with_its_reason() -> None:
    check = decide(now=NOW + timedelta(days=1), template_name="t", template_language="en", template_params=["{city}"])
    assert (check.action, check.cause) == ("cancel", "window_closed")
    assert check.reason is not None
    assert "city" in check.reason


def test_a_template_is_never_rechecked_against_the_window() -> None:
    assert decide(queued=replace(QUEUED, kind="template"), now=NOW + timedelta(days=3)).action == "send"
