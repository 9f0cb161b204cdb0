"""Errors a person can fix before a process does anything (a bad setting, a database URL that does not parse, an
unreachable database, a flow that does not load), each as one line; `python -m core`, `python -m jobs` and the
dashboard show that line instead of a traceback.
"""

from __future__ import annotations

import argparse
import logging

from pydantic import ValidationError
from sqlalchemy.exc import ArgumentError

from core.errors import WaflowError


def one_line(text: str) -> str:
    """A message that may span lines (YAML errors do) as a single line."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def settings_error(error: ValidationError) -> str:
    """What is wrong with which environment variable. The values are left out: a DATABASE_URL or a token may
    hold a password."""
    problems = []
    for item in error.errors():
        name = "_".join(str(part) for part in item["loc"]).upper() or "settings"
        problems.append(f"{name}: {item['msg'].removeprefix('Value error, ')}")
    return "invalid setting " + "; ".join(problems)


def explain(error: BaseException) -> str | None:
    """The one line for an error the user can act on; None for anything else (a bug keeps its traceback)."""
    if isinstance(error, ValidationError) and error.title == "Settings":
        return settings_error(error)
    if isinstance(error, WaflowError):
        return one_line(str(error))
    if isinstance(error, ArgumentError):
        return f"invalid database URL: {one_line(str(error))}"
    return None


def log_level(text: str) -> str:
    """An argparse type for --log-level: a logging level name, any case."""
    name = text.upper()
    if not isinstance(logging.getLevelName(name), int):
        raise argparse.ArgumentTypeError(f"unknown log level {text!r}: use DEBUG, INFO, WARNING or ERROR")
    return name
