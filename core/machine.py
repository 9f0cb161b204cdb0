"""Decide what one inbound message does to one session: pure, deterministic, no I/O and no clock.

`decide(flow, state, message)` returns the new state, the outcome for the transition log and the replies to
queue. The engine owns storage, locking and sending; every flow rule here is a plain unit test.

Late messages: a message older (WhatsApp timestamp, whole seconds) than the newest one already applied to the
session was delivered late. Its moment has passed, so it is never taken as the answer to the current step: the
outcome is "late", nothing changes and nothing is sent. Only an opt-out keyword still counts (a legal duty; when
in doubt we stop messaging), as an opt-out that moves no time. A late opt-in does not: it could undo a STOP the
user sent after it. The same second is not late: ties keep arrival order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from core.flows import Flow, Step, normalize_keyword
from core.messages import FLOW_KINDS, MEDIA_KINDS, InboundMessage
from core.placeholders import render

TEXT_BODY_MAX = 4096
INTERACTIVE_BODY_MAX = 1024
# The WHATWG (HTML form) email grammar, plus at least one dot in the domain: real inboxes, no RFC corner cases.
_EMAIL = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
)
_DOT_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
# "1,5" is a decimal in much of the world; "1,500" is ambiguous (thousands?), so three digits are refused.
_COMMA_NUMBER = re.compile(r"[+-]?\d+,\d{1,2}")


@dataclass(frozen=True)
class SessionState:
    step: str
    data: Mapping[str, Any] = field(default_factory=dict)
    failure_count: int = 0
    language: str = "en"
    status: str = "active"  # active | completed | archived
    # WhatsApp time (Unix seconds) of the newest message applied to the session; an older one arrived late.
    last_message_at: int | None = None


@dataclass(frozen=True)
class Reply:
    kind: str  # "text" | "interactive"
    text: str
    step: str | None
    body: dict[str, Any]


@dataclass(frozen=True)
class Decision:
    outcome: str
    from_step: str | None
    to_step: str
    data: dict[str, Any]
    failure_count: int
    status: str
    language: str
    replies: tuple[Reply, ...]
    opted_out: bool | None = None
    # This message brought an archived session back (the outcome says what the message itself did).
    restored: bool = False
    # Older than a message already applied: logged, but it moves no time (see the module docstring).
    late: bool = False


@dataclass(frozen=True)
class _Answer:
    value: Any
    choice: str | None = None


def new_session(flow: Flow, language: str | None = None) -> SessionState:
    """A fresh session at the start step; an unknown language (or 'es_MX' for an 'es' flow) is mapped."""
    return SessionState(step=flow.start, data={}, failure_count=0, language=_language(flow, language), status="active")


def decide(flow: Flow, state: SessionState | None, message: InboundMessage, *,
           context_step: str | None = None, language: str | None = None) -> Decision:
    """Apply one message. `context_step` is the step whose prompt the message replies to, when known;
    `language` is the language a NEW session starts in (e.g. from the number's country code)."""
    if message.kind not in FLOW_KINDS:
        raise ValueError(f"message kind {message.kind!r} never moves a session")
    keyword = _keyword(message)
    late = is_late(state, message)
    # Opt-out is honoured in every state, also before a session exists and when late: a legal duty, not a step.
    if keyword in flow.opt_out_keywords or (keyword in flow.opt_in_keywords and not late):
        opted = _opt(flow, state or new_session(flow, language), opted_out=keyword in flow.opt_out_keywords,
                     new=state is None)
        return replace(opted, late=late)
    if late and state is not None:
        return _late(state)
    if state is None and flow.first_message == "answer":
        return _decide_active(flow, new_session(flow, language), message, keyword, context_step)
    if state is None:
        return _restart(flow, None, _language(flow, language), "started")
    if state.status == "archived":
        return _return(flow, state, message, keyword, context_step)
    if state.status == "completed":
        return _restart(flow, state.step, state.language, "started")
    if state.status != "active":
        raise ValueError(f"unknown session status {state.status!r}")
    return _decide_active(flow, state, message, keyword, context_step)


def is_late(state: SessionState | None, message: InboundMessage) -> bool:
    """Whether the message is older than one already applied to the session (the same second is not)."""
    return state is not None and state.last_message_at is not None and message.timestamp < state.last_message_at


def _decide_active(flow: Flow, state: SessionState, message: InboundMessage, keyword: str | None,
                   context_step: str | None) -> Decision:
    if keyword in flow.reset_keywords:
        return _restart(flow, state.step, state.language, "reset")
    step = flow.step(state.step)
    if _is_stale(flow, step, message, context_step):
        return _stay(flow, state, "stale", notice=flow.text("stale", state.language))
    if step.input == "none":
        return _stay(flow, state, "reprompted", notice=None)
    answer = _ACCEPTORS[step.input](step, message)
    if answer is None:
        return _invalid(flow, state, step)
    return _advance(flow, state, step, answer)


def prompt_replies(flow: Flow, step_id: str, language: str, data: Mapping[str, Any] | None = None, *,
                   notice: str | None = None) -> tuple[Reply, ...]:
    """The message(s) that ask a step's question, optionally preceded by a notice (reprompt, stale, ...).

    Public so follow-up jobs can re-send the current question exactly as the flow would.
    """
    step = flow.step(step_id)
    values = data or {}
    notice = render(notice, values) if notice else None
    if not step.prompt:
        return (_text_reply(notice, None),) if notice else ()
    prompt = render(_pick(step.prompt, language, flow.default_language), values)
    if step.input != "choice":
        return (_text_reply(f"{notice}\n\n{prompt}" if notice else prompt, step.id),)
    combined = f"{notice}\n\n{prompt}" if notice else prompt
    if len(combined) <= INTERACTIVE_BODY_MAX:
        return (_interactive_reply(flow, step, language, combined),)
    # Too long for one interactive body: the notice goes first as text so the buttons are not lost.
    notices = (_text_reply(notice, None),) if notice else ()
    return (*notices, _interactive_reply(flow, step, language, prompt))


# --- outcomes -------------------------------------------------------------------------------------------------


def _restart(flow: Flow, from_step: str | None, language: str, outcome: str) -> Decision:
    return Decision(
        outcome=outcome, from_step=from_step, to_step=flow.start, data={}, failure_count=0,
        status=_status(flow, flow.start), language=language,
        replies=prompt_replies(flow, flow.start, language, {}),
    )


def _return(flow: Flow, state: SessionState, message: InboundMessage, keyword: str | None,
            context_step: str | None) -> Decision:
    """An archived user writes again. Where the flow resumes, the message counts in the step the user is in: the
    typical case is a reply to a reminder that asked that very question, and dropping it would ask again. Only a
    message that is not an answer (a greeting on a choice step, a stale tap, an invalid value) gets the welcome
    back and the question; a reset keyword starts over as it would in an active session."""
    restored = _restore(flow, state)
    if not _resumes(flow, state):
        return restored  # a new run: the message only starts it
    applied = _decide_active(flow, replace(state, status="active"), message, keyword, context_step)
    if applied.outcome in ("advanced", "completed", "reset"):
        return replace(applied, restored=True)
    return restored


def _resumes(flow: Flow, state: SessionState) -> bool:
    """Whether an archived session picks up where it stood (else the returning user starts a new run)."""
    archived_step = flow.steps.get(state.step)
    # A finished (or no longer existing) step cannot be resumed.
    return flow.on_return == "resume" and archived_step is not None and not archived_step.terminal


def _restore(flow: Flow, state: SessionState) -> Decision:
    to_step, data = (state.step, dict(state.data)) if _resumes(flow, state) else (flow.start, {})
    return Decision(
        outcome="restored", from_step=state.step, to_step=to_step, data=data, failure_count=0,
        status=_status(flow, to_step), language=state.language,
        replies=prompt_replies(flow, to_step, state.language, data, notice=flow.text("welcome_back", state.language)),
        restored=True,
    )


def _opt(flow: Flow, current: SessionState, *, opted_out: bool, new: bool) -> Decision:
    notice = flow.text("opted_out" if opted_out else "opted_in", current.language)
    if opted_out or current.status != "active":
        replies: tuple[Reply, ...] = (_text_reply(render(notice, current.data), None),)
    else:
        replies = prompt_replies(flow, current.step, current.language, current.data, notice=notice)
    # The subscription flag changes; the conversation itself (step, data, status) does not.
    return Decision(
        outcome="opted_out" if opted_out else "opted_in", from_step=None if new else current.step,
        to_step=current.step, data=dict(current.data), failure_count=current.failure_count, status=current.status,
        language=current.language, replies=replies, opted_out=opted_out,
    )


def _late(state: SessionState) -> Decision:
    return Decision(
        outcome="late", from_step=state.step, to_step=state.step, data=dict(state.data),
        failure_count=state.failure_count, status=state.status, language=state.language, replies=(), late=True,
    )


def _stay(flow: Flow, state: SessionState, outcome: str, *, notice: str | None) -> Decision:
    return Decision(
        outcome=outcome, from_step=state.step, to_step=state.step, data=dict(state.data),
        failure_count=state.failure_count, status=state.status, language=state.language,
        replies=prompt_replies(flow, state.step, state.language, state.data, notice=notice),
    )


def _invalid(flow: Flow, state: SessionState, step: Step) -> Decision:
    failures = state.failure_count + 1
    limit = step.failure_limit if step.failure_limit is not None else flow.failure_limit
    if failures >= limit and flow.handoff_step is not None:
        return Decision(
            outcome="handoff", from_step=step.id, to_step=flow.handoff_step, data=dict(state.data), failure_count=0,
            status=_status(flow, flow.handoff_step), language=state.language,
            replies=prompt_replies(flow, flow.handoff_step, state.language, state.data),
        )
    notice = _pick(step.reprompt, state.language, flow.default_language) or flow.text("invalid", state.language)
    return Decision(
        outcome="reprompted", from_step=step.id, to_step=step.id, data=dict(state.data), failure_count=failures,
        status=state.status, language=state.language,
        replies=prompt_replies(flow, step.id, state.language, state.data, notice=notice),
    )


def _advance(flow: Flow, state: SessionState, step: Step, answer: _Answer) -> Decision:
    data = dict(state.data)
    if step.key is not None:
        data[step.key] = answer.value
    if step.increment is not None:
        count = data.get(step.increment)
        data[step.increment] = count + 1 if isinstance(count, int) and not isinstance(count, bool) else 1
    language = answer.choice if step.sets_language and answer.choice else state.language
    to_step = step.next_by_choice.get(answer.choice, step.next) if answer.choice is not None else step.next
    if to_step is None:  # the loader rejects such flows; a flow built in code could still omit `next`
        raise ValueError(f"step {step.id!r} of flow {flow.name!r} has no next step for {answer.choice!r}")
    completed = flow.step(to_step).terminal
    return Decision(
        outcome="completed" if completed else "advanced", from_step=step.id, to_step=to_step, data=data,
        failure_count=0, status="completed" if completed else "active", language=language,
        replies=prompt_replies(flow, to_step, language, data),
    )


# --- input acceptance: each returns the value to store, or None when the input is invalid -----------------------


def _accept_text(step: Step, message: InboundMessage) -> _Answer | None:
    if message.kind != "text" or message.text is None or not message.text.strip():
        return None
    # Validate the trimmed text but store exactly what the user sent (no Unicode normalisation, no stripping).
    return _Answer(message.text) if _text_ok(step.validators, message.text.strip()) else None


def _accept_email(step: Step, message: InboundMessage) -> _Answer | None:
    if message.kind != "text" or message.text is None:
        return None
    email = message.text.strip().lower()
    if len(email) > 254 or not _EMAIL.fullmatch(email):
        return None
    return _Answer(email) if _text_ok(step.validators, email) else None


def _accept_number(step: Step, message: InboundMessage) -> _Answer | None:
    number = _parse_number(message.text) if message.kind == "text" and message.text else None
    if number is None:
        return None
    rules = step.validators
    if ("min" in rules and number < rules["min"]) or ("max" in rules and number > rules["max"]):
        return None
    if "one_of" in rules and number not in rules["one_of"]:
        return None
    return _Answer(number)


def _accept_choice(step: Step, message: InboundMessage) -> _Answer | None:
    if message.choice_id is not None:
        known = any(c.id == message.choice_id for c in step.choices)
        return _Answer(message.choice_id, message.choice_id) if known else None
    if message.kind != "text" or not message.text:
        return None
    # Users on old clients (or who just type) answer with the option's title or id instead of tapping it.
    typed = normalize_keyword(message.text)
    for choice in step.choices:
        if typed == normalize_keyword(choice.id) or typed in {normalize_keyword(t) for t in choice.title.values()}:
            return _Answer(choice.id, choice.id)
    return None


def _accept_media(step: Step, message: InboundMessage) -> _Answer | None:
    if message.kind not in MEDIA_KINDS or message.media is None:
        return None
    media = message.media
    return _Answer({"id": media.id, "mime_type": media.mime_type, "caption": media.caption,
                    "filename": media.filename})


def _accept_location(step: Step, message: InboundMessage) -> _Answer | None:
    if message.kind != "location" or message.location is None:
        return None
    place = message.location
    return _Answer({"latitude": place.latitude, "longitude": place.longitude, "name": place.name,
                    "address": place.address})


def _accept_any(step: Step, message: InboundMessage) -> _Answer:
    if message.choice_id is not None:
        return _Answer(message.choice_id, message.choice_id)
    for accept in (_accept_media, _accept_location):
        answer = accept(step, message)
        if answer is not None:
            return answer
    return _Answer(message.text if message.text is not None else message.contacts or message.order)


_ACCEPTORS: Mapping[str, Callable[[Step, InboundMessage], _Answer | None]] = {
    "text": _accept_text, "email": _accept_email, "number": _accept_number, "choice": _accept_choice,
    "media": _accept_media, "location": _accept_location, "any": _accept_any,
}


def _text_ok(rules: Mapping[str, Any], text: str) -> bool:
    if len(text) < rules.get("min_length", 0) or len(text) > rules.get("max_length", len(text)):
        return False
    if "pattern" in rules and re.fullmatch(rules["pattern"], text) is None:
        return False
    return "one_of" not in rules or text.casefold() in {str(option).casefold() for option in rules["one_of"]}


def _parse_number(text: str) -> int | float | None:
    cleaned = text.strip()
    if _COMMA_NUMBER.fullmatch(cleaned):
        cleaned = cleaned.replace(",", ".")
    elif not _DOT_NUMBER.fullmatch(cleaned):
        return None
    return float(cleaned) if "." in cleaned else int(cleaned)


# --- helpers ------------------------------------------------------------------------------------------------------


def _keyword(message: InboundMessage) -> str | None:
    """The normalised text a keyword is matched against: typed text, or a template quick-reply payload."""
    if message.kind == "text" and message.text is not None:
        return normalize_keyword(message.text)
    if message.kind == "button" and message.choice_id is not None:
        return normalize_keyword(message.choice_id)
    return None


def _is_stale(flow: Flow, step: Step, message: InboundMessage, context_step: str | None) -> bool:
    """A tap on a button or list row of a prompt that is no longer the current question."""
    if message.choice_id is None:
        return False
    if context_step is not None and context_step != step.id:
        return True
    if any(c.id == message.choice_id for c in step.choices):
        return False
    return any(c.id == message.choice_id for other in flow.steps.values() for c in other.choices)


def _status(flow: Flow, step_id: str) -> str:
    return "completed" if flow.step(step_id).terminal else "active"


def _language(flow: Flow, language: str | None) -> str:
    for candidate in (language, (language or "").replace("-", "_").split("_")[0]):
        if candidate in flow.languages:
            return candidate
    return flow.default_language


def _pick(texts: Mapping[str, str], language: str, default_language: str) -> str:
    return texts.get(language) or texts.get(default_language) or ""


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _text_reply(text: str, step: str | None) -> Reply:
    text = _clip(text, TEXT_BODY_MAX)
    return Reply(kind="text", text=text, step=step, body={"type": "text", "text": {"body": text}})


def _interactive_reply(flow: Flow, step: Step, language: str, text: str) -> Reply:
    text = _clip(text, INTERACTIVE_BODY_MAX)
    title = {c.id: _pick(c.title, language, flow.default_language) for c in step.choices}
    action: dict[str, Any]
    if step.style == "button":
        action = {"buttons": [{"type": "reply", "reply": {"id": c.id, "title": title[c.id]}} for c in step.choices]}
    else:
        rows = []
        for choice in step.choices:
            row = {"id": choice.id, "title": title[choice.id]}
            description = _pick(choice.description, language, flow.default_language)
            if description:
                row["description"] = description
            rows.append(row)
        label = _clip(flow.text("choose", language), 20)
        action = {"button": label, "sections": [{"title": _clip(label, 24), "rows": rows}]}
    body = {"type": "interactive", "interactive": {"type": step.style, "body": {"text": text}, "action": action}}
    return Reply(kind="interactive", text=text, step=step.id, body=body)
