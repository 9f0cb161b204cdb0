"""The simulated week's data: configuration, messages, POSTs, each user's plan and the scenario."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

WABA_ID = "109876543210001"
DEFAULT_ROUTES: Mapping[str, str] = {
    "100000000000111": "lead_qualification",
    "100000000000222": "service_booking",
}
DISPLAY_NUMBERS: Mapping[str, str] = {"100000000000111": "15550001111", "100000000000222": "15550002222"}
DAY = 86_400
HOUR = 3_600
# Meta batches whatever arrives within about a second into one POST.
BATCH_WINDOW_SECONDS = 1
MAX_BATCH = 6
# How a body is serialized. "meta" is what Meta sends; a retry of the same event arrives as other bytes
# ("spaced", "pretty": raw UTF-8, other whitespace), which is why dedupe must key on the wamid, not the body.
ENCODINGS = ("meta", "utf8", "spaced", "pretty")
REDELIVERY_ENCODINGS = ("spaced", "pretty")

# Relative weight of a conversation starting at each UTC hour: quiet nights, lunch and evening peaks.
HOUR_WEIGHTS = (1, 1, 1, 1, 1, 1, 2, 4, 6, 7, 8, 8, 10, 10, 8, 7, 7, 8, 9, 10, 10, 8, 5, 2)


@dataclass(frozen=True)
class SimConfig:
    users: int = 300
    days: float = 7.0
    seed: int = 7
    end: int = 1_767_268_800  # Unix seconds: the last moment of simulated traffic ("now" for a live demo)
    routes: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ROUTES))
    abandon_share: float = 0.35
    return_share: float = 0.4  # of those who abandon
    opt_out_share: float = 0.04
    spanish_share: float = 0.25
    redelivery_share: float = 0.06
    double_send_share: float = 0.07


@dataclass(frozen=True)
class SimMessage:
    """One inbound message object in Meta's shape, without `context` (the player adds it)."""

    phone_number_id: str
    user_id: str
    profile_name: str
    wamid: str
    timestamp: int
    body: Mapping[str, Any]
    label: str  # greeting, answer, invalid, double, stale_tap, media, unsupported, reset, opt_out, reaction, ...
    # The exact text of the outbound prompt this message replies to (context.id / reaction target), if any.
    context_text: str | None = None

    def with_context(self, context_id: str | None) -> dict[str, Any]:
        obj = dict(self.body)
        if context_id is None:
            return obj
        if obj.get("type") == "reaction":
            obj["reaction"] = {**obj["reaction"], "message_id": context_id}
        else:
            obj["context"] = {"from": DISPLAY_NUMBERS.get(self.phone_number_id, "15550000000"), "id": context_id}
        return obj


@dataclass(frozen=True)
class Post:
    """One webhook delivery: a batch of messages, sent at simulated time `at`."""

    at: int
    messages: tuple[SimMessage, ...]
    encoding: str = "meta"
    redelivery: bool = False
    # "return": the first POST of a returning user (the player counts whether their session was archived
    # meanwhile; either way the answer counts in the step they left).
    gate: str | None = None


@dataclass
class UserPlan:
    user_id: str
    phone_number_id: str
    flow: str
    language: str
    name: str
    fate: str  # completed | abandoned | returned | opted_out | handoff | in_progress
    started_at: int
    quirks: list[str] = field(default_factory=list)
    messages: int = 0
    predicted_step: str = ""
    predicted_status: str = ""


@dataclass
class Scenario:
    config: SimConfig
    users: list[UserPlan]
    posts: list[Post]

    @property
    def abandon_share(self) -> float:
        gave_up = sum(1 for u in self.users if u.fate in ("abandoned", "returned"))
        return gave_up / len(self.users) if self.users else 0.0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for user in self.users:
            out[f"fate:{user.fate}"] = out.get(f"fate:{user.fate}", 0) + 1
            out[f"flow:{user.flow}"] = out.get(f"flow:{user.flow}", 0) + 1
            for quirk in user.quirks:
                out[f"quirk:{quirk}"] = out.get(f"quirk:{quirk}", 0) + 1
        out["posts"] = len(self.posts)
        out["messages"] = sum(len(p.messages) for p in self.posts if not p.redelivery)
        out["redeliveries"] = sum(len(p.messages) for p in self.posts if p.redelivery)
        out["batched_posts"] = sum(1 for p in self.posts if len({m.user_id for m in p.messages}) > 1)
        return out
