"""`simulate`: play a simulated week of users (core/simulation/) against a running webhook over HTTP.

Every POST is signed with WHATSAPP_APP_SECRET, exactly as Meta signs. With ADMIN_TOKEN the player also reads
the admin API: to put the real outbound wamid in `context.id` of replies and reactions (once the sender has
sent the prompt), to greet first when a returning user's session was archived meanwhile, and at the end to
send delivery statuses for the messages the bot sent.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from core.config import get_settings
from core.errors import WaflowError
from core.flows import default_flows_dir, load_flows
from core.signature import sign
from core.simulation import (
    DEFAULT_ROUTES,
    Post,
    Scenario,
    SimConfig,
    SimMessage,
    generate,
    plan_statuses,
    status_body,
    webhook_body,
)

RETRIES = 8
CONTEXT_REFRESH_SECONDS = 0.3
STALE_TAP_PATIENCE = 2.0
STATUS_CHUNK = 100


def register(sub: Any) -> None:
    sim = sub.add_parser("simulate", help="send a simulated week of users through a running webhook (demo traffic)")
    sim.add_argument("--url", default="http://127.0.0.1:8000/webhook", help="the webhook URL (POST /webhook)")
    sim.add_argument("--users", type=_positive_int, default=200)
    sim.add_argument("--days", type=_positive_float, default=7.0, help="simulated span, ending now")
    sim.add_argument("--seed", type=int, default=7, help="same seed, same traffic (and the same wamids: deduplicated)")
    sim.add_argument("--speed", type=float, default=20_000.0,
                     help="simulated seconds per real second (default: a week in ~30 s; 0: as fast as possible)")
    sim.add_argument("--routes", help="PHONE_NUMBER_ID=flow,... (default: FLOW_ROUTES); must match the server's")
    sim.add_argument("--wait", type=float, default=60.0, help="seconds to wait for GET /healthz")
    sim.add_argument("--status-wait", type=float, default=30.0,
                     help="seconds to wait for the sender to send the bot's replies before sending their statuses")
    sim.add_argument("--no-statuses", action="store_true", help="skip delivery statuses")
    sim.add_argument("--no-progress", action="store_true")
    sim.set_defaults(handler=cmd_simulate)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def parse_routes(text: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
        raise WaflowError(f"routes must look like PHONE_NUMBER_ID=flow,PHONE_NUMBER_ID=flow, got {text!r}")
    return {number.strip(): flow.strip() for number, flow in pairs}


def cmd_simulate(args: argparse.Namespace) -> int:
    settings = get_settings()
    secret = next(iter(settings.app_secrets), "")
    if not secret:
        raise WaflowError("WHATSAPP_APP_SECRET is not set: the webhook rejects unsigned POSTs")
    if settings.send_mode == "live":
        raise WaflowError("SEND_MODE=live: simulated users have made-up numbers; simulate against a dry-run server")
    routes_text = args.routes or settings.flow_routes
    if not routes_text:
        suggested = ",".join(f"{k}={v}" for k, v in DEFAULT_ROUTES.items())
        raise WaflowError(f"FLOW_ROUTES is not set: start the server and the simulator with FLOW_ROUTES={suggested}")
    routes = parse_routes(routes_text)
    flows = {flow.name: flow for flow in load_flows(settings.flows_dir or default_flows_dir())}
    unknown = sorted(set(routes.values()) - set(flows))
    if unknown:
        raise WaflowError(f"routes name unknown flows: {', '.join(unknown)} (loaded: {', '.join(sorted(flows))})")
    end = int(time.time())
    config = SimConfig(users=args.users, days=args.days, seed=args.seed, end=end, routes=routes)
    print("routes (the server must use the same FLOW_ROUTES): "
          + ", ".join(f"{number} -> {flow}" for number, flow in routes.items()), flush=True)
    scenario = generate(config, flows)
    player = Player(args.url, secret, settings.admin_token, progress=not args.no_progress)
    player.wait_healthy(args.wait)
    if settings.admin_token:
        # Fails now, with one line, if the server has another ADMIN_TOKEN: not halfway through the week.
        player.session_view("0", "0")
    else:
        print("ADMIN_TOKEN is not set: no context ids, reactions or delivery statuses", file=sys.stderr)
    player.play(scenario, speed=args.speed)
    if settings.admin_token and not args.no_statuses:
        player.send_statuses(scenario, wait=args.status_wait)
    print(player.summary(scenario))
    return 1 if player.failures or player.stats["flow_mismatch"] else 0


@dataclass
class _Cached:
    fetched: float
    view: dict[str, Any] | None


@dataclass
class Player:
    """Sends a scenario's POSTs in time order, signed, retrying 503s; reads the admin API when it can."""

    url: str
    secret: str
    admin_token: str = ""
    progress: bool = True
    stats: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    http: requests.Session = field(default_factory=requests.Session)
    _views: dict[tuple[str, str], _Cached] = field(default_factory=dict)

    def endpoint(self, path: str) -> str:
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, path, "", ""))

    # -- HTTP
    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                response = self.http.get(self.endpoint("/healthz"), timeout=5)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except requests.RequestException as e:
                last = type(e).__name__
            time.sleep(0.5)
        raise WaflowError(f"{self.endpoint('/healthz')} not healthy after {timeout:.0f}s ({last})")

    def post(self, body: bytes) -> dict[str, Any] | None:
        headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sign(body, self.secret)}
        delay = 0.25
        for attempt in range(RETRIES + 1):
            try:
                response = self.http.post(self.url, data=body, headers=headers, timeout=30)
            except requests.RequestException as e:
                problem = f"{type(e).__name__}"
            else:
                if response.status_code == 200:
                    result: dict[str, Any] = response.json()
                    return result
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code != 503:
                    break  # a 4xx will not change on retry: our payload is wrong, report it
            if attempt < RETRIES:
                self.stats["retries"] += 1
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.failures.append(problem)
        return None

    def session_view(self, phone_number_id: str, user_id: str, *, max_age: float = 0.0) -> dict[str, Any] | None:
        if not self.admin_token:
            return None
        key = (phone_number_id, user_id)
        cached = self._views.get(key)
        if cached is not None and time.monotonic() - cached.fetched <= max_age:
            return cached.view
        path = f"/admin/sessions/{quote(phone_number_id, safe='')}/{quote(user_id, safe='')}"
        try:
            response = self.http.get(self.endpoint(path), headers={"Authorization": f"Bearer {self.admin_token}"},
                                     timeout=10)
        except requests.RequestException:
            return None
        if response.status_code == 401:
            raise WaflowError("the admin API refused ADMIN_TOKEN (is the server using the same one?)")
        view = response.json() if response.status_code == 200 else None
        self._views[key] = _Cached(time.monotonic(), view)
        return view

    # -- context ids
    def resolve(self, msg: SimMessage, *, patience: float = 0.0) -> str | None:
        """The wamid the sender gave the prompt this message replies to, if it has been sent (within `patience`)."""
        deadline = time.monotonic() + patience
        max_age = float("inf")
        while True:
            view = self.session_view(msg.phone_number_id, msg.user_id, max_age=max_age)
            wamid = _latest_wamid(view, msg.context_text)
            if wamid or not self.admin_token:
                return wamid
            if max_age == CONTEXT_REFRESH_SECONDS and time.monotonic() >= deadline:
                return None
            if max_age == CONTEXT_REFRESH_SECONDS:
                time.sleep(CONTEXT_REFRESH_SECONDS)
            max_age = CONTEXT_REFRESH_SECONDS

    def body_for(self, messages: tuple[SimMessage, ...], encoding: str) -> tuple[bytes | None, int]:
        """The signed-to-be body, with context ids resolved, and how many messages it carries."""
        resolved: dict[str, str | None] = {}
        kept = []
        for msg in messages:
            if msg.context_text is not None:
                # A tap on an old button is the point of the exercise: give the sender a moment to send that prompt.
                patience = STALE_TAP_PATIENCE if msg.label == "stale_tap" else 0.0
                resolved[msg.wamid] = self.resolve(msg, patience=patience)
                self.stats["context_resolved" if resolved[msg.wamid] else "context_unresolved"] += 1
                if msg.label == "stale_tap":
                    self.stats["stale_taps_with_context" if resolved[msg.wamid] else "stale_taps_without"] += 1
                if msg.label == "reaction" and not resolved[msg.wamid]:
                    self.stats["reactions_dropped"] += 1  # a reaction needs the id of the message it is on
                    continue
            kept.append(msg)
        if not kept:
            return None, 0
        return webhook_body(kept, encoding=encoding, resolve=lambda m: resolved.get(m.wamid)), len(kept)

    # -- the traffic
    def play(self, scenario: Scenario, *, speed: float) -> None:
        posts = scenario.posts
        bar = Progress(len(posts), enabled=self.progress)
        first = posts[0].at if posts else 0
        started = time.monotonic()
        for index, post in enumerate(posts):
            if speed > 0:
                ahead = started + (post.at - first) / speed - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            self.deliver(post)
            bar.update(index + 1, post.at)
        bar.finish()

    def deliver(self, post: Post) -> None:
        if post.gate == "return":
            head = post.messages[0]
            view = self.session_view(head.phone_number_id, head.user_id)
            archived = view is not None and view.get("status") == "archived"
            self.stats["returns_archived" if archived else "returns_active"] += 1
        self._send(post)

    def _send(self, post: Post) -> None:
        body, count = self.body_for(post.messages, post.encoding)
        if body is None:
            return
        result = self.post(body)
        self.stats["posts"] += 1
        self.stats["redeliveries_sent" if post.redelivery else "messages_sent"] += count
        if result:
            self.stats["server_duplicates"] += int(result.get("duplicates", 0))
            self.stats["server_stored"] += int(result.get("stored", 0))

    # -- delivery statuses
    def send_statuses(self, scenario: Scenario, *, wait: float) -> None:
        views = self._wait_for_sender(scenario, wait)
        bar = Progress(len(views), enabled=self.progress, label="statuses")
        for index, (plan, view) in enumerate(views):
            if view.get("flow") != plan.flow:
                self.stats["flow_mismatch"] += 1
                continue
            statuses = plan_statuses(scenario.config.seed, plan.user_id, view.get("outbound", []),
                                     view.get("transitions", []), scenario.config.end)
            for start in range(0, len(statuses), STATUS_CHUNK):
                chunk = statuses[start:start + STATUS_CHUNK]
                if self.post(status_body(plan.phone_number_id, chunk)) is not None:
                    self.stats["statuses"] += len(chunk)
                    self.stats["statuses_failed"] += sum(1 for s in chunk if s["status"] == "failed")
            bar.update(index + 1)
        bar.finish()
        if self.stats["flow_mismatch"]:
            self.failures.append(f"{self.stats['flow_mismatch']} session(s) are in another flow than the routes say: "
                                 "the server's FLOW_ROUTES differ from the simulator's")

    def _wait_for_sender(self, scenario: Scenario, wait: float) -> list[tuple[Any, dict[str, Any]]]:
        """Every simulated user's session, once the sender has sent their replies (or `wait` is over)."""
        deadline = time.monotonic() + wait
        views: dict[str, tuple[Any, dict[str, Any]]] = {}
        todo = list(scenario.users)
        while todo:
            waiting = []
            for plan in todo:
                view = self.session_view(plan.phone_number_id, plan.user_id)
                if view is None:
                    continue
                views[plan.user_id] = (plan, view)
                if any(item.get("status") == "queued" for item in view.get("outbound", [])):
                    waiting.append(plan)
            if not waiting or time.monotonic() >= deadline:
                self.stats["outbound_unsent"] = sum(
                    1 for p in waiting for o in views[p.user_id][1].get("outbound", []) if o.get("status") == "queued"
                )
                break
            todo = waiting
            time.sleep(1.0)
        return [views[p.user_id] for p in scenario.users if p.user_id in views]

    # -- report
    def summary(self, scenario: Scenario) -> str:
        counts, s, cfg = scenario.counts(), self.stats, scenario.config
        flows = ", ".join(f"{v} {k[5:]}" for k, v in sorted(counts.items()) if k.startswith("flow:"))
        fates = ", ".join(f"{k[5:]} {v}" for k, v in sorted(counts.items()) if k.startswith("fate:"))
        quirks = ", ".join(f"{k[6:]} {v}" for k, v in sorted(counts.items()) if k.startswith("quirk:"))
        ended = datetime.fromtimestamp(cfg.end, UTC).strftime("%Y-%m-%d %H:%M UTC")
        lines = [
            f"simulated {cfg.users} users ({flows}) over {cfg.days:g} days ending {ended}, seed {cfg.seed}",
            f"  users: {fates}; returning users whose session had been archived: {s['returns_archived']}",
            f"  users who: {quirks}",
            f"  sent {s['posts']} POSTs: {s['messages_sent']} messages, {s['redeliveries_sent']} duplicate deliveries "
            f"(server: {s['server_stored']} stored, {s['server_duplicates']} duplicates), "
            f"{counts['batched_posts']} multi-user batches, {s['retries']} retries",
            f"  replies carrying context.id: {s['context_resolved']} of "
            f"{s['context_resolved'] + s['context_unresolved']} "
            "(the others answered before the sender sent the prompt); taps on old buttons with context.id: "
            f"{s['stale_taps_with_context']} of {s['stale_taps_with_context'] + s['stale_taps_without']}",
        ]
        if s["statuses"] or s["outbound_unsent"]:
            lines.append(f"  delivery statuses sent: {s['statuses']} ({s['statuses_failed']} failed); "
                         f"outbound still queued: {s['outbound_unsent']}")
        for failure in self.failures[:5]:
            lines.append(f"  FAILED: {failure}")
        if len(self.failures) > 5:
            lines.append(f"  ... and {len(self.failures) - 5} more failures")
        return "\n".join(lines)


def _latest_wamid(view: Mapping[str, Any] | None, text: str | None) -> str | None:
    if not view or text is None:
        return None
    for item in reversed(view.get("outbound", [])):
        if item.get("text") == text and item.get("wamid"):
            return str(item["wamid"])
    return None


class Progress:
    """A one-line progress bar on stderr; on a non-terminal, a line every 10%."""

    def __init__(self, total: int, *, enabled: bool = True, label: str = "posts", stream: TextIO | None = None) -> None:
        self.total, self.enabled, self.label = max(total, 1), enabled, label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.last_shown = -1.0
        self.decile = -1

    def update(self, done: int, sim_time: int | None = None) -> None:
        if not self.enabled:
            return
        fraction = min(done / self.total, 1.0)
        now = time.monotonic()
        if self.tty:
            if done < self.total and now - self.last_shown < 0.1:
                return
            self.last_shown = now
        else:
            if int(fraction * 10) == self.decile:
                return
            self.decile = int(fraction * 10)
        filled = int(fraction * 30)
        when = f"  sim {datetime.fromtimestamp(sim_time, UTC):%a %d %b %H:%M}" if sim_time else ""
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%} {done}/{self.total} {self.label}"
                f"{when}  {now - self.started:4.0f}s")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
