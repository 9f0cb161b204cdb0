"""What a session's status means to every reader: which sessions are still somewhere in their flow.

Archiving exists for the engine and for cheap "who is talking to us now" queries: the archive job flips
sessions idle past `ARCHIVE_AFTER_HOURS` from active (or completed) to archived, so the hot set the apply path
and the active-user counts touch stays small. It never moves a user: step, data, history and the 24 h window
stay as they were, `archived_from` remembers whether the run was still going, and the user's next message
restores the session where it stood.

So archived means idle, not gone. Every user-facing read about where users are (stalled lists, the state
distribution, campaign preview and targeting) counts a session as in progress when it is active, or archived
from active. Completed runs, archived or not, are never "stalled".
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, String, and_, literal_column, or_

from core.models import ChatSession

# Statuses a reader may filter "where users are" by: active, archived (idle, still in its step), or both.
PRESENCE = ("active", "archived")


def _is(value: str) -> ColumnElement[str]:
    """A status spelled as a SQL literal, not a bind parameter (see in_progress)."""
    return literal_column(f"'{value}'", String)


def in_progress() -> ColumnElement[bool]:
    """Sessions still in their flow: active, or archived while active (not finished runs).

    The very predicate of the partial indexes ix_sessions_in_progress and ix_sessions_step_in_progress
    (core.models.IN_PROGRESS, migration 0008), spelled with literals: with bind parameters a prepared
    statement's generic plan could not prove it and would read the whole table, mostly finished runs.
    """
    s = ChatSession
    return or_(s.status == _is("active"), and_(s.status == _is("archived"), s.archived_from == _is("active")))


def presence_filter(presence: str) -> list[ColumnElement[bool]]:
    """`any` (every in-progress session), `active` (talking to us recently) or `archived` (idle past the archive
    cutoff, still in its step)."""
    if presence == "any":
        return [in_progress()]
    if presence == "active":
        return [ChatSession.status == "active"]
    if presence == "archived":
        # The same rows as status = 'archived' AND archived_from = 'active', said so that the in-progress
        # indexes (which hold no archived_from) answer it: their predicate, then the status they include.
        return [in_progress(), ChatSession.status == _is("archived")]
    raise ValueError(f"unknown status filter {presence!r}: use any, active or archived")


def presence_of(status: Any) -> str:
    """The status a person reads for an in-progress session ("active" or "archived")."""
    return "archived" if status == "archived" else "active"
