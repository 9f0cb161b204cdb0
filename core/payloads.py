"""Parse and validate WhatsApp Cloud API webhook bodies into normalized messages and delivery statuses.

Pure: bytes in, `ParsedWebhook` out, no I/O and no clock (the receiving time is given). A body that cannot be
accepted (not JSON, not an object, no entry list, a message without sender, id or numeric timestamp...) raises
`PayloadError` with a reason that is safe to send back (the webhook answers 400); nothing else escapes.
A message that is well formed but breaks a bound of core.bounds (a NUL character, a value longer than its
column, a number or timestamp out of range) is not a reason to refuse its neighbours: it is listed in
`ParsedWebhook.rejected` for the quarantine, as a webhook value of its own; a status that breaks one is skipped
with a note. Unknown fields are ignored (Meta adds fields over time) and missing optional parts are normal; what
is skipped on purpose is listed in `ParsedWebhook.notes` for the log.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from core.bounds import (
    LATITUDE_RANGE,
    LONGITUDE_RANGE,
    MAX_BODY_BYTES,
    MAX_DEPTH,
    MAX_KIND_CHARS,
    MAX_OPAQUE_CHARS,
    MAX_PHONE_NUMBER_ID_CHARS,
    MAX_PRICING_CHARS,
    MAX_PROFILE_NAME_CHARS,
    MAX_REFERENCE_CHARS,
    MAX_STATUS_CHARS,
    MAX_USER_ID_CHARS,
    MAX_WAMID_CHARS,
    OutOfBounds,
    check_error_codes,
    check_json,
    check_opaque,
    check_optional_text,
    check_range,
    check_text,
    check_timestamp,
)
from core.errors import PayloadError
from core.messages import InboundMessage, Location, Media, Pricing, RejectedMessage, StatusUpdate

__all__ = ["MAX_BODY_BYTES", "MAX_DEPTH", "ParsedWebhook", "parse_webhook", "rejected_message"]

WHATSAPP_OBJECT = "whatsapp_business_account"
MESSAGES_FIELD = "messages"
# Longest `object` name echoed back in the answer to a body that is not ours.
MAX_OBJECT_ECHO = 100

Json = dict[str, Any]


@dataclass(frozen=True)
class MarketingPreference:
    """One `user_preferences[]` entry with category `marketing_messages`: the user stopped (or resumed)
    marketing messages from this business number."""

    phone_number_id: str
    user_id: str
    stop: bool  # value "stop"; False: "resume"
    timestamp: int | None = None


@dataclass(frozen=True)
class ParsedWebhook:
    object: str
    messages: list[InboundMessage]  # in payload order; the engine sorts per user by timestamp
    statuses: list[StatusUpdate]
    notes: list[str] = field(default_factory=list)  # what was ignored and why, for the log
    # Messages that break a bound (core.quarantine holds them); the rest of the body is accepted.
    rejected: list[RejectedMessage] = field(default_factory=list)
    # `user_preferences` changes: users who stopped or resumed marketing messages.
    preferences: list[MarketingPreference] = field(default_factory=list)

    @property
    def relevant(self) -> bool:
        return self.object == WHATSAPP_OBJECT


def parse_webhook(raw: bytes, *, now: datetime | None = None) -> ParsedWebhook:
    """Parse one POST body received at `now` (None: timestamps are only held to year 9999, not to the clock).
    Raises `PayloadError` (and only that) when the body must be rejected."""
    try:
        return _parse(raw, None if now is None else int(now.timestamp()))
    except PayloadError:
        raise
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, ArithmeticError, RecursionError) as e:
        # Safety net: every shape problem should already have its own clear message above.
        raise PayloadError(f"malformed payload ({type(e).__name__})") from e


# --------------------------------------------------------------------------- bytes -> JSON

_KEEP_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_AS_PARENS = bytes.maketrans(b"[]{}", b"()()")
_RUNS = re.compile(rb"\(+|\)+")
_OPEN = ord("(")
_PEEL_PASSES = 8


def _too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text nests more than `limit` arrays/objects, computed without recursion.

    Drops escaped backslashes and quotes, then the strings, keeps only brackets (all C-speed passes), peels
    the innermost `()` pairs a few times (each peel lowers the depth by one and shrinks the text a lot),
    then walks the remaining runs of `(` and `)`. Any 3 MB body takes well under a second.
    """
    # Removing `\\` pairs left to right, then `\"`, is how a JSON lexer reads backslash runs.
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Outside strings = every other piece between quotes (an unterminated last string drops out too).
    outside = b"".join(unescaped.split(b'"')[::2])
    brackets = outside.translate(_AS_PARENS, _KEEP_BRACKETS)
    peeled = 0
    while peeled < _PEEL_PASSES:
        shorter = brackets.replace(b"()", b"")
        if len(shorter) == len(brackets):
            break
        brackets, peeled = shorter, peeled + 1
    depth = 0
    for run in _RUNS.finditer(brackets):
        size = run.end() - run.start()
        if brackets[run.start()] == _OPEN:
            depth += size
            if depth + peeled > limit:
                return True
        else:
            depth -= size
            if depth < 0:  # a closer without opener: invalid JSON that json.loads reports before going deep
                return False
    return False


# Numbers a float or an int cannot hold (1e400, NaN, an integer of more digits than Python reads) load as infinite
# or NaN floats: the message holding one breaks a bound and is quarantined, elsewhere in the body they are ignored.
# (The quarantine writes them as Infinity/NaN, which a retry reads back the same way, with the same reason.)
_CONSTANTS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _constant(name: str) -> float:
    return _CONSTANTS[name]


def _integer(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:  # more digits than sys.get_int_max_str_digits()
        return -math.inf if text.startswith("-") else math.inf


def _json_error(e: json.JSONDecodeError, text: str) -> PayloadError:
    if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
        return PayloadError(f"truncated JSON: {e.msg} at line {e.lineno} column {e.colno}")
    return PayloadError(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}")


def _load_json(raw: bytes) -> Any:
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise PayloadError("body must be bytes")
    raw = bytes(raw)
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadError(f"body larger than {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        raise PayloadError("empty body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PayloadError(f"invalid UTF-8 at byte {e.start}") from e
    if _too_deep(raw):
        raise PayloadError(f"invalid JSON: nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_constant, parse_int=_integer)
    except json.JSONDecodeError as e:
        raise _json_error(e, text) from e
    except (ValueError, RecursionError) as e:
        raise PayloadError(f"invalid JSON: {e}") from e


# --------------------------------------------------------------------------- typed access with a path

_TYPE_NAMES = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}


def _type_name(value: Any) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _wrong(path: str, expected: str, value: Any) -> PayloadError:
    return PayloadError(f"{path} must be {expected}, got {_type_name(value)}")


def _as_dict(value: Any, path: str) -> Json:
    if not isinstance(value, dict):
        raise _wrong(path, "an object", value)
    return value


def _opt_dict(obj: Json, key: str, path: str) -> Json | None:
    value = obj.get(key)
    return None if value is None else _as_dict(value, f"{path}.{key}")


def _opt_list(obj: Json, key: str, path: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _wrong(f"{path}.{key}", "an array", value)
    return value


def _dict_items(obj: Json, key: str, path: str) -> list[Json]:
    return [_as_dict(item, f"{path}.{key}[{i}]") for i, item in enumerate(_opt_list(obj, key, path))]


def _opt_str(obj: Json, key: str, path: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _wrong(f"{path}.{key}", "a string", value)
    return value


def _req_str(obj: Json, key: str, path: str) -> str:
    value = _opt_str(obj, key, path)
    if not value:
        raise PayloadError(f"{path}: missing '{key}'")
    return value


def _opt_bool(obj: Json, key: str, path: str) -> bool:
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _wrong(f"{path}.{key}", "a boolean", value)
    return value


def _number(obj: Json, key: str, path: str) -> float:
    value = obj.get(key)
    if value is None:
        raise PayloadError(f"{path}: missing '{key}'")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong(f"{path}.{key}", "a number", value)
    return float(value)


def _timestamp_digits(obj: Json, path: str) -> str:
    """The shape of a timestamp (Meta sends Unix seconds as a digit string); its range is a bound, checked later."""
    value = obj.get("timestamp")
    if value is None:
        raise PayloadError(f"{path}: missing 'timestamp'")
    if not (isinstance(value, str) and value and value.isascii() and value.isdigit()):
        raise PayloadError(f"{path}.timestamp must be Unix seconds as a digit string, got {_short(value)}")
    return value


def _errors(obj: Json, path: str) -> list[Json] | None:
    errors = _dict_items(obj, "errors", path)
    return errors or None


def _describe_errors(errors: list[Json]) -> str:
    return "; ".join(f"{e.get('code')} {e.get('title') or e.get('message') or ''}".strip() for e in errors)


# --------------------------------------------------------------------------- one normalizer per kind

Fields = dict[str, Any]


def _text(payload: Json, path: str) -> Fields:
    return {"text": _opt_str(payload, "body", path)}


def _reply(payload: Json, path: str) -> Fields:
    return {"choice_id": _opt_str(payload, "id", path), "choice_title": _opt_str(payload, "title", path)}


def _flow_reply(payload: Json, path: str) -> Fields:
    return {"text": _opt_str(payload, "response_json", path)}


_INTERACTIVE: dict[str, Callable[[Json, str], Fields]] = {
    "button_reply": _reply,
    "list_reply": _reply,
    "nfm_reply": _flow_reply,
}


def _interactive(payload: Json, path: str) -> Fields:
    kind = _opt_str(payload, "type", path)
    if kind is None:  # the reply object alone says which reply it is
        kind = next((name for name in _INTERACTIVE if name in payload), "")
    normalizer = _INTERACTIVE.get(kind)
    reply = _opt_dict(payload, kind, path) if normalizer else None
    if normalizer is None or reply is None:
        return {}
    return normalizer(reply, f"{path}.{kind}")


def _button(payload: Json, path: str) -> Fields:
    return {"choice_id": _opt_str(payload, "payload", path), "text": _opt_str(payload, "text", path)}


def _media(payload: Json, path: str) -> Fields:
    media = Media(
        id=_opt_str(payload, "id", path),
        mime_type=_opt_str(payload, "mime_type", path),
        caption=_opt_str(payload, "caption", path),
        filename=_opt_str(payload, "filename", path),
        sha256=_opt_str(payload, "sha256", path),
        voice=_opt_bool(payload, "voice", path),
    )
    return {"media": media, "text": media.caption}


def _location(payload: Json, path: str) -> Fields:
    location = Location(
        latitude=_number(payload, "latitude", path),
        longitude=_number(payload, "longitude", path),
        name=_opt_str(payload, "name", path),
        address=_opt_str(payload, "address", path),
        url=_opt_str(payload, "url", path),
    )
    return {"location": location}


def _order(payload: Json, path: str) -> Fields:
    order = {
        "catalog_id": _opt_str(payload, "catalog_id", path),
        "text": _opt_str(payload, "text", path),
        "product_items": _dict_items(payload, "product_items", path),
    }
    return {"order": order}


def _reaction(payload: Json, path: str) -> Fields:
    # An absent or empty emoji means the user removed their reaction.
    return {"reacted_to": _opt_str(payload, "message_id", path), "emoji": _opt_str(payload, "emoji", path) or None}


def _system(payload: Json, path: str) -> Fields:
    fields: Fields = {"text": _opt_str(payload, "body", path)}
    if _opt_str(payload, "type", path) == "user_changed_number":
        wa_id, new_wa_id = _opt_str(payload, "wa_id", path), _opt_str(payload, "new_wa_id", path)
        fields["new_user_id"] = wa_id or new_wa_id
    return fields


# Keyed by message `type`; the payload is the message's object of the same name. Kinds missing here
# (unsupported, unknown, request_welcome...) keep only the common fields and `raw`.
_NORMALIZERS: dict[str, Callable[[Json, str], Fields]] = {
    "text": _text,
    "interactive": _interactive,
    "button": _button,
    "image": _media,
    "document": _media,
    "audio": _media,
    "video": _media,
    "sticker": _media,
    "location": _location,
    "order": _order,
    "reaction": _reaction,
    "system": _system,
}


def _kind_fields(msg: Json, kind: str, path: str) -> Fields:
    if kind == "contacts":
        # Cards the user shared; the sender's own profile is value.contacts, read elsewhere.
        return {"contacts": _dict_items(msg, "contacts", path)} if msg.get("contacts") is not None else {}
    normalizer = _NORMALIZERS.get(kind)
    payload = _opt_dict(msg, kind, path) if normalizer else None
    if normalizer is None or payload is None:
        # A missing payload object is tolerated: Meta sends e.g. `interactive` without it next to value.errors.
        return {}
    return normalizer(payload, f"{path}.{kind}")


# --------------------------------------------------------------------------- messages and statuses


def _user_ids(msg: Json, path: str) -> tuple[str, str | None]:
    """The session user (`from`, else the business-scoped `from_user_id`) and the business-scoped id."""
    phone, scoped = _opt_str(msg, "from", path), _opt_str(msg, "from_user_id", path)
    user_id = phone or scoped
    if not user_id:
        raise PayloadError(f"{path}: message has neither 'from' nor 'from_user_id'")
    return user_id, scoped


def _profiles(value: Json, path: str) -> dict[str, str]:
    """Sender profile names from value.contacts, by wa_id and by business-scoped user_id."""
    names: dict[str, str] = {}
    for i, contact in enumerate(_dict_items(value, "contacts", path)):
        where = f"{path}.contacts[{i}]"
        profile = _opt_dict(contact, "profile", where)
        name = _opt_str(profile, "name", f"{where}.profile") if profile else None
        for key in ("wa_id", "user_id"):
            contact_id = _opt_str(contact, key, where)
            if contact_id and name is not None:
                names.setdefault(contact_id, name)
    return names


def _build(model: type[Any], path: str, **fields: Any) -> Any:
    try:
        return model(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PayloadError(f"{path}: {where}: {first['msg']}") from e


@dataclass(frozen=True)
class _Value:
    """One change's `value`: what its messages and statuses share."""

    doc: Json
    phone_number_id: str
    profiles: dict[str, str]
    now: int | None  # receiving time, Unix seconds
    problem: OutOfBounds | None  # a bound the value itself breaks (its phone_number_id): every item breaks it


def _message_bounds(msg: Json, message: InboundMessage) -> None:
    """The bounds of the normalized fields; every string of `raw` was checked before normalizing."""
    sender = "from" if msg.get("from") else "from_user_id"
    for where, text, limit in (
        ("message.id", message.wamid, MAX_WAMID_CHARS),
        (f"message.{sender}", message.user_id, MAX_USER_ID_CHARS),
        ("message.type", message.kind, MAX_KIND_CHARS),
        ("message.context.id", message.context_id, MAX_REFERENCE_CHARS),
        ("message.reaction.message_id", message.reacted_to, MAX_REFERENCE_CHARS),
        ("message.system.wa_id", message.new_user_id, MAX_USER_ID_CHARS),
        # Not part of `raw`: a NUL here would fail the session's write, not only the message's.
        ("the sender's profile name (contacts[].profile.name)", message.profile_name, MAX_PROFILE_NAME_CHARS),
    ):
        check_optional_text(where, text, limit)
    if message.location is not None:
        check_range("message.location.latitude", message.location.latitude, LATITUDE_RANGE)
        check_range("message.location.longitude", message.location.longitude, LONGITUDE_RANGE)


def _parse_message(msg: Json, path: str, value: _Value) -> InboundMessage:
    """Raises PayloadError for a malformed message (the body is refused), OutOfBounds for one to quarantine."""
    wamid = _req_str(msg, "id", path)
    user_id, scoped_id = _user_ids(msg, path)
    digits = _timestamp_digits(msg, path)
    kind = _opt_str(msg, "type", path) or "unknown"
    context = _opt_dict(msg, "context", path)
    if value.problem is not None:
        raise value.problem
    # Before the kind's fields are read: a 310-digit latitude must not reach float().
    check_json("message", msg)
    message: InboundMessage = _build(
        InboundMessage,
        path,
        phone_number_id=value.phone_number_id,
        user_id=user_id,
        wamid=wamid,
        timestamp=check_timestamp("message.timestamp", digits, value.now),
        kind=kind,
        context_id=_opt_str(context, "id", f"{path}.context") if context else None,
        profile_name=value.profiles.get(user_id) or (value.profiles.get(scoped_id) if scoped_id else None),
        errors=_errors(msg, path),
        raw=msg,
        **_kind_fields(msg, kind, path),
    )
    _message_bounds(msg, message)
    return message


def _rejected(reason: str, msg: Json, value: _Value) -> RejectedMessage:
    """The message as a webhook value of its own (with its sender's contact), for the quarantine to parse again."""
    senders = [sender for sender in (msg.get("from"), msg.get("from_user_id")) if isinstance(sender, str) and sender]
    contacts = [
        contact for contact in value.doc.get("contacts") or []
        if isinstance(contact, dict) and any(contact.get(key) in senders for key in ("wa_id", "user_id"))
    ]
    envelope = {
        "messaging_product": value.doc.get("messaging_product", "whatsapp"),
        "metadata": value.doc.get("metadata"),
        "contacts": contacts,
        "messages": [msg],
    }
    wamid = msg.get("id")
    return RejectedMessage(
        reason=reason,
        envelope=envelope,
        phone_number_id=value.phone_number_id,
        user_id=senders[0] if senders else None,
        wamid=wamid if isinstance(wamid, str) else None,
    )


def rejected_message(message: InboundMessage, reason: str) -> RejectedMessage:
    """A parsed message to hold in the quarantine after all (the database refused it), as a webhook value of its
    own rebuilt from the message: its metadata and contact are reduced to what the parser reads."""
    contacts = []
    if message.profile_name is not None:
        key = "wa_id" if message.raw.get("from") else "user_id"
        contacts.append({"profile": {"name": message.profile_name}, key: message.user_id})
    envelope = {
        "messaging_product": "whatsapp",
        "metadata": {"phone_number_id": message.phone_number_id},
        "contacts": contacts,
        "messages": [message.raw],
    }
    return RejectedMessage(reason, envelope, message.phone_number_id, message.user_id, message.wamid)


def _take_message(obj: Any, path: str, value: _Value, out: _Collected) -> None:
    msg = _as_dict(obj, path)
    try:
        message = _parse_message(msg, path, value)
    except PayloadError:
        raise
    except OutOfBounds as e:
        out.rejected.append(_rejected(str(e), msg, value))
        return
    except Exception as e:  # noqa: BLE001 — a parser bug met by one message: held (retried once fixed), never its body's
        out.rejected.append(_rejected(f"message could not be parsed ({type(e).__name__})", msg, value))
        return
    if message.errors:
        out.notes.append(f"message {message.wamid} ({message.kind}): {_describe_errors(message.errors)}")
    out.messages.append(message)


def _status_bounds(status: StatusUpdate) -> None:
    check_text("status.id", status.wamid, MAX_WAMID_CHARS)
    check_text("status.status", status.status, MAX_STATUS_CHARS)
    check_optional_text("status.recipient_id", status.recipient_id, MAX_USER_ID_CHARS)
    check_optional_text("status.biz_opaque_callback_data", status.biz_opaque_callback_data, MAX_OPAQUE_CHARS)
    check_opaque("status.biz_opaque_callback_data", status.biz_opaque_callback_data)
    check_json("status.errors", status.errors)
    check_error_codes("status.errors", status.errors)


def _pricing(status: Json, path: str) -> tuple[Pricing | None, str | None]:
    """Meta's `pricing` object (billable, pricing_model, category), or None; a malformed one comes back as the
    reason to drop it instead: the delivery state it came with is kept, it is only the cost that goes unknown."""
    doc = status.get("pricing")
    if doc is None:
        return None, None
    where = f"{path}.pricing"
    try:
        doc = _as_dict(doc, where)
        billable = doc.get("billable")
        if billable is not None and not isinstance(billable, bool):
            raise _wrong(f"{where}.billable", "a boolean", billable)
        category, model = _opt_str(doc, "category", where), _opt_str(doc, "pricing_model", where)
        check_optional_text("status.pricing.category", category, MAX_PRICING_CHARS)
        check_optional_text("status.pricing.pricing_model", model, MAX_PRICING_CHARS)
    except (PayloadError, OutOfBounds) as e:
        return None, str(e)
    if category is None and billable is None and model is None:
        return None, None
    return Pricing(category=category, billable=billable, model=model), None


def _parse_status(obj: Any, path: str, value: _Value, notes: list[str]) -> StatusUpdate:
    status = _as_dict(obj, path)
    recipient_id, recipient_user_id = (
        _opt_str(status, "recipient_id", path),
        _opt_str(status, "recipient_user_id", path),
    )
    wamid, state = _req_str(status, "id", path), _req_str(status, "status", path)
    digits = _timestamp_digits(status, path)
    errors = _errors(status, path) or []
    opaque = _opt_str(status, "biz_opaque_callback_data", path)
    pricing, pricing_problem = _pricing(status, path)
    if value.problem is not None:
        raise value.problem
    parsed: StatusUpdate = _build(
        StatusUpdate,
        path,
        phone_number_id=value.phone_number_id,
        wamid=wamid,
        status=state,
        timestamp=check_timestamp("status.timestamp", digits, value.now),
        # Sent to a business-scoped user id only, a status may carry recipient_user_id alone.
        recipient_id=recipient_id or recipient_user_id,
        errors=errors,
        biz_opaque_callback_data=opaque,
        pricing=pricing,
        raw=status,
    )
    _status_bounds(parsed)
    if pricing_problem is not None:
        notes.append(f"{path}: pricing dropped, status kept: {pricing_problem}")
    return parsed


def _take_status(obj: Any, path: str, value: _Value, out: _Collected) -> None:
    # A status out of bounds is skipped, not quarantined: it moves no session, and the delivery record it would
    # update cannot hold its values anyway. Meta's own statuses never break a bound.
    try:
        out.statuses.append(_parse_status(obj, path, value, out.notes))
    except PayloadError:
        raise
    except OutOfBounds as e:
        out.notes.append(f"{path}: status skipped: {e}")
    except Exception as e:  # noqa: BLE001 — a parser bug met by one status: skipped, never its body's neighbours'
        out.notes.append(f"{path}: status skipped: could not be parsed ({type(e).__name__})")


def _phone_number_id(value: Json, path: str) -> str:
    metadata = _opt_dict(value, "metadata", path)
    phone_number_id = _opt_str(metadata, "phone_number_id", f"{path}.metadata") if metadata else None
    if not phone_number_id:
        # Never guess which business number a message was sent to.
        raise PayloadError(f"{path}: missing 'metadata.phone_number_id'")
    return phone_number_id


@dataclass
class _Collected:
    messages: list[InboundMessage] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rejected: list[RejectedMessage] = field(default_factory=list)
    preferences: list[MarketingPreference] = field(default_factory=list)


def _parse_value(doc: Json, path: str, out: _Collected, now: int | None) -> None:
    errors = _errors(doc, path)
    if errors:
        out.notes.append(f"{path}.errors: {_describe_errors(errors)}")
    messages = _opt_list(doc, "messages", path)
    statuses = _opt_list(doc, "statuses", path)
    if not messages and not statuses:
        return
    phone_number_id = _phone_number_id(doc, path)
    problem = None
    try:
        check_text("metadata.phone_number_id", phone_number_id, MAX_PHONE_NUMBER_ID_CHARS)
    except OutOfBounds as e:
        problem = e
    value = _Value(doc, phone_number_id, _profiles(doc, path) if messages else {}, now, problem)
    for i, obj in enumerate(messages):
        _take_message(obj, f"{path}.messages[{i}]", value, out)
    for i, obj in enumerate(statuses):
        _take_status(obj, f"{path}.statuses[{i}]", value, out)


def _parse_change(obj: Any, path: str, out: _Collected, now: int | None) -> None:
    change = _as_dict(obj, path)
    field_name = _opt_str(change, "field", path)
    value = change.get("value")
    carries_messages = isinstance(value, dict) and ("messages" in value or "statuses" in value)
    if field_name == MESSAGES_FIELD or (field_name is None and carries_messages):
        if value is None:
            raise PayloadError(f"{path}: missing 'value'")
        _parse_value(_as_dict(value, f"{path}.value"), f"{path}.value", out, now)
    elif field_name == USER_PREFERENCES_FIELD and isinstance(value, dict):
        _parse_preferences(value, f"{path}.value", out)
    else:
        out.notes.append(f"{path}: ignored field {_short(field_name)}")


USER_PREFERENCES_FIELD = "user_preferences"
MARKETING_CATEGORY = "marketing_messages"


def _parse_preferences(doc: Json, path: str, out: _Collected) -> None:
    """Meta's `user_preferences` webhook: `value.user_preferences[]` of {wa_id, category, value: stop|resume,
    timestamp}. Entries of other categories or values are noted and ignored; a malformed one is skipped alone."""
    phone_number_id = _phone_number_id(doc, path)
    for i, obj in enumerate(_opt_list(doc, "user_preferences", path)):
        where = f"{path}.user_preferences[{i}]"
        try:
            entry = _as_dict(obj, where)
            category, choice = _opt_str(entry, "category", where), _opt_str(entry, "value", where)
            if category != MARKETING_CATEGORY or choice not in ("stop", "resume"):
                out.notes.append(f"{where}: ignored preference {_short(category)}={_short(choice)}")
                continue
            stamp = entry.get("timestamp")  # seconds as a string, like a message's
            out.preferences.append(MarketingPreference(
                phone_number_id, _req_str(entry, "wa_id", where), choice == "stop",
                int(stamp) if isinstance(stamp, str) and stamp.isdigit() and len(stamp) < 12 else None,
            ))
        except PayloadError as e:
            out.notes.append(f"{where}: preference skipped: {e}")


def _echoable(name: str) -> str:
    """An `object` name safe to send back in a JSON answer (no lone surrogate) and short."""
    if len(name) <= MAX_OBJECT_ECHO and (name.isascii() or not _SURROGATES.search(name)):
        return name
    return json.dumps(name)[1:-1][:MAX_OBJECT_ECHO]


_SURROGATES = re.compile("[\ud800-\udfff]")


def _parse(raw: bytes, now: int | None) -> ParsedWebhook:
    data = _load_json(raw)
    if not isinstance(data, dict):
        raise PayloadError(f"top-level JSON must be an object, got {_type_name(data)}")
    obj = _req_str(data, "object", "body")
    if "entry" not in data or data["entry"] is None:
        raise PayloadError("body: missing 'entry'")
    entries = _opt_list(data, "entry", "body")
    if obj != WHATSAPP_OBJECT:
        return ParsedWebhook(object=_echoable(obj), messages=[], statuses=[], notes=[f"ignored object {_short(obj)}"])
    out = _Collected()
    for i, entry_obj in enumerate(entries):
        entry = _as_dict(entry_obj, f"entry[{i}]")
        for j, change in enumerate(_opt_list(entry, "changes", f"entry[{i}]")):
            _parse_change(change, f"entry[{i}].changes[{j}]", out, now)
    return ParsedWebhook(
        object=obj, messages=out.messages, statuses=out.statuses, notes=out.notes, rejected=out.rejected,
        preferences=out.preferences,
    )
