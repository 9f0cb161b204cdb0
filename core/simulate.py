"""Demo traffic: a week of realistic WhatsApp users of the shipped flows, as Meta webhook payloads.

Pure: a seed, an end time and the flows in, a `Scenario` out (no network, no clock, no database). The same
seed and end time always give the same bytes. `python -m core simulate` (core/commands/simulate.py) plays it
against the real webhook over HTTP.

Each user is walked through their flow with `core.machine.decide`, so the script always knows which question
the bot is asking and answers it the way people do: typing delays, about a third giving up mid-flow (some
coming back days later), typos that earn a reprompt, double-sent answers and double taps, taps on old
buttons, photos and voice notes where text was expected, unsupported messages, STOP, Spanish speakers.
Delivery adds what Meta does: duplicate deliveries (same wamid, other bytes), messages of several users in
one POST, and a user's burst delivered in reverse order. Message timestamps are backdated so a week of
traffic ends at `end`.

Two things depend on the running system and are left to the player: `context.id` (a reply names the
outbound wamid of the prompt it answers, known only once the sender has sent it: `SimMessage.context_text`
says which prompt), and whether a returning user's session has been archived (`Post.gate`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from core.flows import Flow, Step
from core.machine import Decision, SessionState, decide
from core.messages import InboundMessage, Location, Media

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
    # "return": the first POST of a returning user; if their session was archived meanwhile, send `prefix`
    # (a greeting that restores it) first, so the answers that follow land on the right question.
    gate: str | None = None
    prefix: SimMessage | None = None


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


# --------------------------------------------------------------------------- people

_NAMES = {
    "en": ("Olivia Carter", "Liam Brooks", "Emma Hughes", "Noah Patel", "Ava Thompson", "Mason Reed", "Sophia Kim",
           "Ethan Rivera", "Isabella Ward", "Lucas Bennett", "Mia Foster", "Jack Collins", "Amelia Grant",
           "Harper Lee", "Priya Shah", "Daniel O'Neill", "Chloe Martin", "Grace Walker", "Sam", "Jo"),
    "es": ("María García", "José Martínez", "Lucía Fernández", "Carlos López", "Sofía Romero", "Javier Ruiz",
           "Valentina Torres", "Diego Navarro", "Camila Herrera", "Alejandro Díaz", "Paula Jiménez",
           "Mateo Morales", "Daniela Castro", "Andrés Ortega", "Elena Vázquez", "Iñaki Etxeberria"),
}
_CITIES = {
    "en": ("London", "Manchester", "New York", "Austin", "Seattle", "Toronto", "Dublin", "Chicago", "Denver"),
    "es": ("Madrid", "Barcelona", "Sevilla", "Valencia", "Bilbao", "Ciudad de México", "Guadalajara", "Bogotá",
           "Málaga", "A Coruña"),
}
_DOMAINS = ("gmail.com", "outlook.com", "yahoo.com", "icloud.com", "hotmail.com", "proton.me")
_GREETINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "lead_qualification": {"en": ("Hi", "Hello!", "Hi, I saw your ad", "hey", "Hi! Can you tell me more?"),
                           "es": ("Hola", "Hola! Vi vuestro anuncio", "Buenas", "Hola, quiero información")},
    "service_booking": {"en": ("Hi", "Hi, I'd like to book", "hello", "Hey! Do you have space this week?"),
                        "es": ("Hola", "Hola, quiero pedir cita", "Buenas tardes", "Hola! Tenéis hueco?")},
}
_RETURN_GREETINGS = {"en": ("Hi again", "Sorry, I'm back", "hello?"), "es": ("Hola de nuevo", "Perdón, ya estoy")}
_RESET = {"en": ("start over", "RESTART"), "es": ("reiniciar", "empezar de nuevo")}
_STOP = {"en": ("STOP", "stop", "Unsubscribe"), "es": ("BAJA", "baja")}
_BAD_TIME = {"en": ("half past ten", "10h30", "tomorrow morning", "21:00"),
             "es": ("a las diez y media", "por la tarde")}
_UNSUPPORTED = ("poll_update", "event", "view_once")


def _email_for(name: str, rng: random.Random) -> str:
    ascii_name = name.encode("ascii", "ignore").decode().lower().replace("'", "")
    parts = ascii_name.split() or ["user"]
    local = ".".join(parts) if rng.random() < 0.6 else parts[0] + str(rng.randint(1, 99))
    return f"{local}@{rng.choice(_DOMAINS)}"


def _phone(rng: random.Random, language: str) -> str:
    # Spain / Mexico mobiles for Spanish speakers; US 555 and UK drama-range numbers for the others.
    prefix, digits = rng.choice((("346", 8), ("5215", 9))) if language == "es" else rng.choice(
        (("1415555", 4), ("1206555", 4), ("447700900", 3))
    )
    return prefix + "".join(str(rng.randint(0, 9)) for _ in range(digits))


# --------------------------------------------------------------------------- one user's conversation


class _Conversation:
    """Walks one user through their flow, predicting the bot with `decide` and writing the messages."""

    def __init__(self, gen: _Generator, plan: UserPlan, flow: Flow) -> None:
        self.gen, self.plan, self.flow, self.rng = gen, plan, flow, gen.rng
        self.state: SessionState | None = None
        self.t = plan.started_at
        self.prompts: dict[str, str] = {}  # step id -> exact text of the last outbound that asked it
        self.last_reply = ""
        self.last_at = 0
        self.posts: list[Post] = []
        self.pending_gate: str | None = None

    # -- sending
    def send(self, label: str, obj: dict[str, Any], *, context_text: str | None = None,
             context_step: str | None = None, after: float = 0.0, post: bool = True) -> SimMessage:
        self.t += max(1, round(after))
        msg = self.message(label, obj, context_text)
        self.apply(msg, context_step)
        if post:
            self.deliver((msg,))
        return msg

    def message(self, label: str, obj: dict[str, Any], context_text: str | None = None) -> SimMessage:
        wamid = self.gen.wamid()
        self.plan.messages += 1
        return SimMessage(
            phone_number_id=self.plan.phone_number_id, user_id=self.plan.user_id, profile_name=self.plan.name,
            wamid=wamid, timestamp=self.t, label=label, context_text=context_text,
            body={"from": self.plan.user_id, "id": wamid, "timestamp": str(self.t), **obj},
        )

    def deliver(self, messages: tuple[SimMessage, ...], *, prefix: SimMessage | None = None) -> None:
        # Never before this user's previous POST: a user's messages may share a POST, not overtake one.
        at = max(self.last_at, max(m.timestamp for m in messages) + self.rng.randint(0, 2))
        self.last_at = at
        gate, self.pending_gate = self.pending_gate, None
        self.posts.append(Post(at=at, messages=messages, gate=gate, prefix=prefix))
        for m in messages:
            if self.rng.random() < self.gen.config.redelivery_share:
                # Meta retries (or a second subscribed app): same wamid, new bytes, seconds to minutes later.
                later = at + self.rng.choice((5, 20, 90, 600, 1800))
                self.posts.append(Post(at=later, messages=(m,), encoding=self.rng.choice(REDELIVERY_ENCODINGS),
                                       redelivery=True))

    def apply(self, msg: SimMessage, context_step: str | None) -> None:
        inbound = _to_inbound(msg)
        if not inbound.moves_flow:
            return
        # Predict the prompts in the language the server will use (run.sh sets LANGUAGE_BY_PREFIX for the demo).
        decision: Decision = decide(self.flow, self.state, inbound, context_step=context_step,
                                    language=self.plan.language if self.state is None else None)
        self.state = SessionState(step=decision.to_step, data=decision.data, failure_count=decision.failure_count,
                                  language=decision.language, status=decision.status)
        for reply in decision.replies:
            if reply.step is not None:
                self.prompts[reply.step] = reply.text
            self.last_reply = reply.text

    # -- the user
    @property
    def lang(self) -> str:
        return self.plan.language

    def think(self, step: Step) -> float:
        base = {"choice": 6.0, "email": 22.0, "text": 12.0}.get(step.input, 10.0)
        seconds = self.rng.lognormvariate(0, 0.6) * base
        if self.rng.random() < 0.08:
            seconds += self.rng.uniform(300, 3 * HOUR)  # got distracted
        return seconds

    def text(self, body: str) -> dict[str, Any]:
        return {"type": "text", "text": {"body": body}}

    def tap(self, step: Step, choice_id: str) -> dict[str, Any]:
        choice = next(c for c in step.choices if c.id == choice_id)
        title = choice.title.get(self.lang) or next(iter(choice.title.values()))
        kind = "button_reply" if step.style == "button" else "list_reply"
        reply: dict[str, Any] = {"id": choice_id, "title": title}
        if kind == "list_reply" and choice.description:
            reply["description"] = choice.description.get(self.lang) or next(iter(choice.description.values()))
        return {"type": "interactive", "interactive": {"type": kind, kind: reply}}

    def answer(self, step: Step) -> tuple[str, dict[str, Any]]:
        """A valid answer to `step`, or (with a person's odds) an invalid first try."""
        rng = self.rng
        if step.input == "choice":
            ids = [c.id for c in step.choices]
            pick = ids[0] if step.key == "confirmation" and rng.random() < 0.85 else rng.choice(ids)
            return "answer", self.tap(step, pick)
        if step.input == "location":
            return "answer", {"type": "location", "location": {"latitude": 40.4168, "longitude": -3.7038}}
        if step.input == "media":
            return "answer", self.media("image")
        if step.input == "number":
            low, high = int(step.validators.get("min", 1)), int(step.validators.get("max", 10))
            return "answer", self.text(str(rng.randint(low, high)))
        return self.typed(step)

    def typed(self, step: Step) -> tuple[str, dict[str, Any]]:
        rng, lang = self.rng, self.lang
        if step.input == "email":
            email = _email_for(self.plan.name, rng)
            if rng.random() < 0.15:
                return "invalid", self.text(email.replace("@", " at ", 1))
            return "answer", self.text(email.upper() if rng.random() < 0.05 else email)
        if step.key == "time":
            if rng.random() < 0.15:
                return "invalid", self.text(rng.choice(_BAD_TIME[lang]))
            return "answer", self.text(f"{rng.randint(9, 18):02d}:{rng.choice((0, 15, 30, 45)):02d}")
        if step.key == "city":
            return "answer", self.text(rng.choice(_CITIES[lang]))
        if step.key == "name":
            return "answer", self.text(self.plan.name if rng.random() < 0.7 else self.plan.name.split()[0])
        return "answer", self.text("ok" if lang == "en" else "vale")

    def media(self, kind: str) -> dict[str, Any]:
        media_id = str(self.rng.randint(10**15, 10**16 - 1))
        payloads = {
            "image": {"mime_type": "image/jpeg", "sha256": self.gen.sha(), "id": media_id},
            "audio": {"mime_type": "audio/ogg; codecs=opus", "sha256": self.gen.sha(), "id": media_id, "voice": True},
            "sticker": {"mime_type": "image/webp", "sha256": self.gen.sha(), "id": media_id, "animated": False},
        }
        return {"type": kind, kind: payloads[kind]}

    def unsupported(self) -> dict[str, Any]:
        error = {"code": 131051, "title": "Message type unknown", "message": "Message type unknown",
                 "error_data": {"details": "Message type is currently not supported."}}
        return {"type": "unsupported", "unsupported": {"type": self.rng.choice(_UNSUPPORTED)}, "errors": [error]}

    # -- the script
    def run(self, abandon_at: str | None, returns_after: int | None, opt_out_at: str | None) -> None:
        greeting = self.rng.choice(_GREETINGS.get(self.flow.name, _GREETINGS["lead_qualification"])[self.lang])
        self.send("greeting", self.text(greeting))
        for _ in range(60):  # a safety bound: every path of the shipped flows ends far sooner
            state = self.state
            if state is None or state.status != "active" or state.step == self.flow.handoff_step:
                break
            step = self.flow.step(state.step)
            if self.t > self.gen.config.end - 60:
                self.plan.fate = "in_progress"
                break
            if opt_out_at == step.id:
                self.send("opt_out", self.text(self.rng.choice(_STOP[self.lang])), after=self.think(step))
                self.plan.fate = "opted_out"
                break
            if abandon_at == step.id:
                abandon_at = None
                if returns_after is None or self.t + returns_after > self.gen.config.end - 2 * HOUR:
                    self.plan.fate = "abandoned"
                    break
                self.t += returns_after
                self.plan.fate = "returned"
                self.pending_gate = "return"
            self.turn(step)
        if self.state is not None and self.state.status == "completed":
            self.react()
        self.plan.predicted_step = self.state.step if self.state else ""
        self.plan.predicted_status = self.state.status if self.state else ""
        if self.state is not None and self.state.step == self.flow.handoff_step:
            self.plan.fate = "handoff"

    def turn(self, step: Step) -> None:
        """One question answered: possibly preceded or followed by the detours people take."""
        rng = self.rng
        if self.pending_gate == "return":
            self.returning(step)
            return
        roll = rng.random()
        if roll < 0.03 and step.input in ("text", "email"):
            self.quirk("media")
            self.send("media", self.media(rng.choice(("image", "audio", "sticker"))), after=self.think(step))
        elif roll < 0.05:
            self.quirk("unsupported")
            self.send("unsupported", self.unsupported(), after=self.think(step))
        elif roll < 0.07 and step.id != self.flow.start:
            self.quirk("reset")
            self.send("reset", self.text(rng.choice(_RESET[self.lang])), after=self.think(step))
            return
        elif roll < 0.16 and step.input != "choice" and "stale_tap" not in self.plan.quirks:
            self.stale_tap()
        label, obj = self.answer(step)
        if label == "invalid":
            self.quirk("invalid")
            self.send("invalid", obj, after=self.think(step))
            label, obj = self.valid_answer(step)
        context = self.prompts.get(step.id) if step.input == "choice" else None
        context_step = step.id if context else None
        msg = self.send(label, obj, context_text=context, context_step=context_step, after=self.think(step),
                        post=False)
        if rng.random() < self.gen.config.double_send_share and self.harmless_again(msg, context_step):
            # Sent twice (a double tap, an impatient resend): Meta delivers both together, maybe reversed.
            self.quirk("double")
            again = self.send("double", obj, context_text=context, context_step=context_step,
                              after=rng.uniform(1, 3), post=False)
            self.deliver((again, msg) if rng.random() < 0.5 else (msg, again))
        else:
            self.deliver((msg,))

    def valid_answer(self, step: Step) -> tuple[str, dict[str, Any]]:
        label, obj = self.answer(step)
        while label == "invalid":
            label, obj = self.answer(step)
        return label, obj

    def harmless_again(self, msg: SimMessage, context_step: str | None) -> bool:
        """Whether the same message once more is only a stale tap or a reprompt (not a new answer or run)."""
        if self.state is None or self.state.status != "active":
            return False
        again = _to_inbound(replace(msg, wamid=msg.wamid + ".x", body={**msg.body, "id": msg.wamid + ".x"}))
        return decide(self.flow, self.state, again, context_step=context_step).outcome in ("stale", "reprompted")

    def returning(self, step: Step) -> None:
        """Days later the user answers the question they left; a greeting first if the session was archived."""
        prefix = self.message("return_greeting", self.text(self.rng.choice(_RETURN_GREETINGS[self.lang])))
        label, obj = self.valid_answer(step)
        context = self.prompts.get(step.id) if step.input == "choice" else None
        msg = self.send(label, obj, context_text=context, context_step=step.id if context else None,
                        after=self.think(step), post=False)
        self.deliver((msg,), prefix=prefix)

    def stale_tap(self) -> None:
        """Hours later the user scrolls up and taps a button of a question the bot has moved past."""
        old = [s for s in self.flow.steps.values() if s.input == "choice" and s.id in self.prompts]
        if not old or self.state is None or old[0].id == self.state.step:
            return
        step = old[0]
        self.quirk("stale_tap")
        self.send("stale_tap", self.tap(step, self.rng.choice([c.id for c in step.choices])),
                  context_text=self.prompts[step.id], context_step=step.id, after=self.rng.uniform(2 * HOUR, 8 * HOUR))

    def react(self) -> None:
        """A thumbs-up on the bot's last message: stored against that message, never a transition."""
        if self.rng.random() < 0.15 and self.last_reply:
            self.quirk("reaction")
            emoji = self.rng.choice(("\U0001f44d", "\u2764\ufe0f", "\U0001f64f"))
            self.send("reaction", {"type": "reaction", "reaction": {"emoji": emoji}}, context_text=self.last_reply,
                      after=self.rng.uniform(5, 120))

    def quirk(self, name: str) -> None:
        if name not in self.plan.quirks:
            self.plan.quirks.append(name)


def _to_inbound(msg: SimMessage) -> InboundMessage:
    """What the webhook's parser makes of this message (checked against `parse_webhook` in the tests).

    Built directly rather than by parsing: the generator predicts every message and the parser is the slow part.
    """
    obj, kind = msg.body, str(msg.body["type"])
    fields: dict[str, Any] = {}
    if kind == "text":
        fields["text"] = obj["text"]["body"]
    elif kind == "interactive":
        reply = obj["interactive"][obj["interactive"]["type"]]
        fields.update(choice_id=reply["id"], choice_title=reply["title"])
    elif kind in ("image", "audio", "sticker"):
        media = obj[kind]
        fields["media"] = Media(id=media["id"], mime_type=media["mime_type"], sha256=media["sha256"],
                                voice=bool(media.get("voice", False)))
    elif kind == "location":
        fields["location"] = Location(**obj["location"])
    elif kind == "reaction":
        fields["emoji"] = obj["reaction"]["emoji"]
    return InboundMessage(phone_number_id=msg.phone_number_id, user_id=msg.user_id, wamid=msg.wamid,
                          timestamp=msg.timestamp, kind=kind, profile_name=msg.profile_name,
                          errors=obj.get("errors"), raw=dict(obj), **fields)


# --------------------------------------------------------------------------- the whole population


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


# --------------------------------------------------------------------------- bytes on the wire

ContextResolver = Callable[[SimMessage], "str | None"]


def webhook_body(messages: Sequence[SimMessage], *, encoding: str = "meta",
                 resolve: ContextResolver | None = None) -> bytes:
    """A `whatsapp_business_account` POST body: one change per business number, Meta's field layout.

    "meta" is how Meta sends it (compact, non-ASCII as \\uXXXX escapes); the other ENCODINGS are the same
    content as other bytes.
    """
    changes = []
    for phone_number_id in dict.fromkeys(m.phone_number_id for m in messages):
        mine = [m for m in messages if m.phone_number_id == phone_number_id]
        contacts = {m.user_id: {"profile": {"name": m.profile_name}, "wa_id": m.user_id} for m in mine}
        value = {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": DISPLAY_NUMBERS.get(phone_number_id, "15550000000"),
                         "phone_number_id": phone_number_id},
            "contacts": list(contacts.values()),
            "messages": [m.with_context(resolve(m) if resolve and m.context_text else None) for m in mine],
        }
        changes.append({"value": value, "field": "messages"})
    return _encode({"object": "whatsapp_business_account", "entry": [{"id": WABA_ID, "changes": changes}]}, encoding)


def status_body(phone_number_id: str, statuses: Sequence[Mapping[str, Any]], *, encoding: str = "meta") -> bytes:
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": DISPLAY_NUMBERS.get(phone_number_id, "15550000000"),
                     "phone_number_id": phone_number_id},
        "statuses": list(statuses),
    }
    body = {"object": "whatsapp_business_account",
            "entry": [{"id": WABA_ID, "changes": [{"value": value, "field": "messages"}]}]}
    return _encode(body, encoding)


def _encode(body: dict[str, Any], encoding: str) -> bytes:
    if encoding == "utf8":
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if encoding == "spaced":
        return json.dumps(body, ensure_ascii=False).encode("utf-8")
    if encoding == "pretty":
        return json.dumps(body, ensure_ascii=False, indent=1).encode("utf-8")
    return json.dumps(body, separators=(",", ":")).encode("ascii")


# --------------------------------------------------------------------------- delivery statuses

_FAILURES = {
    131047: ("Re-engagement message",
             "Message failed to send because more than 24 hours have passed since the customer last replied "
             "to this number."),
    131026: ("Message undeliverable", "Message Undeliverable."),
}


def plan_statuses(seed: int, user_id: str, outbound: Sequence[Mapping[str, Any]],
                  transitions: Sequence[Mapping[str, Any]], end: int) -> list[dict[str, Any]]:
    """Meta's status callbacks for one user's sent messages (admin API `outbound` / `transitions` shapes).

    Most messages go sent → delivered → read; some stop at delivered; a few fail: 131047 for a free-form
    follow-up that went out after the 24 h window closed, 131026 (undeliverable) now and then. Within a batch
    the order is sometimes shuffled, as Meta's is.
    """
    rng = random.Random(f"{seed}:{user_id}:statuses")
    times = [_epoch(t.get("at")) for t in transitions]
    out: list[dict[str, Any]] = []
    for index, item in enumerate(outbound):
        wamid = item.get("wamid")
        if not wamid or item.get("status") != "sent":
            continue
        base = times[min(index, len(times) - 1)] if times else end - HOUR
        sent = min(end, base + rng.randint(1, 3))
        roll = rng.random()
        # A free-form follow-up can find the 24 h window closed by the time it goes out; templates cannot.
        late_freeform = bool(item.get("campaign")) and item.get("kind") != "template"
        if (late_freeform and roll < 0.3) or roll < 0.025:
            out.append(_status(wamid, "failed", sent, user_id, 131047 if late_freeform else 131026))
            continue
        out.append(_status(wamid, "sent", sent, user_id))
        delivered = min(end, sent + rng.randint(1, 40))
        if roll < 0.93:
            out.append(_status(wamid, "delivered", delivered, user_id))
        if roll < 0.75:
            out.append(_status(wamid, "read", min(end, delivered + rng.randint(3, 2 * HOUR)), user_id))
    if len(out) > 1 and rng.random() < 0.2:
        rng.shuffle(out)  # a late "delivered" after "read" must not downgrade
    return out


def _status(wamid: str, status: str, at: int, user_id: str, code: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"id": wamid, "status": status, "timestamp": str(at), "recipient_id": user_id}
    if code is not None:
        title, details = _FAILURES[code]
        item["errors"] = [{"code": code, "title": title, "message": title, "error_data": {"details": details}}]
    else:
        item["conversation"] = {"id": hashlib.sha256(f"{user_id}:{at // DAY}".encode()).hexdigest()[:30],
                                "origin": {"type": "service"}}
        item["pricing"] = {"billable": True, "pricing_model": "PMP", "category": "service", "type": "regular"}
    return item


def _epoch(value: Any) -> int:
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        return int(datetime.fromisoformat(value).timestamp())
    raise ValueError(f"not a time: {value!r}")
