"""Stalled users page: users idle in a step longer than a threshold, with their 24 h window.

Archived sessions are included (archived means idle, not gone: core.lifecycle); the `status` column says
which users are still active and which were archived for being silent past the archive cutoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import pandas as pd
from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    false,
    func,
    or_,
    select,
    true,
)

from core.analytics.common import Filters, _epoch, _frame, _session_filters, _to_utc
from core.db import Database
from core.lifecycle import presence_filter, presence_of
from core.models import (
    ChatSession,
    FollowUp,
)
from core.views import SERVICE_WINDOW


@dataclass(frozen=True)
class StalledQuery:
    """Users idle in a step: in-progress sessions (active or archived) whose last message is at least
    `idle_seconds` before `now`."""

    now: datetime
    idle_seconds: float
    flow: str | None = None
    step: str | None = None
    phone_number_id: str | None = None
    language: str | None = None
    window: str = "any"  # any | inside | outside (the 24 h customer-service window)
    opted_out: str = "any"  # any | yes | no
    status: str = "any"  # any | active | archived (see core.lifecycle)
    limit: int | None = 10000


def _window_open(now: datetime) -> ColumnElement[bool]:
    """SQL twin of core.views.window_expires_at: open if the last message is < 24 h old and not closed since."""
    return and_(
        ChatSession.last_inbound_at > now - SERVICE_WINDOW,
        or_(ChatSession.window_closed_at.is_(None), ChatSession.window_closed_at < ChatSession.last_inbound_at),
    )


def _stalled_clauses(q: StalledQuery) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = [
        *presence_filter(q.status),
        ChatSession.last_inbound_at <= q.now - timedelta(seconds=q.idle_seconds),
        *_session_filters(Filters(q.flow, q.phone_number_id, q.language)),
    ]
    if q.step:
        clauses.append(ChatSession.current_step == q.step)
    if q.window != "any":
        clauses.append(_window_open(q.now) if q.window == "inside" else ~_window_open(q.now))
    if q.opted_out != "any":
        clauses.append(ChatSession.opted_out.is_(true() if q.opted_out == "yes" else false()))
    return clauses


def stalled_users(db: Database, q: StalledQuery) -> pd.DataFrame:
    """The stalled users matching `q`, longest idle first (at most `q.limit` rows)."""
    # Correlated, so only the returned rows are counted (ix_followups_session), not every follow-up ever sent.
    sent = (
        select(func.count())
        .where(FollowUp.phone_number_id == ChatSession.phone_number_id, FollowUp.user_id == ChatSession.user_id,
               FollowUp.status == "queued")
        .scalar_subquery()
    )
    stmt = (
        select(
            ChatSession.phone_number_id,
            ChatSession.user_id,
            ChatSession.flow,
            ChatSession.current_step.label("step"),
            ChatSession.language,
            ChatSession.status,
            ChatSession.last_inbound_at,
            (q.now.timestamp() - _epoch(db, ChatSession.last_inbound_at)).label("idle_seconds"),
            case((_window_open(q.now), True), else_=False).label("inside_window"),
            ChatSession.opted_out,
            sent.label("followups_sent"),
        )
        .where(*_stalled_clauses(q))
        .order_by(ChatSession.last_inbound_at, ChatSession.phone_number_id, ChatSession.user_id)
        .limit(q.limit)
    )
    frame = _frame(db, stmt)
    frame["status"] = frame["status"].map(presence_of)
    frame["last_inbound_at"] = _to_utc(frame["last_inbound_at"])
    frame["idle_hours"] = (frame.pop("idle_seconds").astype(float) / 3600).round(2)
    frame["inside_window"] = frame["inside_window"].astype(bool)
    frame["opted_out"] = frame["opted_out"].astype(bool)
    frame["followups_sent"] = frame["followups_sent"].astype(int)
    expires = frame["last_inbound_at"] + SERVICE_WINDOW
    frame.insert(frame.columns.get_loc("inside_window") + 1, "window_expires_at", expires.where(frame["inside_window"]))
    return frame


def stalled_count(db: Database, q: StalledQuery) -> int:
    """How many users match `q` without the row limit."""
    with db.engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(ChatSession).where(*_stalled_clauses(q))) or 0)
