"""The outbox sender against a real local HTTP server answering like the Graph API, on SQLite and PostgreSQL."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, update

from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.flows import FlowRegistry
from core.messages import InboundMessage
from core.models import ChatSession, Outbox, SenderPause
from core.views import session_view
from core.whatsapp import ErrorClass, GraphClient, classify, paused_numbers, resume_sending
from jobs.sender import RateLimiter, claim_due, run_sender
from jobs.sweeper import free_stale_claims
from tests import graph_server as g
from tests.conftest import make_settings
from tests.factories import PHONE, PHONE_2, text

TOKEN = "test-access-token"


@pytest.fixture
def graph() -> Iterator[g.GraphServer]:
    with g.running() as server:
        yield server


@pytest.fixture
def live(database_url: str, flows_dir: Path, graph: g.GraphServer) -> Settings:
    return make_settings(
        database_url, flows_dir, send_mode="live", graph_api_url=graph.url, whatsapp_access_token=TOKEN,
        send_user_spacing_seconds=0.0, send_timeout_seconds=0.5, send_connect_timeout_seconds=0.5,
    )


@pytest.fixture
def live_engine(db: Database, registry: FlowRegistry, live: Settings) -> Engine:
    return Engine(db, registry, live)


def now() -> datetime:
    return datetime.now(UTC)


def deliver(engine: Engine, *messages: InboundMessage) -> None:
    for key in engine.ingest(list(messages)).session_keys:
        engine.apply_all(key)


def greet(engine: Engine, *users: str, phone: str = PHONE) -> None:
    """Each user says hi: the engine queues the flow's first prompt for each (one outbox row per user)."""
    ts = int(time.time()) - 60
    deliver(engine, *(text(user, "hi", ts, phone=phone) for user in users))


def outbox(db: Database) -> list[Outbox]:
    with db.session() as s:
        return list(s.scalars(select(Outbox).order_by(Outbox.id)))


def test_live_send_posts_meta_shape_and_stores_wamid(live_engine: Engine, db: Database, live: Settings,
                                                     graph: g.GraphServer) -> None:
    greet(live_engine, "u1")
    result = run_sender(db, live, now())
    assert result["sent"] == 1
    [request] = graph.requests
    [row] = outbox(db)
    assert request.path == f"/v23.0/{PHONE}/messages"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.json["messaging_product"] == "whatsapp"
    assert request.json["recipient_type"] == "individual"
    assert request.json["to"] == "u1"
    assert request.json["type"] == "text"
    assert request.json["text"]["body"] == row.text
    assert request.json["biz_opaque_callback_data"] == str(row.id)
    assert (row.status, row.wamid, row.attempts) == ("sent", request.wamid, 1)
    assert row.sent_at is not None
    assert row.send_started_at is not None
    view = session_view(db, PHONE, "u1")
    assert view is not None
    assert view["outbound"][0]["wamid"] == request.wamid


def test_dry_run_marks_sent_without_any_http(engine: Engine, db: Database, settings: Settings,
                                             graph: g.GraphServer) -> None:
    assert settings.send_mode == "dry-run"
    greet(engine, "u1", "u2")
    result = run_sender(db, settings.model_copy(update={"graph_api_url": graph.url}), now())
    assert result["sent"] == 2
    assert graph.requests == []
    assert [(r.status, r.wamid) for r in outbox(db)] == [(r.status, f"wamid.dryrun.{r.id}") for r in outbox(db)]
    assert all(r.status == "sent" for r in outbox(db))


def test_transient_errors_back_off_with_jitter_then_send(live_engine: Engine, db: Database, live: Settings,
                                                          graph: g.GraphServer) -> None:
    greet(live_engine, "u1")
    graph.script(g.error(131000, status=500), g.http(503), g.http(429, retry_after=30), g.ok())
    t0 = now()
    waits = []
    for step in range(3):
        result = run_sender(db, live, t0)
        assert result.get("retry") == 1, result
        [row] = outbox(db)
        assert row.status == "queued"
        assert row.attempts == step + 1
        waits.append((row.next_attempt_at - t0).total_seconds())
        # Not due yet: nothing is sent before the backoff has passed.
        assert run_sender(db, live, t0).get("sent") is None
        t0 = row.next_attempt_at + timedelta(milliseconds=1)
    base = live.send_backoff_base_seconds
    slack = 3.0  # the run's clock moves on while it sends (a loaded CI machine is slow)
    assert base * 0.5 <= waits[0] <= base * 1.0 + slack
    assert base * 1.0 <= waits[1] <= base * 2.0 + slack
    assert 30 <= waits[2] <= 30 + slack  # Retry-After is honoured as a floor (the backoff step alone is 4-8 s)
    assert run_sender(db, live, t0)["sent"] == 1
    [row] = outbox(db)
    assert (row.status, row.attempts, row.error_code) == ("sent", 4, None)
    assert len(graph.requests) == 4


def test_connection_refused_is_retried_not_uncertain(live_engine: Engine, db: Database, live: Settings) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings = live.model_copy(update={"graph_api_url": f"http://127.0.0.1:{closed_port}/v23.0"})
    greet(live_engine, "u1")
    assert run_sender(db, settings, now()).get("retry") == 1
    [row] = outbox(db)
    assert row.status == "queued"
    assert "connection failed" in (row.error_title or "")


def test_permanent_error_fails_and_is_never_retried(live_engine: Engine, db: Database, live: Settings,
                                                    graph: g.GraphServer) -> None:
    greet(live_engine, "u1")
    graph.script(g.error(131026))
    assert run_sender(db, live, now())["failed"] == 1
    assert run_sender(db, live, now() + timedelta(days=1)) == {}
    [row] = outbox(db)
    assert (row.status, row.error_code, row.error_title) == ("failed", 131026, "Message undeliverable")
    assert len(graph.requests) == 1


def test_gives_up_after_max_attempts(live_engine: Engine, db: Database, live: Settings, graph: g.GraphServer) -> None:
    settings = live.model_copy(update={"send_max_attempts": 2})
    greet(live_engine, "u1")
    graph.script(g.error(2), g.error(2))
    assert run_sender(db, settings, now())["retry"] == 1
    assert run_sender(db, settings, now() + timedelta(hours=1))["failed"] == 1
    [row] = outbox(db)
    assert row.status == "failed"
    assert row.attempts == 2
    assert "gave up after 2" in (row.error_title or "")


def test_pair_rate_and_marketing_limits_retry_at_their_own_pace(live_engine: Engine, db: Database, live: Settings,
                                                                 graph: g.GraphServer) -> None:
    greet(live_engine, "u1", "u2")
    graph.rule(lambda r: g.error(131056) if r.json["to"] == "u1" else g.error(131049))
    t0 = now()
    assert run_sender(db, live, t0)["retry"] == 2
    pair, marketing = outbox(db)
    assert 6 <= (pair.next_attempt_at - t0).total_seconds() <= 12
    assert 3600 <= (marketing.next_attempt_at - t0).total_seconds() <= 3610
    assert run_sender(db, live, t0 + timedelta(hours=2))["retry"] == 2
    _, marketing = outbox(db)
    assert 4 * 3600 <= (marketing.next_attempt_at - t0 - timedelta(hours=2)).total_seconds() <= 4 * 3600 + 10


def test_account_error_pauses_the_number_until_an_operator_resumes(live_engine: Engine, db: Database,
                                                                   live: Settings, graph: g.GraphServer) -> None:
    greet(live_engine, "a1", "a2", "a3", phone=PHONE)
    greet(live_engine, "b1", phone=PHONE_2)
    graph.rule(lambda r: g.error(131031) if r.phone_number_id == PHONE else None)
    live = live.model_copy(update={"send_workers": 1})
    result = run_sender(db, live, now())
    assert result["paused"] == 1
    assert result["sent"] == 1
    assert [p["phone_number_id"] for p in paused_numbers(db)] == [PHONE]
    assert paused_numbers(db)[0]["error_code"] == 131031
    assert REGISTRY.get_sample_value("waflow_sender_paused", {"phone_number_id": PHONE, "code": "131031"}) == 1
    by_user = {r.user_id: r for r in outbox(db)}
    assert by_user["b1"].status == "sent"
    assert {by_user[u].status for u in ("a1", "a2", "a3")} == {"queued"}
    assert by_user["a1"].attempts == 0  # the pause does not count against the message
    requests_before = len(graph.requests)
    assert run_sender(db, live, now() + timedelta(hours=1)) == {}
    assert len(graph.requests) == requests_before  # nothing goes from a paused number
    graph.rule(lambda r: None)
    assert resume_sending(db, PHONE) is True
    assert REGISTRY.get_sample_value("waflow_sender_paused", {"phone_number_id": PHONE, "code": "131031"}) is None
    assert run_sender(db, live, now())["sent"] == 3
    assert {r.status for r in outbox(db)} == {"sent"}


def test_window_closed_marks_the_session(live_engine: Engine, db: Database, live: Settings,
                                         graph: g.GraphServer) -> None:
    greet(live_engine, "u1")
    graph.script(g.error(131047))
    assert run_sender(db, live, now())["failed"] == 1
    [row] = outbox(db)
    assert (row.status, row.error_code) == ("failed", 131047)
    view = session_view(db, PHONE, "u1")
    assert view is not None
    assert view["window_expires_at"] is None
    # The user's next message reopens the window (the engine clears window_closed_at).
    deliver(live_engine, text("u1", "Ana", int(time.time())))
    view = session_view(db, PHONE, "u1")
    assert view is not None
    assert view["window_expires_at"] is not None


def test_read_timeout_is_uncertain_and_never_resent(live_engine: Engine, db: Database, live: Settings,
                                                    graph: g.GraphServer) -> None:
    greet(live_engine, "u1")
    graph.script(g.slow(1.5))
    result = run_sender(db, live, now())
    assert result == {"uncertain": 1}
    [row] = outbox(db)
    assert row.status == "uncertain"
    assert "no answer in time" in (row.error_title or "")
    assert run_sender(db, live, now() + timedelta(days=2)) == {}
    assert len(graph.requests) == 1


def test_rate_limit_per_business_number(live_engine: Engine, db: Database, live: Settings,
                                        graph: g.GraphServer) -> None:
    users = [f"r{i}" for i in range(10)]
    greet(live_engine, *users)
    settings = live.model_copy(update={"send_rate_per_second": 20.0, "send_workers": 4})
    started = time.monotonic()
    assert run_sender(db, settings, now())["sent"] == 10
    assert time.monotonic() - started >= 9 / 20.0 - 0.02
    stamps = sorted(r.at for r in graph.requests)
    assert stamps[-1] - stamps[0] >= 9 / 20.0 - 0.05


def test_one_users_messages_go_in_order_spaced_and_wait_behind_a_retry(live_engine: Engine, db: Database,
                                                                       live: Settings, graph: g.GraphServer) -> None:
    ts = int(time.time()) - 60
    # Two messages in one batch: two replies (prompt for the name, then for the email) to the same user.
    deliver(live_engine, text("u1", "hi", ts), text("u1", "Ana", ts + 1))
    first, second = outbox(db)
    settings = live.model_copy(update={"send_user_spacing_seconds": 0.3})
    graph.script(g.error(131000))
    t0 = now()
    assert run_sender(db, settings, t0)["retry"] == 1
    assert [r.json["biz_opaque_callback_data"] for r in graph.requests] == [str(first.id)]
    # The second message is due but waits behind the first one's retry.
    assert claim_due(db, t0 + timedelta(milliseconds=10), "x", 10, 0.3) == []
    later = t0 + timedelta(seconds=5)
    assert run_sender(db, settings, later)["sent"] == 2
    sent = [r for r in graph.requests if r.wamid]
    assert [r.json["biz_opaque_callback_data"] for r in sent] == [str(first.id), str(second.id)]
    assert sent[1].at - sent[0].at >= 0.29


def test_sweeper_frees_stale_claims(live_engine: Engine, db: Database) -> None:
    greet(live_engine, "u1", "u2")
    old = now() - timedelta(hours=1)
    claimed = claim_due(db, now(), "dead-sender", 10, 0.0)
    assert len(claimed) == 2
    with db.begin() as conn:  # claimed an hour ago; the dead sender had started the HTTP call of one row only
        conn.execute(update(Outbox).values(claimed_at=old))
        conn.execute(update(Outbox).where(Outbox.id == claimed[0].id).values(send_started_at=old))
    assert free_stale_claims(db, now(), timedelta(minutes=5)) == (1, 1)
    first, second = outbox(db)
    assert first.status == "uncertain"
    assert (second.status, second.claimed_by) == ("queued", None)
    # A fresh claim is left alone.
    claim_due(db, now(), "live-sender", 10, 0.0)
    assert free_stale_claims(db, now(), timedelta(minutes=5)) == (0, 0)


def test_rate_limiter_spaces_calls_per_key() -> None:
    limiter = RateLimiter(10.0)
    started = time.monotonic()
    for _ in range(4):
        limiter.wait("a")
    limiter.wait("b")  # another number is not slowed down by "a"
    assert 0.29 <= time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        (131000, 500, ErrorClass.RETRY), (130429, 429, ErrorClass.RETRY), (None, 502, ErrorClass.RETRY),
        (None, 429, ErrorClass.RETRY), (131056, 400, ErrorClass.RETRY_RECIPIENT),
        (131049, 400, ErrorClass.SLOW_RETRY), (131026, 400, ErrorClass.PERMANENT),
        (132001, 404, ErrorClass.PERMANENT), (131047, 400, ErrorClass.WINDOW_CLOSED),
        (190, 401, ErrorClass.PAUSE_NUMBER), (0, 401, ErrorClass.PAUSE_NUMBER), (368, 400, ErrorClass.PAUSE_NUMBER),
        (999999, 400, ErrorClass.PERMANENT),
    ],
)
def test_error_table(code: int | None, status: int, expected: ErrorClass) -> None:
    assert classify(code, status) is expected


def test_client_parses_meta_error_json(graph: g.GraphServer) -> None:
    graph.script(g.error(132001, status=404))
    client = GraphClient(graph.url, TOKEN)
    result = client.send(PHONE, "u1", {"type": "text", "text": {"body": "x"}}, 7)
    client.close()
    assert (result.ok, result.error_code, result.error_class, result.http_status) == (
        False, 132001, ErrorClass.PERMANENT, 404
    )
    assert result.error_title == g.ERROR_TITLES[132001]


def test_pause_rows_survive_in_table(db: Database) -> None:
    from core.whatsapp import pause_sending

    assert pause_sending(db, PHONE, 190, "token expired", now()) is True
    assert pause_sending(db, PHONE, 131031, "locked", now()) is False  # the first reason stays
    with db.session() as s:
        [pause] = s.scalars(select(SenderPause)).all()
        assert (pause.error_code, pause.reason) == (190, "token expired")
    assert resume_sending(db, PHONE) is True
    assert resume_sending(db, PHONE) is False
    with db.session() as s:
        assert s.get(ChatSession, (PHONE, "nobody")) is None


def test_a_2xx_without_a_wamid_is_uncertain(graph: g.GraphServer) -> None:
    graph.script(g.Answer(status=200, body={"messaging_product": "whatsapp"}), g.Answer(status=200, body=None))
    client = GraphClient(graph.url, TOKEN)
    first = client.send(PHONE, "u1", {"type": "text", "text": {"body": "x"}}, 1)
    second = client.send(PHONE, "u1", {"type": "text", "text": {"body": "x"}}, 2)
    client.close()
    assert first.error_class is ErrorClass.UNCERTAIN
    assert second.ok
    assert second.wamid == graph.requests[1].wamid


def test_the_rate_holds_from_one_run_to_the_next(live_engine: Engine, db: Database, live: Settings,
                                                  graph: g.GraphServer) -> None:
    greet(live_engine, "first", "second")
    settings = live.model_copy(update={"send_rate_per_second": 2.5, "send_batch_size": 1})
    assert run_sender(db, settings, now(), max_batches=1) == {"sent": 1}
    assert run_sender(db, settings, now(), max_batches=1) == {"sent": 1}
    first, second = graph.requests
    assert second.at - first.at >= 0.38
