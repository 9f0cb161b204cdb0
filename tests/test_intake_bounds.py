"""Nothing a sender does can hurt other users: every signed body is handled on its own (core/intake.py, core/bounds.py).

Each class of hostile value, on SQLite and PostgreSQL, in process (IntakeWorker on the test database) and through a
real `python -m core serve`: the message is held in the quarantine with the reason, its neighbours in the same POST
and in concurrent POSTs are stored and applied exactly once, a retry keeps it held with the same reason, and the
admin view and `sessions show` answer afterwards. Also: a value the database refuses although the parser let it
through (a constraint added to the test database) is quarantined alone; only an outage is a 503; a POST of 5,000
statuses does not hold a concurrent POST.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.errors import DatabaseUnavailableError
from core.flows import FlowRegistry
from core.intake import Intake, IntakeWorker, is_outage
from core.models import InboundEvent, MessageStatusEvent, QuarantinedMessage
from core.quarantine import retry
from core.signature import sign
from core.views import session_view
from tests.conftest import make_settings
from tests.test_cli import run
from tests.test_webhook_e2e import (
    SECRET,
    Server,
    served_database,
    transitions_by_wamid,
    wait_applied,
)

PN = "100000000000111"
TS = 1767268800
ADMIN = {"Authorization": "Bearer test-admin-token"}
Json = dict[str, Any]


# ---------------------------------------------------------------------------------------------- bodies


def text_message(wamid: str, user: str, body: str = "hi", ts: int = TS) -> Json:
    return {"from": user, "id": wamid, "timestamp": str(ts), "type": "text", "text": {"body": body}}


def contact(user: str, name: str = "Test User") -> Json:
    return {"profile": {"name": name}, "wa_id": user}


def envelope(messages: list[Json], contacts: list[Json] | None = None, statuses: list[Json] | None = None) -> bytes:
    """Compact and \\uXXXX-escaped, as Meta sends it (a NUL travels as \\u0000)."""
    value: Json = {"messaging_product": "whatsapp", "metadata": {"display_phone_number": "15550001111",
                                                                 "phone_number_id": PN}}
    if messages:
        value["contacts"] = contacts if contacts is not None else [contact(m["from"]) for m in messages]
        value["messages"] = messages
    if statuses:
        value["statuses"] = statuses
    doc = {"object": "whatsapp_business_account",
           "entry": [{"id": "109876543210001", "changes": [{"field": "messages", "value": value}]}]}
    return json.dumps(doc, separators=(",", ":")).encode()


def _long_from(message: Json, contacts: list[Json]) -> None:
    message["from"] = contacts[0]["wa_id"] = "1" * 200


def _huge_latitude(message: Json, _contacts: list[Json]) -> None:
    del message["text"]
    message.update(type="location", location={"latitude": 10**309, "longitude": 1.5})


Hostile = Callable[[Json, list[Json]], None]
HOSTILE: dict[str, tuple[Hostile, str]] = {
    "nul-text": (lambda m, c: m["text"].update(body="hi\x00there"), "message.text.body contains a NUL character"),
    "nul-profile-name": (lambda m, c: c[0]["profile"].update(name="Ann\x00Lee"),
                         "the sender's profile name (contacts[].profile.name) contains a NUL character"),
    "nul-wamid": (lambda m, c: m.update(id=m["id"] + "\x00"), "message.id contains a NUL character"),
    "wamid-300": (lambda m, c: m.update(id=m["id"].ljust(300, "w")), "message.id is longer than 256 characters (300)"),
    "from-200-digits": (_long_from, "message.from is longer than 128 characters (200)"),
    "type-60": (lambda m, c: m.update(type="t" * 60), "message.type is longer than 32 characters (60)"),
    "latitude-310-digits": (_huge_latitude, "message.location.latitude is out of range (a 310-digit integer)"),
    "timestamp-9999": (lambda m, c: m.update(timestamp="253402300799"),
                       "message.timestamp 253402300799 is after 9999-01-01"),
    "profile-name-300": (lambda m, c: c[0]["profile"].update(name="n" * 300),
                         "the sender's profile name (contacts[].profile.name) is longer than 256 characters (300)"),
}


def new_user() -> str:
    return "1555" + "".join(random.choices("0123456789", k=8))


class Scene:
    """One hostile message from `sender` (who already wrote once) next to a clean one from `neighbour`, and clean
    POSTs of other users; wamids share a prefix, so what was applied is counted by it."""

    def __init__(self, case: str) -> None:
        self.tag = f"wamid.B{uuid.uuid4().hex[:10]}"
        self.sender, self.neighbour = new_user(), new_user()
        self.others = [new_user() for _ in range(12)]
        hostile = text_message(f"{self.tag}.bad", self.sender, "hostile", TS + 10)
        contacts = [contact(self.sender), contact(self.neighbour)]
        change, self.reason = HOSTILE[case]
        change(hostile, contacts)
        self.first = envelope([text_message(f"{self.tag}.first", self.sender, "hi")])
        self.hostile = envelope([hostile, text_message(f"{self.tag}.neighbour", self.neighbour, "hello", TS + 11)],
                                contacts)
        self.clean = [envelope([text_message(f"{self.tag}.clean{i}", user)]) for i, user in enumerate(self.others)]

    @property
    def expected_applied(self) -> set[str]:
        return {f"{self.tag}.first", f"{self.tag}.neighbour", *(f"{self.tag}.clean{i}" for i in range(12))}


def held(db: Database, tag: str) -> list[QuarantinedMessage]:
    with db.session() as s:
        rows = s.scalars(select(QuarantinedMessage).where(QuarantinedMessage.payload.like(f'%"{tag}.%')))
        return list(rows)


def applied_once(db: Database, tag: str) -> dict[str, int]:
    return transitions_by_wamid(db, tag + ".")


# ---------------------------------------------------------------------------------------------- in process


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_message_is_held_and_every_neighbour_applied(db: Database, engine: Engine, case: str) -> None:
    scene = Scene(case)
    worker = IntakeWorker(engine, db)
    first = worker.process([scene.first])[0]
    assert isinstance(first, Intake)
    # The hostile POST stored in one group commit with concurrent clean POSTs, as the intake thread does under load.
    outcomes = worker.process([scene.clean[0], scene.hostile, *scene.clean[1:]])
    assert all(isinstance(o, Intake) and o.stored is not None for o in outcomes), outcomes
    answer = outcomes[1]
    assert isinstance(answer, Intake)
    assert answer.stored is not None
    assert (answer.stored.stored, answer.quarantined) == (1, 1)
    assert [o.stored.stored for o in outcomes if isinstance(o, Intake) and o.stored] == [1] * 13
    for outcome in [first, *outcomes]:
        assert isinstance(outcome, Intake)
        assert outcome.stored is not None
        for key in outcome.stored.session_keys:
            engine.apply_all(key)
    assert applied_once(db, scene.tag) == dict.fromkeys(scene.expected_applied, 1)
    [row] = held(db, scene.tag)
    assert (row.stage, row.status, row.reason, row.seen) == ("intake", "held", scene.reason, 1)
    assert row.phone_number_id == PN
    # Meta retries the same POST: its neighbours are duplicates, the hostile message is seen again, held once.
    again = worker.process([scene.hostile])[0]
    assert isinstance(again, Intake)
    assert again.stored is not None
    assert (again.stored.stored, again.stored.duplicates, again.quarantined) == (0, 1, 1)
    assert [r.seen for r in held(db, scene.tag)] == [2]
    # A retry parses it again: still held, with the same reason; the sender's session is untouched.
    result = retry(db, engine, [row.id], actor="test", reason="bounds test", now=datetime.now(UTC))
    assert (result.retried, result.still_rejected) == (0, [(row.id, scene.reason)])
    assert [(r.status, r.reason) for r in held(db, scene.tag)] == [("held", scene.reason)]
    view = session_view(db, PN, scene.sender)
    assert view is not None
    assert [m["wamid"] for m in view["inbound"]] == [f"{scene.tag}.first"]
    neighbour = session_view(db, PN, scene.neighbour)
    assert neighbour is not None
    assert neighbour["inbound"][0]["text"] == "hello"


def test_outage_and_refused_values_are_told_apart_on_real_errors(db: Database) -> None:
    down = Database("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")  # nothing listens on port 1
    with pytest.raises(DatabaseUnavailableError) as caught:
        down.ping()
    down.dispose()
    assert is_outage(caught.value)
    with db.begin() as conn:
        conn.execute(text("CREATE TABLE refuse (id INTEGER PRIMARY KEY, v VARCHAR(4) NOT NULL CHECK (length(v) <= 4))"))
    statements = [
        ("INSERT INTO refuse (id, v) VALUES (1, 'a'), (1, 'b')", {}),  # unique
        ("INSERT INTO refuse (id, v) VALUES (2, NULL)", {}),  # not null
        ("INSERT INTO refuse (id, v) VALUES (3, :v)", {"v": "toolong"}),  # varchar(4) / check
    ]
    if db.is_postgres:
        statements.append(("INSERT INTO refuse (id, v) VALUES (4, :v)", {"v": "a\x00"}))  # NUL: refused by psycopg
    refused: list[BaseException] = []
    for statement, params in statements:
        with pytest.raises(DBAPIError) as error, db.begin() as conn:
            conn.execute(text(statement), params)
        refused.append(error.value)
    assert [is_outage(e) for e in refused] == [False] * len(statements)
    wrapped = DatabaseUnavailableError("cannot store messages: value too long")  # as core.engine wraps them
    wrapped.__cause__ = refused[2]
    assert not is_outage(wrapped)


def test_a_value_the_database_refuses_is_quarantined_alone(db: Database, engine: Engine) -> None:
    """The last line of defence: a constraint the parser knows nothing about fails the shared INSERT; each body is
    then stored on its own, each message of the failing body on its own, and only the refused one is held."""
    poison(db)
    tag = f"wamid.P{uuid.uuid4().hex[:8]}"
    bad = envelope([text_message(f"{tag}.POISON", "15550000001"), text_message(f"{tag}.ok1", "15550000002")])
    clean = [envelope([text_message(f"{tag}.ok{i}", f"1555000001{i}")]) for i in range(2, 6)]
    outcomes = IntakeWorker(engine, db).process([clean[0], bad, *clean[1:]])
    assert [(o.stored.stored if o.stored else None, o.quarantined) for o in outcomes if isinstance(o, Intake)] == [
        (1, 0), (1, 1), (1, 0), (1, 0), (1, 0)
    ], outcomes
    [row] = held(db, tag)
    assert row.reason.startswith("could not be stored: "), row.reason
    assert "poison" in row.reason.lower()
    with db.begin() as conn:
        stored = conn.scalars(select(InboundEvent.wamid).where(InboundEvent.wamid.like(f"{tag}.%"))).all()
    assert sorted(stored) == sorted(f"{tag}.ok{i}" for i in range(1, 6))


def poison(db: Database) -> None:
    """A rule only the database knows: wamids containing POISON are refused (a CHECK on PostgreSQL, a trigger on
    SQLite: both raise an IntegrityError)."""
    with db.begin() as conn:
        if db.is_postgres:
            conn.execute(text("ALTER TABLE inbound_events ADD CONSTRAINT poison CHECK (wamid NOT LIKE '%POISON%')"))
        else:
            conn.execute(text("CREATE TRIGGER poison BEFORE INSERT ON inbound_events WHEN NEW.wamid LIKE '%POISON%' "
                              "BEGIN SELECT RAISE(ABORT, 'poisoned wamid'); END"))


def statuses_body(tag: str, count: int) -> bytes:
    statuses = [{"id": f"{tag}.out{i}", "status": "delivered", "timestamp": str(TS + 5), "recipient_id": "15550000009"}
                for i in range(count)]
    return envelope([], statuses=statuses)


def count_statuses(db: Database, tag: str) -> int:
    with db.engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(MessageStatusEvent)
                               .where(MessageStatusEvent.wamid.like(f"{tag}.%"))) or 0)


def test_statuses_of_a_huge_post_are_recorded_in_turns_with_other_posts(db: Database, engine: Engine) -> None:
    """Structural: a POST that arrives while a big one's statuses are being recorded is answered before they are
    all recorded, its own statuses included (they wait for a chunk, never for the whole POST)."""
    tag = f"wamid.S{uuid.uuid4().hex[:8]}"
    worker = IntakeWorker(engine, db)
    worker.start()

    async def scenario() -> tuple[int, bool, Intake, Intake]:
        big = asyncio.ensure_future(worker.take(statuses_body(f"{tag}.big", 1500)))
        while count_statuses(db, f"{tag}.big") == 0:
            await asyncio.sleep(0.005)
        small_body = envelope([text_message(f"{tag}.msg", "15550000008")],
                              statuses=[{"id": f"{tag}.small.out", "status": "read", "timestamp": str(TS)}])
        small = await worker.take(small_body)
        recorded_then, big_done_then = count_statuses(db, f"{tag}.big"), big.done()
        return recorded_then, big_done_then, small, await big

    try:
        recorded_then, big_done_then, small, big = asyncio.run(scenario())
    finally:
        worker.stop()
    assert not big_done_then
    assert 0 < recorded_then < 1500
    assert small.stored is not None
    assert small.stored.stored == 1
    assert count_statuses(db, f"{tag}.small") == 1
    assert len(big.parsed.statuses) == 1500
    assert count_statuses(db, f"{tag}.big") == 1500


# ---------------------------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, flows_dir: Path
) -> Iterator[tuple[Server, Database, Settings]]:
    with served_database(request, request.param, tmp_path_factory.mktemp("bounds"), flows_dir) as (server, db):
        yield server, db, make_settings(str(db.url.render_as_string(hide_password=False)), flows_dir,
                                        default_flow="counter")


def post_all(server: Server, bodies: list[bytes]) -> list[tuple[int, Json]]:
    def one(body: bytes) -> tuple[int, Json]:
        response = server.http.post(server.url + "/webhook", data=body, timeout=30, headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": sign(body, SECRET)})
        return response.status_code, response.json()

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, bodies))


@pytest.mark.parametrize("case", list(HOSTILE))
def test_over_http_a_hostile_message_is_held_and_concurrent_posts_are_applied(
    served: tuple[Server, Database, Settings], case: str
) -> None:
    server, db, _ = served
    assert server.alive, server.log()
    scene = Scene(case)
    assert server.post(scene.first).status_code == 200
    answers = post_all(server, [*scene.clean[:6], scene.hostile, *scene.clean[6:]])
    assert [status for status, _ in answers] == [200] * 13, answers
    assert answers[6][1] == {"status": "ok", "stored": 1, "duplicates": 0, "statuses": 0, "quarantined": 1}
    assert wait_applied(db, scene.tag + ".", 14) == dict.fromkeys(scene.expected_applied, 1)
    assert [(r.stage, r.reason) for r in held(db, scene.tag)] == [("intake", scene.reason)]
    for user in (scene.sender, scene.neighbour):
        assert server.get(f"/admin/sessions/{PN}/{user}", headers=ADMIN).status_code == 200
    assert server.get("/healthz").status_code == 200


def test_over_http_retry_keeps_it_held_and_views_never_fail(
    served: tuple[Server, Database, Settings], registry: FlowRegistry, flows_dir: Path
) -> None:
    server, db, settings = served
    scene = Scene("timestamp-9999")
    assert server.post(scene.first).status_code == 200
    assert server.post(scene.hostile).json()["quarantined"] == 1
    wait_applied(db, scene.tag + ".", 2)
    [row] = held(db, scene.tag)
    result = retry(db, Engine(db, registry, settings), [row.id], actor="test", reason="bounds", now=datetime.now(UTC))
    assert result.still_rejected == [(row.id, scene.reason)]
    response = server.get(f"/admin/sessions/{PN}/{scene.sender}", headers=ADMIN)
    assert response.status_code == 200
    assert [m["timestamp"] for m in response.json()["inbound"]] == [TS]
    shown = run("sessions", "show", PN, scene.sender, database_url=str(db.url.render_as_string(hide_password=False)),
                flows_dir=flows_dir)
    assert shown.returncode == 0, shown.stderr
    assert "Traceback" not in shown.stderr
    assert json.loads(shown.stdout)["user_id"] == scene.sender


def test_over_http_the_connection_survives_a_hostile_body(served: tuple[Server, Database, Settings]) -> None:
    server, db, _ = served
    scene = Scene("latitude-310-digits")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        answers = []
        for body in (scene.hostile, scene.clean[0], scene.first):
            conn.request("POST", "/webhook", body=body, headers={"Content-Type": "application/json",
                                                                 "X-Hub-Signature-256": sign(body, SECRET)})
            response = conn.getresponse()
            answers.append((response.status, json.loads(response.read()).get("quarantined", 0)))
            assert response.getheader("connection", "keep-alive").lower() != "close"
    finally:
        conn.close()
    assert answers == [(200, 1), (200, 0), (200, 0)]
    wait_applied(db, scene.tag + ".", 3)


def test_over_http_a_value_the_database_refuses_is_quarantined_alone(served: tuple[Server, Database, Settings]) -> None:
    server, db, _ = served
    poison(db)
    tag = f"wamid.P{uuid.uuid4().hex[:8]}"
    try:
        bodies = [envelope([text_message(f"{tag}.ok{i}", new_user())]) for i in range(10)]
        bad = envelope([text_message(f"{tag}.POISON", new_user()), text_message(f"{tag}.ok10", new_user())])
        answers = post_all(server, [*bodies[:5], bad, *bodies[5:]])
        assert [status for status, _ in answers] == [200] * 11, answers
        assert answers[5][1]["quarantined"] == 1
        assert wait_applied(db, tag + ".ok", 11) == {f"{tag}.ok{i}": 1 for i in range(11)}
        [row] = held(db, tag)
        assert row.reason.startswith("could not be stored: ")
    finally:
        with db.begin() as conn:
            conn.execute(text("ALTER TABLE inbound_events DROP CONSTRAINT poison" if db.is_postgres
                              else "DROP TRIGGER poison"))


def test_over_http_5000_statuses_do_not_hold_a_concurrent_post(served: tuple[Server, Database, Settings]) -> None:
    """Structural: the clean POST, sent once the big one's statuses are being recorded, is answered (and applied)
    while they are still being recorded."""
    server, db, _ = served
    tag = f"wamid.S{uuid.uuid4().hex[:8]}"
    big: dict[str, Any] = {}

    def send_big() -> None:  # on a connection of its own
        body = statuses_body(f"{tag}.big", 5000)
        response = requests.post(server.url + "/webhook", data=body, timeout=120, headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": sign(body, SECRET)})
        big.update(status=response.status_code, body=response.json(), at=time.monotonic())

    thread = threading.Thread(target=send_big)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while count_statuses(db, f"{tag}.big") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "status" not in big, big
        response = server.post(envelope([text_message(f"{tag}.clean", new_user())]))
        answered = time.monotonic()
        recorded = count_statuses(db, f"{tag}.big")
    finally:
        thread.join(120)
    assert response.status_code == 200
    assert big["status"] == 200
    assert big["body"]["statuses"] == 5000
    assert answered < big["at"]
    assert recorded < 5000
    assert count_statuses(db, f"{tag}.big") == 5000
    assert wait_applied(db, f"{tag}.clean", 1) == {f"{tag}.clean": 1}
