"""Overview and States pages: traffic, session counts over time, where users in progress are."""

from __future__ import annotations

from datetime import datetime

import pandas as pd
from sqlalchemy import (
    and_,
    case,
    func,
    or_,
    select,
)

from core.analytics.common import (
    Filters,
    _bucket,
    _epoch,
    _frame,
    _quantiles,
    _session_filters,
    _to_utc,
    _transition_filters,
)
from core.db import Database
from core.lifecycle import in_progress
from core.models import (
    ChatSession,
    InboundEvent,
    Transition,
)


def has_traffic(db: Database) -> bool:
    """False on an empty database: pages then explain how to make demo traffic instead of drawing nothing."""
    with db.engine.connect() as conn:
        return conn.scalar(select(Transition.id).limit(1)) is not None


def filter_options(db: Database) -> pd.DataFrame:
    """Distinct (flow, phone_number_id, language) combinations of sessions, for filter drop-downs."""
    stmt = (
        select(ChatSession.flow, ChatSession.phone_number_id, ChatSession.language)
        .where(ChatSession.status != "new")
        .group_by(ChatSession.flow, ChatSession.phone_number_id, ChatSession.language)
        .order_by(ChatSession.flow, ChatSession.phone_number_id, ChatSession.language)
    )
    return _frame(db, stmt)


def session_counts(db: Database, filters: Filters = Filters()) -> pd.DataFrame:
    """One row: active, completed, archived, total sessions and the completion rate (%).

    Completed counts sessions that finished their flow, also when they were archived afterwards.
    """
    finished = or_(
        ChatSession.status == "completed",
        and_(ChatSession.status == "archived", ChatSession.archived_from == "completed"),
    )
    stmt = select(
        func.count().label("total"),
        func.sum(case((ChatSession.status == "active", 1), else_=0)).label("active"),
        func.sum(case((ChatSession.status == "completed", 1), else_=0)).label("completed"),
        func.sum(case((ChatSession.status == "archived", 1), else_=0)).label("archived"),
        func.sum(case((finished, 1), else_=0)).label("finished"),
    ).where(ChatSession.status != "new", *_session_filters(filters))
    frame = _frame(db, stmt).fillna(0).astype(int)
    total = frame.loc[0, "total"]
    frame["completion_rate"] = round(100.0 * frame.loc[0, "finished"] / total, 1) if total else 0.0
    return frame


def sessions_over_time(db: Database, filters: Filters = Filters(), unit: str = "day") -> pd.DataFrame:
    """New sessions (first transition) and completions per UTC day/hour: columns bucket, new_sessions, completions."""
    started = (
        select(_bucket(db, Transition.at, unit).label("bucket"), func.count().label("n"))
        .where(Transition.outcome == "started", *_transition_filters(filters))
        .group_by(_bucket(db, Transition.at, unit))
    )
    completed = (
        select(_bucket(db, Transition.at, unit).label("bucket"), func.count().label("n"))
        .where(Transition.outcome == "completed", *_transition_filters(filters))
        .group_by(_bucket(db, Transition.at, unit))
    )
    new = _frame(db, started).rename(columns={"n": "new_sessions"})
    done = _frame(db, completed).rename(columns={"n": "completions"})
    if new.empty and done.empty:
        return pd.DataFrame(columns=["bucket", "new_sessions", "completions"])
    for part in (new, done):
        part["bucket"] = _to_utc(part["bucket"]) if not part.empty else pd.Series(dtype="datetime64[ns, UTC]")
    frame = new.merge(done, on="bucket", how="outer").fillna(0).sort_values("bucket").reset_index(drop=True)
    frame[["new_sessions", "completions"]] = frame[["new_sessions", "completions"]].astype(int)
    return frame


def messages_per_hour(db: Database, since: datetime | None = None, until: datetime | None = None) -> pd.DataFrame:
    """Inbound messages per UTC hour of their WhatsApp timestamp: columns hour, messages."""
    bucket = InboundEvent.timestamp - InboundEvent.timestamp % 3600
    stmt = select(bucket.label("hour"), func.count().label("messages")).group_by(bucket).order_by(bucket)
    if since:
        stmt = stmt.where(InboundEvent.timestamp >= int(since.timestamp()))
    if until:
        stmt = stmt.where(InboundEvent.timestamp < int(until.timestamp()))
    frame = _frame(db, stmt)
    frame["hour"] = pd.to_datetime(frame["hour"].astype("int64"), unit="s", utc=True)
    frame["messages"] = frame["messages"].astype(int)
    return frame


# ---------------------------------------------------------------------------------------- states
def state_distribution(db: Database, now: datetime, filters: Filters = Filters()) -> pd.DataFrame:
    """Where users in progress are: flow, step, users (active + archived: archived users still stand in their
    step, see core.lifecycle) and how long they have been in that step (hours, p50/p90).

    The date range selects users by their last message (`last_inbound_at`).
    """
    clauses = [in_progress(), *_session_filters(filters)]
    if filters.since:
        clauses.append(ChatSession.last_inbound_at >= filters.since)
    if filters.until:
        clauses.append(ChatSession.last_inbound_at < filters.until)
    entered = func.coalesce(ChatSession.step_entered_at, ChatSession.last_inbound_at, ChatSession.created_at)
    archived = case((ChatSession.status == "archived", 1), else_=0)
    stmt = select(
        ChatSession.flow,
        ChatSession.current_step.label("step"),
        (now.timestamp() - _epoch(db, entered)).label("seconds"),
        archived.label("archived"),
    ).where(*clauses)
    frame = _quantiles(db, stmt, ["flow", "step"], "seconds", (0.5, 0.9))
    frame = frame.rename(columns={"n": "users"})
    frame["users"] = frame["users"].astype(int)
    split = _frame(db, select(ChatSession.flow, ChatSession.current_step.label("step"),
                              func.sum(archived).label("archived")).where(*clauses)
                   .group_by(ChatSession.flow, ChatSession.current_step))
    frame = frame.merge(split, on=["flow", "step"], how="left") if not frame.empty else frame.assign(archived=[])
    frame["archived"] = frame["archived"].fillna(0).astype(int)
    frame.insert(frame.columns.get_loc("users") + 1, "active", frame["users"] - frame["archived"])
    frame.insert(frame.columns.get_loc("active") + 1, "archived", frame.pop("archived"))
    frame["p50_hours_in_step"] = (frame.pop("p50").astype(float) / 3600).round(2)
    frame["p90_hours_in_step"] = (frame.pop("p90").astype(float) / 3600).round(2)
    return frame.sort_values(["flow", "users"], ascending=[True, False]).reset_index(drop=True)
