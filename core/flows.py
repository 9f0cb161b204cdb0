"""Flow definitions: load YAML flow files into frozen, validated dataclasses.

Every check runs at load time, so a broken flow stops the process at startup instead of stranding a user
mid-conversation. Each error is a FlowDefinitionError naming the file and, where one applies, the step.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from itertools import combinations
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from core.errors import FlowDefinitionError, UnknownFlowError

INPUT_KINDS = frozenset({"text", "email", "number", "choice", "media", "location", "any", "none"})
VALIDATORS_BY_INPUT: Mapping[str, frozenset[str]] = MappingProxyType({
    "text": frozenset({"min_length", "max_length", "pattern", "one_of"}),
    "email": frozenset({"max_length", "pattern", "one_of"}),
    "number": frozenset({"min", "max", "one_of"}),
})
ALL_VALIDATORS = frozenset().union(*VALIDATORS_BY_INPUT.values())
# WhatsApp Cloud API interactive limits: (max choices, max title chars) per style.
STYLE_LIMITS: Mapping[str, tuple[int, int]] = MappingProxyType({"button": (3, 20), "list": (10, 24)})
ROW_DESCRIPTION_MAX = 72
CHOICE_ID_MAX = 200  # list row ids allow 200, button ids 256: one limit keeps a step's style switchable
INTERACTIVE_BODY_MAX = 1024
# Flow-level texts; a flow overrides any of them per language under `texts:`. "choose" labels the list button.
DEFAULT_TEXTS: Mapping[str, str] = MappingProxyType({
    "stale": "That question has moved on. Here is where we are now:",
    "invalid": "Sorry, I didn't get that.",
    "welcome_back": "Welcome back! Let's pick up where we left off.",
    "opted_out": "You won't get any more messages from us. Send START if you change your mind.",
    "opted_in": "You're subscribed again. Welcome back!",
    "choose": "Choose",
})
_DURATION = re.compile(r"(\d+)\s*([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_EMPTY: Mapping[str, Any] = MappingProxyType({})


def normalize_keyword(text: str) -> str:
    """Casefold and collapse whitespace, so ' Start  OVER ' matches the keyword 'start over'."""
    return " ".join(text.split()).casefold()


@dataclass(frozen=True)
class Choice:
    id: str
    title: Mapping[str, str]
    description: Mapping[str, str] = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True)
class Step:
    id: str
    prompt: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    input: str = "text"
    choices: tuple[Choice, ...] = ()
    style: str = "button"
    key: str | None = None
    validators: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    next: str | None = None
    next_by_choice: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    reprompt: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    failure_limit: int | None = None
    terminal: bool = False
    increment: str | None = None
    sets_language: bool = False
    followup_after: int | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        """Every step id this step can move to on a valid answer."""
        return tuple(t for t in (self.next, *self.next_by_choice.values()) if t is not None)


@dataclass(frozen=True)
class Flow:
    name: str
    version: int
    start: str
    steps: Mapping[str, Step]
    default_language: str = "en"
    languages: tuple[str, ...] = ("en",)
    reset_keywords: frozenset[str] = frozenset({"restart", "start over"})
    opt_out_keywords: frozenset[str] = frozenset({"stop", "unsubscribe"})
    opt_in_keywords: frozenset[str] = frozenset({"start"})
    failure_limit: int = 3
    handoff_step: str | None = None
    on_return: str = "resume"
    # "greet": a new user's first message only triggers the start prompt; "answer": it answers the start step
    # (keyword-triggered or counting flows, where the first message already carries data).
    first_message: str = "greet"
    texts: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: MappingProxyType({"en": DEFAULT_TEXTS}))
    source: str = "<memory>"

    def step(self, step_id: str) -> Step:
        try:
            return self.steps[step_id]
        except KeyError:
            raise FlowDefinitionError(
                f"flow {self.name!r} v{self.version} has no such step; steps: {sorted(self.steps)}",
                file=self.source, step=step_id,
            ) from None

    def text(self, name: str, language: str) -> str:
        """A flow-level text in the language, falling back to the default language, then the built-in one."""
        own = self.texts.get(language, _EMPTY).get(name) or self.texts.get(self.default_language, _EMPTY).get(name)
        return own or DEFAULT_TEXTS[name]


# Unknown keys are rejected so a typo (`nxt:`) fails at load instead of silently dropping a branch.
_STEP_KEYS = frozenset(f.name for f in fields(Step))
_FLOW_KEYS = frozenset(f.name for f in fields(Flow)) - {"source"} | {"description"}
_KEYWORD_SETS = ("reset_keywords", "opt_out_keywords", "opt_in_keywords")


class FlowRegistry:
    """Every loaded flow, by name and version; a session pins the version it started with."""

    def __init__(self, flows: Iterable[Flow] = ()) -> None:
        self._flows: dict[tuple[str, int], Flow] = {}
        for flow in flows:
            other = self._flows.get((flow.name, flow.version))
            if other is not None:
                raise FlowDefinitionError(
                    f"flow {flow.name!r} version {flow.version} is also defined in {other.source}", file=flow.source
                )
            self._flows[(flow.name, flow.version)] = flow

    def get(self, name: str, version: int | None = None) -> Flow:
        if version is None:
            return self.latest(name)
        flow = self._flows.get((name, version))
        if flow is None:
            raise UnknownFlowError(f"no flow {name!r} version {version}; available: {self._available()}")
        return flow

    def latest(self, name: str) -> Flow:
        versions = [v for (n, v) in self._flows if n == name]
        if not versions:
            raise UnknownFlowError(f"no flow named {name!r}; available: {self._available()}")
        return self._flows[(name, max(versions))]

    def names(self) -> list[str]:
        return sorted({name for name, _ in self._flows})

    def __iter__(self) -> Iterator[Flow]:
        return iter([self._flows[key] for key in sorted(self._flows)])

    def __len__(self) -> int:
        return len(self._flows)

    def _available(self) -> str:
        if not self._flows:
            return "none (no flow files loaded)"
        by_name: dict[str, list[int]] = {}
        for name, version in sorted(self._flows):
            by_name.setdefault(name, []).append(version)
        return "; ".join(f"{name} v{', v'.join(map(str, versions))}" for name, versions in by_name.items())


def default_flows_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "flows"


def load_flows(directory: str | Path) -> FlowRegistry:
    """Load every *.yaml / *.yml directly inside `directory` (not sub-directories)."""
    root = Path(directory)
    if not root.is_dir():
        raise FlowDefinitionError("flow directory does not exist", file=str(root))
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml"))
    return FlowRegistry(load_flow_file(p) for p in paths)


def load_flow_file(path: str | Path) -> Flow:
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise FlowDefinitionError(f"invalid YAML: {e}", file=source) from e
    except (OSError, UnicodeDecodeError) as e:
        raise FlowDefinitionError(f"cannot read flow file: {e}", file=source) from e
    if not isinstance(raw, dict):
        raise FlowDefinitionError("a flow file must be a YAML mapping (name, version, steps, ...)", file=source)
    return _Loader(source).flow(raw)


class _Loader:
    """Parses one flow file; holds the file name and languages every error and text map needs."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.default_language = "en"
        self.languages: tuple[str, ...] = ("en",)

    def error(self, message: str, step: str | None = None) -> FlowDefinitionError:
        return FlowDefinitionError(message, file=self.source, step=step)

    def flow(self, raw: dict[Any, Any]) -> Flow:
        self._no_unknown_keys(raw, _FLOW_KEYS, None)
        name, version = raw.get("name"), raw.get("version")
        if not isinstance(name, str) or not name.strip():
            raise self.error("flow has no `name` (a non-empty string)")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise self.error(f"flow {name!r} needs `version`: an integer >= 1, got {version!r}")
        self._languages(raw)
        steps = self._steps(raw.get("steps"))
        flow = Flow(
            name=name, version=version, start=self._name(raw, "start", None) or next(iter(steps)),
            steps=MappingProxyType(steps), default_language=self.default_language, languages=self.languages,
            failure_limit=self._positive_int(raw.get("failure_limit"), "failure_limit", None) or 3,
            handoff_step=self._name(raw, "handoff_step", None), on_return=raw.get("on_return", "resume"),
            first_message=raw.get("first_message", "greet"),
            texts=self._flow_texts(raw.get("texts")), source=self.source, **self._keywords(raw),
        )
        if flow.on_return not in ("resume", "restart"):
            raise self.error(f"on_return must be 'resume' or 'restart', got {flow.on_return!r}")
        if flow.first_message not in ("greet", "answer"):
            raise self.error(f"first_message must be 'greet' or 'answer', got {flow.first_message!r}")
        self._check_graph(flow)
        return flow

    def _no_unknown_keys(self, raw: Mapping[Any, Any], allowed: frozenset[str], step: str | None) -> None:
        unknown = sorted(map(str, set(raw) - allowed))
        if unknown:
            raise self.error(f"unknown key(s) {unknown}; allowed: {sorted(allowed)}", step)

    def _languages(self, raw: Mapping[str, Any]) -> None:
        default = raw.get("default_language", "en")
        languages = raw.get("languages", [default])
        if not isinstance(languages, list) or not all(isinstance(x, str) and x for x in languages):
            raise self.error(f"languages must be a list of language codes, got {languages!r}")
        if default not in languages:
            raise self.error(f"default_language {default!r} is not in languages {languages}")
        self.default_language, self.languages = default, tuple(dict.fromkeys(languages))

    def _keywords(self, raw: Mapping[str, Any]) -> dict[str, frozenset[str]]:
        sets: dict[str, frozenset[str]] = {}
        for name in _KEYWORD_SETS:
            words = raw.get(name, list(getattr(Flow, name)))  # the dataclass default
            if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
                raise self.error(f"{name} must be a list of non-empty strings, got {words!r}")
            sets[name] = frozenset(normalize_keyword(w) for w in words)
        # One message cannot both reset and opt out: the keyword sets must not overlap.
        for first, second in combinations(_KEYWORD_SETS, 2):
            if sets[first] & sets[second]:
                raise self.error(f"{first} and {second} share {sorted(sets[first] & sets[second])}")
        return sets

    def _flow_texts(self, raw: object) -> Mapping[str, Mapping[str, str]]:
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise self.error("texts must map language -> {name: text}")
        texts: dict[str, Mapping[str, str]] = {}
        for language, entries in raw.items():
            if language not in self.languages:
                raise self.error(f"texts use undeclared language {language!r}; declared: {list(self.languages)}")
            if not isinstance(entries, dict) or not all(isinstance(v, str) and v.strip() for v in entries.values()):
                raise self.error(f"texts.{language} must map text names to non-empty strings")
            self._no_unknown_keys(entries, frozenset(DEFAULT_TEXTS), None)
            texts[language] = MappingProxyType(dict(entries))
        texts[self.default_language] = MappingProxyType({**DEFAULT_TEXTS, **texts.get(self.default_language, {})})
        return MappingProxyType(texts)

    def _steps(self, raw: object) -> dict[str, Step]:
        if not isinstance(raw, list) or not raw:
            raise self.error("steps must be a non-empty list of mappings, each with an `id`")
        steps: dict[str, Step] = {}
        for index, item in enumerate(raw):
            step = self._step(item, index)
            if step.id in steps:
                raise self.error("duplicate step id", step.id)
            steps[step.id] = step
        return steps

    def _step(self, raw: object, index: int) -> Step:
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"].strip():
            raise self.error(f"steps[{index}] must be a mapping with a string `id`")
        sid: str = raw["id"]
        self._no_unknown_keys(raw, _STEP_KEYS, sid)
        terminal = self._flag(raw, "terminal", sid)
        kind = raw.get("input", "none" if terminal else "text")
        if kind not in INPUT_KINDS:
            raise self.error(f"unknown input {kind!r}; known: {sorted(INPUT_KINDS)}", sid)
        choices = self._choices(raw.get("choices"), sid)
        step = Step(
            id=sid, prompt=self._lang_texts(raw.get("prompt"), "prompt", sid, required=not terminal), input=kind,
            choices=choices, style=self._style(raw.get("style"), choices, sid), key=self._name(raw, "key", sid),
            validators=self._validators(raw.get("validators"), kind, sid), next=self._name(raw, "next", sid),
            next_by_choice=self._next_by_choice(raw.get("next_by_choice"), sid),
            reprompt=self._lang_texts(raw.get("reprompt"), "reprompt", sid, required=False),
            failure_limit=self._positive_int(raw.get("failure_limit"), "failure_limit", sid), terminal=terminal,
            increment=self._name(raw, "increment", sid), sets_language=self._flag(raw, "sets_language", sid),
            followup_after=self._duration(raw.get("followup_after"), sid),
        )
        self._check_step(step)
        return step

    def _check_step(self, step: Step) -> None:
        choice_ids = {c.id for c in step.choices}
        if step.input == "choice" and not step.choices:
            raise self.error("a choice step needs `choices`", step.id)
        if step.choices and step.input != "choice":
            raise self.error(f"`choices` given but input is {step.input!r}, not 'choice'", step.id)
        if set(step.next_by_choice) - choice_ids:
            raise self.error(f"next_by_choice names unknown choice(s) {sorted(set(step.next_by_choice) - choice_ids)}",
                             step.id)
        if step.terminal and step.targets:
            raise self.error("a terminal step ends the flow and cannot have `next`", step.id)
        branches_cover = bool(choice_ids) and choice_ids <= set(step.next_by_choice)
        if not step.terminal and step.next is None and step.input != "none" and not branches_cover:
            raise self.error("a non-terminal step needs `next` (or `terminal: true`)", step.id)
        if step.sets_language and not (choice_ids and choice_ids <= set(self.languages)):
            raise self.error(f"sets_language needs a choice step whose choice ids are languages {self.languages}",
                             step.id)
        if step.input == "choice":
            self._check_prompt_fits(step)

    def _check_prompt_fits(self, step: Step) -> None:
        for language, text in step.prompt.items():
            if len(text) > INTERACTIVE_BODY_MAX:
                raise self.error(f"prompt ({language}) is {len(text)} chars; WhatsApp allows "
                                 f"{INTERACTIVE_BODY_MAX} in an interactive body", step.id)

    def _check_graph(self, flow: Flow) -> None:
        for ref, what in ((flow.start, "start"), (flow.handoff_step, "handoff_step")):
            if ref is not None and ref not in flow.steps:
                raise self.error(f"{what} names an unknown step; steps: {sorted(flow.steps)}", str(ref))
        for step in flow.steps.values():
            for target in step.targets:
                if target not in flow.steps:
                    raise self.error(f"next step {target!r} does not exist; steps: {sorted(flow.steps)}", step.id)
        self._check_reachable(flow)

    def _check_reachable(self, flow: Flow) -> None:
        # The handoff step is reachable from every step (after too many invalid answers), so it seeds the search.
        seen = {flow.start} | ({flow.handoff_step} if flow.handoff_step else set())
        queue = deque(seen)
        while queue:
            for target in flow.steps[queue.popleft()].targets:
                if target not in seen:
                    seen.add(target)
                    queue.append(target)
        for step_id in flow.steps:
            if step_id not in seen:
                raise self.error(f"step is unreachable from start {flow.start!r}", step_id)

    def _lang_texts(self, raw: object, what: str, step: str | None, *, required: bool) -> Mapping[str, str]:
        if raw is None:
            if required:
                raise self.error(f"{what} is missing", step)
            return _EMPTY
        texts = {self.default_language: raw} if isinstance(raw, str) else raw
        if not isinstance(texts, dict) or not all(isinstance(v, str) and v.strip() for v in texts.values()):
            raise self.error(f"{what} must be a text or a mapping of language -> non-empty text", step)
        undeclared = sorted(map(str, set(texts) - set(self.languages)))
        if undeclared:
            raise self.error(f"{what} uses undeclared language(s) {undeclared}; declared: {list(self.languages)}", step)
        if self.default_language not in texts:
            raise self.error(f"{what} has no text in the default language {self.default_language!r}", step)
        return MappingProxyType(dict(texts))

    def _choices(self, raw: object, sid: str) -> tuple[Choice, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            raise self.error("choices must be a list of {id, title, description?}", sid)
        choices: dict[str, Choice] = {}
        for item in raw:
            cid = item.get("id") if isinstance(item, dict) else None
            if not isinstance(cid, str) or not cid.strip():
                # YAML reads an unquoted 2026-12-01 as a date and yes/no as booleans.
                raise self.error(f"choice id must be a non-empty string (quote it in YAML), got {cid!r}", sid)
            if cid in choices:
                raise self.error(f"duplicate choice id {cid!r}", sid)
            if len(cid) > CHOICE_ID_MAX:
                raise self.error(f"choice id {cid[:20]!r}... is longer than {CHOICE_ID_MAX} chars", sid)
            self._no_unknown_keys(item, frozenset({"id", "title", "description"}), sid)
            choices[cid] = Choice(
                id=cid, title=self._lang_texts(item.get("title"), f"title of choice {cid!r}", sid, required=True),
                description=self._lang_texts(item.get("description"), f"description of {cid!r}", sid, required=False),
            )
        return tuple(choices.values())

    def _style(self, raw: object, choices: tuple[Choice, ...], sid: str) -> str:
        style = raw if raw is not None else ("button" if len(choices) <= STYLE_LIMITS["button"][0] else "list")
        if not isinstance(style, str) or style not in STYLE_LIMITS:
            raise self.error(f"style must be 'button' or 'list', got {style!r}", sid)
        max_choices, max_title = STYLE_LIMITS[style]
        if len(choices) > max_choices:
            raise self.error(f"{len(choices)} choices; WhatsApp allows at most {max_choices} as {style}", sid)
        for choice in choices:
            for language, title in choice.title.items():
                if len(title) > max_title:
                    raise self.error(f"title {title!r} of choice {choice.id!r} ({language}) is {len(title)} chars; "
                                     f"WhatsApp allows {max_title} for a {style}", sid)
            if choice.description and style == "button":
                raise self.error(f"choice {choice.id!r} has a description, which buttons cannot show", sid)
            if any(len(d) > ROW_DESCRIPTION_MAX for d in choice.description.values()):
                raise self.error(f"description of {choice.id!r} exceeds {ROW_DESCRIPTION_MAX} chars", sid)
        return style

    def _validators(self, raw: object, kind: str, sid: str) -> Mapping[str, Any]:
        if raw is None:
            return _EMPTY
        if not isinstance(raw, dict):
            raise self.error("validators must be a mapping, e.g. {min_length: 2}", sid)
        for name, value in raw.items():
            if name not in ALL_VALIDATORS:
                raise self.error(f"unknown validator {name!r}; known: {sorted(ALL_VALIDATORS)}", sid)
            if name not in VALIDATORS_BY_INPUT.get(kind, frozenset()):
                raise self.error(f"validator {name!r} does not apply to input {kind!r}", sid)
            self._check_validator(name, value, sid)
        for low, high in (("min_length", "max_length"), ("min", "max")):
            if low in raw and high in raw and raw[low] > raw[high]:
                raise self.error(f"{low} {raw[low]} is greater than {high} {raw[high]}", sid)
        return MappingProxyType(dict(raw))

    def _check_validator(self, name: str, value: object, sid: str) -> None:
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if name in ("min_length", "max_length") and not (is_number and isinstance(value, int) and value >= 0):
            raise self.error(f"{name} must be a non-negative integer, got {value!r}", sid)
        if name in ("min", "max") and not is_number:
            raise self.error(f"{name} must be a number, got {value!r}", sid)
        if name == "one_of" and not (isinstance(value, list) and value):
            raise self.error(f"one_of must be a non-empty list, got {value!r}", sid)
        if name == "pattern":
            if not isinstance(value, str):
                raise self.error(f"pattern must be a string, got {value!r}", sid)
            try:
                re.compile(value)
            except re.error as e:
                raise self.error(f"bad regex pattern {value!r}: {e}", sid) from e

    def _next_by_choice(self, raw: object, sid: str) -> Mapping[str, str]:
        if raw is None:
            return _EMPTY
        if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            raise self.error("next_by_choice must map choice id -> step id (quote ids in YAML)", sid)
        return MappingProxyType(dict(raw))

    def _name(self, raw: Mapping[str, Any], field_name: str, sid: str | None) -> str | None:
        value = raw.get(field_name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise self.error(f"{field_name} must be a non-empty string, got {value!r}", sid)
        return value

    def _flag(self, raw: Mapping[str, Any], field_name: str, sid: str) -> bool:
        value = raw.get(field_name, False)
        if not isinstance(value, bool):
            raise self.error(f"{field_name} must be true or false, got {value!r}", sid)
        return value

    def _positive_int(self, value: object, field_name: str, sid: str | None) -> int | None:
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise self.error(f"{field_name} must be an integer >= 1, got {value!r}", sid)
        return value

    def _duration(self, raw: object, sid: str) -> int | None:
        """Seconds from an int or '45s' / '30m' / '2h' / '3d'."""
        if raw is None:
            return None
        match = _DURATION.fullmatch(raw.strip()) if isinstance(raw, str) else None
        seconds = int(match[1]) * _UNIT_SECONDS[match[2]] if match else raw
        if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds <= 0:
            raise self.error(f"followup_after must be a positive duration like 30m, 2h or 3d, got {raw!r}", sid)
        return seconds
