"""One user's conversation: walked through the flow with `decide`, so the script knows what the bot asks."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from core.flows import Flow, Step
from core.machine import Decision, SessionState, decide
from core.messages import InboundMessage, Location, Media
from core.simulation.model import HOUR, REDELIVERY_ENCODINGS, Post, SimMessage, UserPlan
from core.simulation.people import (
    _BAD_TIME,
    _CITIES,
    _GREETINGS,
    _RESET,
    _STOP,
    _UNSUPPORTED,
    _email_for,
)

if TYPE_CHECKING:
    from core.simulation.population import _Generator


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

    def deliver(self, messages: tuple[SimMessage, ...]) -> None:
        # Never before this user's previous POST: a user's messages may share a POST, not overtake one.
        at = max(self.last_at, max(m.timestamp for m in messages) + self.rng.randint(0, 2))
        self.last_at = at
        gate, self.pending_gate = self.pending_gate, None
        self.posts.append(Post(at=at, messages=messages, gate=gate))
        for m in messages:
            if self.rng.random() < self.gen.config.redelivery_share:
                # Meta retries (or a second subscribed app): same wamid, new bytes, seconds to minutes later.
                later = at + self.rng.choice((5, 20, 90, 600, 1800))
                self.posts.append(Post(at=later, messages=(m,), encoding=self.rng.choice(REDELIVERY_ENCODINGS),
                                       redelivery=True))

    def apply(self, msg: SimMessage, context_step: str | None) -> None:
        inbound = to_inbound(msg)
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
        again = to_inbound(replace(msg, wamid=msg.wamid + ".x", body={**msg.body, "id": msg.wamid + ".x"}))
        return decide(self.flow, self.state, again, context_step=context_step).outcome in ("stale", "reprompted")

    def returning(self, step: Step) -> None:
        """Days later the user answers the question they left (often a reply to our reminder); archived or not,
        the answer counts there."""
        label, obj = self.valid_answer(step)
        context = self.prompts.get(step.id) if step.input == "choice" else None
        msg = self.send(label, obj, context_text=context, context_step=step.id if context else None,
                        after=self.think(step), post=False)
        self.deliver((msg,))

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


def to_inbound(msg: SimMessage) -> InboundMessage:
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
