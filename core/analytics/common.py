"""Shared by every analytics module: filters, percentiles, SQL helpers that differ by backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import (
    ColumnElement,
    Float,
    Select,
    cast,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.orm import InstrumentedAttribute

from core.db import Database
from core.flows import Flow
from core.models import (
    ChatSession,
    Transition,
)

QUANTILES = (0.5, 0.9, 0.99)
# Subscription changes are logged as transitions but say nothing about progress through a flow; nor does a
# late message (older than one already applied: logged at the session's latest time, it moved nothing).
NOT_PROGRESS = ("opted_out", "opted_in", "late")
SESSION_STATUSES = ("active", "completed", "archived")

# A SELECT of any shape, and a column or an ORM attribute, as the helpers below accept them.
Query = Select[*tuple[Any, ...]]
Expr = ColumnElement[Any] | InstrumentedAttribute[Any]


@dataclass(frozen=True)
class Filters:
    """What every page can narrow its numbers to. `since`/`until` are a half-open range [since, until)."""

    flow: str | None = None
    phone_number_id: str | None = None
    language: str | None = None
    since: datetime | None = None
    until: datetime | None = None


# --------------------------------------------------------------------------------------- helpers
def _frame(db: Database, stmt: Query) -> pd.DataFrame:
    with db.engine.connect() as conn:
        if db.is_postgres:
            # Funnels and percentiles hash or sort a few hundred thousand rows: keep that in memory. JIT
            # compilation costs these sub-second queries more than it saves, and varies from run to run.
            conn.execute(text("SET LOCAL work_mem = '64MB'"))
            conn.execute(text("SET LOCAL jit = off"))
        result = conn.execute(stmt)
        # Plain tuples: given SQLAlchemy rows, pandas probes each one for namedtuple fields (several times slower).
        return pd.DataFrame([tuple(row) for row in result], columns=list(result.keys()))


def _epoch(db: Database, column: Expr) -> ColumnElement[float]:
    """Seconds since 1970 as a float, in SQL."""
    if db.is_postgres:
        # date_part is float8 arithmetic; EXTRACT computes a numeric (since PostgreSQL 14), several times slower.
        return func.date_part(literal_column("'epoch'"), column).cast(Float)
    # Whole seconds plus milliseconds (julianday() would lose tens of microseconds to float rounding).
    whole = cast(func.strftime(literal_column("'%s'"), column), Float)
    fraction = cast(func.strftime(literal_column("'%f'"), column), Float) - cast(
        func.strftime(literal_column("'%S'"), column), Float
    )
    return whole + fraction


def _seconds_between(db: Database, later: Expr, earlier: Expr) -> ColumnElement[float]:
    return _epoch(db, later) - _epoch(db, earlier)


def _bucket(db: Database, column: Expr, unit: str) -> ColumnElement[Any]:
    """Start of the UTC hour/day containing `column` (a naive timestamp or text; `_to_utc` reads both)."""
    pattern = {"hour": "%Y-%m-%d %H:00:00", "day": "%Y-%m-%d 00:00:00"}[unit]
    # Literals, not bind parameters: GROUP BY must repeat the very same expression as the SELECT list.
    if db.is_postgres:
        return func.date_trunc(literal_column(f"'{unit}'"), func.timezone(literal_column("'UTC'"), column))
    return func.strftime(literal_column(f"'{pattern}'"), column)


def _to_utc(series: pd.Series) -> pd.Series:
    return pd.to_datetime(series, utc=True)


def _quantile_name(q: float) -> str:
    return f"p{round(q * 100)}"


def _quantiles(
    db: Database, stmt: Query, groups: Sequence[str], value: str, qs: Sequence[float] = QUANTILES
) -> pd.DataFrame:
    """count + percentiles of `value` per group of a statement's rows (linear interpolation on both backends)."""
    names = [_quantile_name(q) for q in qs]
    if db.is_postgres:
        sub = stmt.subquery()
        keys = [sub.c[g] for g in groups]
        aggregates = [
            func.percentile_cont(q).within_group(sub.c[value]).label(n) for q, n in zip(qs, names, strict=True)
        ]
        frame = _frame(db, select(*keys, func.count().label("n"), *aggregates).group_by(*keys))
        for n in names:
            frame[n] = frame[n].astype(float)
        return frame
    rows = _frame(db, stmt)
    if rows.empty:
        return pd.DataFrame(columns=[*groups, "n", *names])
    rows[value] = rows[value].astype(float)
    if not groups:
        values = rows[value]
        quantiles = {n: float(values.quantile(q)) for q, n in zip(qs, names, strict=True)}
        return pd.DataFrame([{"n": len(values), **quantiles}])
    grouped = rows.groupby(list(groups), sort=False)[value]
    frame = grouped.size().rename("n").to_frame()
    for q, n in zip(qs, names, strict=True):
        frame[n] = grouped.quantile(q)
    return frame.reset_index()


def _transition_filters(filters: Filters, *, dates: bool = True) -> list[ColumnElement[bool]]:
    clauses = _segment_filters(Transition, filters)
    if dates and filters.since:
        clauses.append(Transition.at >= filters.since)
    if dates and filters.until:
        clauses.append(Transition.at < filters.until)
    return clauses


def _session_filters(filters: Filters) -> list[ColumnElement[bool]]:
    return _segment_filters(ChatSession, filters)


def _segment_filters(model: type[Transition] | type[ChatSession], filters: Filters) -> list[ColumnElement[bool]]:
    """Flow, business number and language: columns both transitions and sessions carry."""
    clauses: list[ColumnElement[bool]] = []
    if filters.flow:
        clauses.append(model.flow == filters.flow)
    if filters.phone_number_id:
        clauses.append(model.phone_number_id == filters.phone_number_id)
    if filters.language:
        clauses.append(model.language == filters.language)
    return clauses


def funnel_path(flow: Flow) -> list[str]:
    """The flow's main path: from `start`, follow each step's `next` until a terminal step (or a loop)."""
    path: list[str] = []
    step_id: str | None = flow.start
    while step_id is not None and step_id not in path:
        path.append(step_id)
        step = flow.step(step_id)
        step_id = None if step.terminal else step.next
    return path
