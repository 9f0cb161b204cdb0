"""Builders for normalized inbound messages, so tests read as conversations."""

from __future__ import annotations

import itertools
from typing import Any

from core.messages import InboundMessage

PHONE = "100000000000111"
PHONE_2 = "100000000000222"
BASE_TS = 1_767_268_800  # 2026-01-01T12:00:00Z
_counter = itertools.count(1)


def wamid() -> str:
    return f"wamid.T{next(_counter):08d}"


def text(
    user: str, body: str, ts: int, *, phone: str = PHONE, wamid_: str | None = None, **extra: Any
) -> InboundMessage:
    wid = wamid_ or wamid()
    raw = {"from": user, "id": wid, "timestamp": str(ts), "type": "text", "text": {"body": body}}
    return InboundMessage(
        phone_number_id=phone, user_id=user, wamid=wid, timestamp=ts, kind="text", text=body, raw=raw, **extra
    )


def button(user: str, choice_id: str, ts: int, *, title: str = "", phone: str = PHONE,
           context_id: str | None = None, list_reply: bool = False) -> InboundMessage:
    wid = wamid()
    reply_type = "list_reply" if list_reply else "button_reply"
    raw = {
        "from": user,
        "id": wid,
        "timestamp": str(ts),
        "type": "interactive",
        "interactive": {"type": reply_type, reply_type: {"id": choice_id, "title": title}},
    }
    return InboundMessage(
        phone_number_id=phone, user_id=user, wamid=wid, timestamp=ts, kind="interactive",
        choice_id=choice_id, choice_title=title, context_id=context_id, raw=raw,
    )


def of_kind(user: str, kind: str, ts: int, *, phone: str = PHONE, **fields: Any) -> InboundMessage:
    wid = wamid()
    raw = {"from": user, "id": wid, "timestamp": str(ts), "type": kind}
    return InboundMessage(phone_number_id=phone, user_id=user, wamid=wid, timestamp=ts, kind=kind, raw=raw, **fields)
