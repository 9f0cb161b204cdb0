"""Flow files: every shipped flow loads and walks; every load error names its file and step."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import FlowDefinitionError, UnknownFlowError
from core.flows import (
    STYLE_LIMITS,
    Flow,
    FlowRegistry,
    default_flows_dir,
    load_flow_file,
    load_flows,
    normalize_keyword,
)
from core.machine import SessionState, decide, prompt_replies
from core.messages import InboundMessage

DATA = Path(__file__).parent / "data" / "flows"
SHIPPED = sorted([*default_flows_dir().glob("*.yaml"), *default_flows_dir().glob("*.yml")])

# file -> (step named in the error, or None for flow-level errors; a fragment of the message)
INVALID = {
    "bad_followup.yaml": ("ask", "followup_after must be a positive duration"),
    "bad_regex.yaml": ("ask", "bad regex pattern"),
    "button_title_too_long.yaml": ("pick", "WhatsApp allows 20 for a button"),
    "choice_without_choices.yaml": ("pick", "a choice step needs `choices`"),
    "duplicate_choice.yaml": ("pick", "duplicate choice id 'a'"),
    "duplicate_step.yaml": ("ask", "duplicate step id"),
    "invalid_yaml.yaml": (None, "invalid YAML"),
    "keyword_overlap.yaml": (None, "reset_keywords and opt_in_keywords share ['start']"),
    "list_title_too_long.yaml": ("pick", "WhatsApp allows 24 for a list"),
    "missing_default_language_prompt.yaml": ("ask", "no text in the default language 'en'"),
    "missing_name.yaml": (None, "flow has no `name`"),
    "missing_prompt.yaml": ("ask", "prompt is missing"),
    "missing_version.yaml": (None, "needs `version`"),
    "next_by_choice_unknown_choice.yaml": ("ask", "next_by_choice names unknown choice(s) ['maybe']"),
    "no_next.yaml": ("ask", "a non-terminal step needs `next`"),
    "sets_language_not_languages.yaml": ("lang", "sets_language needs a choice step"),
    "terminal_with_next.yaml": ("end", "cannot have `next`"),
    "too_many_buttons.yaml": ("pick", "WhatsApp allows at most 3 as button"),
    "too_many_rows.yaml": ("pick", "WhatsApp allows at most 10 as list"),
    "undeclared_language.yaml": ("ask", "undeclared language(s) ['de']"),
    "unknown_handoff.yaml": ("humans", "handoff_step names an unknown step"),
    "unknown_input.yaml": ("ask", "unknown input 'telepathy'"),
    "unknown_next.yaml": ("ask", "next step 'nowhere' does not exist"),
    "unknown_next_by_choice.yaml": ("ask", "next step 'ghost' does not exist"),
    "unknown_start.yaml": ("begin", "start names an unknown step"),
    "unknown_step_key.yaml": ("ask", "unknown key(s) ['nxt']"),
    "unknown_validator.yaml": ("ask", "unknown validator 'min_lenght'"),
    "unquoted_date_choice.yaml": ("pick", "choice id must be a non-empty string (quote it in YAML)"),
    "unreachable_step.yaml": ("island", "step is unreachable from start 'ask'"),
    "validator_wrong_input.yaml": ("ask", "validator 'min' does not apply to input 'text'"),
}


def tap(choice_id: str) -> InboundMessage:
    return InboundMessage(phone_number_id="100", user_id="200", wamid="wamid.x", timestamp=1, kind="interactive",
                          choice_id=choice_id)


def _walk(flow: Flow) -> None:
    """Render every step in every language and follow every choice branch through decide()."""
    for step in flow.steps.values():
        for language in flow.languages:
            replies = prompt_replies(flow, step.id, language, {})
            assert bool(replies) == bool(step.prompt), step.id
            for reply in replies:
                _assert_whatsapp_shape(reply.body, step.style)
        state = SessionState(step=step.id, data={}, failure_count=0, language=flow.default_language, status="active")
        for choice in step.choices:
            decision = decide(flow, state, tap(choice.id))
            assert decision.to_step == step.next_by_choice.get(choice.id, step.next)
            assert decision.outcome in ("advanced", "completed")


def _assert_whatsapp_shape(body: dict, style: str) -> None:
    if body["type"] == "text":
        assert 0 < len(body["text"]["body"]) <= 4096
        return
    interactive = body["interactive"]
    assert 0 < len(interactive["body"]["text"]) <= 1024
    max_choices, max_title = STYLE_LIMITS[interactive["type"]]
    action = interactive["action"]
    options = [b["reply"] for b in action["buttons"]] if style == "button" else action["sections"][0]["rows"]
    assert 0 < len(options) <= max_choices
    assert all(len(option["title"]) <= max_title for option in options)


def test_shipped_flows_exist() -> None:
    assert {p.name for p in SHIPPED} >= {"lead_qualification.yaml", "service_booking.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_flow_loads_and_walks(path: Path) -> None:
    flow = load_flow_file(path)
    assert flow.source == str(path)
    assert flow.name == path.stem
    assert any(step.terminal for step in flow.steps.values())
    assert flow.handoff_step is not None
    _walk(flow)


def test_test_fixture_flows_load_and_walk() -> None:
    registry = load_flows(DATA)
    assert registry.names() == ["counter", "polyglot", "validators"]
    for flow in registry:
        _walk(flow)


def test_counter_flow_loops_on_itself_without_a_terminal_step() -> None:
    flow = load_flows(DATA).get("counter")
    step = flow.step("count")
    assert (step.input, step.increment, step.next, step.key) == ("any", "count", "count", None)
    assert not any(s.terminal for s in flow.steps.values())


def test_lead_qualification_definition() -> None:
    flow = load_flows(default_flows_dir()).get("lead_qualification", 1)
    assert flow.start == "ask_name"
    assert [(s.id, s.input, s.key, s.next) for s in flow.steps.values()] == [
        ("ask_name", "text", "name", "ask_email"),
        ("ask_email", "email", "email", "ask_city"),
        ("ask_city", "text", "city", "done"),
        ("done", "none", None, None),
        ("handoff", "none", None, None),
    ]
    assert flow.step("ask_name").validators["min_length"] == 2
    assert flow.step("done").terminal
    assert flow.step("ask_name").followup_after == 7200
    assert flow.step("ask_city").followup_after == 86400
    assert flow.languages == ("en", "es")
    assert all(set(s.prompt) == {"en", "es"} for s in flow.steps.values())


def test_service_booking_definition() -> None:
    flow = load_flows(default_flows_dir()).get("service_booking")
    service, date, confirm = flow.step("choose_service"), flow.step("choose_date"), flow.step("confirm")
    assert (service.style, [c.id for c in service.choices]) == ("button", ["haircut", "coloring", "beard"])
    assert date.style == "list"
    assert all(len(c.id) == 10 and c.id.startswith("2026-12-") for c in date.choices)
    assert [c.id for c in confirm.choices] == ["confirm_yes", "confirm_no"]
    assert confirm.next_by_choice == {"confirm_no": "choose_service"}
    assert confirm.next == "done"
    assert flow.step("choose_service").followup_after == 1800


def test_defaults_when_a_flow_says_little(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yml"
    path.write_text("name: tiny\nversion: 3\nsteps:\n  - {id: ask, prompt: Hello, next: end}\n"
                    "  - {id: end, terminal: true}\n", encoding="utf-8")
    flow = load_flow_file(path)
    assert (flow.start, flow.default_language, flow.languages, flow.failure_limit) == ("ask", "en", ("en",), 3)
    assert flow.reset_keywords == {"restart", "start over"}
    assert flow.opt_out_keywords == {"stop", "unsubscribe"}
    assert flow.opt_in_keywords == {"start"}
    assert (flow.handoff_step, flow.on_return) == (None, "resume")
    assert flow.step("ask").input == "text"
    assert flow.step("end").input == "none"
    assert flow.text("stale", "en").startswith("That question has moved on")
    assert load_flows(tmp_path).names() == ["tiny"]  # .yml counts too


def test_keywords_are_casefolded_and_whitespace_normalized(tmp_path: Path) -> None:
    path = tmp_path / "kw.yaml"
    path.write_text("name: kw\nversion: 1\nreset_keywords: ['  Start   OVER ', 'VOLVER']\n"
                    "steps:\n  - {id: end, terminal: true}\n", encoding="utf-8")
    assert load_flow_file(path).reset_keywords == {"start over", "volver"}
    assert normalize_keyword("\tStart\u00a0 Over\n") == "start over"


def test_style_defaults_to_list_beyond_three_choices() -> None:
    flow = load_flows(DATA).get("validators")
    assert flow.step("ask_plan").style == "list"
    assert flow.step("ask_plan").choices[0].description == {"en": "For trying things out"}
    assert load_flows(DATA).get("polyglot").step("pick_language").style == "button"


def test_flow_objects_are_immutable() -> None:
    flow = load_flows(default_flows_dir()).get("lead_qualification")
    with pytest.raises(AttributeError):
        flow.start = "done"  # type: ignore[misc]
    with pytest.raises(TypeError):
        flow.steps["x"] = flow.step("done")  # type: ignore[index]


def test_unknown_step_lookup_names_file_and_step() -> None:
    flow = load_flows(default_flows_dir()).get("lead_qualification")
    with pytest.raises(FlowDefinitionError, match="lead_qualification.yaml, step 'nope'"):
        flow.step("nope")


def test_every_invalid_fixture_is_covered() -> None:
    assert sorted(p.name for p in (DATA / "invalid").glob("*.yaml")) == sorted(INVALID)


@pytest.mark.parametrize(("name", "expected"), sorted(INVALID.items()), ids=sorted(INVALID))
def test_load_error_names_file_and_step(name: str, expected: tuple[str | None, str]) -> None:
    step, fragment = expected
    path = DATA / "invalid" / name
    with pytest.raises(FlowDefinitionError) as caught:
        load_flow_file(path)
    error = caught.value
    assert error.file == str(path)
    assert error.step == step
    assert name in str(error)
    assert fragment in str(error)
    if step is not None:
        assert f"step {step!r}" in str(error)


def test_invalid_yaml_keeps_the_yaml_error_as_cause() -> None:
    with pytest.raises(FlowDefinitionError) as caught:
        load_flow_file(DATA / "invalid" / "invalid_yaml.yaml")
    assert caught.value.__cause__ is not None


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FlowDefinitionError, match="cannot read flow file"):
        load_flow_file(tmp_path / "absent.yaml")
    with pytest.raises(FlowDefinitionError, match="flow directory does not exist"):
        load_flows(tmp_path / "absent")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(FlowDefinitionError, match="must be a YAML mapping"):
        load_flow_file(path)


def _write_version(directory: Path, file_name: str, version: int, prompt: str) -> None:
    (directory / file_name).write_text(
        f"name: lead_qualification\nversion: {version}\n"
        f"steps:\n  - {{id: ask_name, prompt: {prompt!r}, key: name, next: done}}\n"
        "  - {id: done, terminal: true, prompt: Thanks}\n",
        encoding="utf-8",
    )


def test_version_pin_and_latest(tmp_path: Path) -> None:
    (tmp_path / "lead_qualification.yaml").write_text(
        (default_flows_dir() / "lead_qualification.yaml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    _write_version(tmp_path, "lead_qualification_v2.yaml", 2, "Who are you? (v2)")
    registry = load_flows(tmp_path)
    assert registry.get("lead_qualification", 1).version == 1
    assert registry.get("lead_qualification", 1).step("ask_name").prompt["en"].startswith("Hi!")
    assert registry.get("lead_qualification").version == 2
    assert registry.latest("lead_qualification").step("ask_name").prompt["en"] == "Who are you? (v2)"
    assert registry.names() == ["lead_qualification"]
    assert [(f.name, f.version) for f in registry] == [("lead_qualification", 1), ("lead_qualification", 2)]
    assert len(registry) == 2


def test_unknown_flow_lists_what_exists(tmp_path: Path) -> None:
    _write_version(tmp_path, "a.yaml", 1, "v1")
    _write_version(tmp_path, "b.yaml", 2, "v2")
    registry = load_flows(tmp_path)
    with pytest.raises(UnknownFlowError, match=r"no flow 'lead_qualification' version 3; available: "
                                               r"lead_qualification v1, v2"):
        registry.get("lead_qualification", 3)
    with pytest.raises(UnknownFlowError, match="no flow named 'nope'; available: lead_qualification v1, v2"):
        registry.get("nope")
    with pytest.raises(UnknownFlowError, match="none"):
        FlowRegistry().latest("anything")


def test_duplicate_name_and_version_across_files(tmp_path: Path) -> None:
    _write_version(tmp_path, "a.yaml", 1, "one")
    _write_version(tmp_path, "b.yaml", 1, "other")
    with pytest.raises(FlowDefinitionError, match=r"b\.yaml.*version 1 is also defined in .*a\.yaml"):
        load_flows(tmp_path)


def test_invalid_subdirectory_is_not_loaded_with_its_parent() -> None:
    assert "bad" not in load_flows(DATA).names()
