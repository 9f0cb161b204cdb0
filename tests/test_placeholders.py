"""Campaign placeholders never leak: `{key}` / `{key|fallback}` checked at create and edit, filled or skipped."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from core import campaigns as api
from core.campaigns.planning import _template_plan
from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.errors import WaflowError
from core.flows import Flow, FlowRegistry, Step
from core.machine import render
from core.models import ChatSession
from core.placeholders import MissingValueError, Placeholder, PlaceholderError, parse, render_strict
from jobs.followups import run_followups
from tests.factories import PHONE, text
from tests.test_cli import one_error_line, run
from tests.test_jobs_followups import T0, deliver, followup_outbox, followup_rows, stall, ts

LEAD_KEYS = "available: {city}, {email}, {name}, {profile_name}"
MALFORMED = [
    ("Hi {", "'{' at character 4 is never closed"),
    ("Hi }", "'}' at character 4 has no opening '{'"),
    ("Hi {}", "malformed placeholder {}"),
    ("Hi {1x}", "malformed placeholder {1x}"),
    ("Hi { name }", "malformed placeholder { name }"),
    ("Hi {na-me}", "malformed placeholder {na-me}"),
    ("Hi {{name}}", "never closed"),
    ("{name|a{b}", "never closed"),
]


def nudge(db: Database, flows: FlowRegistry | None, **overrides: Any) -> api.Campaign:
    fields: dict[str, Any] = {
        "name": "nudge", "flow": "lead_qualification", "step": "ask_email", "delay_seconds": 2 * 3600,
        "text": "Still there, {name|friend}?",
    }
    fields.update(overrides)
    return api.create_campaign(db, api.build_spec(**fields), flows)


def set_data(db: Database, user: str, data: dict[str, Any]) -> None:
    with db.session() as s:
        s.execute(update(ChatSession).where(ChatSession.user_id == user).values(data=data))


# --- the grammar (pure) ------------------------------------------------------------------------------------------


def test_parse_reads_keys_and_fallbacks() -> None:
    assert parse("Hi {name|there}, from {city}{x|} {y|a|b c}") == (
        Placeholder("name", "there"), Placeholder("city", None), Placeholder("x", ""), Placeholder("y", "a|b c"),
    )
    assert parse("no placeholders") == ()


@pytest.mark.parametrize(("text_", "message"), MALFORMED)
def test_malformed_braces_are_errors(text_: str, message: str) -> None:
    with pytest.raises(PlaceholderError, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse(text_)


def test_strict_render_uses_fallbacks_and_refuses_missing_values() -> None:
    data = {"name": "Ana", "blank": "  ", "none": None, "zero": 0}
    assert render_strict("{name|x} {blank|b} {none|n} {missing|m} {zero|z} {none|}!", data) == "Ana b n m 0 !"
    for key in ("blank", "none", "missing"):
        with pytest.raises(MissingValueError, match=rf"no value for \{{{key}\}} and no fallback"):
            render_strict(f"Hi {{{key}}}", data)


def test_values_with_braces_are_inserted_verbatim_in_one_pass() -> None:
    data = {"name": "{email} {nme} {", "email": "{name|x}"}
    assert render_strict("{name} / {email} / {city|n}", data) == "{email} {nme} { / {name|x} / n"


def test_flow_prompts_share_the_grammar_and_stay_lenient() -> None:
    assert render("Hi {name|there}, {missing} {0} {}", {}) == "Hi there, {missing} {0} {}"
    assert render("Hi {name|there}", {"name": "{missing}"}) == "Hi {missing}"
    assert render("[{name}]", {"name": ""}) == "[]"  # as before: a blank answer is inserted, not kept as {name}


def facts(**overrides: Any) -> api.SessionFacts:
    values: dict[str, Any] = {
        "phone_number_id": PHONE, "user_id": "u", "language": "en", "data": {"name": "Ana"},
        "last_inbound_at": T0 - timedelta(hours=30), "window_closed_at": None, "opted_out": False,
    }
    values.update(overrides)
    return api.SessionFacts(**values)


def test_template_plan_fills_params_or_skips_naming_the_key() -> None:
    spec = api.CampaignSpec(name="n", flow="f", step="s", delay_seconds=60, template_name="t",
                            template_language="en", template_params=["{name}", "Dr. {profile_name|friend}", "ACME"])
    plan = _template_plan(spec, facts(), T0, False)
    assert (plan.action, plan.text) == ("template", "Ana | Dr. friend | ACME")
    plan = _template_plan(spec, facts(data={}, profile_name="Bea P"), T0, False)
    assert (plan.action, plan.reason) == ("skip", "template parameter 1: no value for {name} and no fallback")
    empty = spec.model_copy(update={"template_params": ["{city|}"]})
    assert _template_plan(empty, facts(), T0, False).reason == "template parameter 1 is empty"


def test_a_stored_malformed_text_is_skipped_never_sent() -> None:
    """A campaign written before placeholders were checked (CampaignSpec itself does not parse them)."""
    legacy = api.CampaignSpec(name="n", flow="f", step="s", delay_seconds=60, text="Hi {name")
    plan = api.plan_followup(legacy, facts(last_inbound_at=T0 - timedelta(hours=3)), api.History(), T0)
    assert plan.action == "skip"
    assert plan.reason is not None
    assert plan.reason.startswith("unbalanced braces: '{' at character 4 is never closed")


# --- checked at create and edit ------------------------------------------------------------------------------------


def test_unknown_placeholder_is_refused_at_create(db: Database, registry: FlowRegistry) -> None:
    with pytest.raises(WaflowError) as error:
        nudge(db, registry, text="Hi {nme}, what's your email?")
    assert str(error.value) == f"invalid campaign 'nudge': unknown placeholder {{nme}} in text; {LEAD_KEYS}"
    with pytest.raises(WaflowError) as error:
        nudge(db, registry, template_name="t", template_language="en", template_params=["ACME", "{nme|you}"])
    assert str(error.value) == \
        f"invalid campaign 'nudge': unknown placeholder {{nme}} in template parameter 2; {LEAD_KEYS}"
    assert api.list_campaigns(db) == []


@pytest.mark.parametrize(("text_", "message"), MALFORMED)
def test_malformed_placeholder_is_refused_with_or_without_flows(db: Database, registry: FlowRegistry,
                                                                text_: str, message: str) -> None:
    for flows in (registry, None):
        with pytest.raises(WaflowError, match=r"^invalid campaign 'nudge': text: "):
            nudge(db, flows, text=text_)
        with pytest.raises(WaflowError, match="template parameter 1: "):
            nudge(db, flows, template_name="t", template_language="en", template_params=[text_])
    assert api.list_campaigns(db) == []


def test_unknown_or_malformed_placeholder_is_refused_at_edit(db: Database, registry: FlowRegistry) -> None:
    c = nudge(db, registry)
    with pytest.raises(WaflowError) as error:
        api.update_campaign(db, c.id, registry, text="Hi {nme}")
    assert str(error.value) == f"invalid campaign 'nudge': unknown placeholder {{nme}} in text; {LEAD_KEYS}"
    with pytest.raises(WaflowError, match="malformed placeholder {}"):
        api.update_campaign(db, c.id, None, text="Hi {}")  # no flows: keys unchecked, syntax still checked
    # Moving the campaign to a flow without that key re-checks the text it keeps.
    with pytest.raises(WaflowError, match=r"unknown placeholder \{name\} in text; available: \{confirmation\}, "
                                          r"\{date\}, \{profile_name\}, \{service\}, \{time\}$"):
        api.update_campaign(db, c.id, registry, flow="service_booking", step="choose_date")
    assert api.get_campaign(db, c.id).text == "Still there, {name|friend}?"
    edited = api.update_campaign(db, c.id, registry, text="Hi {profile_name|there}, {city|} {email}")
    assert edited.text == "Hi {profile_name|there}, {city|} {email}"


def test_keys_of_every_version_and_increments_are_available(db: Database) -> None:
    def flow(version: int, key: str) -> Flow:
        steps = {"ask": Step(id="ask", key=key, increment=f"{key}_tries", next="end"), "end": Step(id="end")}
        return Flow(name="f", version=version, start="ask", steps=steps)

    flows = FlowRegistry([flow(1, "old"), flow(2, "new")])
    c = nudge(db, flows, flow="f", step="ask", text="{old|} {new|} {old_tries|} {new_tries|} {profile_name|}")
    with pytest.raises(WaflowError, match=r"available: \{new\}, \{new_tries\}, \{old\}, \{old_tries\}, "
                                          r"\{profile_name\}$"):
        api.update_campaign(db, c.id, flows, text="{gone}")


def test_cli_prints_one_clear_line_and_saves_nothing(database_url: str, flows_dir: Path) -> None:
    add = ["campaigns", "add", "--name", "nudge", "--flow", "lead_qualification", "--step", "ask_email",
           "--after", "2h"]
    typo = run(*add, "--text", "Hi {nme}", database_url=database_url, flows_dir=flows_dir)
    assert one_error_line(typo) == f"error: invalid campaign 'nudge': unknown placeholder {{nme}} in text; {LEAD_KEYS}"
    malformed = run(*add, "--template", "t", "--language", "en", "--param", "{1x}",
                    database_url=database_url, flows_dir=flows_dir)
    assert one_error_line(malformed).startswith(
        "error: invalid campaign 'nudge': template parameter 1: malformed placeholder {1x} (use {key} or "
    )
    db = Database(database_url)
    try:
        assert api.list_campaigns(db) == []
    finally:
        db.dispose()


# --- filled or skipped by the real job -----------------------------------------------------------------------------


def test_fallbacks_fill_the_text(engine: Engine, db: Database, registry: FlowRegistry, settings: Settings) -> None:
    stall(engine, "ana", T0 - timedelta(hours=3))
    nudge(db, registry, text="Hi {name|there}, still in {city|your city}?")
    assert run_followups(db, settings, T0) == {"queued_text": 1}
    [row] = followup_outbox(db)
    assert row.body == {"type": "text", "text": {"body": "Hi Ana, still in your city?"}}


def test_no_value_and_no_fallback_skips_with_the_reason(engine: Engine, db: Database, registry: FlowRegistry,
                                                        settings: Settings) -> None:
    for user in ("missing", "blank", "none"):
        stall(engine, user, T0 - timedelta(hours=3))
    set_data(db, "blank", {"name": "   "})
    set_data(db, "none", {"name": None})
    set_data(db, "missing", {})
    c = nudge(db, registry, text="Hi {name}, what's your email?")
    preview = api.preview_targets(db, c.id, T0).set_index("user_id")
    assert set(preview["would_send_as"]) == {"skip"}
    assert run_followups(db, settings, T0) == {"skipped": 3}
    assert followup_outbox(db) == []
    rows = followup_rows(db)
    assert [(f.status, f.outbox_id, f.reason) for f in rows] == [
        ("skipped", None, "no value for {name} and no fallback")
    ] * 3
    assert run_followups(db, settings, T0 + timedelta(hours=1)) == {}  # recorded once per stall
    assert api.campaign_results(db, c.id, T0).loc[0, "skipped"] == 3


def test_profile_name_comes_from_the_session(engine: Engine, db: Database, registry: FlowRegistry,
                                             settings: Settings) -> None:
    at = T0 - timedelta(hours=3)
    deliver(engine, text("named", "hi", ts(at) - 30, profile_name="Ana WhatsApp"))
    deliver(engine, text("named", "Ana", ts(at), profile_name="Ana WhatsApp"))
    stall(engine, "anonymous", at)
    nudge(db, registry, text="Hi {profile_name|there}!")
    nudge(db, registry, name="strict", text="Hi {profile_name}!")
    assert run_followups(db, settings, T0) == {"queued_text": 3, "skipped": 1}
    sent = sorted((r.campaign_id, r.user_id, r.text) for r in followup_outbox(db))
    assert [t for _, _, t in sent] == ["Hi there!", "Hi Ana WhatsApp!", "Hi Ana WhatsApp!"]
    [skipped] = [f for f in followup_rows(db) if f.status == "skipped"]
    assert (skipped.user_id, skipped.reason) == ("anonymous", "no value for {profile_name} and no fallback")


def test_template_params_with_fallbacks(engine: Engine, db: Database, registry: FlowRegistry,
                                        settings: Settings) -> None:
    stall(engine, "late", T0 - timedelta(hours=30), name="Bea")
    nudge(db, registry, text=None, template_name="reminder", template_language="en_US",
          template_params=["{name|friend}", "{city|your city}", "ACME"])
    nudge(db, registry, name="strict", text=None, template_name="reminder", template_language="en_US",
          template_params=["{name}", "{city}"])
    assert run_followups(db, settings, T0) == {"queued_template": 1, "skipped": 1}
    [row] = followup_outbox(db)
    assert row.body["template"]["components"] == [{"type": "body", "parameters": [
        {"type": "text", "text": "Bea"}, {"type": "text", "text": "your city"}, {"type": "text", "text": "ACME"},
    ]}]
    [skipped] = [f for f in followup_rows(db) if f.status == "skipped"]
    assert skipped.reason == "template parameter 2: no value for {city} and no fallback"


def test_values_containing_braces_are_sent_verbatim(engine: Engine, db: Database, registry: FlowRegistry,
                                                    settings: Settings) -> None:
    stall(engine, "inside", T0 - timedelta(hours=3), name="{email} {nme} {")
    stall(engine, "outside", T0 - timedelta(hours=30), name="{city|x}}")
    nudge(db, registry, text="Hi {name}, {email|no email yet}", template_name="reminder",
          template_language="en_US", template_params=["{name}"])
    assert run_followups(db, settings, T0) == {"queued_text": 1, "queued_template": 1}
    by_user = {r.user_id: r for r in followup_outbox(db)}
    assert by_user["inside"].text == "Hi {email} {nme} {, no email yet"
    assert by_user["outside"].body["template"]["components"][0]["parameters"] == [
        {"type": "text", "text": "{city|x}}"}
    ]

