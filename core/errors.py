"""One small exception family; every error carries the context a reader needs to act on it."""

from __future__ import annotations


class WaflowError(Exception):
    """Base class for every error waflow raises on purpose."""


class ConfigError(WaflowError):
    """A setting is missing or malformed."""


class FlowDefinitionError(WaflowError):
    """A flow file is invalid; the message names the file and, where it applies, the step."""

    def __init__(self, message: str, *, file: str | None = None, step: str | None = None) -> None:
        self.file = file
        self.step = step
        where = ", ".join(part for part in (f"file {file}" if file else "", f"step {step!r}" if step else "") if part)
        super().__init__(f"{where}: {message}" if where else message)


class UnknownFlowError(WaflowError):
    """A flow name (or name and version) that no loaded flow file declares."""


class PayloadError(WaflowError):
    """A webhook body or message that cannot be accepted; the message is safe to return to the sender."""


class DatabaseUnavailableError(WaflowError):
    """The database cannot be reached; callers answer 503 / exit non-zero, nothing is half-written."""
