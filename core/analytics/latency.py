"""Transition latency page: time between consecutive steps, its distribution and trend."""

from __future__ import annotations

import pandas as pd
from sqlalchemy import (
    ColumnElement,
    TextClause,
    select,
)

from core.analytics.common import Filters, _bucket, _frame, _quantiles, _to_utc, _transition_filters
from core.db import Database
from core.models import (
    MOVES,
    Transition,
)


def _moves(filters: Filters) -> list[ColumnElement[bool] | TextClause]:
    """Step changes (`MOVES`, the very predicate of the partial index ix_transitions_moves) matching `filters`."""
    return [MOVES, *_transition_filters(filters)]


def transition_latency(db: Database, filters: Filters = Filters(), friction_top: int = 3) -> pd.DataFrame:
    """Per step change (flow, from_step → to_step): count and p50/p90/p99 of the time since the user's previous
    message. The `friction_top` transitions with the highest p50 are flagged `friction`."""
    stmt = select(
        Transition.flow, Transition.from_step, Transition.to_step, Transition.elapsed_seconds.label("seconds")
    ).where(*_moves(filters))
    frame = _quantiles(db, stmt, ["flow", "from_step", "to_step"], "seconds")
    if frame.empty:
        return pd.DataFrame(columns=["flow", "from_step", "to_step", "n", "p50", "p90", "p99", "friction"])
    frame["n"] = frame["n"].astype(int)
    frame = frame.sort_values(["p50", "n"], ascending=[False, False]).reset_index(drop=True)
    frame[["p50", "p90", "p99"]] = frame[["p50", "p90", "p99"]].round(3)
    frame["friction"] = frame.index < friction_top
    return frame


def latency_samples(
    db: Database, filters: Filters = Filters(), from_step: str | None = None, to_step: str | None = None,
    limit: int = 20000,
) -> pd.DataFrame:
    """The `limit` most recent step changes' seconds (by WhatsApp time), for the histogram: columns from_step,
    to_step, seconds."""
    clauses = _moves(filters)
    if from_step:
        clauses.append(Transition.from_step == from_step)
    if to_step:
        clauses.append(Transition.to_step == to_step)
    stmt = (
        select(Transition.from_step, Transition.to_step, Transition.elapsed_seconds.label("seconds"))
        .where(*clauses)
        # ix_transitions_moves read backwards from the end of the range, stopping at `limit`.
        .order_by(Transition.at.desc(), Transition.id.desc())
        .limit(limit)
    )
    frame = _frame(db, stmt)
    frame["seconds"] = frame["seconds"].astype(float)
    return frame


def latency_trend(db: Database, filters: Filters = Filters(), unit: str = "day") -> pd.DataFrame:
    """p50/p90 of step-change latency per UTC day (or hour): columns bucket, n, p50, p90."""
    bucket = _bucket(db, Transition.at, unit)
    stmt = select(bucket.label("bucket"), Transition.elapsed_seconds.label("seconds")).where(*_moves(filters))
    frame = _quantiles(db, stmt, ["bucket"], "seconds", (0.5, 0.9))
    if frame.empty:
        return frame
    frame["bucket"] = _to_utc(frame["bucket"])
    return frame.sort_values("bucket").reset_index(drop=True)
