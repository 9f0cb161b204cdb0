"""Webhook body parsing: every documented shape normalizes exactly; every malformed body is a PayloadError.

Fixtures under tests/data/webhook/ are written from Meta's documented payload shapes (non-ASCII text
\\uXXXX-escaped as Meta sends it, except text_raw_utf8.json).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import bounds, payloads
from core.errors import PayloadError
from core.messages import InboundMessage, RejectedMessage
from core.payloads import MAX_BODY_BYTES, MAX_DEPTH, ParsedWebhook, parse_webhook, rejected_message
from core.quarantine import payload_text

DATA = Path(__file__).parent / "data" / "webhook"
FIXTURES = sorted(path.stem for path in DATA.glob("*.json"))

PN, PN2 = "100000000000111", "100000000000222"
USER, USER2 = "14155550101", "447700900123"
BSUID = "US.13491208655302741918"
NAME = "Sheena Nelson"
TS = 1767268800
PROMPT = "wamid.OUTBOUNDPROMPT001"


def load(name: str) -> bytes:
    return (DATA / f"{name}.json").read_bytes()


def parse(name: str) -> ParsedWebhook:
    return parse_webhook(load(name))


def raw_messages(name: str) -> list[dict[str, Any]]:
    doc = json.loads(load(name))
    return [m for e in doc["entry"] for c in e.get("changes", []) for m in c["value"].get("messages", [])]


def msg(wamid: str, **fields: Any) -> dict[str, Any]:
    """The expected normalized message: every field, defaults for a text from USER to PN."""
    expected: dict[str, Any] = {
        "phone_number_id": PN,
        "user_id": USER,
        "wamid": wamid,
        "timestamp": TS,
        "kind": "text",
        "text": None,
        "choice_id": None,
        "choice_title": None,
        "media": None,
        "location": None,
        "contacts": None,
        "order": None,
        "context_id": None,
        "profile_name": NAME,
        "reacted_to": None,
        "emoji": None,
        "new_user_id": None,
        "errors": None,
    }
    expected.update(fields)
    return expected


def media(**fields: Any) -> dict[str, Any]:
    return {"id": None, "mime_type": None, "caption": None, "filename": None, "sha256": None, "voice": False} | fields


def dump(message: InboundMessage) -> dict[str, Any]:
    return message.model_dump(exclude={"raw"})


LONG = ("ab \u20ac\u00e9\U0001f600\u4e16 " * 700)[:5000]
SAME = "Ol\u00e1, \u4e16\u754c \U0001f44b \u2014 \u00bfqu\u00e9 tal? \u05e9\u05dc\u05d5\u05dd"
FLOW_JSON = (
    '{"flow_token":"AQAAAAACS5FpgQ_cAAAAAD0QI3s.","delivery_rating":"4","comment_text":"R\u00e1pido \U0001f44d"}'
)
ERR_131051 = {
    "code": 131051,
    "title": "Message type unknown",
    "message": "Message type unknown",
    "error_data": {"details": "Message type is currently not supported."},
}
CARDS = json.loads(load("contacts"))["entry"][0]["changes"][0]["value"]["messages"][0]["contacts"]

MESSAGE_CASES: dict[str, list[dict[str, Any]]] = {
    "signature_example": [msg("wamid.TEST0001", text="hi", profile_name=None)],
    "text_ascii": [msg("wamid.TEXTASCII0000", text="Does it come in another color?")],
    "text_emoji": [
        msg(
            "wamid.TEXTEMOJI0000",
            text="Hi \U0001f44b\U0001f3fd family \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 "
            "flag \U0001f1f5\U0001f1f9 math \U0001d4b3 heart \u2764\ufe0f",
        )
    ],
    "text_rtl": [
        msg(
            "wamid.TEXTRTL00000",
            text="\u200f\u05de\u05d4 \u05e9\u05dc\u05d5\u05de\u05da?\u200e OK "
            "\u200f\u0645\u0631\u062d\u0628\u0627 123\u200e",
        )
    ],
    "text_nfd_nfc": [
        msg("wamid.TEXTNORM0000", text="Cafe\u0301 cre\u0300me"),
        msg("wamid.TEXTNORM0001", text="Caf\u00e9 cr\u00e8me", timestamp=TS + 1),
    ],
    "text_whitespace": [msg("wamid.TEXTWS000000", text="  line one\n\tline two\r\nline three  \n\n")],
    "text_long": [msg("wamid.TEXTLONG0000", text=LONG)],
    "text_escaped": [msg("wamid.TEXTSAME0000", text=SAME)],
    "text_raw_utf8": [msg("wamid.TEXTSAME0000", text=SAME)],
    "image_caption": [
        msg(
            "wamid.IMAGE0000001",
            kind="image",
            text="My receipt \U0001f9fe #42",
            media=media(
                id="1003383421387256",
                mime_type="image/jpeg",
                caption="My receipt \U0001f9fe #42",
                sha256="VjIAYXb0zb5E1+X7EqfqV8EFM4ULlZfKCEl5fCIWdZM=",
            ),
        )
    ],
    "document_filename": [
        msg(
            "wamid.DOCUMENT00001",
            kind="document",
            text="Signed contract",
            media=media(
                id="1219398839597826",
                mime_type="application/pdf",
                caption="Signed contract",
                filename="Invoice #42 (final) \u2014 M\u00e4rz 2026.pdf",
                sha256="WsDbRQp1m7Nlbh4lSv3Lx3AJhcWwBLw2lNa7Jm7Dqx8=",
            ),
        )
    ],
    "audio_voice": [
        msg(
            "wamid.AUDIOVOICE001",
            kind="audio",
            media=media(
                id="1016243240452478",
                mime_type="audio/ogg; codecs=opus",
                sha256="m04pFf2ERdaopTyFkGPA0+bX3i+YY2dYgVFwOgDLSDI=",
                voice=True,
            ),
        )
    ],
    "video": [
        msg(
            "wamid.VIDEO0000001",
            kind="video",
            text="How it arrived",
            media=media(
                id="765756756102030",
                mime_type="video/mp4",
                caption="How it arrived",
                sha256="Jh+2ij6PzUv/J2y+grrtegr/ZMzRxkEPwc24Oyib4s03w9Jc=",
            ),
        )
    ],
    "sticker": [
        msg(
            "wamid.STICKER000001",
            kind="sticker",
            media=media(
                id="1234567890987654",
                mime_type="image/webp",
                sha256="OmT4nhjUhCMIPNmj7eeOZeCYjTXkLxoOv85OMCFwSuc=",
            ),
        )
    ],
    "location": [
        msg(
            "wamid.LOCATION00001",
            kind="location",
            location={
                "latitude": -33.4430837,
                "longitude": -70.6545412,
                "name": "Palacio de La Moneda",
                "address": "Av. Libertador Bernardo O'Higgins 1449, Santiago, Chile",
                "url": "https://maps.example.com/?cid=1",
            },
        ),
        msg(
            "wamid.LOCATION00002",
            kind="location",
            timestamp=TS + 1,
            location={"latitude": -0.25, "longitude": -78.5, "name": None, "address": None, "url": None},
        ),
    ],
    "contacts": [msg("wamid.CONTACTS00001", kind="contacts", contacts=CARDS)],
    "interactive_button_reply": [
        msg(
            "wamid.BUTTONREPLY001",
            kind="interactive",
            choice_id="opt_yes",
            choice_title="Yes \u2705",
            context_id=PROMPT,
        )
    ],
    "interactive_list_reply": [
        msg(
            "wamid.LISTREPLY00001",
            kind="interactive",
            choice_id="plan_pro",
            choice_title="Pro plan",
            context_id=PROMPT,
        )
    ],
    "interactive_nfm_reply": [msg("wamid.NFMREPLY000001", kind="interactive", text=FLOW_JSON, context_id=PROMPT)],
    "interactive_missing_object": [msg("wamid.INTERACTNOOBJ1", kind="interactive", context_id=PROMPT)],
    "button_legacy": [
        msg(
            "wamid.BUTTONLEGACY1",
            kind="button",
            choice_id="STOP_PROMOTIONS",
            text="Stop promotions",
            context_id="wamid.OUTBOUNDTEMPLATE1",
        )
    ],
    "order": [
        msg(
            "wamid.ORDER000000001",
            kind="order",
            order={
                "catalog_id": "354160437058781",
                "text": "Please deliver after 6pm",
                "product_items": [
                    {"product_retailer_id": "SKU-HAMBURGER", "quantity": 2, "item_price": 12.5, "currency": "USD"},
                    {"product_retailer_id": "SKU-SODA", "quantity": 3, "item_price": 1.99, "currency": "USD"},
                    {"product_retailer_id": "SKU-GIFT", "quantity": 1, "item_price": 0, "currency": "USD"},
                ],
            },
        )
    ],
    "reaction": [
        msg("wamid.REACTION000001", kind="reaction", reacted_to="wamid.OUTBOUNDREACTED1", emoji="\u2764\ufe0f")
    ],
    "reaction_removed": [msg("wamid.REACTION000002", kind="reaction", reacted_to="wamid.OUTBOUNDREACTED1")],
    "system_user_changed_number": [
        msg(
            "wamid.SYSTEM00000001",
            kind="system",
            text=f"User {NAME} changed from {USER} to 14155550199",
            new_user_id="14155550199",
            profile_name=None,
        )
    ],
    "unsupported": [msg("wamid.UNSUPPORTED001", kind="unsupported", errors=[ERR_131051])],
    "unknown_legacy": [
        msg(
            "wamid.UNKNOWN0000001",
            kind="unknown",
            errors=[
                {
                    "code": 131051,
                    "details": "Message type is not currently supported",
                    "title": "Unsupported message type",
                }
            ],
        )
    ],
    "referral": [msg("wamid.REFERRAL000001", text="Can I get more info on this?")],
    "business_scoped_user": [
        msg("wamid.BSUID000000001", user_id=BSUID, text="hello from a username", profile_name="Sam")
    ],
    "two_business_numbers": [
        msg("wamid.TWONUMBERS0001", text="to number A"),
        msg("wamid.TWONUMBERS0002", phone_number_id=PN2, text="to number B", timestamp=TS - 5),
    ],
    "out_of_order": [
        msg("wamid.ORDERLY0000003", text="third", timestamp=TS + 60),
        msg("wamid.ORDERLY0000001", text="first", timestamp=TS),
        msg("wamid.ORDERLY0000002", text="second", timestamp=TS + 30),
        msg("wamid.ORDERLY0000004", text="same second as third", timestamp=TS + 60),
    ],
    "extra_unknown_fields": [
        msg("wamid.EXTRAFIELDS01", text="extra fields ignored"),
        msg(
            "wamid.EXTRAFIELDS02",
            kind="image",
            timestamp=TS + 1,
            media=media(id="99887766", mime_type="image/png"),
        ),
    ],
}

OUT_WAMID = "wamid.OUTBOUNDSTATUS01"


def status(wamid: str, status: str, timestamp: int, **fields: Any) -> dict[str, Any]:
    expected = {
        "phone_number_id": PN,
        "wamid": wamid,
        "status": status,
        "timestamp": timestamp,
        "recipient_id": USER,
        "errors": [],
        "biz_opaque_callback_data": None,
        "pricing": None,
    }
    return expected | fields


HREF = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"
SERVICE_PRICING = {"category": "service", "billable": True, "model": "PMP"}
STATUS_CASES: dict[str, list[dict[str, Any]]] = {
    "statuses": [
        status(OUT_WAMID, "sent", TS + 1, biz_opaque_callback_data="campaign=nudge;step=ask_email",
               pricing=SERVICE_PRICING),
        status(OUT_WAMID, "delivered", TS + 2, pricing=SERVICE_PRICING),
        status(OUT_WAMID, "read", TS + 3),
    ],
    "status_failed_131047": [
        status(
            "wamid.OUTBOUNDFAILED01",
            "failed",
            TS + 90000,
            errors=[
                {
                    "code": 131047,
                    "title": "Re-engagement message",
                    "message": "Re-engagement message",
                    "error_data": {
                        "details": "Message failed to send because more than 24 hours have passed since the "
                        "customer last replied to this number."
                    },
                    "href": HREF,
                }
            ],
        )
    ],
    "status_failed_131026": [
        status(
            "wamid.OUTBOUNDFAILED02",
            "failed",
            TS + 5,
            recipient_id=USER2,
            errors=[
                {
                    "code": 131026,
                    "title": "Message undeliverable",
                    "message": "Message undeliverable",
                    "error_data": {"details": "Message Undeliverable."},
                    "href": HREF,
                }
            ],
        )
    ],
    "extra_unknown_fields": [status(OUT_WAMID, "delivered", TS + 2)],
}

# Bodies that carry nothing to act on, and the note each leaves for the log.
QUIET_CASES: dict[str, tuple[str, list[str]]] = {
    "errors_only": ("whatsapp_business_account", ["entry[0].changes[0].value.errors: 131000 Something went wrong"]),
    "template_status_update": (
        "whatsapp_business_account",
        ["entry[0].changes[0]: ignored field 'message_template_status_update'"],
    ),
    "empty_changes": ("whatsapp_business_account", []),
    "object_page": ("page", ["ignored object 'page'"]),
}


def test_every_fixture_is_covered() -> None:
    covered = set(MESSAGE_CASES) | set(STATUS_CASES) | set(QUIET_CASES)
    assert set(FIXTURES) == covered


@pytest.mark.parametrize("name", sorted(MESSAGE_CASES))
def test_messages_normalize_exactly(name: str) -> None:
    parsed = parse(name)
    assert parsed.object == "whatsapp_business_account"
    assert parsed.relevant
    assert [dump(m) for m in parsed.messages] == MESSAGE_CASES[name]
    assert [m.raw for m in parsed.messages] == raw_messages(name)
    if name not in STATUS_CASES:
        assert parsed.statuses == []


@pytest.mark.parametrize("name", sorted(STATUS_CASES))
def test_statuses_normalize_exactly(name: str) -> None:
    parsed = parse(name)
    assert [s.model_dump(exclude={"raw"}) for s in parsed.statuses] == STATUS_CASES[name]
    value = json.loads(load(name))["entry"][0]["changes"][0]["value"]
    assert [s.raw for s in parsed.statuses] == value["statuses"]
    if name not in MESSAGE_CASES:
        assert parsed.messages == []


@pytest.mark.parametrize("name", sorted(QUIET_CASES))
def test_bodies_with_nothing_to_act_on_are_accepted(name: str) -> None:
    parsed = parse(name)
    expected_object, expected_notes = QUIET_CASES[name]
    assert (parsed.object, parsed.messages, parsed.statuses, parsed.notes) == (expected_object, [], [], expected_notes)
    assert parsed.relevant == (expected_object == "whatsapp_business_account")


def test_escaped_and_raw_utf8_bodies_give_identical_text() -> None:
    escaped, raw = load("text_escaped"), load("text_raw_utf8")
    assert escaped != raw
    assert escaped.isascii()
    assert not raw.isascii()
    assert parse("text_escaped").messages[0].text == parse("text_raw_utf8").messages[0].text == SAME


def test_text_is_kept_exactly_as_sent() -> None:
    nfd, nfc = parse("text_nfd_nfc").messages
    assert nfd.text != nfc.text  # NFD and NFC are not normalized into each other
    assert len(nfd.text or "") == len("Cafe\u0301 cre\u0300me")
    long_text = parse("text_long").messages[0].text or ""
    assert len(long_text) == 5000
    assert sum(ch > "\uffff" for ch in long_text) > 500  # astral characters counted once each


def test_shared_contact_cards_are_not_the_sender_profile() -> None:
    message = parse("contacts").messages[0]
    assert message.profile_name == NAME
    assert [card["name"]["formatted_name"] for card in message.contacts or []] == ["Barbara J. Johnson", "Zo\u00eb"]


def test_referral_and_unknown_fields_are_kept_in_raw() -> None:
    message = parse("referral").messages[0]
    assert message.raw["referral"]["ctwa_clid"] == "Afd9Wq3Y1m6PeSgYb6pbyNbL"
    extra = parse("extra_unknown_fields").messages[0]
    assert extra.user_id == USER  # `from` wins when from_user_id is also sent
    assert extra.raw["from_user_id"] == BSUID
    assert extra.raw["brand_new_object"] == {"deep": {"deeper": ["x"]}}


def test_kinds_route_as_the_spec_says() -> None:
    assert parse("interactive_button_reply").messages[0].moves_flow
    assert parse("button_legacy").messages[0].moves_flow
    assert parse("image_caption").messages[0].moves_flow
    for name in ("reaction", "reaction_removed", "system_user_changed_number", "unsupported", "unknown_legacy"):
        assert not parse(name).messages[0].moves_flow, name


def test_error_codes_of_unreadable_messages_are_noted() -> None:
    assert parse("unsupported").notes == ["message wamid.UNSUPPORTED001 (unsupported): 131051 Message type unknown"]
    assert parse("unknown_legacy").notes == ["message wamid.UNKNOWN0000001 (unknown): 131051 Unsupported message type"]
    assert parse("interactive_missing_object").notes == [
        "entry[0].changes[0].value.errors: 131000 Something went wrong"
    ]


def test_two_business_numbers_keep_their_own_session_keys() -> None:
    keys = [m.session_key for m in parse("two_business_numbers").messages]
    assert keys == [(PN, USER), (PN2, USER)]


def test_a_thousand_messages_in_one_post() -> None:
    messages = [
        {"from": f"1415555{i:04d}", "id": f"wamid.BATCH{i:04d}", "timestamp": str(TS + i % 7), "type": "text"}
        | {"text": {"body": f"message {i}"}}
        for i in range(1000)
    ]
    value = {"messaging_product": "whatsapp", "metadata": {"phone_number_id": PN}, "messages": messages}
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}],
    }
    parsed = parse_webhook(json.dumps(body).encode())
    assert [m.wamid for m in parsed.messages] == [f"wamid.BATCH{i:04d}" for i in range(1000)]
    assert parsed.messages[999].text == "message 999"


def test_parsed_webhook_is_frozen() -> None:
    parsed = parse("text_ascii")
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.object = "page"  # type: ignore[misc]


def test_limits() -> None:
    assert MAX_BODY_BYTES == 3 * 1024 * 1024 + 64 * 1024
    assert MAX_DEPTH == 64


# --------------------------------------------------------------------------- malformed bodies


def mutated(change: Callable[[dict[str, Any]], object], name: str = "text_ascii") -> bytes:
    doc = json.loads(load(name))
    change(doc)
    return json.dumps(doc).encode()


def V(doc: dict[str, Any]) -> dict[str, Any]:  # noqa: N802 - reads like a path in the table below
    return doc["entry"][0]["changes"][0]["value"]


def M(doc: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
    return V(doc)["messages"][0]


def S(doc: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
    return V(doc)["statuses"][0]


def nested(depth: int) -> bytes:
    inner = "[" * (depth - 1) + "]" * (depth - 1)  # the top-level object is level 1
    return ('{"object":"whatsapp_business_account","entry":[],"x":' + inner + "}").encode()


MSG = "entry[0].changes[0].value.messages[0]"
VALUE = "entry[0].changes[0].value"

MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "empty body"),
    ("whitespace", b" \r\n\t ", "empty body"),
    ("not-json", b"hello=world", "invalid JSON"),
    ("xml", b"<xml/>", "invalid JSON"),
    ("truncated", load("text_ascii")[:-12], "truncated JSON"),
    ("truncated-in-string", load("text_ascii")[:200], "truncated JSON"),
    ("trailing-garbage", load("text_ascii") + b"}", "invalid JSON"),
    ("invalid-utf8", load("text_ascii").replace(b"another", b"an\xffther"), "invalid UTF-8"),
    ("utf8-encoded-surrogate", load("text_ascii").replace(b"another", b"an\xed\xa0\x80"), "invalid UTF-8"),
    ("utf16-body", load("text_ascii").decode().encode("utf-16"), "invalid UTF-8"),
    ("top-level-array", b"[]", "top-level JSON must be an object, got array"),
    ("top-level-string", b'"whatsapp_business_account"', "top-level JSON must be an object, got string"),
    ("top-level-null", b"null", "top-level JSON must be an object, got null"),
    ("too-deep", nested(MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH}"),
    ("deep-3mb", b"[" * (3 * 1024 * 1024), "nested deeper"),
    ("deep-objects", b'{"a":' * 100_000, "nested deeper"),
    ("too-large", b" " * (MAX_BODY_BYTES + 1), "larger than"),
    ("missing-object", mutated(lambda d: d.pop("object")), "missing 'object'"),
    ("object-not-string", mutated(lambda d: d.update(object=1)), "body.object must be a string, got number"),
    ("missing-entry", mutated(lambda d: d.pop("entry")), "missing 'entry'"),
    ("entry-null", mutated(lambda d: d.update(entry=None)), "missing 'entry'"),
    ("entry-object", mutated(lambda d: d.update(entry={})), "body.entry must be an array, got object"),
    ("entry-item-string", mutated(lambda d: d.update(entry=["x"])), "entry[0] must be an object, got string"),
    ("changes-string", mutated(lambda d: d["entry"][0].update(changes="x")), "entry[0].changes must be an array"),
    ("change-number", mutated(lambda d: d["entry"][0].update(changes=[1])), "entry[0].changes[0] must be an object"),
    ("field-number", mutated(lambda d: d["entry"][0]["changes"][0].update(field=1)), "field must be a string"),
    ("value-missing", mutated(lambda d: d["entry"][0]["changes"][0].pop("value")), "missing 'value'"),
    ("value-array", mutated(lambda d: d["entry"][0]["changes"][0].update(value=[])), "value must be an object"),
    ("no-from", mutated(lambda d: M(d).pop("from")), f"{MSG}: message has neither 'from' nor 'from_user_id'"),
    ("empty-from", mutated(lambda d: M(d).update({"from": ""})), "neither 'from' nor 'from_user_id'"),
    ("from-number", mutated(lambda d: M(d).update({"from": 14155550101})), f"{MSG}.from must be a string"),
    ("from-user-id-list", mutated(lambda d: M(d).update(from_user_id=[])), "from_user_id must be a string"),
    (
        "new-wa-id-number",
        mutated(lambda d: M(d)["system"].update(new_wa_id=1), "system_user_changed_number"),
        "new_wa_id",
    ),
    ("recipient-user-id-number", mutated(lambda d: S(d).update(recipient_user_id=1), "statuses"), "recipient_user_id"),
    ("no-timestamp", mutated(lambda d: M(d).pop("timestamp")), f"{MSG}: missing 'timestamp'"),
    ("timestamp-word", mutated(lambda d: M(d).update(timestamp="yesterday")), "timestamp must be Unix seconds"),
    ("timestamp-float", mutated(lambda d: M(d).update(timestamp="1767268800.5")), "timestamp must be Unix seconds"),
    ("timestamp-negative", mutated(lambda d: M(d).update(timestamp="-1")), "timestamp must be Unix seconds"),
    ("timestamp-space", mutated(lambda d: M(d).update(timestamp=" 1767268800")), "timestamp must be Unix seconds"),
    ("timestamp-empty", mutated(lambda d: M(d).update(timestamp="")), "timestamp must be Unix seconds"),
    ("timestamp-arabic", mutated(lambda d: M(d).update(timestamp="\u0661\u0662\u0663")), "must be Unix seconds"),
    ("timestamp-int", mutated(lambda d: M(d).update(timestamp=TS)), "timestamp must be Unix seconds"),
    ("timestamp-bool", mutated(lambda d: M(d).update(timestamp=True)), "timestamp must be Unix seconds"),
    ("no-metadata", mutated(lambda d: V(d).pop("metadata")), f"{VALUE}: missing 'metadata.phone_number_id'"),
    ("no-phone-id", mutated(lambda d: V(d)["metadata"].pop("phone_number_id")), "missing 'metadata.phone_number_id'"),
    ("empty-phone-id", mutated(lambda d: V(d)["metadata"].update(phone_number_id="")), "metadata.phone_number_id"),
    ("phone-id-number", mutated(lambda d: V(d)["metadata"].update(phone_number_id=1)), "phone_number_id must be"),
    ("metadata-string", mutated(lambda d: V(d).update(metadata="x")), f"{VALUE}.metadata must be an object"),
    ("status-no-metadata", mutated(lambda d: V(d).pop("metadata"), "statuses"), "missing 'metadata.phone_number_id'"),
    ("no-id", mutated(lambda d: M(d).pop("id")), f"{MSG}: missing 'id'"),
    ("empty-id", mutated(lambda d: M(d).update(id="")), f"{MSG}: missing 'id'"),
    ("id-number", mutated(lambda d: M(d).update(id=7)), f"{MSG}.id must be a string, got number"),
    ("messages-string", mutated(lambda d: V(d).update(messages="hi")), f"{VALUE}.messages must be an array"),
    ("message-string", mutated(lambda d: V(d).update(messages=["hi"])), f"{MSG} must be an object, got string"),
    ("type-number", mutated(lambda d: M(d).update(type=1)), f"{MSG}.type must be a string"),
    ("text-number", mutated(lambda d: M(d).update(text=5)), f"{MSG}.text must be an object, got number"),
    ("text-body-number", mutated(lambda d: M(d)["text"].update(body=5)), f"{MSG}.text.body must be a string"),
    ("context-string", mutated(lambda d: M(d).update(context="x")), f"{MSG}.context must be an object"),
    ("context-id-list", mutated(lambda d: M(d).update(context={"id": []})), f"{MSG}.context.id must be a string"),
    ("errors-object", mutated(lambda d: M(d).update(errors={})), f"{MSG}.errors must be an array"),
    ("errors-item-string", mutated(lambda d: M(d).update(errors=["x"])), f"{MSG}.errors[0] must be an object"),
    ("value-errors-string", mutated(lambda d: V(d).update(errors="boom")), f"{VALUE}.errors must be an array"),
    ("contacts-object", mutated(lambda d: V(d).update(contacts={})), f"{VALUE}.contacts must be an array"),
    ("contact-name-number", mutated(lambda d: V(d)["contacts"][0]["profile"].update(name=3)), "profile.name must"),
    ("contact-wa-id-number", mutated(lambda d: V(d)["contacts"][0].update(wa_id=3)), "contacts[0].wa_id must be"),
    ("image-string", mutated(lambda d: M(d).update(image="x"), "image_caption"), f"{MSG}.image must be an object"),
    ("caption-number", mutated(lambda d: M(d)["image"].update(caption=1), "image_caption"), "image.caption must be"),
    ("voice-string", mutated(lambda d: M(d)["audio"].update(voice="yes"), "audio_voice"), "audio.voice must be a bool"),
    ("latitude-string", mutated(lambda d: M(d)["location"].update(latitude="-33.4"), "location"), "latitude must be"),
    ("latitude-bool", mutated(lambda d: M(d)["location"].update(latitude=True), "location"), "latitude must be"),
    ("no-longitude", mutated(lambda d: M(d)["location"].pop("longitude"), "location"), "missing 'longitude'"),
    (
        "reply-id-number",
        mutated(lambda d: M(d)["interactive"]["button_reply"].update(id=1), "interactive_button_reply"),
        f"{MSG}.interactive.button_reply.id must be a string",
    ),
    (
        "reply-object-list",
        mutated(lambda d: M(d)["interactive"].update(list_reply=[]), "interactive_list_reply"),
        "interactive.list_reply must be an object",
    ),
    (
        "nfm-json-object",
        mutated(lambda d: M(d)["interactive"]["nfm_reply"].update(response_json={}), "interactive_nfm_reply"),
        "nfm_reply.response_json must be a string",
    ),
    ("button-payload-number", mutated(lambda d: M(d)["button"].update(payload=1), "button_legacy"), "button.payload"),
    ("cards-object", mutated(lambda d: M(d).update(contacts={}), "contacts"), f"{MSG}.contacts must be an array"),
    ("items-object", mutated(lambda d: M(d)["order"].update(product_items={}), "order"), "product_items must be an"),
    ("item-number", mutated(lambda d: M(d)["order"].update(product_items=[1]), "order"), "product_items[0] must be"),
    ("emoji-number", mutated(lambda d: M(d)["reaction"].update(emoji=1), "reaction"), "reaction.emoji must be"),
    (
        "system-wa-id-number",
        mutated(lambda d: M(d)["system"].update(wa_id=1), "system_user_changed_number"),
        "system.wa_id must be a string",
    ),
    ("status-no-id", mutated(lambda d: S(d).pop("id"), "statuses"), f"{VALUE}.statuses[0]: missing 'id'"),
    ("status-no-status", mutated(lambda d: S(d).pop("status"), "statuses"), "missing 'status'"),
    ("status-timestamp", mutated(lambda d: S(d).update(timestamp="soon"), "statuses"), "must be Unix seconds"),
    ("status-errors-map", mutated(lambda d: S(d).update(errors={}), "statuses"), "statuses[0].errors must be"),
    ("statuses-number", mutated(lambda d: V(d).update(statuses=1), "statuses"), f"{VALUE}.statuses must be an array"),
]


@pytest.mark.parametrize(("body", "reason"), [(b, r) for _, b, r in MALFORMED], ids=[i for i, _, _ in MALFORMED])
def test_malformed_bodies_are_rejected_with_a_clear_reason(body: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_webhook(body)
    message = str(caught.value)
    assert reason in message
    assert "Traceback" not in message
    assert len(message) < 300


def test_every_prefix_of_a_body_is_rejected() -> None:
    body = load("interactive_button_reply").rstrip()
    for end in range(len(body)):
        with pytest.raises(PayloadError):
            parse_webhook(body[:end])


def test_depth_limit_is_exact() -> None:
    assert parse_webhook(nested(MAX_DEPTH)).relevant
    with pytest.raises(PayloadError, match="nested deeper"):
        parse_webhook(nested(MAX_DEPTH + 1))


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    tricky = '[[[{{{ \\" \\\\ "' * 4_000  # 60,000 characters: within MAX_TEXT_CHARS
    padding = tricky * 5  # 300,000 more where nothing is stored

    def put(d: dict[str, Any]) -> None:
        M(d)["text"]["body"] = tricky
        d["padding"] = padding

    assert parse_webhook(mutated(put)).messages[0].text == tricky


@pytest.mark.parametrize(
    "body",
    [
        b"[" * (3 * 1024 * 1024),
        b"{" * (3 * 1024 * 1024),
        b'{"a":' * (600 * 1024),
        b"[]" * (1536 * 1024),
        (b"[" * 64 + b"]" * 64) * (24 * 1024),
        b'"' + b'\\"' * (1536 * 1024),
        b'"' * (3 * 1024 * 1024),
    ],
    ids=["open-brackets", "open-braces", "open-objects", "pairs", "deep-blocks", "escaped-quotes", "quotes"],
)
def test_huge_hostile_bodies_return_promptly(body: bytes) -> None:
    with pytest.raises(PayloadError):
        parse_webhook(body)


# --------------------------------------------------------------------------- bounds: held, not refused

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
NOW_TS = int(NOW.timestamp())


def with_neighbour(change: Callable[[dict[str, Any]], object], name: str = "text_ascii") -> bytes:
    """The fixture's first message changed by `change`, followed by a clean message of another user."""

    def both(d: dict[str, Any]) -> None:
        clean = {"from": USER2, "id": "wamid.NEIGHBOUR0001", "timestamp": str(TS), "type": "text",
                 "text": {"body": "fine"}}
        V(d)["messages"].append(clean)
        V(d).setdefault("contacts", []).append({"profile": {"name": "Neighbour"}, "wa_id": USER2})
        change(d)

    return mutated(both, name)


def located(**location: Any) -> Callable[[dict[str, Any]], object]:
    return lambda d: M(d)["location"].update(location)


LONG = 10**309  # 310 digits
QUARANTINED: list[tuple[str, bytes, str]] = [
    ("nul-text", with_neighbour(lambda d: M(d)["text"].update(body="a\x00b")), "message.text.body contains a NUL"),
    ("nul-wamid", with_neighbour(lambda d: M(d).update(id="wamid.\x00")), "message.id contains a NUL character"),
    ("nul-key", with_neighbour(lambda d: M(d).update({"x\x00": 1})), "(a key) contains a NUL character"),
    ("nul-profile", with_neighbour(lambda d: V(d)["contacts"][0]["profile"].update(name="Ann\x00")),
     "the sender's profile name (contacts[].profile.name) contains a NUL character"),
    ("surrogate-text", with_neighbour(lambda d: M(d)["text"].update(body="a\ud83d")),
     "message.text.body contains an unpaired UTF-16 surrogate"),
    ("surrogate-escape", with_neighbour(lambda d: None).replace(b"another", b"\\ud83d"), "unpaired UTF-16 surrogate"),
    ("wamid-300", with_neighbour(lambda d: M(d).update(id="w" * 300)), "message.id is longer than 256 characters"),
    ("from-200", with_neighbour(lambda d: M(d).update({"from": "1" * 200})),
     "message.from is longer than 128 characters (200)"),
    ("from-user-id-200", with_neighbour(lambda d: (M(d).pop("from"), M(d).update(from_user_id="U" * 200))),
     "message.from_user_id is longer than 128 characters"),
    ("type-60", with_neighbour(lambda d: M(d).update(type="t" * 60)), "message.type is longer than 32 characters (60)"),
    ("context-id-300", with_neighbour(lambda d: M(d).update(context={"id": "c" * 300})),
     "message.context.id is longer than 256"),
    ("profile-300", with_neighbour(lambda d: V(d)["contacts"][0]["profile"].update(name="n" * 300)),
     "profile name (contacts[].profile.name) is longer than 256 characters (300)"),
    ("text-too-long", with_neighbour(lambda d: M(d)["text"].update(body="x" * (bounds.MAX_TEXT_CHARS + 1))),
     f"message.text.body is longer than {bounds.MAX_TEXT_CHARS} characters"),
    ("latitude-310-digits", with_neighbour(located(latitude=LONG), "location"),
     "message.location.latitude is out of range (a 310-digit integer)"),
    ("latitude-91", with_neighbour(located(latitude=91), "location"), "location.latitude 91.0 is outside -90..90"),
    ("longitude-181", with_neighbour(located(longitude=-180.5), "location"), "longitude -180.5 is outside -180..180"),
    ("number-2**63", with_neighbour(lambda d: M(d).update(extra=2**63)), "message.extra is out of range"),
    ("huge-float", with_neighbour(lambda d: M(d).update(extra=0.5)).replace(b"0.5", b"1e400"),
     "message.extra is not a finite number (inf)"),
    ("nan", with_neighbour(lambda d: M(d).update(extra=0.5)).replace(b"0.5", b"NaN"), "not a finite number (nan)"),
    ("int-5000-digits", with_neighbour(lambda d: M(d).update(extra=0.5)).replace(b"0.5", b"9" * 5000),
     "message.extra is not a finite number (inf)"),
    ("nested-number", with_neighbour(lambda d: M(d).update(order={"product_items": [{"quantity": LONG}]}), "order"),
     "message.order.product_items[0].quantity is out of range"),
    ("timestamp-9999", with_neighbour(lambda d: M(d).update(timestamp="253402300799")),
     "message.timestamp 253402300799 is after 9999-01-01"),
    ("timestamp-19-digits", with_neighbour(lambda d: M(d).update(timestamp="9" * 19)), "is after 9999-01-01"),
    ("timestamp-5000-digits", with_neighbour(lambda d: M(d).update(timestamp="9" * 5000)), "(5000 digits) is after"),
    ("timestamp-2-days-ahead", with_neighbour(lambda d: M(d).update(timestamp=str(NOW_TS + 2 * 86400))),
     "is more than 24 hours ahead of the receiving clock"),
    ("phone-number-id-70", with_neighbour(lambda d: V(d)["metadata"].update(phone_number_id="9" * 70)),
     "metadata.phone_number_id is longer than 64 characters (70)"),
]


@pytest.mark.parametrize(("body", "reason"), [(b, r) for _, b, r in QUARANTINED], ids=[i for i, _, _ in QUARANTINED])
def test_a_message_out_of_bounds_is_held_with_the_reason_and_its_neighbours_accepted(body: bytes, reason: str) -> None:
    parsed = parse_webhook(body, now=NOW)
    assert parsed.rejected, parsed
    assert reason in parsed.rejected[0].reason
    if "phone_number_id" in reason:  # the value's own bound: every message of it is held
        assert (parsed.messages, len(parsed.rejected)) == ([], 2)
        return
    sent = V(payloads._load_json(body))["messages"]  # as the parser reads it (9 * 5000 is not a Python int)
    assert [m.wamid for m in parsed.messages] == [m["id"] for m in sent[1:]]
    assert len(parsed.rejected) == 1
    held = parsed.rejected[0]
    assert held.envelope["messages"] == [sent[0]] or "(nan)" in reason  # NaN != NaN
    sender = sent[0].get("from") or sent[0]["from_user_id"]
    assert (held.phone_number_id, held.wamid, held.user_id) == (PN, sent[0]["id"], sender)


@pytest.mark.parametrize(("body", "reason"), [(b, r) for _, b, r in QUARANTINED], ids=[i for i, _, _ in QUARANTINED])
def test_a_held_message_parsed_again_as_its_own_value_is_held_with_the_same_reason(body: bytes, reason: str) -> None:
    held = parse_webhook(body, now=NOW).rejected[0]
    # As core.quarantine stores and retries it: ASCII JSON text, parsed back, wrapped in an envelope of its own.
    value = json.loads(payload_text(held.envelope))
    again = parse_webhook(json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "q", "changes": [
        {"field": "messages", "value": value}]}]}).encode(), now=NOW)
    assert again.messages == []
    assert [r.reason for r in again.rejected] == [held.reason]
    assert set(held.envelope) == {"messaging_product", "metadata", "contacts", "messages"}
    assert [c.get("wa_id") or c.get("user_id") for c in held.envelope["contacts"]] in ([], [held.user_id])


def test_bounds_are_met_exactly() -> None:
    def body(**fields: Any) -> bytes:
        return mutated(lambda d: M(d).update(fields))

    edge = [
        body(id="w" * bounds.MAX_WAMID_CHARS),
        body(**{"from": "1" * bounds.MAX_USER_ID_CHARS}),
        body(type="t" * bounds.MAX_KIND_CHARS),
        body(text={"body": "x" * bounds.MAX_TEXT_CHARS}),
        body(timestamp="0"),  # old messages and replays stay valid
        body(timestamp="0001767268800"),
        body(timestamp=str(NOW_TS + bounds.MAX_SECONDS_AHEAD)),
        body(timestamp=str(bounds.MAX_TIMESTAMP)),  # without a clock, only the absolute bound
        body(extra=[bounds.MAX_JSON_NUMBER, -bounds.MAX_JSON_NUMBER, 1e18, -0.0, 5e-324]),
        mutated(lambda d: M(d)["location"].update(latitude=-90, longitude=180.0), "location"),
        mutated(lambda d: V(d)["contacts"][0]["profile"].update(name="n" * bounds.MAX_PROFILE_NAME_CHARS)),
        mutated(lambda d: V(d)["metadata"].update(phone_number_id="9" * bounds.MAX_PHONE_NUMBER_ID_CHARS)),
    ]
    for i, raw in enumerate(edge):
        parsed = parse_webhook(raw, now=None if i == 7 else NOW)
        assert parsed.messages, i
        assert parsed.rejected == [], i


def test_non_finite_and_huge_numbers_outside_messages_are_ignored() -> None:
    for literal in (b"NaN", b"-Infinity", b"1e400", b"9" * 5000):
        body = b'{"object":"whatsapp_business_account","entry":[],"x":' + literal + b"}"
        assert parse_webhook(body).relevant


def test_an_object_name_is_echoed_back_safely() -> None:
    long_name = parse_webhook(json.dumps({"object": "p" * 1000, "entry": []}).encode())
    assert len(long_name.object) == 100
    surrogate = parse_webhook(b'{"object":"page\\ud83d","entry":[]}')
    assert (surrogate.object, surrogate.relevant) == ("page\\ud83d", False)
    surrogate.object.encode("utf-8")


STATUS_SKIPPED: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    ("id-300", lambda s: s.update(id="w" * 300), "status.id is longer than 256"),
    ("id-nul", lambda s: s.update(id="wamid.\x00"), "status.id contains a NUL character"),
    ("status-20", lambda s: s.update(status="s" * 20), "status.status is longer than 16"),
    ("recipient-200", lambda s: s.update(recipient_id="1" * 200), "status.recipient_id is longer than 128"),
    ("timestamp-9999", lambda s: s.update(timestamp="253402300799"), "status.timestamp 253402300799 is after"),
    ("errors-nul", lambda s: s.update(errors=[{"code": 1, "title": "a\x00"}]), "status.errors[0].title contains"),
    ("code-2**40", lambda s: s.update(errors=[{"code": 2**40}]), "status.errors[0].code is out of range"),
    ("code-digits", lambda s: s.update(errors=[{"code": "9" * 12}]), "is not an error code"),
    ("code-superscript", lambda s: s.update(errors=[{"code": "\u00b2"}]), "is not an error code"),
    ("opaque-superscript", lambda s: s.update(biz_opaque_callback_data="\u00b2"), "is not an outbox id"),
    ("opaque-30-digits", lambda s: s.update(biz_opaque_callback_data="9" * 30), "is not an outbox id"),
    ("opaque-600", lambda s: s.update(biz_opaque_callback_data="o" * 600), "longer than 512"),
]


@pytest.mark.parametrize(
    ("change", "reason"), [(c, r) for _, c, r in STATUS_SKIPPED], ids=[i for i, _, _ in STATUS_SKIPPED]
)
def test_a_status_out_of_bounds_is_skipped_with_a_note(change: Callable[[dict[str, Any]], object], reason: str) -> None:
    clean = parse("statuses")
    parsed = parse_webhook(mutated(lambda d: change(S(d)), "statuses"), now=NOW)
    assert [s.wamid for s in parsed.statuses] == [s.wamid for s in clean.statuses[1:]]
    skipped = [note for note in parsed.notes if note.startswith(f"{VALUE}.statuses[0]: status skipped: ")]
    assert len(skipped) == 1
    assert reason in skipped[0]
    assert parsed.rejected == []


def test_a_message_the_database_refused_is_rebuilt_as_a_value_of_its_own() -> None:
    message = parse("text_ascii").messages[0]
    held = rejected_message(message, "could not be stored: 'value too long'")
    assert isinstance(held, RejectedMessage)
    again = parse_webhook(json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "q", "changes": [
        {"field": "messages", "value": held.envelope}]}]}).encode())
    assert again.messages == [message]
    assert (held.phone_number_id, held.user_id, held.wamid) == (PN, USER, message.wamid)


def test_a_parser_bug_met_by_one_message_holds_that_message_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(payload: dict[str, Any], path: str) -> dict[str, Any]:
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(payloads._NORMALIZERS, "location", bug)
    parsed = parse_webhook(with_neighbour(lambda d: None, "location"))
    assert [m.wamid for m in parsed.messages] == ["wamid.NEIGHBOUR0001"]
    assert [r.reason for r in parsed.rejected] == ["message could not be parsed (ZeroDivisionError)"] * 2


# --------------------------------------------------------------------------- properties: only PayloadError escapes


def outcome(body: bytes) -> ParsedWebhook | PayloadError:
    try:
        parsed = parse_webhook(body, now=NOW)
    except PayloadError as e:
        error = e
    else:
        assert isinstance(parsed, ParsedWebhook)
        assert_storable(parsed)
        return parsed
    assert str(error)
    return error


def assert_storable(parsed: ParsedWebhook) -> None:
    """What the parser accepts fits the columns and PostgreSQL's TEXT/JSONB; what it holds can be held."""
    for message in parsed.messages:
        document = message.model_dump_json()  # raises on a lone surrogate
        assert "\\u0000" not in document
        lengths = [len(message.phone_number_id), len(message.user_id), len(message.wamid), len(message.kind)]
        assert all(a <= b for a, b in zip(lengths, [64, 128, 256, 32], strict=True))
        assert len(message.profile_name or "") <= 256
        assert message.timestamp <= NOW_TS + 86400
    for status in parsed.statuses:
        assert "\x00" not in status.wamid + status.status + (status.recipient_id or "")
        assert len(status.status) <= 16
        json.dumps(status.errors, allow_nan=False).encode()
    for held in parsed.rejected:
        assert held.reason
        assert "\x00" not in held.reason
        payload_text(held.envelope).encode("ascii")


KEYS = [
    "object", "entry", "id", "changes", "field", "value", "metadata", "phone_number_id", "contacts", "profile",
    "name", "wa_id", "user_id", "messages", "statuses", "from", "from_user_id", "timestamp", "type", "text",
    "body", "interactive", "button_reply", "list_reply", "nfm_reply", "response_json", "title", "button",
    "payload", "image", "audio", "voice", "caption", "location", "latitude", "longitude", "order",
    "product_items", "reaction", "emoji", "message_id", "system", "errors", "code", "context", "status",
]  # fmt: skip
WORDS = [
    "whatsapp_business_account", "messages", "text", "interactive", "button_reply", "list_reply", "nfm_reply",
    "button", "image", "audio", "location", "contacts", "order", "reaction", "system", "unsupported",
    "user_changed_number", "sent", "failed", "1767268800", "100000000000111", "wamid.X", "",
]  # fmt: skip
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(WORDS)
)
json_values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_random_json_never_raises_anything_but_payload_error(value: Any) -> None:
    outcome(json.dumps(value).encode())


@settings(max_examples=200, deadline=None)
@given(entry=json_values)
def test_random_entries_under_a_valid_envelope(entry: Any) -> None:
    outcome(json.dumps({"object": "whatsapp_business_account", "entry": [entry]}).encode())


def containers(doc: Any) -> Iterator[tuple[dict[str, Any] | list[Any], Any]]:
    """Every (container, key) slot in the document, walked without recursion."""
    stack = [doc]
    while stack:
        node = stack.pop()
        slots = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, child in slots:
            yield node, key
            stack.append(child)


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    doc = json.loads(load(draw(st.sampled_from(FIXTURES))))
    for _ in range(draw(st.integers(1, 3))):
        slots = list(containers(doc))
        if not slots:
            break
        node, key = draw(st.sampled_from(slots))
        if isinstance(node, dict) and draw(st.booleans()):
            del node[key]
        else:
            node[key] = draw(json_values)
    return json.dumps(doc, ensure_ascii=draw(st.booleans())).encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=mutated_bodies())
def test_mutated_valid_bodies_never_raise_anything_but_payload_error(body: bytes) -> None:
    outcome(body)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(FIXTURES),
    position=st.integers(min_value=0),
    junk=st.binary(min_size=0, max_size=4),
    cut=st.booleans(),
)
def test_byte_level_damage_never_raises_anything_but_payload_error(
    name: str, position: int, junk: bytes, cut: bool
) -> None:
    body = load(name)
    i = position % (len(body) + 1)
    outcome(body[:i] if cut else body[:i] + junk + body[i + 1 :])


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_payload_error(body: bytes) -> None:
    outcome(body)
