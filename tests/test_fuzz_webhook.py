"""Fuzzing a real `python -m core serve` per backend with correctly signed bodies full of hostile values.

Each example is a realistic value (messages of several kinds, contacts, a status) with one to four values swapped
for hostile ones (NUL and lone surrogates, strings longer than their column, huge and non-finite numbers,
timestamps past year 9999 or days ahead, wrong types), POSTed together with clean POSTs of other users. Whatever
the hostile body holds: it is answered 200 (what breaks a bound is quarantined) or 400 (a malformed body), never a
5xx while the database is up, and every clean POST is answered 200 and applied exactly once.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from core.db import Database
from core.signature import sign
from tests.test_webhook_e2e import SECRET, Server, served_database

PN = "100000000000111"
TS = 1767268800
ADMIN = {"Authorization": "Bearer test-admin-token"}
NOW = int(datetime.now(UTC).timestamp())
Json = dict[str, Any]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, flows_dir: Path
) -> Iterator[tuple[Server, Database]]:
    with served_database(request, request.param, tmp_path_factory.mktemp("fuzz"), flows_dir) as served:
        yield served


# ---------------------------------------------------------------------------------------------- bodies


def base_value(tag: str, alice: str, bob: str) -> Json:
    """Two users, four kinds of message and a status: every field a hostile value may land in."""
    return {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": PN},
        "contacts": [{"profile": {"name": "Alice"}, "wa_id": alice}, {"profile": {"name": "Bob"}, "wa_id": bob}],
        "messages": [
            {"from": alice, "id": f"{tag}.1", "timestamp": str(TS), "type": "text", "text": {"body": "hi"}},
            {"from": bob, "id": f"{tag}.2", "timestamp": str(TS + 1), "type": "location",
             "location": {"latitude": -33.44, "longitude": -70.65, "name": "La Moneda"}},
            {"from": alice, "id": f"{tag}.3", "timestamp": str(TS + 2), "type": "interactive",
             "context": {"from": "15550001111", "id": "wamid.OUT1"},
             "interactive": {"type": "button_reply", "button_reply": {"id": "yes", "title": "Yes"}}},
            {"from": bob, "id": f"{tag}.4", "timestamp": str(TS + 3), "type": "reaction",
             "reaction": {"message_id": "wamid.OUT2", "emoji": "👍"}},
        ],
        "statuses": [{"id": f"{tag}.out", "status": "failed", "timestamp": str(TS + 4), "recipient_id": alice,
                      "biz_opaque_callback_data": "7", "errors": [{"code": 131047, "title": "Re-engagement"}]}],
    }


def envelope(value: Json) -> Json:
    return {"object": "whatsapp_business_account",
            "entry": [{"id": "109876543210001", "changes": [{"field": "messages", "value": value}]}]}


def slots(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into the document (the root excluded)."""
    if isinstance(doc, dict):
        for key, item in doc.items():
            yield (*path, key)
            yield from slots(item, (*path, key))
    elif isinstance(doc, list):
        for index, item in enumerate(doc):
            yield (*path, index)
            yield from slots(item, (*path, index))


# Where a hostile value hurts most (every column a message or status writes), besides any path at all.
TARGETS: list[tuple[Any, ...]] = [
    ("metadata", "phone_number_id"), ("contacts", 0, "profile", "name"), ("contacts", 1, "wa_id"),
    ("messages", 0, "id"), ("messages", 0, "from"), ("messages", 0, "type"), ("messages", 0, "timestamp"),
    ("messages", 0, "text", "body"), ("messages", 1, "location", "latitude"), ("messages", 1, "location", "longitude"),
    ("messages", 2, "context", "id"), ("messages", 2, "interactive", "button_reply", "id"),
    ("messages", 3, "reaction", "message_id"), ("messages", 3, "reaction", "emoji"), ("statuses", 0, "id"),
    ("statuses", 0, "status"), ("statuses", 0, "timestamp"), ("statuses", 0, "recipient_id"),
    ("statuses", 0, "biz_opaque_callback_data"), ("statuses", 0, "errors", 0, "code"),
    ("statuses", 0, "errors", 0, "title"),
]

hostile_strings = st.one_of(
    st.sampled_from(["\x00", "a\x00b", "\ud83d", "x\udfffy", "", " ", "\u202e\u200f", "\ufeff", "\uffff",
                     "' OR 1=1 --", "\\", '"', "²", "٣", "-1", "1767268800.5"]),
    st.text(alphabet=st.characters(codec=None), max_size=20),  # any code point, lone surrogates included
    st.builds(lambda c, n: c * n, st.sampled_from(["1", "w", "é", "😀", "\x00"]),
              st.sampled_from([33, 65, 129, 257, 300, 513, 65_537])),
)
hostile_numbers = st.one_of(
    st.sampled_from([10**309, -(10**309), 2**63, 2**31, 2**40, -1, 0, 91, -180.5, 1e308, math.inf, -math.inf,
                     math.nan, True]),
    st.integers(),
    st.floats(),
)
hostile_timestamps = st.one_of(
    st.sampled_from(["253402300799", "253370764800", "9" * 30, "9" * 5000, "0", "00001767268800",
                     str(NOW + 2 * 86400), str(NOW + 3600)]),
    st.integers(0, 10**13).map(str),
)
json_leaf = st.none() | st.booleans() | hostile_numbers | hostile_strings
hostile_values = st.one_of(
    hostile_strings, hostile_numbers, hostile_timestamps,
    st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        hostile_strings, inner, max_size=3), max_leaves=6),
)


def new_user() -> str:
    return f"1555{uuid.uuid4().int % 10**8:08d}"


def _like(current: Any, key: Any) -> st.SearchStrategy[Any]:
    """Mostly a hostile value of the same type (a bound to break, not a shape: those are plain 400s)."""
    if key == "timestamp":
        same = hostile_timestamps
    elif isinstance(current, str):
        same = hostile_strings
    elif isinstance(current, (int, float)) and not isinstance(current, bool):
        same = hostile_numbers
    else:
        return hostile_values
    return st.one_of(*[same] * 9, hostile_values)


@st.composite
def hostile_bodies(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """A signed body's bytes and the users of its messages before any swap."""
    users = [new_user(), new_user()]
    value = base_value(f"wamid.F{uuid.uuid4().hex[:12]}", *users)
    for _ in range(draw(st.integers(1, 4))):
        anywhere = st.sampled_from(list(slots(value)))
        path = draw(st.one_of(st.sampled_from(TARGETS), st.sampled_from(TARGETS), st.sampled_from(TARGETS), anywhere))
        parent: Any = value
        try:
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]] = draw(_like(parent[path[-1]], path[-1]))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier swap removed that path
    doc = envelope(value)
    if draw(st.integers(0, 3)):
        return json.dumps(doc, separators=(",", ":")).encode(), users  # \\uXXXX escapes, as Meta sends
    # Raw UTF-8; a lone surrogate then becomes bytes that are not UTF-8 at all (a 400 for the whole body).
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass"), users


def clean_body(wamid: str, user: str) -> bytes:
    value = {"messaging_product": "whatsapp", "metadata": {"phone_number_id": PN},
             "contacts": [{"profile": {"name": "Clean"}, "wa_id": user}],
             "messages": [{"from": user, "id": wamid, "timestamp": str(TS), "type": "text", "text": {"body": "ok"}}]}
    return json.dumps(envelope(value)).encode()


# ---------------------------------------------------------------------------------------------- the property


def post(server: Server, body: bytes) -> requests.Response:
    return requests.post(server.url + "/webhook", data=body, timeout=30, headers={
        "Content-Type": "application/json", "X-Hub-Signature-256": sign(body, SECRET)})


def applied(db: Database, tag: str, expected: int, timeout: float = 30.0) -> dict[str, int]:
    """Transitions per wamid starting with `tag`, once `expected` wamids have one (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        with db.engine.connect() as conn:
            rows = conn.execute(text("SELECT wamid, count(*) FROM transitions WHERE wamid LIKE :p GROUP BY wamid"),
                                {"p": tag + ".%"}).all()
        found = {str(r[0]): int(r[1]) for r in rows}
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hostile=hostile_bodies())
def test_hostile_signed_bodies_never_5xx_and_never_hurt_concurrent_posts(
    served: tuple[Server, Database], hostile: tuple[bytes, list[str]]
) -> None:
    server, db = served
    body, users = hostile
    tag = f"wamid.C{uuid.uuid4().hex[:12]}"
    clean = [(f"{tag}.{i}", new_user()) for i in range(3)]
    bodies = [clean_body(*clean[0]), body, clean_body(*clean[1]), clean_body(*clean[2])]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: post(server, b), bodies))
    answer = answers[1]
    assert answer.status_code in (200, 400), (answer.status_code, answer.text, body[:400])
    if answer.status_code == 400:
        assert set(answer.json()) == {"error"}
    event(f"hostile body answered {answer.status_code}, {answer.json().get('quarantined', 0)} quarantined")
    for other in answers[:1] + answers[2:]:
        assert (other.status_code, other.json().get("stored")) == (200, 1), other.text
    assert applied(db, tag, len(clean)) == {wamid: 1 for wamid, _ in clean}
    # The views of whoever the hostile body was about answer (their session, or none), never a 500.
    for user in users:
        assert server.get(f"/admin/sessions/{PN}/{user}", headers=ADMIN).status_code in (200, 404)
    assert server.get(f"/admin/sessions/{PN}/{clean[0][1]}", headers=ADMIN).status_code == 200
    assert server.get("/healthz").status_code == 200
    assert server.alive, server.log()
