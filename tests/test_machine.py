"""decide(): every rule of the pure session machine, on the shipped flows and the test fixture flows."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import pytest

from core.flows import Flow, default_flows_dir, load_flow_file, load_flows
from core.machine import Decision, SessionState, decide, new_session, prompt_replies, render
from core.messages import InboundMessage, Location, Media

DATA = Path(__file__).parent / "data" / "flows"
SHIPPED = load_flows(default_flows_dir())
FIXTURES = load_flows(DATA)
LEAD = SHIPPED.get("lead_qualification", 1)
BOOKING = SHIPPED.get("service_booking", 1)
CHECKS = FIXTURES.get("validators")
POLY = FIXTURES.get("polyglot")
COUNTER = FIXTURES.get("counter")


def msg(kind: str = "text", **fields: Any) -> InboundMessage:
    return InboundMessage(phone_number_id="100", user_id="200", wamid="wamid.1", timestamp=1_767_268_800,
                          kind=kind, **fields)


def text(body: str) -> InboundMessage:
    return msg(text=body)


def tap(choice_id: str, kind: str = "interactive") -> InboundMessage:
    return msg(kind, choice_id=choice_id)


def at(flow: Flow, step: str, data: dict[str, Any] | None = None, **fields: Any) -> SessionState:
    values: dict[str, Any] = {"failure_count": 0, "language": flow.default_language, "status": "active", **fields}
    return SessionState(step=step, data=data or {}, **values)


def after(decision: Decision) -> SessionState:
    return SessionState(step=decision.to_step, data=decision.data, failure_count=decision.failure_count,
                        language=decision.language, status=decision.status)


def run(flow: Flow, state: SessionState | None, *messages: InboundMessage) -> list[Decision]:
    decisions = []
    for message in messages:
        decisions.append(decide(flow, state, message))
        state = after(decisions[-1])
    return decisions


def only_text(decision: Decision) -> str:
    assert len(decision.replies) == 1
    return decision.replies[0].text


def flow_from(tmp_path: Path, body: str) -> Flow:
    path = tmp_path / "flow.yaml"
    path.write_text(body, encoding="utf-8")
    return load_flow_file(path)


# --- lead qualification --------------------------------------------------------------------------------------


def test_new_user_gets_the_start_prompt_and_the_first_message_is_not_an_answer() -> None:
    decision = decide(LEAD, None, text("Ana"))
    assert (decision.outcome, decision.from_step, decision.to_step) == ("started", None, "ask_name")
    assert (decision.data, decision.failure_count, decision.status, decision.language) == ({}, 0, "active", "en")
    assert decision.opted_out is None
    reply = decision.replies[0]
    assert (reply.kind, reply.step) == ("text", "ask_name")
    assert reply.body == {"type": "text", "text": {"body": LEAD.step("ask_name").prompt["en"]}}


def test_lead_happy_path() -> None:
    name, email, city = run(LEAD, at(LEAD, "ask_name"), text("Ana"), text("  Ana.Perez@Example.COM "),
                            text("Valencia"))
    assert (name.outcome, name.from_step, name.to_step) == ("advanced", "ask_name", "ask_email")
    assert only_text(name).startswith("Nice to meet you, Ana!")
    assert (email.to_step, email.data["email"]) == ("ask_city", "ana.perez@example.com")
    assert (city.outcome, city.to_step, city.status) == ("completed", "done", "completed")
    assert city.data == {"name": "Ana", "email": "ana.perez@example.com", "city": "Valencia"}
    assert only_text(city).startswith("Thanks Ana! 🎉")
    assert "ana.perez@example.com" in only_text(city)


@pytest.mark.parametrize("name", ["A", " ", "  B  ", "x" * 81])
def test_name_validator_rejects(name: str) -> None:
    decision = decide(LEAD, at(LEAD, "ask_name"), text(name))
    assert (decision.outcome, decision.to_step, decision.failure_count, decision.data) == (
        "reprompted", "ask_name", 1, {})
    assert only_text(decision) == f"{LEAD.step('ask_name').reprompt['en']}\n\n{LEAD.step('ask_name').prompt['en']}"


@pytest.mark.parametrize("email", ["ana@", "ana example.com", "@example.com", "ana@localhost", "ana@@x.com",
                                   "ana@x..com", "ana@-x.com", "ana@x.com\nbob", "a" * 250 + "@x.com"])
def test_invalid_emails(email: str) -> None:
    decision = decide(LEAD, at(LEAD, "ask_email", {"name": "Ana"}), text(email))
    assert decision.outcome == "reprompted"
    assert "email" not in decision.data


@pytest.mark.parametrize(("sent", "stored"), [
    ("ana@example.com", "ana@example.com"),
    (" Bob.O'Neil+tag@Mail.Example.co.uk\n", "bob.o'neil+tag@mail.example.co.uk"),
    ("x_y@sub-domain.io", "x_y@sub-domain.io"),
])
def test_valid_emails_are_stored_lowercased_and_stripped(sent: str, stored: str) -> None:
    decision = decide(LEAD, at(LEAD, "ask_email", {"name": "Ana"}), text(sent))
    assert (decision.outcome, decision.data["email"]) == ("advanced", stored)


def test_failure_limit_hands_off_and_the_handoff_step_waits_for_nothing() -> None:
    first, second, third, later = run(LEAD, at(LEAD, "ask_email"), text("no"), text("nope"), text("still no"),
                                      text("hello?"))
    assert [d.failure_count for d in (first, second)] == [1, 2]
    assert (third.outcome, third.from_step, third.to_step, third.failure_count) == ("handoff", "ask_email", "handoff",
                                                                                    0)
    assert third.status == "active"
    assert only_text(third) == LEAD.step("handoff").prompt["en"]
    assert (later.outcome, later.to_step, later.failure_count) == ("reprompted", "handoff", 0)
    assert only_text(later) == LEAD.step("handoff").prompt["en"]


def test_a_valid_answer_clears_the_failure_count() -> None:
    decision = decide(LEAD, at(LEAD, "ask_name", failure_count=2), text("Ana"))
    assert (decision.outcome, decision.failure_count) == ("advanced", 0)


def test_non_text_input_on_a_text_step_is_invalid() -> None:
    photo = msg("image", media=Media(id="m1", mime_type="image/jpeg", caption="Ana"))
    assert decide(LEAD, at(LEAD, "ask_name"), photo).outcome == "reprompted"


@pytest.mark.parametrize("word", ["restart", "RESTART", "  Start   Over ", "start\tover", "reiniciar"])
def test_reset_keywords(word: str) -> None:
    decision = decide(LEAD, at(LEAD, "ask_city", {"name": "Ana", "email": "a@b.co"}, failure_count=2), text(word))
    assert (decision.outcome, decision.from_step, decision.to_step) == ("reset", "ask_city", "ask_name")
    assert (decision.data, decision.failure_count, decision.status) == ({}, 0, "active")
    assert only_text(decision) == LEAD.step("ask_name").prompt["en"]


def test_a_keyword_inside_a_sentence_is_just_text() -> None:
    decision = decide(LEAD, at(LEAD, "ask_city", {"name": "Ana"}), text("restart city"))
    assert (decision.outcome, decision.data["city"]) == ("completed", "restart city")


# --- opt-out / opt-in ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["STOP", " stop ", "Unsubscribe", "baja"])
def test_opt_out_keeps_the_conversation_and_flags_the_user(word: str) -> None:
    state = at(LEAD, "ask_email", {"name": "Ana"}, failure_count=1)
    decision = decide(LEAD, state, text(word))
    assert (decision.outcome, decision.from_step, decision.to_step, decision.opted_out) == (
        "opted_out", "ask_email", "ask_email", True)
    assert (decision.data, decision.failure_count, decision.status) == ({"name": "Ana"}, 1, "active")
    assert len(decision.replies) == 1
    assert decision.replies[0].step is None
    assert only_text(decision) == LEAD.texts["en"]["opted_out"]


def test_opt_in_resends_the_current_question() -> None:
    decision = decide(LEAD, at(LEAD, "ask_email", {"name": "Ana"}), text("START"))
    assert (decision.outcome, decision.to_step, decision.opted_out) == ("opted_in", "ask_email", False)
    assert only_text(decision) == f"{LEAD.texts['en']['opted_in']}\n\nNice to meet you, Ana! " \
                                  "What's the best email address to reach you?"
    assert decision.replies[0].step == "ask_email"


def test_opt_out_before_any_session_and_opt_in_after_completion() -> None:
    first = decide(LEAD, None, text("stop"))
    assert (first.outcome, first.from_step, first.to_step, first.opted_out) == ("opted_out", None, "ask_name", True)
    done = decide(LEAD, at(LEAD, "done", {"name": "Ana"}, status="completed"), text("start"))
    assert (done.outcome, done.to_step, done.status, done.opted_out) == ("opted_in", "done", "completed", False)
    assert only_text(done) == LEAD.texts["en"]["opted_in"]


def test_template_quick_reply_payload_can_opt_out() -> None:
    decision = decide(LEAD, at(LEAD, "ask_name"), tap("STOP", kind="button"))
    assert decision.opted_out is True


# --- restore, completion, new runs -------------------------------------------------------------------------------


def test_archived_session_resumes_where_it_was() -> None:
    state = at(LEAD, "ask_email", {"name": "Ana"}, failure_count=2, status="archived", language="es")
    decision = decide(LEAD, state, text("hola"))
    assert (decision.outcome, decision.from_step, decision.to_step, decision.status) == (
        "restored", "ask_email", "ask_email", "active")
    assert (decision.data, decision.failure_count, decision.language) == ({"name": "Ana"}, 0, "es")
    assert only_text(decision) == ("¡Hola de nuevo! Sigamos donde lo dejamos.\n\n"
                                   "¡Encantado, Ana! ¿A qué correo electrónico te podemos escribir?")


def test_an_archived_users_answer_counts_in_the_step_they_were_in() -> None:
    state = at(LEAD, "ask_email", {"name": "Ana"}, failure_count=2, status="archived")
    decision = decide(LEAD, state, text(" Ana@Example.com "))
    assert (decision.outcome, decision.from_step, decision.to_step, decision.status, decision.restored) == (
        "advanced", "ask_email", "ask_city", "active", True)
    assert (decision.data, decision.failure_count) == ({"name": "Ana", "email": "ana@example.com"}, 0)
    assert only_text(decision) == LEAD.step("ask_city").prompt["en"]  # the next question, no welcome back
    last = decide(LEAD, at(LEAD, "ask_city", {"name": "Ana"}, status="archived"), text("Lima"))
    assert (last.outcome, last.to_step, last.status, last.restored) == ("completed", "done", "completed", True)


def test_an_archived_users_tap_on_the_current_buttons_counts_and_a_stale_one_is_welcomed_back() -> None:
    state = at(BOOKING, "choose_service", status="archived")
    choice = BOOKING.step("choose_service").choices[0].id
    tapped = decide(BOOKING, state, tap(choice), context_step="choose_service")
    assert (tapped.outcome, tapped.restored, tapped.data[BOOKING.step("choose_service").key]) == (
        "advanced", True, choice)
    stale = decide(BOOKING, state, tap(choice), context_step="confirm")
    assert (stale.outcome, stale.to_step, stale.restored) == ("restored", "choose_service", True)


def test_an_archived_user_who_says_start_over_restarts() -> None:
    decision = decide(LEAD, at(LEAD, "ask_email", {"name": "Ana"}, status="archived"), text("start over"))
    assert (decision.outcome, decision.to_step, decision.data, decision.restored) == ("reset", "ask_name", {}, True)


def test_an_active_users_answer_is_not_marked_restored() -> None:
    assert decide(LEAD, at(LEAD, "ask_email", {"name": "Ana"}), text("ana@example.com")).restored is False


def test_archived_session_restarts_when_the_flow_says_so() -> None:
    decision = decide(POLY, at(POLY, "ask_name", {"x": 1}, status="archived"), text("hi"))
    assert (decision.outcome, decision.to_step, decision.data) == ("restored", "pick_language", {})
    assert decision.replies[0].text.startswith(POLY.text("welcome_back", "en"))
    assert decision.replies[0].kind == "interactive"


def test_archived_completed_session_restarts() -> None:
    decision = decide(LEAD, at(LEAD, "done", {"name": "Ana"}, status="archived"), text("hi again"))
    assert (decision.outcome, decision.from_step, decision.to_step, decision.data) == (
        "restored", "done", "ask_name", {})


def test_completed_session_starts_a_new_run() -> None:
    decision = decide(LEAD, at(LEAD, "done", {"name": "Ana"}, status="completed", language="es"), text("Ana"))
    assert (decision.outcome, decision.from_step, decision.to_step) == ("started", "done", "ask_name")
    assert (decision.data, decision.status, decision.language) == ({}, "active", "es")
    assert only_text(decision) == LEAD.step("ask_name").prompt["es"]


def test_unknown_status_and_non_flow_kinds_are_caller_bugs() -> None:
    with pytest.raises(ValueError, match="unknown session status"):
        decide(LEAD, at(LEAD, "ask_name", status="paused"), text("x"))
    with pytest.raises(ValueError, match="never moves a session"):
        decide(LEAD, at(LEAD, "ask_name"), msg("reaction", emoji="👍"))


# --- service booking: interactive replies, choices, branches, stale taps ------------------------------------------


def test_booking_buttons_are_meta_interactive_buttons() -> None:
    reply = decide(BOOKING, None, text("hi")).replies[0]
    prompt = BOOKING.step("choose_service").prompt["en"]
    assert (reply.kind, reply.step, reply.text) == ("interactive", "choose_service", prompt)
    assert reply.body == {"type": "interactive", "interactive": {
        "type": "button", "body": {"text": prompt}, "action": {"buttons": [
            {"type": "reply", "reply": {"id": "haircut", "title": "Haircut"}},
            {"type": "reply", "reply": {"id": "coloring", "title": "Coloring"}},
            {"type": "reply", "reply": {"id": "beard", "title": "Beard trim"}},
        ]}}}


def test_booking_dates_are_a_meta_list() -> None:
    decision = decide(BOOKING, at(BOOKING, "choose_service"), tap("haircut"))
    assert (decision.outcome, decision.to_step, decision.data) == ("advanced", "choose_date", {"service": "haircut"})
    interactive = decision.replies[0].body["interactive"]
    assert interactive["type"] == "list"
    assert interactive["action"]["button"] == "Choose a day"
    rows = interactive["action"]["sections"][0]["rows"]
    assert rows[0] == {"id": "2026-12-01", "title": "Tuesday 1 December"}
    assert rows[-1] == {"id": "2026-12-05", "title": "Saturday 5 December", "description": "Busy day, book early"}


def test_booking_list_in_spanish() -> None:
    decision = decide(BOOKING, at(BOOKING, "choose_service", language="es"), tap("beard"))
    interactive = decision.replies[0].body["interactive"]
    assert interactive["body"]["text"] == BOOKING.step("choose_date").prompt["es"]
    assert interactive["action"]["button"] == "Elegir día"
    assert interactive["action"]["sections"][0]["rows"][0]["title"] == "martes 1 de diciembre"


@pytest.mark.parametrize(("typed", "choice"), [("Haircut", "haircut"), ("  beard trim ", "beard"),
                                               ("CORTE DE PELO", "haircut"), ("coloring", "coloring")])
def test_typed_choice_title_or_id_is_accepted(typed: str, choice: str) -> None:
    decision = decide(BOOKING, at(BOOKING, "choose_service"), text(typed))
    assert (decision.outcome, decision.data["service"]) == ("advanced", choice)


def test_invalid_choice_reprompts_with_the_buttons_again() -> None:
    decision = decide(BOOKING, at(BOOKING, "choose_service"), text("pizza"))
    assert (decision.outcome, decision.failure_count) == ("reprompted", 1)
    reply = decision.replies[0]
    assert reply.kind == "interactive"
    assert reply.body["interactive"]["body"]["text"].startswith("Please tap one of the options below.\n\n")
    assert len(reply.body["interactive"]["action"]["buttons"]) == 3


def test_unknown_choice_id_is_invalid_not_stale() -> None:
    assert decide(BOOKING, at(BOOKING, "choose_service"), tap("massage")).outcome == "reprompted"


@pytest.mark.parametrize("time", ["09:00", "18:59", " 10:30 ", "12:05"])
def test_booking_time_accepts(time: str) -> None:
    decision = decide(BOOKING, at(BOOKING, "choose_time", {"service": "haircut", "date": "2026-12-01"}), text(time))
    assert (decision.outcome, decision.to_step, decision.data["time"]) == ("advanced", "confirm", time)


@pytest.mark.parametrize("time", ["19:00", "08:59", "8:30", "10:3", "noon", "10:30pm", "24:00"])
def test_booking_time_rejects(time: str) -> None:
    assert decide(BOOKING, at(BOOKING, "choose_time"), text(time)).outcome == "reprompted"


def test_booking_confirm_yes_completes_and_no_goes_back() -> None:
    data = {"service": "haircut", "date": "2026-12-01", "time": "10:30"}
    start = decide(BOOKING, at(BOOKING, "choose_time", {"service": "haircut", "date": "2026-12-01"}), text("10:30"))
    assert start.replies[0].text == "Here's your booking: haircut on 2026-12-01 at 10:30. Shall I confirm it?"
    yes = decide(BOOKING, at(BOOKING, "confirm", data), tap("confirm_yes"))
    assert (yes.outcome, yes.to_step, yes.status, yes.data["confirmation"]) == ("completed", "done", "completed",
                                                                                "confirm_yes")
    assert "See you on 2026-12-01 at 10:30" in only_text(yes)
    no = decide(BOOKING, at(BOOKING, "confirm", data), tap("confirm_no"))
    assert (no.outcome, no.to_step, no.status, no.data["service"]) == ("advanced", "choose_service", "active",
                                                                       "haircut")


def test_stale_tap_on_a_foreign_choice() -> None:
    state = at(BOOKING, "choose_date", {"service": "haircut"}, failure_count=2)
    decision = decide(BOOKING, state, tap("coloring"))
    assert (decision.outcome, decision.from_step, decision.to_step) == ("stale", "choose_date", "choose_date")
    assert (decision.data, decision.failure_count, decision.status) == ({"service": "haircut"}, 2, "active")
    reply = decision.replies[0]
    assert (reply.kind, reply.step) == ("interactive", "choose_date")
    assert reply.text == f"{BOOKING.text('stale', 'en')}\n\n{BOOKING.step('choose_date').prompt['en']}"


def test_stale_tap_by_context_even_when_the_id_fits_the_current_step() -> None:
    state = at(BOOKING, "choose_service", {"service": "haircut"})
    decision = decide(BOOKING, state, tap("beard"), context_step="confirm")
    assert (decision.outcome, decision.to_step, decision.data) == ("stale", "choose_service", {"service": "haircut"})
    current = decide(BOOKING, state, tap("beard"), context_step="choose_service")
    assert (current.outcome, current.data["service"]) == ("advanced", "beard")


def test_stale_on_a_step_that_waits_for_nothing() -> None:
    decision = decide(BOOKING, at(BOOKING, "handoff"), tap("confirm_yes"))
    assert (decision.outcome, decision.to_step) == ("stale", "handoff")


# --- languages ---------------------------------------------------------------------------------------------------


def test_spanish_prompts_and_reprompts() -> None:
    decision = decide(LEAD, at(LEAD, "ask_name", language="es"), text("A"))
    assert only_text(decision) == ("¿Me dices tu nombre? Al menos 2 caracteres, por favor.\n\n"
                                   "¡Hola! 👋 Gracias por escribir a Acme. ¿Cómo te llamas?")


def test_choice_sets_the_language_and_missing_translations_fall_back() -> None:
    spanish = decide(POLY, at(POLY, "pick_language"), tap("es"))
    assert (spanish.language, only_text(spanish)) == ("es", "¿Tu nombre?")
    french = decide(POLY, at(POLY, "pick_language"), text("Français"))
    assert (french.language, only_text(french)) == ("fr", "Your name?")  # no French prompt: default language
    done = decide(POLY, after(french), text("Zoé"))
    assert only_text(done) == "Bye Zoé!"


def test_flow_texts_fall_back_per_text() -> None:
    assert decide(POLY, at(POLY, "pick_language", language="es"), text("x")).replies[0].text.startswith(
        "Perdona, no lo entendí.")
    assert decide(POLY, at(POLY, "pick_language", language="fr"), text("x")).replies[0].text.startswith(
        "Sorry, I didn't get that.")


def test_handoff_to_a_terminal_step_completes() -> None:
    first, second = run(POLY, at(POLY, "ask_name"), text(" "), text(""))
    assert (first.outcome, second.outcome, second.to_step, second.status) == ("reprompted", "handoff", "human",
                                                                              "completed")


@pytest.mark.parametrize(("asked", "got"), [(None, "en"), ("es", "es"), ("es_MX", "es"), ("fr-CA", "fr"),
                                             ("de", "en")])
def test_new_session_language(asked: str | None, got: str) -> None:
    assert new_session(POLY, asked) == SessionState(step="pick_language", data={}, failure_count=0, language=got,
                                                    status="active")


# --- validators fixture: every input kind ---------------------------------------------------------------------


@pytest.mark.parametrize(("sent", "value"), [("18", 18), ("120", 120), (" 42 ", 42), ("25.5", 25.5),
                                             ("30,5", 30.5), ("+40", 40), ("٤٢", 42)])
def test_number_accepts(sent: str, value: float) -> None:
    decision = decide(CHECKS, at(CHECKS, "ask_age"), text(sent))
    assert decision.outcome == "advanced"
    assert decision.data["age"] == value
    assert type(decision.data["age"]) is type(value)


@pytest.mark.parametrize("sent", ["17", "121", "17.99", "1,500", "abc", "", "1e3", "nan", "inf", "4 2"])
def test_number_rejects(sent: str) -> None:
    decision = decide(CHECKS, at(CHECKS, "ask_age"), text(sent))
    assert decision.outcome == "reprompted"
    assert only_text(decision).startswith("Please send a number from 18 to 120.")


@pytest.mark.parametrize(("sent", "ok"), [("ABC-123", True), ("abc-123", False), ("ABC-1234", False),
                                          ("XABC-123", False), ("ABC-123\n", True)])
def test_pattern_is_a_fullmatch(sent: str, ok: bool) -> None:
    assert decide(CHECKS, at(CHECKS, "ask_code"), text(sent)).outcome == ("advanced" if ok else "reprompted")


@pytest.mark.parametrize(("sent", "ok"), [("Red", True), ("blue", True), ("purple", False), ("re", False)])
def test_text_one_of(sent: str, ok: bool) -> None:
    decision = decide(CHECKS, at(CHECKS, "ask_color"), text(sent))
    assert decision.outcome == ("advanced" if ok else "reprompted")
    if ok:
        assert decision.data["color"] == sent  # stored as sent, matched case-insensitively


@pytest.mark.parametrize(("sent", "ok"), [("1", True), ("3.5", True), ("3,5", True), ("4", False), ("3", False)])
def test_number_one_of(sent: str, ok: bool) -> None:
    assert decide(CHECKS, at(CHECKS, "ask_size"), text(sent)).outcome == ("advanced" if ok else "reprompted")


@pytest.mark.parametrize(("sent", "ok"), [("a@example.com", True), ("a" * 20 + "@example.com", False)])
def test_email_max_length(sent: str, ok: bool) -> None:
    assert decide(CHECKS, at(CHECKS, "ask_email"), text(sent)).outcome == ("advanced" if ok else "reprompted")


@pytest.mark.parametrize("kind", ["image", "document", "audio", "video", "sticker"])
def test_media_is_stored_exactly_as_sent(kind: str) -> None:
    media = Media(id="1234567890", mime_type=f"{kind}/x", caption="Ünïcode\u200f caption", filename="Ré sumé.pdf",
                  sha256="abc")
    decision = decide(CHECKS, at(CHECKS, "ask_photo"), msg(kind, media=media))
    assert decision.data["photo"] == {"id": "1234567890", "mime_type": f"{kind}/x",
                                      "caption": "Ünïcode\u200f caption", "filename": "Ré sumé.pdf"}


def test_media_step_rejects_text_and_location() -> None:
    assert decide(CHECKS, at(CHECKS, "ask_photo"), text("here")).outcome == "reprompted"
    place = msg("location", location=Location(latitude=1.0, longitude=2.0))
    assert decide(CHECKS, at(CHECKS, "ask_photo"), place).outcome == "reprompted"


def test_location_keeps_signs_and_optional_fields() -> None:
    place = Location(latitude=-33.8688, longitude=-151.2093, name="Opera House", address=None, url="https://x")
    decision = decide(CHECKS, at(CHECKS, "ask_where"), msg("location", location=place))
    assert decision.data["place"] == {"latitude": -33.8688, "longitude": -151.2093, "name": "Opera House",
                                      "address": None}
    assert decide(CHECKS, at(CHECKS, "ask_where"), text("Sydney")).outcome == "reprompted"


@pytest.mark.parametrize(("message", "stored"), [
    (msg(text="anything"), "anything"),
    (msg("interactive", choice_id="xyz"), "xyz"),
    (msg("image", media=Media(id="m9")), {"id": "m9", "mime_type": None, "caption": None, "filename": None}),
    (msg("location", location=Location(latitude=0.5, longitude=-0.5)),
     {"latitude": 0.5, "longitude": -0.5, "name": None, "address": None}),
    (msg("contacts", contacts=[{"name": {"formatted_name": "Bo"}}]), [{"name": {"formatted_name": "Bo"}}]),
    (msg("order", order={"catalog_id": "c1", "product_items": []}), {"catalog_id": "c1", "product_items": []}),
])
def test_any_accepts_everything(message: InboundMessage, stored: Any) -> None:
    decision = decide(CHECKS, at(CHECKS, "ask_note"), message)
    assert (decision.outcome, decision.data["note"]) == ("advanced", stored)


def test_step_failure_limit_without_a_handoff_keeps_reprompting() -> None:
    decisions = run(CHECKS, at(CHECKS, "ask_plan"), text("gold"), text("silver"))
    assert [(d.outcome, d.failure_count) for d in decisions] == [("reprompted", 1), ("reprompted", 2)]


def test_terminal_step_without_a_message_completes_silently() -> None:
    decision = decide(CHECKS, at(CHECKS, "ask_plan"), tap("pro"))
    assert (decision.outcome, decision.status, decision.replies) == ("completed", "completed", ())


def test_list_rows_have_descriptions_only_when_given() -> None:
    rows = prompt_replies(CHECKS, "ask_plan", "en")[0].body["interactive"]["action"]["sections"][0]["rows"]
    assert rows[0] == {"id": "free", "title": "Free", "description": "For trying things out"}
    assert rows[1] == {"id": "pro", "title": "Pro"}


# --- counter (loop) ----------------------------------------------------------------------------------------------


def test_counter_loops_and_counts() -> None:
    # the counter flow says first_message: answer, so the very first message already counts
    start = decide(COUNTER, None, text("go"))
    assert (start.outcome, start.data["count"]) == ("advanced", 1)
    decisions = run(COUNTER, after(start), text("a"), tap("b"), msg("sticker", media=Media(id="s")))
    assert [(d.outcome, d.from_step, d.to_step, d.data["count"]) for d in decisions] == [
        ("advanced", "count", "count", 2), ("advanced", "count", "count", 3), ("advanced", "count", "count", 4)]
    assert only_text(decisions[-1]) == "Counted 4."


def test_counter_with_a_bad_stored_count_starts_again_from_one() -> None:
    assert decide(COUNTER, at(COUNTER, "count", {"count": "x"}), text("a")).data["count"] == 1


# --- placeholders, exact text, purity ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["{email}", "{0} {} {", "Ana {name}", "}{", "{{x}}", "%s %(name)s"])
def test_braces_in_user_data_are_never_expanded(name: str) -> None:
    decision = decide(LEAD, at(LEAD, "ask_name"), text(name))
    assert decision.data["name"] == name
    assert only_text(decision).startswith(f"Nice to meet you, {name}! What's")


def test_render_leaves_missing_keys_and_stray_braces() -> None:
    assert render("Hi {name}, {missing} {0} {not a key} {}", {"name": "{missing}"}) == \
        "Hi {missing}, {missing} {0} {not a key} {}"
    assert render("{n} {flag} {ratio}", {"n": 0, "flag": False, "ratio": 1.5}) == "0 False 1.5"


@pytest.mark.parametrize("sent", [
    "Zoe\u0308",  # NFD
    "Zoë",  # NFC
    "\u200fمرحبا\u200e Ana",  # RTL with RLM/LRM marks
    "👩‍👩‍👧 family",  # ZWJ sequence
    "𝔸𝕟𝕒 𐍈",  # astral characters
    "Ana\tMaría\nLine two  ",  # tab, newline, trailing spaces
    "x" * 5000,  # longer than a WhatsApp text body
])
def test_text_is_stored_exactly_as_sent(sent: str) -> None:
    decision = decide(POLY, at(POLY, "ask_name"), text(sent))
    assert decision.data["name"] == sent
    if not unicodedata.is_normalized("NFC", sent):
        assert decision.data["name"] != unicodedata.normalize("NFC", sent)


def test_long_user_data_is_clipped_in_replies_not_in_data() -> None:
    decision = decide(POLY, at(POLY, "ask_name"), text("N" * 4096))
    assert decision.data["name"] == "N" * 4096
    body = decision.replies[0].body["text"]["body"]
    assert len(body) == 4096
    assert body.endswith("…")


def test_notice_too_long_for_an_interactive_body_goes_first_as_text(tmp_path: Path) -> None:
    flow = flow_from(tmp_path, "name: long\nversion: 1\nsteps:\n  - id: pick\n    input: choice\n"
                     f"    prompt: {'Q' * 1000}\n    reprompt: {'R' * 100}\n"
                     "    choices: [{id: a, title: A}]\n    next: end\n  - {id: end, terminal: true}\n")
    replies = decide(flow, at(flow, "pick"), text("zzz")).replies
    assert [(r.kind, r.step, len(r.text)) for r in replies] == [("text", None, 100), ("interactive", "pick", 1000)]


def test_decide_does_not_mutate_and_is_deterministic() -> None:
    data = {"name": "Ana", "nested": {"a": 1}}
    state = at(LEAD, "ask_email", data)
    first = decide(LEAD, state, text("ana@example.com"))
    assert data == {"name": "Ana", "nested": {"a": 1}}
    assert state.data is data
    assert first.data is not data
    assert decide(LEAD, state, text("ana@example.com")) == first
    for message in (text("restart"), text("stop"), text("bad")):
        decide(LEAD, state, message).data["x"] = 1
        assert "x" not in data


def test_first_message_answers_the_start_step_when_the_flow_says_so() -> None:
    from tests.factories import text

    counter = load_flow_file(Path(__file__).parent / "data" / "flows" / "counter.yaml")
    first = decide(counter, None, text("14155550101", "one", 1))
    assert (first.outcome, first.from_step, first.to_step, first.data) == ("advanced", "count", "count", {"count": 1})
