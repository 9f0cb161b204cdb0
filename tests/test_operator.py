"""Operator controls: every action of core/operator.py on SQLite and PostgreSQL (what it changes, what it refuses,
the audit row), the same actions through `python -m core`, the admin API over a real server and the dashboard's
Operations page, and the status webhook that settles an uncertain send by itself."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, text, update
from streamlit.testing.v1 import AppTest

from core import operator, quarantine
from core.db import Database
from core.engine import Engine
from core.flows import FlowRegistry
from core.models import AuditEntry, ChatSession, InboundEvent, Outbox, QuarantinedMessage, Transition
from core.operator import ConflictError, NotFoundError, OperatorError
from core.payloads import parse_webhook
from core.statuses import record_statuses
from core.views import session_view
from tests import factories as f
from tests.conftest import ROOT, make_settings
from tests.test_cli import one_error_line, run
from tests.test_webhook_e2e import ADMIN, Server, served_database, text_body, wait_applied

DATA = Path(__file__).parent / "data" / "operator"
PN = f.PHONE
USER, OTHER = "14155550101", "447700900123"
NOW = datetime(2026, 1, 2, 9, 0, tzinfo=UTC)
LEAD_STEPS = "ask_name, ask_email, ask_city, done, handoff"


def play(engine: Engine, user: str, *answers: str, start: int = f.BASE_TS) -> None:
    """The user's messages, ten seconds apart, applied as the webhook would apply them."""
    engine.ingest([f.text(user, body, start + 10 * n) for n, body in enumerate(answers)])
    engine.apply_all((PN, user))


def session_of(db: Database, user: str, phone: str = PN) -> ChatSession:
    with db.session() as s:
        found = s.get(ChatSession, (phone, user))
    assert found is not None
    return found


def audit_rows(db: Database) -> list[AuditEntry]:
    with db.session() as s:
        return list(s.scalars(select(AuditEntry).order_by(AuditEntry.id)))


def everything(db: Database) -> tuple[list[tuple[Any, ...]], ...]:
    """Every row an operator action could touch: a refusal must leave all of it as it was."""
    queries = ("SELECT * FROM sessions ORDER BY phone_number_id, user_id", "SELECT * FROM audit_log ORDER BY id",
               "SELECT id, status, wamid, sent_at, error_title FROM outbox ORDER BY id",
               "SELECT id, status, resolved_by FROM quarantine ORDER BY id", "SELECT count(*) FROM transitions")
    with db.engine.connect() as conn:
        return tuple([tuple(r) for r in conn.execute(text(q))] for q in queries)


def add_outbox(db: Database, user: str, status: str, **values: Any) -> int:
    with db.begin() as conn:
        return int(conn.execute(insert(Outbox).values(
            idempotency_key=f"test:{uuid.uuid4().hex}", phone_number_id=PN, user_id=user, kind="text",
            body={"type": "text", "text": {"body": "Hi!"}}, text="Hi!", status=status, attempts=1, **values,
        )).inserted_primary_key[0])


# ------------------------------------------------------------------------------------------ sessions
def test_reset_goes_to_the_start_of_the_latest_version_with_nothing_kept(
    db: Database, engine: Engine, registry: FlowRegistry
) -> None:
    play(engine, USER, "hi", "Ana Lima", "ana@example.com")
    with db.begin() as conn:
        conn.execute(update(ChatSession).values(status="archived", archived_from="active", archived_at=NOW))
    newer = replace(registry.latest("lead_qualification"), version=2)
    flows = FlowRegistry([*registry, newer])
    transitions = everything(db)[-1]

    done = operator.reset_session(db, flows, PN, USER, actor="ops:tester", reason="asked to start over", now=NOW)

    s = session_of(db, USER)
    assert (s.current_step, s.flow_version, s.data, s.failure_count, s.status) == ("ask_name", 2, {}, 0, "active")
    assert (s.step_entered_at, s.updated_at, s.archived_at, s.archived_from, s.completed_at) == (
        NOW, NOW, None, None, None)
    assert s.version == 3  # counts applied messages only
    assert everything(db)[-1] == transitions  # no transition: the audit log is the operators' history
    [entry] = audit_rows(db)
    assert (entry.actor, entry.action, entry.target, entry.reason, entry.at) == (
        "ops:tester", "session.reset", f"session {PN}/{USER}", "asked to start over", NOW)
    assert entry.details["from"]["step"] == "ask_city"
    assert entry.details["cleared_keys"] == ["email", "name"]
    assert done.summary.startswith(f"reset {PN}/{USER}: ask_city → ask_name")
    view = session_view(db, PN, USER)
    assert view is not None
    assert view["operator_actions"] == [{"at": NOW.isoformat(), "actor": "ops:tester", "action": "session.reset",
                                         "target": f"session {PN}/{USER}", "reason": "asked to start over"}]


def test_move_refuses_an_unknown_step_and_keeps_every_state_column_coherent(
    db: Database, engine: Engine, registry: FlowRegistry
) -> None:
    play(engine, USER, "hi", "Ana Lima")
    before = everything(db)
    with pytest.raises(OperatorError, match=f"has no step 'nowhere'; its steps: {LEAD_STEPS}"):
        operator.move_session(db, registry, PN, USER, "nowhere", actor="t", reason="r", now=NOW)
    assert everything(db) == before

    operator.move_session(db, registry, PN, USER, "done", actor="t", reason="confirmed by phone", now=NOW)
    s = session_of(db, USER)
    assert (s.current_step, s.status, s.completed_at, s.step_entered_at) == ("done", "completed", NOW, NOW)
    assert s.data == {"name": "Ana Lima"}  # a move keeps what the user told us

    with db.begin() as conn:  # the archive job, later
        conn.execute(update(ChatSession).values(status="archived", archived_from="completed", archived_at=NOW))
    later = NOW + timedelta(hours=1)
    operator.move_session(db, registry, PN, USER, "ask_city", actor="t", reason="needs the city", now=later)
    s = session_of(db, USER)
    assert (s.current_step, s.status, s.completed_at, s.archived_at, s.archived_from, s.step_entered_at) == (
        "ask_city", "active", None, None, None, later)
    assert [e.action for e in audit_rows(db)] == ["session.move", "session.move"]


def test_opt_out_is_set_and_cleared_and_a_no_op_is_refused(db: Database, engine: Engine) -> None:
    play(engine, USER, "hi")
    operator.set_opt_out(db, PN, USER, True, actor="t", reason="asked by email", now=NOW)
    s = session_of(db, USER)
    assert (s.opted_out, s.opted_out_at, s.current_step) == (True, NOW, "ask_name")
    before = everything(db)
    with pytest.raises(ConflictError, match="is already opted out"):
        operator.set_opt_out(db, PN, USER, True, actor="t", reason="again", now=NOW)
    assert everything(db) == before
    operator.set_opt_out(db, PN, USER, False, actor="t", reason="subscribed again", now=NOW)
    s = session_of(db, USER)
    assert (s.opted_out, s.opted_out_at) == (False, None)
    assert [(e.action, e.reason) for e in audit_rows(db)] == [
        ("session.opt-out", "asked by email"), ("session.opt-in", "subscribed again")]


def test_end_handoff_goes_back_to_the_step_handed_off_from(
    db: Database, engine: Engine, registry: FlowRegistry
) -> None:
    play(engine, OTHER, "hi")
    with pytest.raises(ConflictError, match="is not in hand-off: in step 'ask_name'"):
        operator.end_handoff(db, registry, PN, OTHER, actor="t", reason="r", now=NOW)
    play(engine, USER, "hi", "Ana Lima", "nope", "still no", "no")  # three bad emails: handed to a person
    assert session_of(db, USER).current_step == "handoff"
    before = everything(db)
    with pytest.raises(OperatorError, match="is the hand-off step itself"):
        operator.end_handoff(db, registry, PN, USER, step="handoff", actor="t", reason="r", now=NOW)
    with pytest.raises(OperatorError, match=f"its steps: {LEAD_STEPS}"):
        operator.end_handoff(db, registry, PN, USER, step="nowhere", actor="t", reason="r", now=NOW)
    assert everything(db) == before

    done = operator.end_handoff(db, registry, PN, USER, actor="agent:maria", reason="email fixed by phone", now=NOW)
    s = session_of(db, USER)
    assert (s.current_step, s.status, s.failure_count, s.step_entered_at) == ("ask_email", "active", 0, NOW)
    assert done.summary == f"ended hand-off of {PN}/{USER}: back to ask_email"
    with pytest.raises(ConflictError, match="not in hand-off"):
        operator.end_handoff(db, registry, PN, USER, actor="t", reason="r", now=NOW)

    play(engine, USER, "bad", "worse", "worst", start=f.BASE_TS + 100)
    operator.end_handoff(db, registry, PN, USER, step="ask_name", actor="t", reason="start with the name", now=NOW)
    assert session_of(db, USER).current_step == "ask_name"


def test_every_action_refuses_a_missing_session_and_a_blank_reason(
    db: Database, engine: Engine, registry: FlowRegistry
) -> None:
    play(engine, USER, "hi")
    actions: list[Callable[..., object]] = [
        lambda user, reason: operator.reset_session(db, registry, PN, user, actor="t", reason=reason, now=NOW),
        lambda user, reason: operator.move_session(db, registry, PN, user, "ask_city", actor="t", reason=reason,
                                                   now=NOW),
        lambda user, reason: operator.set_opt_out(db, PN, user, True, actor="t", reason=reason, now=NOW),
        lambda user, reason: operator.end_handoff(db, registry, PN, user, actor="t", reason=reason, now=NOW),
    ]
    before = everything(db)
    for action in actions:
        with pytest.raises(NotFoundError, match=f"^no session for {PN}/nobody$"):
            action("nobody", "why not")
        with pytest.raises(OperatorError, match="give a reason"):
            action(USER, "   ")
    assert everything(db) == before


# ------------------------------------------------------------------------------------------ uncertain sends
def test_an_operator_resolves_uncertain_sends(db: Database, engine: Engine) -> None:
    play(engine, USER, "hi")
    started = NOW - timedelta(minutes=5)
    first = add_outbox(db, USER, "uncertain", send_started_at=started)
    second = add_outbox(db, USER, "uncertain", send_started_at=started)
    sent = add_outbox(db, USER, "sent", wamid="wamid.SENT")
    before = everything(db)
    refusals: list[tuple[type[OperatorError], str, Callable[[], object]]] = [
        (NotFoundError, "no outbound message with id 999999", lambda: operator.resolve_send(
            db, 999999, "sent", actor="t", reason="r", now=NOW)),
        (ConflictError, f"outbound message {sent} is sent, not uncertain", lambda: operator.resolve_send(
            db, sent, "failed", actor="t", reason="r", now=NOW)),
        (ConflictError, f"wamid wamid.SENT belongs to outbound message {sent}", lambda: operator.resolve_send(
            db, first, "sent", wamid="wamid.SENT", actor="t", reason="r", now=NOW)),
        (OperatorError, "a wamid only goes with status sent", lambda: operator.resolve_send(
            db, first, "failed", wamid="wamid.X", actor="t", reason="r", now=NOW)),
        (OperatorError, "status must be sent or failed", lambda: operator.resolve_send(
            db, first, "read", actor="t", reason="r", now=NOW)),
    ]
    for error, message, action in refusals:
        with pytest.raises(error, match=message):
            action()
    assert everything(db) == before

    operator.resolve_send(db, first, "sent", wamid="wamid.FOUND", actor="t", reason="user confirmed", now=NOW)
    operator.resolve_send(db, second, "failed", actor="t", reason="user never got it", now=NOW)
    with db.session() as s:
        rows = {o.id: o for o in s.scalars(select(Outbox))}
    assert (rows[first].status, rows[first].wamid, rows[first].sent_at) == ("sent", "wamid.FOUND", started)
    assert rows[second].status == "failed"
    with pytest.raises(ConflictError, match="is sent, not uncertain"):
        operator.resolve_send(db, first, "sent", actor="t", reason="twice", now=NOW)
    view = session_view(db, PN, USER)
    assert view is not None
    assert [(a["action"], a["target"]) for a in view["operator_actions"]] == [
        ("outbox.resolve-sent", f"outbox {first}"), ("outbox.resolve-failed", f"outbox {second}")]


def test_a_status_webhook_settles_an_uncertain_send_by_itself(db: Database) -> None:
    started = NOW - timedelta(minutes=5)
    for outbox_id, user in ((4101, "14155550101"), (4102, "14155550102")):
        with db.begin() as conn:
            conn.execute(insert(Outbox).values(
                id=outbox_id, idempotency_key=f"test:{outbox_id}", phone_number_id=PN, user_id=user, kind="text",
                body={"type": "text"}, text="Hi!", status="uncertain", attempts=1, send_started_at=started,
                error_title="read timeout: outcome unknown, not resent",
            ))
    for name in ("status_uncertain_delivered", "status_uncertain_failed"):
        statuses = parse_webhook((DATA / f"{name}.json").read_bytes()).statuses
        assert record_statuses(db, statuses, now=NOW) == 1
        record_statuses(db, statuses, now=NOW)  # Meta redelivers: nothing changes
    with db.session() as s:
        rows = {o.id: o for o in s.scalars(select(Outbox))}
    delivered, failed = rows[4101], rows[4102]
    assert (delivered.status, delivered.sent_at, delivered.error_title) == ("sent", started, None)
    assert delivered.wamid == "wamid.HBgLMTQxNTU1NTAxMDEVAgARGBJDQUZFMDAxQUJDMTIzNDU2"
    assert (failed.status, failed.error_code) == ("failed", 131026)
    assert failed.wamid == "wamid.HBgLMTQxNTU1NTAxMDIVAgARGBJDQUZFMDAyREVGNDU2Nzg5"
    assert audit_rows(db) == []  # settled by WhatsApp's answer, not by an operator


# ------------------------------------------------------------------------------------------ quarantine
def hold_messages(db: Database, engine: Engine, *users: str) -> list[int]:
    """Stored messages that kept failing to apply, held in quarantine (as core.worker leaves them)."""
    engine.ingest([f.text(user, "hi", f.BASE_TS) for user in users])
    with db.begin() as conn:
        events = conn.execute(select(InboundEvent.__table__).where(InboundEvent.user_id.in_(users))
                              .order_by(InboundEvent.id)).all()
        for event in events:
            quarantine.quarantine_event(conn, event, "flow blew up", NOW)
        return [int(i) for i in conn.scalars(select(QuarantinedMessage.id).order_by(QuarantinedMessage.id))]


def test_quarantine_actions_refuse_unknown_and_closed_ids(db: Database, engine: Engine) -> None:
    [held] = hold_messages(db, engine, USER)
    before = everything(db)
    with pytest.raises(NotFoundError, match="no quarantined message with id 999"):
        operator.drop_quarantined(db, [held, 999], actor="t", reason="r", now=NOW)
    with pytest.raises(OperatorError, match="give a reason"):
        operator.retry_quarantined(db, engine, [held], actor="t", reason="", now=NOW)
    assert everything(db) == before
    assert operator.retry_quarantined(db, engine, [held], actor="t", reason="flow fixed", now=NOW).retried == 1
    assert session_of(db, USER).current_step == "ask_name"
    with pytest.raises(ConflictError, match=f"quarantined message {held} \\(retried\\) is not held"):
        operator.drop_quarantined(db, [held], actor="t", reason="r", now=NOW)


# ------------------------------------------------------------------------------------------ command line
def test_cli_session_actions_and_their_refusals(
    database_url: str, db: Database, engine: Engine, flows_dir: Path
) -> None:
    play(engine, USER, "hi", "Ana Lima", "nope", "still no", "no")
    play(engine, OTHER, "hi")

    def cli(*args: str) -> Any:
        return run(*args, database_url=database_url, flows_dir=flows_dir)

    done = cli("sessions", "end-handoff", PN, USER, "--reason", "called the user")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ended hand-off of {PN}/{USER}: back to ask_email"
    [entry] = audit_rows(db)
    assert (entry.actor[:4], entry.reason) == ("cli:", "called the user")

    before = everything(db)
    refusals = {
        ("sessions", "move", PN, OTHER, "--step", "nowhere", "--reason", "r"): f"its steps: {LEAD_STEPS}",
        ("sessions", "end-handoff", PN, OTHER, "--reason", "r"): "is not in hand-off",
        ("sessions", "reset", PN, "nobody", "--reason", "r"): f"error: no session for {PN}/nobody",
        ("sessions", "opt-in", PN, OTHER, "--reason", "r"): "is already opted in",
        ("sessions", "reset", PN, OTHER, "--reason", " "): "give a reason",
        ("sessions", "reset", PN, OTHER): "the following arguments are required: --reason",
        ("outbound", "resolve", "999", "--as", "sent", "--reason", "r"): "no outbound message with id 999",
    }
    for args, message in refusals.items():
        assert message in one_error_line(cli(*args)), args
    assert everything(db) == before

    for args in (("sessions", "move", PN, OTHER, "--step", "ask_city", "--reason", "skip the email"),
                 ("sessions", "opt-out", PN, OTHER, "--reason", "asked by email")):
        result = cli(*args)
        assert result.returncode == 0, result.stderr
    s = session_of(db, OTHER)
    assert (s.current_step, s.opted_out) == ("ask_city", True)
    assert [(e.action, e.reason) for e in audit_rows(db)][1:] == [
        ("session.move", "skip the email"), ("session.opt-out", "asked by email")]


def test_cli_quarantine_list_retry_drop_and_outbound_resolve(
    sqlite_url: str, flows_dir: Path, registry: FlowRegistry
) -> None:
    db = Database(sqlite_url)
    engine = Engine(db, registry, make_settings(sqlite_url, flows_dir))
    first, second = hold_messages(db, engine, USER, OTHER)
    uncertain = add_outbox(db, USER, "uncertain")

    def cli(*args: str) -> Any:
        return run(*args, database_url=sqlite_url, flows_dir=flows_dir)

    listing = cli("quarantine", "list")
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    assert header.split()[:4] == ["id", "stage", "status", "number"]
    assert [r.split()[:3] for r in rows] == [[str(second), "apply", "held"], [str(first), "apply", "held"]]
    assert all("flow blew up" in r for r in rows)

    retried = cli("quarantine", "retry", str(first), "--reason", "flow fixed")
    assert (retried.returncode, retried.stdout.strip()) == (0, "retried 1 quarantined message(s)"), retried.stderr
    assert session_of(db, USER).current_step == "ask_name"  # applied, exactly once
    dropped = cli("quarantine", "drop", str(second), "--reason", "test traffic")
    assert (dropped.returncode, dropped.stdout.strip()) == (0, "dropped 1 quarantined message(s)"), dropped.stderr

    before = everything(db)
    assert "is not held any more" in one_error_line(cli("quarantine", "drop", str(second), "--reason", "again"))
    assert "no quarantined message with id 999" in one_error_line(cli("quarantine", "retry", "999", "--reason", "r"))
    assert everything(db) == before
    assert cli("quarantine", "list").stdout.strip() == "no held quarantined messages"
    assert [r.split()[:3] for r in cli("quarantine", "list", "--status", "dropped").stdout.splitlines()[1:]] == [
        [str(second), "apply", "dropped"]]

    assert str(uncertain) in cli("outbound", "uncertain").stdout
    resolved = cli("outbound", "resolve", str(uncertain), "--as", "sent", "--wamid", "wamid.OK", "--reason", "seen")
    assert resolved.returncode == 0, resolved.stderr
    assert cli("outbound", "uncertain").stdout.strip() == "no uncertain sends"
    assert [(e.action, e.target, e.reason) for e in audit_rows(db)] == [
        ("quarantine.retry", f"quarantine {first}", "flow fixed"),
        ("quarantine.drop", f"quarantine {second}", "test traffic"),
        ("outbox.resolve-sent", f"outbox {uncertain}", "seen"),
    ]
    assert all(e.actor.startswith("cli:") for e in audit_rows(db))
    db.dispose()


# ------------------------------------------------------------------------------------------ admin API
@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        flows_dir: Path) -> Iterator[tuple[Server, Database]]:
    with served_database(request, request.param, tmp_path_factory.mktemp("operator-api"), flows_dir,
                         DEFAULT_FLOW="lead_qualification") as served:
        yield served


def post(server: Server, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    return server.http.post(server.url + path, json=body, headers=ADMIN if headers is None else headers, timeout=10)


def test_admin_api_session_actions_refusals_and_401(api: tuple[Server, Database]) -> None:
    server, db = api
    user = f"1555{uuid.uuid4().int % 10**7:07d}"
    prefix = f"wamid.OP.{user}."
    for n, answer in enumerate(("hi", "Ana Lima")):
        assert server.post(text_body(f"{prefix}{n}", user, answer, ts=f.BASE_TS + 10 * n)).status_code == 200
    assert len(wait_applied(db, prefix, 2)) == 2
    base = f"/admin/sessions/{PN}/{user}"
    before = everything(db)

    protected = [f"{base}/{action}" for action in ("reset", "move", "opt-out", "end-handoff")] + [
        "/admin/outbound/1/resolve", "/admin/quarantine/1/retry", "/admin/quarantine/1/drop"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for path in protected:
            assert post(server, path, {"reason": "r", "step": "ask_city"}, headers).status_code == 401, path
    refusals = [
        (f"/admin/sessions/{PN}/nobody/reset", {"reason": "r"}, 404, f"no session for {PN}/nobody"),
        (f"{base}/move", {"step": "nowhere", "reason": "r"}, 422, f"its steps: {LEAD_STEPS}"),
        (f"{base}/reset", {}, 422, "invalid request: reason: Field required"),
        (f"{base}/end-handoff", {"reason": "r"}, 409, "is not in hand-off"),
        (f"{base}/opt-out", {"opted_out": False, "reason": "r"}, 409, "is already opted in"),
    ]
    for path, body, status, message in refusals:
        answer = post(server, path, body)
        assert answer.status_code == status, (path, answer.text)
        assert message in answer.json()["error"], answer.json()
    assert everything(db) == before

    moved = post(server, f"{base}/move", {"step": "ask_city", "reason": "email given by phone", "actor": "alice"})
    assert moved.status_code == 200, moved.text
    assert moved.json()["session"]["step"] == "ask_city"
    reset = post(server, f"{base}/reset", {"reason": "wrong person"})
    assert reset.status_code == 200, reset.text
    assert (reset.json()["session"]["step"], reset.json()["session"]["data"]) == ("ask_name", {})
    view = server.get(base, headers=ADMIN).json()
    assert [(a["actor"], a["action"], a["reason"]) for a in view["operator_actions"]] == [
        ("admin-api:alice", "session.move", "email given by phone"), ("admin-api", "session.reset", "wrong person")]


def test_admin_api_resolves_sends_and_handles_quarantine(api: tuple[Server, Database]) -> None:
    server, db = api
    user = f"1666{uuid.uuid4().int % 10**7:07d}"
    uncertain = add_outbox(db, user, "uncertain")
    assert post(server, f"/admin/outbound/{uncertain}/resolve", {"status": "sent", "reason": "r"}, {}
                ).status_code == 401
    assert post(server, f"/admin/outbound/{uncertain}/resolve", {"status": "maybe", "reason": "r"}).status_code == 422
    assert post(server, "/admin/outbound/999999/resolve", {"status": "sent", "reason": "r"}).status_code == 404
    resolved = post(server, f"/admin/outbound/{uncertain}/resolve", {"status": "failed", "reason": "never arrived"})
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["action"] == "outbox.resolve-failed"
    assert post(server, f"/admin/outbound/{uncertain}/resolve", {"status": "sent", "reason": "r"}).status_code == 409

    wamid = f"wamid.Q.{user}"
    message = f.text(user, "hi", f.BASE_TS, wamid_=wamid)
    # Stored and held in one transaction: the server's pending sweep must not apply it first.
    with db.begin() as conn:
        event_id = conn.execute(insert(InboundEvent).values(
            phone_number_id=PN, wamid=wamid, user_id=user, timestamp=f.BASE_TS, kind="text",
            message=message.model_dump(mode="json"), received_at=NOW,
        )).inserted_primary_key[0]
        event = conn.execute(select(InboundEvent.__table__).where(InboundEvent.id == event_id)).one()
        quarantine.quarantine_event(conn, event, "flow blew up", NOW)
    listed = server.get("/admin/quarantine", headers=ADMIN).json()["messages"]
    [held] = [m for m in listed if m["wamid"] == wamid]
    assert server.get("/admin/quarantine").status_code == 401
    retried = post(server, f"/admin/quarantine/{held['id']}/retry", {"reason": "bound raised"})
    assert retried.status_code == 200, retried.text
    assert retried.json()["retried"] == 1
    assert wait_applied(db, wamid, 1) == {wamid: 1}
    assert post(server, f"/admin/quarantine/{held['id']}/drop", {"reason": "r"}).status_code == 409
    assert post(server, "/admin/quarantine/999999/drop", {"reason": "r"}).status_code == 404
    with db.session() as s:
        actions = s.scalars(select(AuditEntry.action).where(AuditEntry.target.in_(
            [f"outbox {uncertain}", f"quarantine {held['id']}"])).order_by(AuditEntry.id)).all()
    assert actions == ["outbox.resolve-failed", "quarantine.retry"]
    with db.session() as s:
        assert s.scalar(select(Transition.to_step).where(Transition.wamid == wamid)) == "ask_name"


# ------------------------------------------------------------------------------------------ dashboard
def operations_page(url: str, flows_dir: Path, monkeypatch: pytest.MonkeyPatch, role: str) -> AppTest:
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("FLOWS_DIR", str(flows_dir))
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=60)
    at.session_state["auth_user"] = {"name": "alice" if role == "admin" else "victor", "role": role}
    at.switch_page("dashboard/pages/operations.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def page_text(at: AppTest) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "info", "error", "warning", "success", "caption")
                     for e in at.get(kind))


def click(at: AppTest, label: str) -> None:
    next(b for b in at.button if b.label == label).click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]


def test_operations_page_acts_for_admins_only(
    sqlite_url: str, flows_dir: Path, registry: FlowRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(sqlite_url)
    engine = Engine(db, registry, make_settings(sqlite_url, flows_dir))
    play(engine, USER, "hi", "Ana Lima")
    [held] = hold_messages(db, engine, OTHER)
    uncertain = add_outbox(db, USER, "uncertain")

    viewer = operations_page(sqlite_url, flows_dir, monkeypatch, "viewer")
    assert "Only admins can act" in page_text(viewer)
    assert viewer.text_input == []
    assert [b.label for b in viewer.button] == ["Sign out"]

    at = operations_page(sqlite_url, flows_dir, monkeypatch, "admin")
    at.text_input(key="ops_phone").input(PN)
    at.text_input(key="ops_user").input(USER)
    at.run()
    assert "step **ask_email**" in page_text(at)
    at.radio(key="ops_action").set_value("Move to step")
    at.selectbox(key="ops_step").select("ask_city")
    click(at, "Apply to this session")
    assert "move: give a reason" in page_text(at)
    assert audit_rows(db) == []
    at.text_input(key="ops_reason").input("email given by phone")
    click(at, "Apply to this session")
    assert f"moved {PN}/{USER}: ask_email → ask_city" in page_text(at)
    assert session_of(db, USER).current_step == "ask_city"

    at.selectbox(key="ops_resolve_id").select(uncertain)
    at.radio(key="ops_resolve_status").set_value("failed")
    at.text_input(key="ops_resolve_reason").input("user never got it")
    click(at, "Resolve")
    at.multiselect(key="ops_quarantine_ids").select(held)
    at.text_input(key="ops_quarantine_reason").input("test traffic")
    click(at, "Drop")
    assert "Nothing held in quarantine." in page_text(at)
    assert [(e.actor, e.action, e.reason) for e in audit_rows(db)] == [
        ("dashboard:alice", "session.move", "email given by phone"),
        ("dashboard:alice", "outbox.resolve-failed", "user never got it"),
        ("dashboard:alice", "quarantine.drop", "test traffic"),
    ]
    db.dispose()
