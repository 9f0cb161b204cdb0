"""The demo traffic generator: deterministic, realistic in the ways the README promises, and valid Meta payloads."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from core.commands.simulate import Player, Progress, _latest_wamid, parse_routes
from core.errors import WaflowError
from core.flows import default_flows_dir, load_flows
from core.machine import SessionState, decide
from core.payloads import parse_webhook
from core.signature import sign, verify_signature
from core.simulation import (
    DAY,
    DEFAULT_ROUTES,
    Scenario,
    SimConfig,
    generate,
    plan_statuses,
    status_body,
    to_inbound,
    webhook_body,
)

END = 1_767_268_800
FLOWS = {flow.name: flow for flow in load_flows(default_flows_dir())}


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return generate(SimConfig(users=400, seed=11, end=END), FLOWS)


def _bodies(scenario: Scenario) -> list[bytes]:
    return [webhook_body(p.messages, encoding=p.encoding) for p in scenario.posts]


def test_same_seed_same_bytes_other_seed_other_traffic() -> None:
    first = generate(SimConfig(users=60, seed=3, end=END), FLOWS)
    again = generate(SimConfig(users=60, seed=3, end=END), FLOWS)
    other = generate(SimConfig(users=60, seed=4, end=END), FLOWS)
    assert _bodies(first) == _bodies(again)
    assert [u.user_id for u in first.users] == [u.user_id for u in again.users]
    assert _bodies(first) != _bodies(other)
    wamids = {m.wamid for p in first.posts for m in p.messages}
    assert wamids.isdisjoint({m.wamid for p in other.posts for m in p.messages})


def test_a_later_run_with_the_same_seed_resends_the_same_wamids() -> None:
    """`run.sh` twice: the second week ends later, but its users and wamids are the first's (deduplicated)."""
    first = generate(SimConfig(users=100, seed=3, end=END), FLOWS)
    later = generate(SimConfig(users=100, seed=3, end=END + 5 * 3600), FLOWS)
    assert [u.user_id for u in first.users] == [u.user_id for u in later.users]
    wamids = {m.wamid for p in first.posts for m in p.messages}
    again = {m.wamid for p in later.posts for m in p.messages}
    assert len(wamids & again) >= 0.9 * len(wamids)


def test_about_35_percent_abandon_and_some_return(scenario: Scenario) -> None:
    fates = Counter(u.fate for u in scenario.users)
    assert 0.29 <= scenario.abandon_share <= 0.41, fates
    assert fates["returned"] >= 20
    assert fates["completed"] >= 0.4 * len(scenario.users)
    assert fates["opted_out"] >= 5


def test_every_post_parses_and_matches_what_the_generator_predicted(scenario: Scenario) -> None:
    for post in scenario.posts:
        parsed = parse_webhook(webhook_body(post.messages, encoding=post.encoding))
        assert parsed.relevant
        assert not parsed.statuses
        by_wamid = {m.wamid: m for m in parsed.messages}
        assert len(by_wamid) == len(post.messages)
        for msg in post.messages:
            got = by_wamid[msg.wamid]
            assert got.model_dump(exclude={"raw"}) == to_inbound(msg).model_dump(exclude={"raw"})
            assert (got.phone_number_id, got.user_id, got.timestamp) == (msg.phone_number_id, msg.user_id,
                                                                         msg.timestamp)


def test_duplicate_deliveries_same_wamid_other_bytes(scenario: Scenario) -> None:
    first: dict[str, bytes] = {}
    redelivered = 0
    for post in scenario.posts:
        body = webhook_body(post.messages, encoding=post.encoding)
        for msg in post.messages:
            if post.redelivery:
                redelivered += 1
                assert msg.wamid in first, "a redelivery comes after the first delivery"
                assert body != first[msg.wamid]
                assert json.loads(body)["entry"][0]["changes"][0]["value"]["messages"][0]["id"] == msg.wamid
            else:
                assert msg.wamid not in first, "a message is delivered for the first time once"
                first[msg.wamid] = body
    assert redelivered >= 0.03 * len(first)


def test_out_of_order_batches_double_sends_and_two_numbers_in_one_post(scenario: Scenario) -> None:
    reversed_batches = sum(
        1 for p in scenario.posts
        if any(a.user_id == b.user_id and a.timestamp > b.timestamp
               for a, b in zip(p.messages, p.messages[1:], strict=False))
    )
    assert reversed_batches >= 3
    labels = Counter(m.label for p in scenario.posts if not p.redelivery for m in p.messages)
    for label in ("double", "invalid", "media", "unsupported", "reset", "opt_out", "stale_tap", "reaction",
                  "greeting"):
        assert labels[label] > 0, label
    two_numbers = [p for p in scenario.posts if len({m.phone_number_id for m in p.messages}) > 1]
    assert two_numbers
    value_numbers = [
        c["value"]["metadata"]["phone_number_id"]
        for c in json.loads(webhook_body(two_numbers[0].messages))["entry"][0]["changes"]
    ]
    assert sorted(value_numbers) == sorted(DEFAULT_ROUTES)


def test_backdated_week_in_time_order_and_per_user_order_kept(scenario: Scenario) -> None:
    stamps = [m.timestamp for p in scenario.posts for m in p.messages]
    assert min(stamps) >= END - 7 * DAY
    assert max(stamps) <= END
    assert max(stamps) - min(stamps) > 6 * DAY
    assert [p.at for p in scenario.posts] == sorted(p.at for p in scenario.posts)
    assert all(p.at <= END for p in scenario.posts)
    latest: dict[str, int] = defaultdict(int)
    for post in scenario.posts:
        if post.redelivery:
            continue
        for msg in post.messages:
            # A user's POSTs never overtake one another: only messages inside one POST may be reordered.
            assert max(m.timestamp for m in post.messages if m.user_id == msg.user_id) >= latest[msg.user_id]
        for msg in post.messages:
            latest[msg.user_id] = max(latest[msg.user_id], msg.timestamp)


def test_replaying_the_script_through_decide_ends_where_the_plan_says(scenario: Scenario) -> None:
    """The bot model the generator used is the real one: replay each user's messages in timestamp order."""
    messages = defaultdict(list)
    for post in scenario.posts:
        if not post.redelivery:
            for msg in post.messages:
                messages[msg.user_id].append(msg)
    for plan in scenario.users:
        if plan.fate == "in_progress":
            continue
        flow = FLOWS[plan.flow]
        state = None
        for msg in sorted(messages[plan.user_id], key=lambda m: m.timestamp):
            inbound = to_inbound(msg)
            if not inbound.moves_flow:
                continue
            context_step = msg.label in ("stale_tap", "double") and _tapped_step(flow, inbound.choice_id) or None
            d = decide(flow, state, inbound, context_step=context_step)
            state = SessionState(d.to_step, d.data, d.failure_count, d.language, d.status)
        assert state is not None
        assert (state.step, state.status) == (plan.predicted_step, plan.predicted_status), plan
        if plan.fate == "completed":
            assert state.status == "completed"
        if plan.fate == "abandoned":
            assert state.status == "active"


def _tapped_step(flow, choice_id):  # type: ignore[no-untyped-def]
    if choice_id is None:
        return None
    return next((s.id for s in flow.steps.values() if any(c.id == choice_id for c in s.choices)), None)


def test_spanish_speakers_write_spanish(scenario: Scenario) -> None:
    spanish = {u.user_id for u in scenario.users if u.language == "es"}
    assert 0.15 <= len(spanish) / len(scenario.users) <= 0.35
    greetings = [m.body["text"]["body"] for p in scenario.posts for m in p.messages
                 if m.user_id in spanish and m.label == "greeting"]
    assert greetings
    assert all(g.startswith(("Hola", "Buenas")) for g in greetings)
    stops = [m.body["text"]["body"] for p in scenario.posts for m in p.messages
             if m.user_id in spanish and m.label == "opt_out"]
    assert all(s.lower() == "baja" for s in stops)


def test_returning_users_answer_the_question_they_left(scenario: Scenario) -> None:
    """No greeting first: archived or not, a returning user's answer counts in the step they left."""
    gated = [p for p in scenario.posts if p.gate == "return"]
    returned = {u.user_id for u in scenario.users if u.fate == "returned"}
    assert {p.messages[0].user_id for p in gated} == returned
    for post in gated:
        assert len(post.messages) == 1
        assert post.messages[0].label != "return_greeting"
        parse_webhook(webhook_body(post.messages))


def test_context_ids_and_reactions_use_the_resolved_outbound_wamid(scenario: Scenario) -> None:
    taps = [m for p in scenario.posts for m in p.messages if m.label == "stale_tap"]
    reactions = [m for p in scenario.posts for m in p.messages if m.label == "reaction"]
    parsed = parse_webhook(webhook_body([taps[0], reactions[0]], resolve=lambda m: "wamid.dryrun.42"))
    tap, reaction = sorted(parsed.messages, key=lambda m: m.kind)
    assert tap.context_id == "wamid.dryrun.42"
    assert reaction.kind == "reaction"
    assert reaction.reacted_to == "wamid.dryrun.42"
    unresolved = parse_webhook(webhook_body([taps[0]], resolve=lambda m: None)).messages[0]
    assert unresolved.context_id is None
    view = {"outbound": [{"text": taps[0].context_text, "wamid": "wamid.dryrun.1"},
                         {"text": "other", "wamid": "wamid.dryrun.2"},
                         {"text": taps[0].context_text, "wamid": "wamid.dryrun.3"},
                         {"text": taps[0].context_text, "wamid": None}]}
    assert _latest_wamid(view, taps[0].context_text) == "wamid.dryrun.3"
    assert _latest_wamid(view, "never sent") is None


def test_meta_encoding_is_ascii_escaped_and_signs_like_meta(scenario: Scenario) -> None:
    spanish = next(m for p in scenario.posts for m in p.messages if "ó" in json.dumps(m.body, ensure_ascii=False))
    meta = webhook_body((spanish,))
    assert meta.isascii()
    assert b"\\u00f3" in meta
    utf8 = webhook_body((spanish,), encoding="utf8")
    assert "ó".encode() in utf8
    assert verify_signature(meta, sign(meta, "s3cret"), ["s3cret"])
    assert not verify_signature(utf8, sign(meta, "s3cret"), ["s3cret"])


def test_statuses_monotonic_plans_with_failures() -> None:
    outbound = [{"wamid": f"wamid.dryrun.{i}", "status": "sent", "campaign": "nudge" if i % 3 == 0 else None,
                 "kind": "template" if i % 6 == 0 else "text"} for i in range(300)]
    outbound.append({"wamid": None, "status": "queued", "campaign": None})
    transitions = [{"at": "2025-12-31T10:00:00+00:00"}]
    statuses = plan_statuses(5, "14155550101", outbound, transitions, END)
    assert statuses == plan_statuses(5, "14155550101", outbound, transitions, END)
    by_wamid = defaultdict(set)
    for s in statuses:
        by_wamid[s["id"]].add(s["status"])
        assert int(s["timestamp"]) <= END
    assert "wamid.dryrun.None" not in by_wamid
    assert len(by_wamid) == 300
    failed = [s for s in statuses if s["status"] == "failed"]
    codes = Counter(s["errors"][0]["code"] for s in failed)
    assert codes[131047] > 0
    assert codes[131026] > 0
    assert all(by_wamid[s["id"]] == {"failed"} for s in failed)
    templates = {o["wamid"] for o in outbound if o.get("kind") == "template"}
    assert not any(s["id"] in templates for s in failed if s["errors"][0]["code"] == 131047)
    assert sum(1 for v in by_wamid.values() if "read" in v) > 150
    parsed = parse_webhook(status_body("100000000000111", statuses[:100]))
    assert len(parsed.statuses) == 100
    assert not parsed.messages
    assert {s.status for s in parsed.statuses} <= {"sent", "delivered", "read", "failed"}


def test_bad_config_and_routes_are_refused() -> None:
    with pytest.raises(ValueError, match="not loaded"):
        generate(SimConfig(users=5, end=END, routes={"1": "no_such_flow"}), FLOWS)
    with pytest.raises(ValueError, match="at least one user"):
        generate(SimConfig(users=0, end=END), FLOWS)
    assert parse_routes("1=a, 2=b") == {"1": "a", "2": "b"}
    with pytest.raises(WaflowError, match="PHONE_NUMBER_ID=flow"):
        parse_routes("100000000000111")


def test_progress_bar_prints_every_tenth_off_a_terminal() -> None:
    import io

    stream = io.StringIO()
    bar = Progress(200, stream=stream)
    for done in range(1, 201):
        bar.update(done, END)
    bar.finish()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11
    assert lines[-1].startswith("[" + "#" * 30 + "] 100% 200/200 posts")


# --------------------------------------------------------------------------- the HTTP player, against a fake server


class _FakeMeta(ThreadingHTTPServer):
    """Answers like waflow: /healthz, POST /webhook (503 the first `unavailable` times), the admin session view."""

    def __init__(self, *, unavailable: int = 0, archived: bool = False, reject: bool = False,
                 prompt: str = "x", sent_after: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.unavailable, self.archived, self.reject = unavailable, archived, reject
        # The admin view lists `prompt` as sent (with a wamid) from the `sent_after`-th GET on.
        self.prompt, self.sent_after = prompt, sent_after
        self.posts: list[tuple[bytes, str | None]] = []
        self.admin_auth: list[str | None] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/webhook"


class _FakeHandler(BaseHTTPRequestHandler):
    server: _FakeMeta

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/healthz":
            self._reply(200, {"status": "ok"})
        else:
            self.server.admin_auth.append(self.headers.get("Authorization"))
            status = "archived" if self.server.archived else "active"
            sent = len(self.server.admin_auth) > self.server.sent_after
            outbound = {"text": self.server.prompt, "wamid": "wamid.dryrun.1" if sent else None,
                        "status": "sent" if sent else "queued"}
            self._reply(200, {"flow": "lead_qualification", "status": status, "outbound": [outbound]})

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts.append((body, self.headers.get("X-Hub-Signature-256")))
        if self.server.unavailable > 0:
            self.server.unavailable -= 1
            self._reply(503, {"error": "database unavailable"})
        elif self.server.reject:
            self._reply(400, {"error": "invalid JSON"})
        else:
            self._reply(200, {"status": "ok", "stored": 1, "duplicates": 0})


@pytest.fixture
def fake_meta() -> Iterator[Callable[..., _FakeMeta]]:
    servers: list[_FakeMeta] = []

    def start(**kwargs: Any) -> _FakeMeta:
        server = _FakeMeta(**kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_player_signs_every_post_and_retries_503(fake_meta: Callable[..., _FakeMeta]) -> None:
    server = fake_meta(unavailable=2)
    player = Player(server.url, "s3cret", progress=False)
    player.wait_healthy(5)
    small = generate(SimConfig(users=3, seed=2, end=END), FLOWS)
    player.play(small, speed=0)
    assert player.failures == []
    assert player.stats["retries"] == 2
    # Without the admin API a reaction cannot name its message: it is left out; each retry resends the same bytes.
    reactions = sum(1 for p in small.posts for m in p.messages if m.label == "reaction")
    assert player.stats["reactions_dropped"] == reactions
    assert len(server.posts) == sum(1 for p in small.posts if any(m.label != "reaction" for m in p.messages)) + 2
    assert server.posts[0][0] == server.posts[1][0] == server.posts[2][0]
    for body, header in server.posts:
        assert verify_signature(body, header, ["s3cret"])
        parse_webhook(body)


def test_player_reports_a_rejected_post_without_retrying(fake_meta: Callable[..., _FakeMeta]) -> None:
    server = fake_meta(reject=True)
    player = Player(server.url, "s3cret", progress=False)
    player.post(b"{}")
    assert len(server.posts) == 1
    assert player.failures == ['HTTP 400: {"error": "invalid JSON"}']


def test_player_sends_a_returning_users_answer_and_counts_archived_returns(
    fake_meta: Callable[..., _FakeMeta], scenario: Scenario
) -> None:
    gated = next(p for p in scenario.posts if p.gate == "return")
    for archived in (True, False):
        server = fake_meta(archived=archived)
        player = Player(server.url, "s3cret", admin_token="t0ken", progress=False)
        player.deliver(gated)
        sent = [m.wamid for body, _ in server.posts for m in parse_webhook(body).messages]
        assert sent == [m.wamid for m in gated.messages]
        assert set(server.admin_auth) == {"Bearer t0ken"}
        assert player.stats["returns_archived" if archived else "returns_active"] == 1


def test_player_waits_for_healthz_then_gives_up(fake_meta: Callable[..., _FakeMeta]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    player = Player(f"http://127.0.0.1:{port}/webhook", "s3cret", progress=False)
    with pytest.raises(WaflowError, match="not healthy after 1s"):
        player.wait_healthy(1)


def test_player_gives_a_tap_on_an_old_button_a_moment_to_find_its_prompt(fake_meta: Callable[..., _FakeMeta],
                                                                          scenario: Scenario) -> None:
    tap = next(m for p in scenario.posts for m in p.messages if m.label == "stale_tap")
    assert tap.context_text is not None
    server = fake_meta(prompt=tap.context_text, sent_after=3)
    player = Player(server.url, "s3cret", admin_token="t0ken", progress=False)
    assert player.resolve(tap) is None  # an ordinary reply does not wait for the sender
    body, count = player.body_for((tap,), "meta")
    assert count == 1
    assert body is not None
    assert parse_webhook(body).messages[0].context_id == "wamid.dryrun.1"
    assert player.stats["stale_taps_with_context"] == 1


def test_a_wrong_admin_token_stops_the_player_with_one_line(fake_meta: Callable[..., _FakeMeta]) -> None:
    class _Refusing(_FakeHandler):
        def do_GET(self) -> None:  # noqa: N802
            self._reply(401, {"error": "admin API needs Authorization: Bearer $ADMIN_TOKEN"})

    server = fake_meta()
    server.RequestHandlerClass = _Refusing
    player = Player(server.url, "s3cret", admin_token="wrong", progress=False)
    with pytest.raises(WaflowError, match="refused ADMIN_TOKEN"):
        player.session_view("0", "0")
