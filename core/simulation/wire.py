"""Bytes on the wire: Meta webhook bodies for messages and statuses, and the statuses Meta would report."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from core.simulation.model import DAY, DISPLAY_NUMBERS, HOUR, WABA_ID, SimMessage

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
        pricing = _pricing(item)
        out.append(_status(wamid, "sent", sent, user_id, pricing=pricing))
        delivered = min(end, sent + rng.randint(1, 40))
        if roll < 0.93:
            out.append(_status(wamid, "delivered", delivered, user_id, pricing=pricing))
        if roll < 0.75:
            # Meta sends pricing with sent and delivered only.
            out.append(_status(wamid, "read", min(end, delivered + rng.randint(3, 2 * HOUR)), user_id))
    if len(out) > 1 and rng.random() < 0.2:
        rng.shuffle(out)  # a late "delivered" after "read" must not downgrade
    return out


def _pricing(item: Mapping[str, Any]) -> dict[str, Any]:
    """Per-message pricing (PMP): a template is billed by its category (a campaign's nudge as marketing, any
    other as utility); a free-form reply inside the customer service window is a free service message."""
    if item.get("kind") == "template":
        category = "marketing" if item.get("campaign") else "utility"
        return {"billable": True, "pricing_model": "PMP", "category": category, "type": "regular"}
    return {"billable": False, "pricing_model": "PMP", "category": "service", "type": "free_customer_service"}


def _status(wamid: str, status: str, at: int, user_id: str, code: int | None = None,
            pricing: dict[str, Any] | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"id": wamid, "status": status, "timestamp": str(at), "recipient_id": user_id}
    if code is not None:
        title, details = _FAILURES[code]
        item["errors"] = [{"code": code, "title": title, "message": title, "error_data": {"details": details}}]
    else:
        item["conversation"] = {"id": hashlib.sha256(f"{user_id}:{at // DAY}".encode()).hexdigest()[:30],
                                "origin": {"type": "service"}}
        if pricing is not None:
            item["pricing"] = pricing
    return item


def _epoch(value: Any) -> int:
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        return int(datetime.fromisoformat(value).timestamp())
    raise ValueError(f"not a time: {value!r}")
