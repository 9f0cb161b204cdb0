"""The normalized inbound message: what the engine and the flows see, whatever the webhook shape was."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Kinds that go through the flow and produce a transition.
FLOW_KINDS = frozenset(
    {"text", "button", "interactive", "image", "document", "audio", "video", "sticker", "location", "contacts", "order"}
)
MEDIA_KINDS = frozenset({"image", "document", "audio", "video", "sticker"})
# Kinds that are stored (dedupe, replay) but never move a session.
NON_TRANSITION_KINDS = frozenset({"reaction", "system", "unsupported", "unknown", "request_welcome", "ephemeral"})

Kind = str


class Media(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str | None = None
    mime_type: str | None = None
    caption: str | None = None
    filename: str | None = None
    sha256: str | None = None
    voice: bool = False


class Location(BaseModel):
    model_config = ConfigDict(frozen=True)

    latitude: float
    longitude: float
    name: str | None = None
    address: str | None = None
    url: str | None = None


class InboundMessage(BaseModel):
    """One user message, normalized. `raw` keeps the message object exactly as WhatsApp sent it.

    What may be stored is bounded by core.bounds (column widths, no NUL, numbers and timestamps in range), checked by
    the parser at intake rather than here: this model also loads messages stored before a bound existed (apply,
    replay), which must keep loading."""

    model_config = ConfigDict(frozen=True)

    phone_number_id: str = Field(min_length=1)
    user_id: str = Field(min_length=1)
    wamid: str = Field(min_length=1)
    timestamp: int
    kind: Kind
    text: str | None = None
    choice_id: str | None = None
    choice_title: str | None = None
    media: Media | None = None
    location: Location | None = None
    contacts: list[dict[str, Any]] | None = None
    order: dict[str, Any] | None = None
    context_id: str | None = None
    profile_name: str | None = None
    # reaction: the outbound wamid reacted to and the emoji (None when a reaction is removed)
    reacted_to: str | None = None
    emoji: str | None = None
    # system user_changed_number: the user's new id
    new_user_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    raw: dict[str, Any] = Field(default_factory=dict)

    @field_validator("timestamp", mode="before")
    @classmethod
    def _numeric_timestamp(cls, value: object) -> int:
        # WhatsApp sends Unix seconds as a digit string; anything else is a malformed message.
        if isinstance(value, bool):
            raise ValueError("timestamp must be Unix seconds")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.isascii() and value.isdigit():
            return int(value)
        raise ValueError(f"timestamp must be Unix seconds as digits, got {value!r}")

    @property
    def session_key(self) -> tuple[str, str]:
        return (self.phone_number_id, self.user_id)

    @property
    def moves_flow(self) -> bool:
        return self.kind in FLOW_KINDS


class Pricing(BaseModel):
    """Meta's `pricing` object on a status: the category the message is billed as (marketing, utility, service,
    authentication...), whether it is billable, and the pricing model (PMP, or CBP before July 2025)."""

    model_config = ConfigDict(frozen=True)

    category: str | None = None
    billable: bool | None = None
    model: str | None = None


class StatusUpdate(BaseModel):
    """One entry of `statuses[]`: the delivery state of an outbound message."""

    model_config = ConfigDict(frozen=True)

    phone_number_id: str
    wamid: str = Field(min_length=1)
    status: Literal["sent", "delivered", "read", "failed", "deleted", "warning"] | str
    timestamp: int
    recipient_id: str | None = None
    errors: list[dict[str, Any]] = Field(default_factory=list)
    biz_opaque_callback_data: str | None = None
    pricing: Pricing | None = None
    raw: dict[str, Any] = Field(default_factory=dict)

    @field_validator("timestamp", mode="before")
    @classmethod
    def _numeric_timestamp(cls, value: object) -> int:
        return InboundMessage._numeric_timestamp(value)


@dataclass(frozen=True)
class RejectedMessage:
    """One message of an accepted body that cannot be stored (a value out of bounds): it goes to the quarantine
    with the reason, never into a statement shared with other messages. `envelope` is the message with its
    `metadata` and `contacts`, as a webhook `value` of its own, so a retry can parse it again on its own."""

    reason: str
    envelope: dict[str, Any]
    phone_number_id: str | None = None
    user_id: str | None = None
    wamid: str | None = None
