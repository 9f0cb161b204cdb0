"""The audit log: every operator action, written in the same transaction as the action itself."""

from __future__ import annotations

import getpass
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Connection

from core.errors import WaflowError
from core.models import AuditEntry


def cli_actor() -> str:
    """Who runs a command line action: the operating-system user."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "cli:unknown"


def record(conn: Connection, *, actor: str, action: str, target: str, reason: str, at: datetime,
           details: dict[str, Any] | None = None) -> None:
    """One audit row. A blank reason is refused: the log exists to say why."""
    if not reason or not reason.strip():
        raise WaflowError(f"{action}: give a reason (it is written to the audit log)")
    conn.execute(insert(AuditEntry).values(
        at=at, actor=actor[:100], action=action, target=target, reason=reason.strip(), details=details or {},
    ))
