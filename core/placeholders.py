"""Placeholders in texts sent to users: one grammar, shared by flow prompts and follow-up campaigns.

    placeholder := "{" key "}" | "{" key "|" fallback "}"
    key         := a letter or "_", then letters, digits or "_"      e.g. name, first_name, _x2
    fallback    := any text without "{" or "}" (may be empty)          e.g. {name|there}, {city|your city}

`{name|there}` is the value of `name`, or `there` when the user has none (missing, None or a blank string).
Everything is filled in one pass: a value that itself contains braces is inserted verbatim, never expanded.

Campaigns are strict (`parse`, `render_strict`): any other brace (`{`, `}`, `{}`, `{1x}`, `{ name }`) is an
error, and a placeholder without fallback and without value refuses to render, so no literal `{...}` is ever
sent. Flow prompts are lenient (`render`): stray braces and placeholders without a value stay as written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from core.errors import WaflowError

KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{(?P<key>[A-Za-z_][A-Za-z0-9_]*)(?:\|(?P<fallback>[^{}]*))?\}")
_GRAMMAR = "use {key} or {key|fallback}; a key is letters, digits and _, not starting with a digit"


class PlaceholderError(WaflowError):
    """A text whose braces are not placeholders of the grammar above."""


class MissingValueError(WaflowError):
    """A placeholder without fallback has no value to fill it."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"no value for {{{key}}} and no fallback")


@dataclass(frozen=True)
class Placeholder:
    key: str
    fallback: str | None  # None: no fallback; "" is a fallback (render nothing)


def has_value(value: Any) -> bool:
    """What counts as "the user has it": anything but None and blank strings (0 and False are values)."""
    return value is not None and not (isinstance(value, str) and not value.strip())


@lru_cache(maxsize=256)
def parse(text: str) -> tuple[Placeholder, ...]:
    """Every placeholder of `text`, in order; any brace outside one is a PlaceholderError."""
    found: list[Placeholder] = []
    position = 0
    for match in _PLACEHOLDER.finditer(text):
        _no_stray_brace(text, position, match.start())
        found.append(Placeholder(match["key"], match["fallback"]))
        position = match.end()
    _no_stray_brace(text, position, len(text))
    return tuple(found)


def _no_stray_brace(text: str, start: int, end: int) -> None:
    stray = min((i for i in (text.find("{", start, end), text.find("}", start, end)) if i >= 0), default=-1)
    if stray < 0:
        return
    if text[stray] == "}":
        raise PlaceholderError(f"unbalanced braces: '}}' at character {stray + 1} has no opening '{{' ({_GRAMMAR})")
    close = text.find("}", stray + 1)
    if close < 0 or "{" in text[stray + 1:close]:
        raise PlaceholderError(f"unbalanced braces: '{{' at character {stray + 1} is never closed ({_GRAMMAR})")
    raise PlaceholderError(f"malformed placeholder {text[stray:close + 1]} ({_GRAMMAR})")


def render(template: str, data: Mapping[str, Any]) -> str:
    """Lenient (flow prompts): a placeholder without value or fallback, and any stray brace, stays as written."""

    def fill(match: re.Match[str]) -> str:
        value = data.get(match["key"])
        if has_value(value):
            return str(value)
        if match["fallback"] is not None:
            return match["fallback"]
        # A blank string is still the user's answer: flows have always inserted it as is.
        return match[0] if value is None else str(value)

    return _PLACEHOLDER.sub(fill, template)


def render_strict(template: str, data: Mapping[str, Any]) -> str:
    """Strict (campaigns): PlaceholderError on malformed braces, MissingValueError on the first placeholder
    with neither a value nor a fallback; otherwise the text with no brace left but those inside values."""
    parse(template)

    def fill(match: re.Match[str]) -> str:
        value = data.get(match["key"])
        if has_value(value):
            return str(value)
        if match["fallback"] is None:
            raise MissingValueError(match["key"])
        return match["fallback"]

    return _PLACEHOLDER.sub(fill, template)
