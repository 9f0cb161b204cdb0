"""The webhook service through its ASGI app, on SQLite and PostgreSQL: every rule and row of WEBHOOK.md.

Each test runs the real app (lifespan included) with `background=False`, so a 200 means the messages were
stored *and* applied; assertions read the admin API and, for "no trace", every table directly.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import select, text, update

from core.config import Settings
from core.db import Database
from core.flows import FlowRegistry
from core.models import Outbox
from core.payloads import MAX_BODY_BYTES
from core.signature import sign
from core.webhook import create_app
from core.worker import ApplyWorker
from tests.conftest import free_port, make_settings

DATA = Path(__file__).parent / "data" / "webhook"
SECRET = "test-app-secret"
VERIFY = "test-verify-token"
ADMIN = {"Authorization": "Bearer test-admin-token"}
PN, PN2 = "100000000000111", "100000000000222"
USER, NEW_USER = "14155550101", "14155550199"
BSUID = "US.13491208655302741918"
TS = 1767268800
WABA = "whatsapp_business_account"
# Every table a webhook request can write to (webhook_stats only counts requests, it holds no payload).
TABLES = ("sessions", "inbound_events", "transitions", "outbox", "message_status", "message_status_events")


def load(name: str) -> bytes:
    return (DATA / f"{name}.json").read_bytes()


def dumps(doc: Any) -> bytes:
    """Compact and `\\uXXXX`-escaped, as Meta sends it."""
    return json.dumps(doc, separators=(",", ":")).encode()


def envelope(*values: dict[str, Any], object_: str = WABA, field: str = "messages") -> bytes:
    changes = [{"value": v, "field": field} for v in values]
    return dumps({"object": object_, "entry": [{"id": "109876543210001", "changes": changes}]})


def value(
    messages: list[dict[str, Any]] | None = None,
    statuses: list[dict[str, Any]] | None = None,
    phone: str = PN,
) -> dict[str, Any]:
    v: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": phone},
    }
    if messages is not None:
        v["contacts"] = [{"profile": {"name": "Test User"}, "wa_id": m["from"]} for m in messages if "from" in m]
        v["messages"] = messages
    if statuses is not None:
        v["statuses"] = statuses
    return v


def text_msg(wamid: str, body: str, ts: int = TS, user: str = USER, **extra: Any) -> dict[str, Any]:
    return {"from": user, "id": wamid, "timestamp": str(ts), "type": "text", "text": {"body": body}, **extra}


def button_msg(wamid: str, choice: str, title: str, ts: int, context: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "from": USER,
        "id": wamid,
        "timestamp": str(ts),
        "type": "interactive",
        "interactive": {"type": "button_reply", "button_reply": {"id": choice, "title": title}},
    }
    if context:
        msg["context"] = {"from": "15550001111", "id": context}
    return msg


def status_obj(wamid: str, status: str, ts: int, recipient: str = USER, code: int | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": wamid, "status": status, "timestamp": str(ts), "recipient_id": recipient}
    if code is not None:
        obj["errors"] = [{"code": code, "title": f"error {code}"}]
    return obj


class Hook:
    """A TestClient on the app plus direct reads of its database."""

    def __init__(self, client: TestClient, settings: Settings) -> None:
        self.client = client
        self.db = Database(settings.database_url)

    def post(self, body: bytes, *, secret: str | None = SECRET, headers: dict[str, str] | None = None) -> Any:
        sent = {"Content-Type": "application/json"}
        if secret is not None:
            sent["X-Hub-Signature-256"] = sign(body, secret)
        sent.update(headers or {})
        return self.client.post("/webhook", content=body, headers=sent)

    def ok(self, body: bytes) -> dict[str, Any]:
        response = self.post(body)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def session(self, user: str = USER, phone: str = PN) -> dict[str, Any]:
        response = self.client.get(f"/admin/sessions/{phone}/{user}", headers=ADMIN)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def no_session(self, user: str = USER, phone: str = PN) -> None:
        assert self.client.get(f"/admin/sessions/{phone}/{user}", headers=ADMIN).status_code == 404

    def outbound(self, wamid: str) -> dict[str, Any]:
        response = self.client.get(f"/admin/outbound/{wamid}", headers=ADMIN)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def counts(self) -> dict[str, int]:
        with self.db.engine.connect() as conn:
            return {t: int(conn.scalar(text(f"SELECT count(*) FROM {t}")) or 0) for t in TABLES}

    def assert_empty(self) -> None:
        assert self.counts() == dict.fromkeys(TABLES, 0)

    def transitions(self, wamid: str | None = None) -> list[tuple[str, str, str]]:
        sql = "SELECT wamid, user_id, phone_number_id FROM transitions"
        with self.db.engine.connect() as conn:
            if wamid is None:
                return [tuple(r) for r in conn.execute(text(sql + " ORDER BY id"))]
            return [tuple(r) for r in conn.execute(text(sql + " WHERE wamid = :w ORDER BY id"), {"w": wamid})]

    def stored_message(self, wamid: str) -> dict[str, Any]:
        with self.db.engine.connect() as conn:
            raw = conn.scalar(text("SELECT message FROM inbound_events WHERE wamid = :w"), {"w": wamid})
        return json.loads(raw) if isinstance(raw, str) else dict(raw)

    def event_result(self, wamid: str) -> str | None:
        with self.db.engine.connect() as conn:
            return conn.scalar(text("SELECT result FROM inbound_events WHERE wamid = :w"), {"w": wamid})


def open_hook(settings: Settings, registry: FlowRegistry) -> Iterator[Hook]:
    with TestClient(create_app(settings, flows=registry, background=False)) as client:
        hook = Hook(client, settings)
        try:
            yield hook
        finally:
            hook.db.dispose()


@pytest.fixture
def hook(settings: Settings, registry: FlowRegistry) -> Iterator[Hook]:
    yield from open_hook(settings, registry)


@pytest.fixture
def booking_hook(database_url: str, flows_dir: Path, registry: FlowRegistry) -> Iterator[Hook]:
    yield from open_hook(make_settings(database_url, flows_dir, default_flow="service_booking"), registry)


# ---------------------------------------------------------------------------------------------- handshake


def handshake(hook: Hook, **params: str) -> Any:
    return hook.client.get("/webhook", params=params)


def test_handshake_echoes_the_challenge_exactly(hook: Hook) -> None:
    for challenge in ["1158201444", "0042", "abc-XYZ_123", "12345678901234567890123", "ünï"]:
        response = handshake(hook, **{"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": challenge})
        assert response.status_code == 200
        assert response.text == challenge  # "0042" stays "0042": never converted to int
        assert response.headers["content-type"].startswith("text/plain")


def test_handshake_wrong_token_is_403_without_the_challenge(hook: Hook) -> None:
    for token in ["wrong", VERIFY + "x", VERIFY[:-1], "", VERIFY.upper()]:
        params = {"hub.mode": "subscribe", "hub.verify_token": token, "hub.challenge": "CH4LL3NGE"}
        response = handshake(hook, **params)
        assert response.status_code == 403, token
        assert "CH4LL3NGE" not in response.text


INCOMPLETE_HANDSHAKES: list[dict[str, str]] = [
    {"hub.verify_token": VERIFY, "hub.challenge": "CH4LL3NGE"},
    {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY, "hub.challenge": "CH4LL3NGE"},
    {"hub.mode": "SUBSCRIBE ", "hub.verify_token": VERIFY, "hub.challenge": "CH4LL3NGE"},
    {"hub.mode": "subscribe", "hub.challenge": "CH4LL3NGE"},
    {"hub.mode": "subscribe", "hub.verify_token": VERIFY},
    {},
]


def test_handshake_incomplete_request_is_refused(hook: Hook) -> None:
    for params in INCOMPLETE_HANDSHAKES:
        response = handshake(hook, **params)
        assert response.status_code in (400, 403), params
        assert "CH4LL3NGE" not in response.text
        assert "error" in response.json()


def test_handshake_without_configured_token_is_always_403(
    database_url: str, flows_dir: Path, registry: FlowRegistry
) -> None:
    settings = make_settings(database_url, flows_dir, whatsapp_verify_token="")
    for hook in open_hook(settings, registry):
        for token in ["", "anything", VERIFY, "test-verify-token"]:
            params = {"hub.mode": "subscribe", "hub.verify_token": token, "hub.challenge": "CH4LL"}
            response = handshake(hook, **params)
            assert response.status_code == 403
            assert "CH4LL" not in response.text
        assert handshake(hook, **{"hub.mode": "subscribe", "hub.challenge": "CH4LL"}).status_code == 403


# ---------------------------------------------------------------------------------------------- signature


def test_worked_signature_example(database_url: str, flows_dir: Path, registry: FlowRegistry) -> None:
    body = load("signature_example")
    header = "sha256=cec7948a4e436db36ddb10c499f309c31ea80459c171e859b1b942803b74e7a4"
    assert len(body) == 351
    assert not body.endswith(b"\n")
    assert sign(body, "acceptance-app-secret-0001") == header
    settings = make_settings(database_url, flows_dir, whatsapp_app_secret="acceptance-app-secret-0001")
    for hook in open_hook(settings, registry):
        response = hook.post(body, secret=None, headers={"X-Hub-Signature-256": header})
        assert response.status_code == 200, response.text
        assert hook.transitions("wamid.TEST0001") == [("wamid.TEST0001", USER, PN)]
        assert hook.session()["inbound"][0]["text"] == "hi"
        # The same bytes under the test suite's usual secret are not this app's.
        assert hook.post(body, secret=SECRET).status_code == 401


def _bad_signature_cases(body: bytes) -> dict[str, dict[str, str]]:
    good = sign(body, SECRET)
    changed = body[:-2] + bytes([body[-2] ^ 1]) + body[-1:]
    sha1 = "sha1=" + "0" * 40
    return {
        "missing": {},
        "zeros": {"X-Hub-Signature-256": "sha256=" + "0" * 64},
        "wrong secret": {"X-Hub-Signature-256": sign(body, "not-the-secret")},
        "sha1 only": {"X-Hub-Signature": sha1},
        "sha1 in the sha256 header": {"X-Hub-Signature-256": sha1},
        "no prefix": {"X-Hub-Signature-256": good.removeprefix("sha256=")},
        "truncated hex": {"X-Hub-Signature-256": good[:-1]},
        "extra hex": {"X-Hub-Signature-256": good + "0"},
        "empty": {"X-Hub-Signature-256": ""},
        "signature of one changed byte": {"X-Hub-Signature-256": sign(changed, SECRET)},
    }


def test_bad_signatures_are_401_and_leave_no_trace(hook: Hook) -> None:
    body = load("signature_example")
    for case, headers in _bad_signature_cases(body).items():
        response = hook.post(body, secret=None, headers=headers)
        assert response.status_code == 401, case
        assert set(response.json()) == {"error"}
        hook.assert_empty()


def test_one_changed_body_byte_is_401(hook: Hook) -> None:
    body = load("text_ascii")
    header = sign(body, SECRET)
    tampered = body.replace(b"color", b"colour")[: len(body)]
    flipped = body[:100] + bytes([body[100] ^ 0x01]) + body[101:]
    for changed in (tampered, flipped, body + b" "):
        assert hook.post(changed, secret=None, headers={"X-Hub-Signature-256": header}).status_code == 401
    hook.assert_empty()


def test_signature_is_checked_before_parsing(hook: Hook) -> None:
    response = hook.post(b"not json at all", secret="wrong-secret")
    assert response.status_code == 401  # not 400: an unsigned body is never parsed


def test_uppercase_hex_is_accepted(hook: Hook) -> None:
    body = load("text_ascii")
    header = "sha256=" + sign(body, SECRET).removeprefix("sha256=").upper()
    assert hook.post(body, secret=None, headers={"X-Hub-Signature-256": header}).status_code == 200
    assert len(hook.transitions("wamid.TEXTASCII0000")) == 1


def test_several_secrets_during_rotation(database_url: str, flows_dir: Path, registry: FlowRegistry) -> None:
    settings = make_settings(database_url, flows_dir, whatsapp_app_secret="old-secret, new-secret")
    for hook in open_hook(settings, registry):
        old = envelope(value([text_msg("wamid.ROT1", "signed with the old secret")]))
        new = envelope(value([text_msg("wamid.ROT2", "signed with the new secret", ts=TS + 1)]))
        other = envelope(value([text_msg("wamid.ROT3", "signed with neither", ts=TS + 2)]))
        assert hook.post(old, secret="old-secret").status_code == 200
        assert hook.post(new, secret="new-secret").status_code == 200
        assert hook.post(other, secret="old-secret,new-secret").status_code == 401
        assert hook.post(other, secret=SECRET).status_code == 401
        assert [t[0] for t in hook.transitions()] == ["wamid.ROT1", "wamid.ROT2"]


def test_genuine_message_after_rejected_attempts_applies_exactly_once(hook: Hook) -> None:
    body = load("text_ascii")
    for headers in _bad_signature_cases(body).values():
        assert hook.post(body, secret=None, headers=headers).status_code == 401
    hook.assert_empty()  # the wamid was not marked seen by any rejected attempt
    assert hook.ok(body)["stored"] == 1
    assert hook.ok(body)["duplicates"] == 1  # Meta's retry of the same delivery
    assert len(hook.transitions("wamid.TEXTASCII0000")) == 1
    assert hook.session()["version"] == 1


# ---------------------------------------------------------------------------------------------- delivery


def test_duplicate_with_other_bytes_is_one_transition(hook: Hook) -> None:
    body = load("text_emoji")
    reserialized = json.dumps(json.loads(body), indent=2, ensure_ascii=False).encode()
    assert reserialized != body
    assert hook.ok(body)["stored"] == 1
    assert hook.ok(reserialized) == {"status": "ok", "stored": 0, "duplicates": 1, "statuses": 0}
    assert len(hook.transitions("wamid.TEXTEMOJI0000")) == 1
    assert hook.session()["version"] == 1


def test_same_wamid_on_two_business_numbers_is_two_messages(hook: Hook) -> None:
    # Dedupe is scoped by phone_number_id: the same id under another number is another message.
    hook.ok(envelope(value([text_msg("wamid.SHARED", "a")], phone=PN)))
    hook.ok(envelope(value([text_msg("wamid.SHARED", "b")], phone=PN2)))
    assert sorted(hook.transitions("wamid.SHARED")) == [("wamid.SHARED", USER, PN), ("wamid.SHARED", USER, PN2)]


def test_out_of_order_batch_applies_in_timestamp_order(hook: Hook) -> None:
    hook.ok(load("out_of_order"))
    expected = ["wamid.ORDERLY0000001", "wamid.ORDERLY0000002", "wamid.ORDERLY0000003", "wamid.ORDERLY0000004"]
    assert [t[0] for t in hook.transitions()] == expected  # ties (…03, …04) keep arrival order
    session = hook.session()
    assert [m["wamid"] for m in session["inbound"]] == expected
    assert [t["wamid"] for t in session["transitions"]] == expected
    assert [m["text"] for m in session["inbound"]] == ["first", "second", "third", "same second as third"]
    assert session["version"] == 4
    assert hook.ok(load("out_of_order"))["duplicates"] == 4
    assert len(hook.transitions()) == 4


def test_out_of_order_across_posts_each_exactly_once(hook: Hook) -> None:
    late = envelope(value([text_msg("wamid.LATE", "Ana", ts=TS + 60)]))
    early = envelope(value([text_msg("wamid.EARLY", "hello", ts=TS)]))
    hook.ok(late)
    hook.ok(early)
    hook.ok(late)
    assert sorted(t[0] for t in hook.transitions()) == ["wamid.EARLY", "wamid.LATE"]
    session = hook.session()
    assert session["version"] == 2
    assert session["last_inbound_at"] == "2026-01-01T12:01:00+00:00"  # the latest user time, not arrival


def test_two_business_numbers_in_one_post(hook: Hook) -> None:
    hook.ok(load("two_business_numbers"))
    a, b = hook.session(USER, PN), hook.session(USER, PN2)
    assert [m["text"] for m in a["inbound"]] == ["to number A"]
    assert [m["text"] for m in b["inbound"]] == ["to number B"]
    assert a["version"] == b["version"] == 1
    with hook.db.engine.connect() as conn:
        replies = conn.execute(select(Outbox.phone_number_id, Outbox.in_reply_to).order_by(Outbox.id)).all()
    assert sorted(replies) == [(PN, "wamid.TWONUMBERS0001"), (PN2, "wamid.TWONUMBERS0002")]


def test_business_scoped_user_keys_the_session(hook: Hook) -> None:
    hook.ok(load("business_scoped_user"))
    session = hook.session(BSUID)
    assert session["user_id"] == BSUID
    assert session["inbound"][0]["text"] == "hello from a username"
    assert hook.transitions() == [("wamid.BSUID000000001", BSUID, PN)]


def test_number_change_moves_the_session(hook: Hook) -> None:
    hook.ok(load("text_ascii"))
    hook.ok(envelope(value([text_msg("wamid.NAME", "Ana Lima", ts=TS + 10)])))
    before = hook.session(USER)
    change = json.loads(load("system_user_changed_number"))
    change["entry"][0]["changes"][0]["value"]["messages"][0]["timestamp"] = str(TS + 100)
    hook.ok(dumps(change))
    hook.no_session(USER)
    moved = hook.session(NEW_USER)
    assert (moved["step"], moved["data"], moved["version"]) == (before["step"], before["data"], before["version"])
    assert [t["wamid"] for t in moved["transitions"]] == [t["wamid"] for t in before["transitions"]]
    assert len(hook.transitions()) == 2  # the system message is not a transition
    assert hook.event_result("wamid.SYSTEM00000001") == "moved"
    hook.ok(envelope(value([text_msg("wamid.AFTER", "ana@example.com", ts=TS + 200, user=NEW_USER)])))
    assert hook.session(NEW_USER)["data"]["email"] == "ana@example.com"


def test_number_change_without_a_session_creates_nothing(hook: Hook) -> None:
    hook.ok(load("system_user_changed_number"))
    hook.no_session(USER)
    hook.no_session(NEW_USER)
    assert hook.counts()["sessions"] == 0
    assert hook.transitions() == []


# ---------------------------------------------------------------------------------------------- statuses


def test_late_lower_status_never_downgrades(hook: Hook) -> None:
    wamid = "wamid.OUT.ORDER"
    hook.ok(envelope(value(statuses=[status_obj(wamid, "read", TS + 3)])))
    hook.ok(envelope(value(statuses=[status_obj(wamid, "delivered", TS + 2)])))
    hook.ok(envelope(value(statuses=[status_obj(wamid, "sent", TS + 1)])))
    view = hook.outbound(wamid)
    assert view["status"] == "read"
    assert view["history"] == [
        {"status": "sent", "timestamp": TS + 1},
        {"status": "delivered", "timestamp": TS + 2},
        {"status": "read", "timestamp": TS + 3},
    ]
    assert view["errors"] == []
    assert hook.counts()["sessions"] == 0
    assert hook.transitions() == []


def test_statuses_for_an_unknown_wamid_are_stored_and_redelivery_is_idempotent(hook: Hook) -> None:
    assert hook.ok(load("statuses")) == {"status": "ok", "stored": 0, "duplicates": 0, "statuses": 3}
    hook.ok(load("statuses"))
    view = hook.outbound("wamid.OUTBOUNDSTATUS01")
    assert view["status"] == "read"
    assert [h["status"] for h in view["history"]] == ["sent", "delivered", "read"]
    counts = hook.counts()
    assert (counts["message_status"], counts["message_status_events"], counts["sessions"]) == (1, 3, 0)


def test_failed_131047_closes_the_service_window(hook: Hook) -> None:
    hook.ok(load("text_ascii"))
    assert hook.session()["window_expires_at"] == "2026-01-02T12:00:00+00:00"
    hook.ok(load("status_failed_131047"))
    assert hook.session()["window_expires_at"] is None
    view = hook.outbound("wamid.OUTBOUNDFAILED01")
    assert view["status"] == "failed"
    assert view["errors"] == [{"code": 131047, "title": "Re-engagement message"}]
    assert hook.transitions() == [("wamid.TEXTASCII0000", USER, PN)]  # a status never transitions
    # The user writing again reopens the window.
    hook.ok(envelope(value([text_msg("wamid.AGAIN", "Ana", ts=TS + 100_000)])))
    assert hook.session()["window_expires_at"] == "2026-01-03T15:46:40+00:00"


def test_failed_131026_marks_our_outbound_failed(hook: Hook) -> None:
    hook.ok(envelope(value([text_msg("wamid.HELLO", "hello", user="447700900123")])))
    with hook.db.begin() as conn:
        conn.execute(update(Outbox).values(wamid="wamid.OUTBOUNDFAILED02", status="sent"))
    hook.ok(load("status_failed_131026"))
    outbound = hook.session("447700900123")["outbound"]
    assert [(o["wamid"], o["status"]) for o in outbound] == [("wamid.OUTBOUNDFAILED02", "failed")]
    with hook.db.engine.connect() as conn:
        assert conn.scalar(select(Outbox.error_code)) == 131026
    assert hook.outbound("wamid.OUTBOUNDFAILED02")["errors"][0]["code"] == 131026
    assert hook.session("447700900123")["window_expires_at"] is not None  # only 131047 closes the window


# ---------------------------------------------------------------------------------------------- rejects


def _fixture_doc(name: str = "text_ascii") -> dict[str, Any]:
    return dict(json.loads(load(name)))


def _message_without(key: str) -> bytes:
    doc = _fixture_doc()
    del doc["entry"][0]["changes"][0]["value"]["messages"][0][key]
    return dumps(doc)


def _with_timestamp(ts: Any) -> bytes:
    doc = _fixture_doc()
    doc["entry"][0]["changes"][0]["value"]["messages"][0]["timestamp"] = ts
    return dumps(doc)


def _without_phone_number_id() -> bytes:
    doc = _fixture_doc()
    del doc["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"]
    return dumps(doc)


def _good_then_bad() -> bytes:
    # The first message is fine, the second is not: the whole POST is rejected, the first is not stored.
    bad = text_msg("wamid.BAD", "x")
    del bad["from"]
    return envelope(value([text_msg("wamid.GOOD", "fine")]), value([bad]))


def _bad_status() -> bytes:
    return envelope(value(statuses=[status_obj("wamid.S", "read", TS)]), value(statuses=[{"id": "wamid.T"}]))


MALFORMED: dict[str, bytes] = {
    "not JSON": b"hello, webhook",
    "empty body": b"",
    "whitespace only": b" \n\t ",
    "truncated JSON": load("text_ascii")[:-7],
    "truncated mid-string": load("text_ascii")[:400],
    "top-level array": b"[]",
    "invalid UTF-8": load("text_ascii").replace(b"color", b"col\xffr"),
    "NaN constant": load("text_ascii").replace(b'"1767268800"', b"NaN"),
    "missing entry": dumps({"object": WABA}),
    "entry null": dumps({"object": WABA, "entry": None}),
    "entry not a list": dumps({"object": WABA, "entry": {"id": "1"}}),
    "missing object": dumps({"entry": []}),
    "message without from and from_user_id": _message_without("from"),
    "message without id": _message_without("id"),
    "message without timestamp": _message_without("timestamp"),
    "non-numeric timestamp": _with_timestamp("yesterday"),
    "timestamp with a fraction": _with_timestamp("1767268800.5"),
    "negative timestamp": _with_timestamp("-1767268800"),
    "empty timestamp": _with_timestamp(""),
    "missing metadata.phone_number_id": _without_phone_number_id(),
    "good message then a bad one": _good_then_bad(),
    "status without status and timestamp": _bad_status(),
}


def test_malformed_bodies_are_400_json_and_leave_no_trace(hook: Hook) -> None:
    for case, raw in MALFORMED.items():
        response = hook.post(raw)
        assert response.status_code == 400, (case, response.text)
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert set(body) == {"error"}, case
        assert isinstance(body["error"], str)
        assert body["error"]
        assert "Traceback" not in response.text
        assert 'File "' not in response.text
        hook.assert_empty()


def test_error_messages_name_the_problem(hook: Hook) -> None:
    assert hook.post(MALFORMED["not JSON"]).json()["error"].startswith("invalid JSON")
    assert hook.post(MALFORMED["truncated JSON"]).json()["error"].startswith("truncated JSON")
    assert hook.post(MALFORMED["empty body"]).json()["error"] == "empty body"
    assert "entry" in hook.post(MALFORMED["missing entry"]).json()["error"]
    assert "phone_number_id" in hook.post(MALFORMED["missing metadata.phone_number_id"]).json()["error"]
    assert "timestamp" in hook.post(MALFORMED["non-numeric timestamp"]).json()["error"]
    assert "from_user_id" in hook.post(MALFORMED["message without from and from_user_id"]).json()["error"]


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deep_nesting_is_400_fast_and_the_server_stays_responsive(hook: Hook, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    depth = 200_000
    body = b'{"object":"whatsapp_business_account","entry":' + opener * depth + b"1" + closer * depth + b"}"
    started = time.perf_counter()
    response = hook.post(body)
    assert response.status_code == 400
    assert "deeper" in response.json()["error"]
    assert time.perf_counter() - started < 2.0
    # Just past Python's recursion limit, unbalanced, and hidden inside a string (which is fine).
    assert hook.post(b"[" * 1100).status_code == 400
    assert hook.post(b"[" * 1100 + b"]" * 1100).status_code == 400
    assert hook.client.get("/healthz").status_code == 200
    hook.assert_empty()
    hook.ok(envelope(value([text_msg("wamid.X", "[" * 5000)])))  # brackets inside a string are just text
    assert hook.session()["inbound"][0]["text"] == "[" * 5000


def test_body_over_the_cap_is_413_and_leaves_no_trace(hook: Hook) -> None:
    body = envelope(value([text_msg("wamid.BIG", "x" * (4 * 1024 * 1024))]))
    response = hook.post(body)
    assert response.status_code == 413
    assert "error" in response.json()

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap still stops the read
        for _ in range(5):
            yield b" " * (1024 * 1024)

    headers = {"X-Hub-Signature-256": sign(b" " * (5 * 1024 * 1024), SECRET)}
    assert hook.client.post("/webhook", content=chunks(), headers=headers).status_code == 413
    hook.assert_empty()


def test_body_just_under_the_cap_is_accepted(hook: Hook) -> None:
    doc = json.loads(envelope(value([text_msg("wamid.NEARCAP", "ok")])))
    doc["padding"] = ""
    size = len(dumps(doc))
    doc["padding"] = "p" * (MAX_BODY_BYTES - size)
    body = dumps(doc)
    assert len(body) == MAX_BODY_BYTES
    hook.ok(body)
    assert len(hook.transitions("wamid.NEARCAP")) == 1


def test_nothing_to_act_on_is_200_and_routes_nothing(hook: Hook) -> None:
    for name in ["empty_changes", "errors_only", "template_status_update", "object_page"]:
        response = hook.post(load(name))
        assert response.status_code == 200, (name, response.text)
        hook.assert_empty()


def test_other_object_is_ignored(hook: Hook) -> None:
    # Even a page object that carries a messages-like value is never routed into a session.
    doc = json.loads(envelope(value([text_msg("wamid.PAGE", "hi")]), object_="page"))
    assert hook.post(dumps(doc)).json()["status"] == "ignored"
    assert hook.post(envelope(object_="instagram")).status_code == 200
    hook.assert_empty()


def test_empty_entry_list_and_other_fields_are_200(hook: Hook) -> None:
    assert hook.post(dumps({"object": WABA, "entry": []})).status_code == 200
    assert hook.post(envelope({"event": "APPROVED"}, field="account_update")).status_code == 200
    assert hook.post(envelope(value(messages=[], statuses=[]))).status_code == 200
    hook.assert_empty()


def test_errors_only_value_is_logged(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="core.webhook")
    hook.ok(load("errors_only"))
    assert re.search(r"errors: \d+", caplog.text)


# ---------------------------------------------------------------------------------------------- message kinds


def _fixture_messages(name: str) -> list[dict[str, Any]]:
    doc = json.loads(load(name))
    return [m for e in doc["entry"] for c in e["changes"] for m in c["value"].get("messages", [])]


def test_text_is_stored_exactly(hook: Hook) -> None:
    expected: dict[str, str] = {}
    for name in ["text_ascii", "text_emoji", "text_rtl", "text_nfd_nfc", "text_whitespace", "text_long", "referral"]:
        hook.ok(load(name))
        expected.update({m["id"]: m["text"]["body"] for m in _fixture_messages(name)})
    inbound = hook.session()["inbound"]
    assert {m["wamid"]: m["text"] for m in inbound} == expected
    assert {m["kind"] for m in inbound} == {"text"}
    assert sorted(t[0] for t in hook.transitions()) == sorted(expected)


def test_exotic_text_survives_byte_for_byte(hook: Hook) -> None:
    exotic = (
        "\u200fמה שלומך?\u200e OK \u200fمرحبا\u200e 👨\u200d👩\u200d👧 𝒳𝔸 \U0001f9d1\U0001f3fd\u200d🚀"
        " Cafe\u0301 Café \t tab\nline\r\n  \u00a0nbsp \ufeffbom"
    )
    long = ("€é😀世 " * 900)[:4500]
    hook.ok(envelope(value([text_msg("wamid.EXOTIC", exotic), text_msg("wamid.LONG", long, ts=TS + 1)])))
    inbound = hook.session()["inbound"]
    assert [m["text"] for m in inbound] == [exotic, long]
    assert len(long) > 4096
    nfd, nfc = _fixture_messages("text_nfd_nfc")
    assert nfd["text"]["body"] != nfc["text"]["body"]  # the fixture really holds both forms


def test_escaped_and_raw_utf8_bodies_store_identical_text(hook: Hook) -> None:
    escaped, raw = load("text_escaped"), load("text_raw_utf8")
    assert b"\\u" in escaped
    assert b"\\u" not in raw
    assert raw != escaped
    expected = "Olá, 世界 👋 — ¿qué tal? שלום"
    hook.ok(escaped)
    assert hook.session()["inbound"][0]["text"] == expected
    # Same wamid sent with other bytes: a duplicate, and the stored text is the same either way.
    assert hook.ok(raw)["duplicates"] == 1
    raw_doc = raw.replace(b"wamid.TEXTSAME0000", b"wamid.TEXTSAME0001")
    hook.ok(raw_doc)
    texts = {m["wamid"]: m["text"] for m in hook.session()["inbound"]}
    assert texts["wamid.TEXTSAME0000"] == texts["wamid.TEXTSAME0001"] == expected


def test_replies_expose_the_id_and_the_context(hook: Hook) -> None:
    for name in ["interactive_button_reply", "interactive_list_reply", "button_legacy"]:
        hook.ok(load(name))
    inbound = {m["wamid"]: (m["kind"], m["choice_id"], m["context_id"]) for m in hook.session()["inbound"]}
    assert inbound == {
        "wamid.BUTTONREPLY001": ("interactive", "opt_yes", "wamid.OUTBOUNDPROMPT001"),
        "wamid.LISTREPLY00001": ("interactive", "plan_pro", "wamid.OUTBOUNDPROMPT001"),
        "wamid.BUTTONLEGACY1": ("button", "STOP_PROMOTIONS", "wamid.OUTBOUNDTEMPLATE1"),
    }
    assert len(hook.transitions()) == 3


def test_flow_uses_the_reply_id_not_the_title(booking_hook: Hook) -> None:
    hook = booking_hook
    hook.ok(envelope(value([text_msg("wamid.B1", "hi")])))
    with hook.db.begin() as conn:  # as if the sender had sent the service prompt
        conn.execute(update(Outbox).where(Outbox.in_reply_to == "wamid.B1").values(wamid="wamid.PROMPT.SERVICE"))
    hook.ok(envelope(value([button_msg("wamid.B2", "haircut", "Coloring", TS + 1, context="wamid.PROMPT.SERVICE")])))
    session = hook.session()
    assert session["data"] == {"service": "haircut"}  # the id, although the title says something else
    assert session["step"] == "choose_date"
    assert session["inbound"][-1]["choice_id"] == "haircut"


def test_reply_to_an_old_prompt_is_recognised(booking_hook: Hook) -> None:
    hook = booking_hook
    hook.ok(envelope(value([text_msg("wamid.B1", "hi")])))
    with hook.db.begin() as conn:
        conn.execute(update(Outbox).where(Outbox.in_reply_to == "wamid.B1").values(wamid="wamid.PROMPT.SERVICE"))
    hook.ok(envelope(value([button_msg("wamid.B2", "haircut", "Haircut", TS + 1, context="wamid.PROMPT.SERVICE")])))
    # A second tap on the old service prompt: the flow has moved on, nothing changes.
    hook.ok(envelope(value([button_msg("wamid.B3", "beard", "Beard trim", TS + 2, context="wamid.PROMPT.SERVICE")])))
    session = hook.session()
    assert (session["step"], session["data"]) == ("choose_date", {"service": "haircut"})
    assert session["inbound"][-1]["context_id"] == "wamid.PROMPT.SERVICE"
    assert "moved on" in (session["outbound"][-1]["text"] or json.dumps(session["outbound"][-1]))
    assert session["transitions"][-1]["wamid"] == "wamid.B3"


MEDIA_CASES = [
    ("image_caption", "1003383421387256", "image/jpeg", "My receipt 🧾 #42", None),
    ("document_filename", None, "application/pdf", "Signed contract", "Invoice #42 (final) — März 2026.pdf"),
    ("audio_voice", "1016243240452478", "audio/ogg; codecs=opus", None, None),
    ("video", "765756756102030", "video/mp4", "How it arrived", None),
    ("sticker", "1234567890987654", "image/webp", None, None),
]


def test_media_is_stored_for_later_download(hook: Hook) -> None:
    for name, media_id, mime, caption, filename in MEDIA_CASES:
        hook.ok(load(name))
        [raw] = _fixture_messages(name)
        media = hook.stored_message(raw["id"])["media"]
        assert media["id"] == (media_id or raw[raw["type"]]["id"])
        assert (media["mime_type"], media["caption"], media["filename"]) == (mime, caption, filename)
        assert media["voice"] is (name == "audio_voice")
        inbound = {m["wamid"]: m for m in hook.session()["inbound"]}[raw["id"]]
        assert (inbound["kind"], inbound["text"]) == (raw["type"], caption)
        assert len(hook.transitions(raw["id"])) == 1


def test_location_keeps_signed_floats(hook: Hook) -> None:
    hook.ok(load("location"))
    first = hook.stored_message("wamid.LOCATION00001")["location"]
    assert (first["latitude"], first["longitude"]) == (-33.4430837, -70.6545412)
    assert first["name"] == "Palacio de La Moneda"
    bare = hook.stored_message("wamid.LOCATION00002")["location"]
    assert bare == {"latitude": -0.25, "longitude": -78.5, "name": None, "address": None, "url": None}
    assert len(hook.transitions()) == 2


def test_shared_contacts_are_not_the_sender_profile(hook: Hook) -> None:
    hook.ok(load("contacts"))
    [raw] = _fixture_messages("contacts")
    stored = hook.stored_message("wamid.CONTACTS00001")
    assert stored["contacts"] == raw["contacts"]
    sender = json.loads(load("contacts"))["entry"][0]["changes"][0]["value"]["contacts"][0]["profile"]["name"]
    assert stored["profile_name"] == sender
    assert sender not in json.dumps(stored["contacts"], ensure_ascii=False)
    assert len(hook.transitions()) == 1


def test_order_keeps_catalog_and_items(hook: Hook) -> None:
    hook.ok(load("order"))
    [raw] = _fixture_messages("order")
    order = hook.stored_message("wamid.ORDER000000001")["order"]
    assert order["catalog_id"] == "354160437058781"
    assert order["product_items"] == raw["order"]["product_items"]
    assert [(i["quantity"], i["item_price"]) for i in order["product_items"]][0] == (2, 12.5)
    assert len(hook.transitions()) == 1


def test_reaction_is_recorded_without_a_transition(hook: Hook) -> None:
    for name, emoji in [("reaction", "❤️"), ("reaction_removed", None)]:
        hook.ok(load(name))
        [raw] = _fixture_messages(name)
        stored = hook.stored_message(raw["id"])
        assert (stored["reacted_to"], stored["emoji"]) == ("wamid.OUTBOUNDREACTED1", emoji)
        assert hook.event_result(raw["id"]) == "ignored"
        assert hook.transitions() == []
        assert hook.counts()["sessions"] == 0


def test_reaction_does_not_move_an_existing_session(hook: Hook) -> None:
    hook.ok(load("text_ascii"))
    before = hook.session()
    hook.ok(load("reaction"))
    after = hook.session()
    assert (after["step"], after["version"]) == (before["step"], before["version"])


def test_unsupported_is_logged_without_a_transition(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="core.webhook")
    for name in ["unsupported", "unknown_legacy"]:
        caplog.clear()
        hook.ok(load(name))
        [raw] = _fixture_messages(name)
        assert hook.event_result(raw["id"]) == "ignored"
        assert hook.transitions() == []
        assert hook.counts()["sessions"] == 0
        assert f"{raw['id']} ({raw['type']}): 131051" in caplog.text


def test_unknown_fields_and_missing_optional_parts_are_fine(hook: Hook) -> None:
    expected: list[str] = []
    for name, wamids in [
        ("extra_unknown_fields", ["wamid.EXTRAFIELDS01", "wamid.EXTRAFIELDS02"]),
        ("interactive_missing_object", ["wamid.INTERACTNOOBJ1"]),
        ("interactive_nfm_reply", ["wamid.NFMREPLY000001"]),
    ]:
        assert hook.ok(load(name))["stored"] == len(wamids)
        expected += wamids
        assert [t[0] for t in hook.transitions()] == expected


def test_every_fixture_gets_a_non_5xx_answer_and_is_idempotent(hook: Hook) -> None:
    for path in sorted(DATA.glob("*.json")):
        body = path.read_bytes()
        first = hook.post(body)
        assert first.status_code == 200, (path.name, first.text)
        before = hook.counts()
        hook.post(body)
        assert hook.counts()["transitions"] == before["transitions"], path.name


# ---------------------------------------------------------------------------------------------- admin & ops


BAD_ADMIN_HEADERS: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": "Bearer "},
    {"Authorization": "test-admin-token"},
    {"Authorization": "Basic test-admin-token"},
    {"Authorization": "Bearer test-admin-token-and-more"},
]


def test_admin_api_needs_the_bearer_token(hook: Hook) -> None:
    hook.ok(load("text_ascii"))
    hook.ok(load("statuses"))
    for headers in BAD_ADMIN_HEADERS:
        for path in (f"/admin/sessions/{PN}/{USER}", "/admin/outbound/wamid.OUTBOUNDSTATUS01"):
            response = hook.client.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert "error" in response.json()
            assert USER not in response.text
    hook.session()  # and with the token they answer


def test_admin_api_is_closed_without_a_configured_token(
    database_url: str, flows_dir: Path, registry: FlowRegistry
) -> None:
    for hook in open_hook(make_settings(database_url, flows_dir, admin_token=""), registry):
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer test-admin-token"}):
            assert hook.client.get(f"/admin/sessions/{PN}/{USER}", headers=headers).status_code == 401


def test_admin_api_404s(hook: Hook) -> None:
    for path in (f"/admin/sessions/{PN}/{USER}", "/admin/outbound/wamid.NEVER"):
        response = hook.client.get(path, headers=ADMIN)
        assert response.status_code == 404
        assert "error" in response.json()
    hook.ok(load("reaction"))  # stored, but no session: still 404
    assert hook.client.get(f"/admin/sessions/{PN}/{USER}", headers=ADMIN).status_code == 404


def test_admin_session_shape(hook: Hook) -> None:
    hook.ok(load("interactive_button_reply"))
    hook.ok(envelope(value([text_msg("wamid.SHAPE2", "Ana Lima", ts=TS + 5)])))
    session = hook.session()
    required = {"flow", "step", "status", "version", "data", "window_expires_at", "opted_out", "inbound",
                "transitions", "outbound"}
    assert required <= set(session)
    assert (session["flow"], session["step"], session["status"], session["version"]) == (
        "lead_qualification", "ask_email", "active", 2
    )
    assert session["data"] == {"name": "Ana Lima"}
    assert session["opted_out"] is False
    assert session["window_expires_at"] == "2026-01-02T12:00:05+00:00"
    assert session["inbound"] == [
        {"wamid": "wamid.BUTTONREPLY001", "timestamp": TS, "kind": "interactive", "text": None,
         "choice_id": "opt_yes", "context_id": "wamid.OUTBOUNDPROMPT001", "result": "applied"},
        {"wamid": "wamid.SHAPE2", "timestamp": TS + 5, "kind": "text", "text": "Ana Lima", "choice_id": None,
         "context_id": None, "result": "applied"},
    ]
    transition_keys = {"from", "to", "outcome", "wamid", "at", "applied_at", "restored"}
    assert [set(t) for t in session["transitions"]] == [transition_keys] * 2
    assert [(t["from"], t["to"], t["outcome"], t["wamid"], t["at"]) for t in session["transitions"]] == [
        (None, "ask_name", "started", "wamid.BUTTONREPLY001", "2026-01-01T12:00:00+00:00"),
        ("ask_name", "ask_email", "advanced", "wamid.SHAPE2", "2026-01-01T12:00:05+00:00"),
    ]
    assert all(isinstance(t["applied_at"], str) for t in session["transitions"])
    outbound = session["outbound"]
    assert len(outbound) == 2
    assert all({"id", "kind", "text", "template", "campaign", "status", "wamid"} <= set(o) for o in outbound)
    assert [(o["kind"], o["status"], o["template"], o["campaign"], o["wamid"]) for o in outbound] == [
        ("text", "queued", None, None, None)
    ] * 2
    assert "Ana Lima" in outbound[1]["text"]
    assert outbound[0]["id"] < outbound[1]["id"]


def test_admin_outbound_shape(hook: Hook) -> None:
    hook.ok(load("status_failed_131026"))
    view = hook.outbound("wamid.OUTBOUNDFAILED02")
    assert {"wamid", "status", "errors", "history"} <= set(view)
    assert view["wamid"] == "wamid.OUTBOUNDFAILED02"
    assert view["status"] == "failed"
    assert view["errors"] == [{"code": 131026, "title": "Message undeliverable"}]
    assert view["history"] == [{"status": "failed", "timestamp": 1767268805}]


def test_healthz(hook: Hook) -> None:
    response = hook.client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def _metric(text_: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text_, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_requests(hook: Hook) -> None:
    names = [
        'waflow_webhook_requests_total{result="accepted"}',
        'waflow_webhook_requests_total{result="rejected_signature"}',
        'waflow_webhook_requests_total{result="rejected_payload"}',
        "waflow_signature_failures_total",
        "waflow_duplicates_dropped_total",
        "waflow_messages_stored_total",
        "waflow_apply_seconds_count",
        "waflow_lock_wait_seconds_count",
    ]
    before = hook.client.get("/metrics").text
    hook.ok(load("text_ascii"))
    hook.ok(load("text_ascii"))
    hook.post(load("text_ascii"), secret="wrong")
    hook.post(b"{")
    response = hook.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text
    deltas = {n: _metric(after, n) - _metric(before, n) for n in names}
    assert deltas == {
        names[0]: 2, names[1]: 1, names[2]: 1, names[3]: 1, names[4]: 1, names[5]: 1, names[6]: 1, names[7]: 1
    }
    assert re.search(r"^waflow_messages_pending 0\.0$", after, re.MULTILINE)
    assert "waflow_apply_seconds_bucket" in after


# ---------------------------------------------------------------------------------------------- ASGI front


def test_post_webhook_with_a_query_string_is_served_and_other_methods_are_fastapis(hook: Hook) -> None:
    body = load("text_ascii")
    response = hook.client.post("/webhook?x=1", content=body, headers={"X-Hub-Signature-256": sign(body, SECRET)})
    assert (response.status_code, response.json()["stored"]) == (200, 1)
    for method in ("HEAD", "PUT", "PATCH"):
        response = hook.client.request(method, "/webhook")
        assert (response.status_code, response.headers["allow"]) == (405, "GET"), method


def test_unexpected_error_is_a_logged_422_and_the_server_keeps_serving(
    settings: Settings, registry: FlowRegistry, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(settings, flows=registry, background=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None))
    thread = threading.Thread(target=server.run)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}/webhook"
    body = load("text_ascii")
    headers = {"X-Hub-Signature-256": sign(body, SECRET)}

    def bug(_raw: bytes, **_kwargs: object) -> None:
        raise RuntimeError("a bug in parsing")

    try:
        deadline = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        with monkeypatch.context() as patched:
            patched.setattr("core.intake.parse_webhook", bug)
            response = requests.post(url, data=body, headers=headers, timeout=10)
        # That body's alone, never a 500 (core/intake.py): a JSON answer naming the error, traceback in the log only.
        assert (response.status_code, response.json()) == (422, {"error": "parsing a body failed (RuntimeError); "
                                                                           "logged, retry later"})
        response = requests.post(url, data=body, headers=headers, timeout=10)
        assert (response.status_code, response.json()["stored"]) == (200, 1)
        assert "RuntimeError: a bug in parsing" in caplog.text  # logged by the server, traceback included
    finally:
        server.should_exit = True
        thread.join(30)


# ---------------------------------------------------------------------------------------------- properties

JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
SEEDS = [
    "text_ascii", "out_of_order", "statuses", "two_business_numbers", "interactive_button_reply",
    "location", "order", "system_user_changed_number", "business_scoped_user", "status_failed_131047",
]


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(doc, dict):
        for key, item in doc.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(doc, list):
        for index, item in enumerate(doc):
            found += _paths(item, (*prefix, index))
    return found


def _replace(doc: Any, path: tuple[Any, ...], new: Any, delete: bool) -> Any:
    if not path:
        return new
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return doc


@st.composite
def structurally_mutated(draw: st.DrawFn) -> bytes:
    doc = json.loads(load(draw(st.sampled_from(SEEDS))))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        delete = bool(path) and draw(st.booleans())
        replacement = draw(
            JSON | st.sampled_from(["", "0", "1767268800", "99999999999999999999", "text", "user_changed_number"])
        )
        doc = _replace(doc, path, replacement, delete)
    return json.dumps(doc, ensure_ascii=draw(st.booleans())).encode()


@st.composite
def byte_mutated(draw: st.DrawFn) -> bytes:
    body = bytearray(load(draw(st.sampled_from(SEEDS))))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(body) - 1))
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        if op == "flip":
            body[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete":
            del body[at : at + draw(st.integers(1, 8))]
        elif op == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b"[", b"{", b'"', b"\\u", b"\\"]))
        else:
            del body[at:]
        if not body:
            break
    return bytes(body)


BODIES = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda doc: json.dumps(doc).encode()),
    structurally_mutated(),
    byte_mutated(),
)


@hsettings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(body=BODIES)
def test_signed_random_and_mutated_bodies_never_5xx_and_rejects_store_nothing(hook: Hook, body: bytes) -> None:
    before = hook.counts()
    response = hook.post(body)
    assert response.status_code in (200, 400), (response.status_code, response.text, body[:300])
    if response.status_code != 200:
        assert set(response.json()) == {"error"}
        assert hook.counts() == before, body[:300]
    assert hook.client.get("/healthz").status_code == 200


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300) | structurally_mutated(), secret=st.text(min_size=1, max_size=20))
def test_wrongly_signed_bodies_are_401_and_store_nothing(hook: Hook, body: bytes, secret: str) -> None:
    if secret == SECRET:
        return
    before = hook.counts()
    assert hook.post(body, secret=secret).status_code == 401
    assert hook.counts() == before



# ---------------------------------------------------------------------------------------------- worker


class _RecordingEngine:
    def __init__(self) -> None:
        self.applied: list[tuple[str, str]] = []
        self.release = threading.Event()

    def apply_together(self, keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return list(dict.fromkeys(keys))  # as the engine on SQLite: every user is then applied one by one

    def apply_all(self, key: tuple[str, str]) -> int:
        self.release.wait(5)
        self.applied.append(key)
        return 1


def test_apply_worker_coalesces_a_users_queued_keys() -> None:
    engine = _RecordingEngine()
    worker = ApplyWorker(engine, threads=1)  # type: ignore[arg-type]
    a, b = (PN, "1"), (PN, "2")
    for _ in range(5):
        worker.submit([a, b])  # a burst of POSTs from two users before the worker gets to them
    worker.start()
    engine.release.set()
    worker.stop()
    assert engine.applied == [a, b]
    # Once taken off the queue, a key is queued again by the next message (never lost).
    engine2 = _RecordingEngine()
    engine2.release.set()
    worker2 = ApplyWorker(engine2, threads=1)  # type: ignore[arg-type]
    worker2.start()
    worker2.submit([a])
    deadline = time.monotonic() + 5
    while not engine2.applied and time.monotonic() < deadline:
        time.sleep(0.01)
    worker2.submit([a])
    worker2.stop()
    assert engine2.applied == [a, a]
