"""The whole population: users spread over the week, their POSTs batched and redelivered the way Meta does."""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Mapping
from dataclasses import replace

from core.flows import Flow
from core.simulation.conversation import _Conversation
from core.simulation.model import (
    BATCH_WINDOW_SECONDS,
    DAY,
    HOUR,
    HOUR_WEIGHTS,
    MAX_BATCH,
    Post,
    Scenario,
    SimConfig,
    UserPlan,
)
from core.simulation.people import _NAMES, _phone


class _Generator:
    def __init__(self, config: SimConfig, flows: Mapping[str, Flow]) -> None:
        self.config, self.flows = config, flows
        self.rng = random.Random(config.seed)
        # Start times draw from their own generator: how many draws they take depends on `end` (the hour of
        # day), and the rest of the script (users, answers, wamids) must not, so a re-run is deduplicated.
        self.clock = random.Random(f"{config.seed}:clock")
        self._counter = 0
        self._users: set[str] = set()

    def wamid(self) -> str:
        self._counter += 1
        digest = hashlib.sha256(f"{self.config.seed}:{self._counter}".encode()).digest()[:24]
        return "wamid.HBgL" + base64.b32encode(digest).decode().rstrip("=")

    def sha(self) -> str:
        return base64.b64encode(self.rng.randbytes(32)).decode()

    def start_time(self) -> int:
        span = int(self.config.days * DAY)
        while True:
            t = self.config.end - span + self.clock.randrange(span)
            hour = (t % DAY) // HOUR
            if t < self.config.end - 30 * 60 and self.clock.random() < HOUR_WEIGHTS[hour] / max(HOUR_WEIGHTS):
                return t

    def user(self) -> UserPlan:
        rng = self.rng
        phone_number_id = rng.choice(sorted(self.config.routes))
        language = "es" if rng.random() < self.config.spanish_share else "en"
        user_id = _phone(rng, language)
        while user_id in self._users:
            user_id = _phone(rng, language)
        self._users.add(user_id)
        return UserPlan(user_id=user_id, phone_number_id=phone_number_id, flow=self.config.routes[phone_number_id],
                        language=language, name=rng.choice(_NAMES[language]), fate="completed",
                        started_at=self.start_time())

    def conversation(self, plan: UserPlan) -> list[Post]:
        rng, config = self.rng, self.config
        flow = self.flows[plan.flow]
        path = _main_path(flow)
        abandon_at = returns_after = opt_out_at = None
        roll = rng.random()
        if roll < config.abandon_share:
            # Early questions lose more people than late ones: the funnel narrows.
            abandon_at = rng.choices(path, weights=[len(path) - i for i in range(len(path))])[0]
            if rng.random() < config.return_share:
                returns_after = rng.randint(int(1.5 * DAY), 4 * DAY) + rng.randint(0, 12 * HOUR)
        elif roll < config.abandon_share + config.opt_out_share:
            opt_out_at = rng.choice(path)
        convo = _Conversation(self, plan, flow)
        convo.run(abandon_at, returns_after, opt_out_at)
        return convo.posts

    def scenario(self) -> Scenario:
        users = [self.user() for _ in range(self.config.users)]
        posts = [post for plan in users for post in self.conversation(plan)]
        late = {m.user_id for p in posts if p.at > self.config.end and not p.redelivery for m in p.messages}
        for plan in users:
            if plan.user_id in late and plan.fate == "completed":
                plan.fate = "in_progress"  # still typing when the simulated week ends
        posts = [p for p in posts if p.at <= self.config.end]
        posts.sort(key=lambda p: (p.at, p.messages[0].timestamp))
        return Scenario(self.config, users, _batch(posts, self.rng))


def _main_path(flow: Flow) -> list[str]:
    """The questions a user answers on the way to completion (terminal and hand-off steps excluded)."""
    path: list[str] = []
    step_id: str | None = flow.start
    while step_id is not None and step_id not in path:
        step = flow.step(step_id)
        if step.terminal or step_id == flow.handoff_step:
            break
        path.append(step_id)
        step_id = step.next
    return path


def _batch(posts: list[Post], rng: random.Random) -> list[Post]:
    """Merge first deliveries of different users that arrive within the same second into one POST."""
    out: list[Post] = []
    for post in posts:
        last = out[-1] if out else None
        mergeable = (
            last is not None and not post.redelivery and not last.redelivery and post.gate is None
            and last.gate is None and post.at - last.at <= BATCH_WINDOW_SECONDS
            and len(last.messages) + len(post.messages) <= MAX_BATCH
            and not {m.user_id for m in post.messages} & {m.user_id for m in last.messages}
        )
        if last is not None and mergeable:
            out[-1] = replace(last, messages=last.messages + post.messages)
        else:
            out.append(post)
    return out


def generate(config: SimConfig, flows: Mapping[str, Flow]) -> Scenario:
    """The whole simulated population and every POST it causes, sorted by delivery time."""
    missing = sorted(set(config.routes.values()) - set(flows))
    if missing:
        raise ValueError(f"routes name flows that are not loaded: {', '.join(missing)}")
    if config.users < 1 or config.days <= 0:
        raise ValueError("need at least one user and a positive number of days")
    return _Generator(config, flows).scenario()
