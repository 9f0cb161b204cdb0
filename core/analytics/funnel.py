"""Funnel page: the step-reach rollup and its refresh, reach and drop-off per step, time to complete."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    func,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.orm import aliased

from core.analytics.common import NOT_PROGRESS, Expr, Filters, _epoch, _frame, _seconds_between, _to_utc, funnel_path
from core.db import Database, insert_for
from core.flows import Flow
from core.models import (
    AnalyticsWatermark,
    ChatSession,
    StepReach,
    Transition,
)

ROLLUP = "step_reach"
# Transitions applied this recently may still have uncommitted neighbours with lower ids: read them again next time.
SETTLE = timedelta(minutes=2)
ROLLUP_LOCK_KEY = 0x77616E61  # PostgreSQL advisory lock: one refresh at a time


def _same_session(a: Any, b: Any) -> ColumnElement[bool]:
    """Rows of `a` and `b` (tables, aliases or `.c` collections) about the same session in the same flow."""
    return and_(a.phone_number_id == b.phone_number_id, a.user_id == b.user_id, a.flow == b.flow)


def refresh_rollups(db: Database, now: datetime | None = None) -> int:
    """Bring `analytics_step_reach` up to date with `transitions`; returns the transitions read.

    Incremental (from the stored watermark) and idempotent (first times only ever move earlier), so it is
    safe to run from a job, before a query, or both. A job should run it every minute or so at scale.
    """
    now = now or datetime.now(UTC)
    t, r = Transition, StepReach
    with db.begin() as conn:
        if db.is_postgres and not conn.scalar(select(func.pg_try_advisory_xact_lock(ROLLUP_LOCK_KEY))):
            return 0  # another process is refreshing right now
        low = conn.scalar(select(AnalyticsWatermark.last_id).where(AnalyticsWatermark.name == ROLLUP)) or 0
        high = conn.scalar(select(func.max(t.id)))
        if high is None or high <= low:
            return 0
        in_range = and_(t.id > low, t.id <= high)
        # Each row is written with its entered_at (the session's earliest first time in the flow) and rewritten
        # only when a time moves earlier: no second version of every row (their dead copies bloated the table
        # and the funnel's index to twice their size).
        firsts = (
            select(t.phone_number_id, t.user_id, t.flow, t.to_step.label("step"), func.min(t.at).label("first_at"))
            .where(in_range, t.outcome.not_in(NOT_PROGRESS))
            .group_by(t.phone_number_id, t.user_id, t.flow, t.to_step)
            .cte("firsts")
        )
        earliest = (
            select(firsts.c.phone_number_id, firsts.c.user_id, firsts.c.flow,
                   func.min(firsts.c.first_at).label("first_at"))
            .group_by(firsts.c.phone_number_id, firsts.c.user_id, firsts.c.flow)
            .cte("earliest")
        )
        # A message delivered late can move a session's entry earlier: its rows already in the rollup follow.
        conn.execute(
            update(StepReach)
            .where(_same_session(r, earliest.c), earliest.c.first_at < r.entered_at)
            .values(entered_at=earliest.c.first_at)
        )
        # The entry time the rollup already holds for these sessions. A join, read once: a lookup per row could be
        # planned as a scan of the rollup, repeated while this very statement fills it (on the first build).
        held = aliased(StepReach)
        existing = (
            select(held.phone_number_id, held.user_id, held.flow, func.min(held.entered_at).label("entered_at"))
            .join(earliest, _same_session(held, earliest.c))
            .group_by(held.phone_number_id, held.user_id, held.flow)
            .cte("existing")
        )
        rows = (
            select(firsts, func.coalesce(existing.c.entered_at, earliest.c.first_at))
            .join(earliest, _same_session(firsts.c, earliest.c))
            .outerjoin(existing, _same_session(firsts.c, existing.c))
            .where(true())  # SQLite parses an upsert's SELECT only with a WHERE
        )
        dml = insert_for(conn.dialect.name)
        upsert = dml(StepReach).from_select(
            ["phone_number_id", "user_id", "flow", "step", "first_at", "entered_at"], rows
        )
        conn.execute(upsert.on_conflict_do_update(
            index_elements=["phone_number_id", "user_id", "flow", "step"],
            set_={"first_at": upsert.excluded.first_at},
            where=upsert.excluded.first_at < r.first_at,
        ))
        settled = conn.scalar(select(func.max(t.id)).where(in_range, t.applied_at <= now - SETTLE)) or low
        watermark = dml(AnalyticsWatermark).values(name=ROLLUP, last_id=settled, refreshed_at=now)
        conn.execute(watermark.on_conflict_do_update(
            index_elements=["name"], set_={"last_id": settled, "refreshed_at": now}
        ))
        return int(high - low)



@dataclass(frozen=True)
class _FunnelQuery:
    """One row per cohort user ("journey"): when they entered the flow and first reached each path step.

    Cohort: users whose first arrival in the flow lies in [since, until). Step i is reached (column s<i>,
    epoch seconds) when first reached within `window_seconds` of entering (no limit when None).
    """

    db: Database
    flow: Flow
    filters: Filters
    window_seconds: float | None
    by: str | None = None

    @property
    def path(self) -> list[str]:
        return funnel_path(self.flow)

    def journeys(self) -> Any:
        r, f, db = StepReach, self.filters, self.db
        segment: Expr
        if self.by == "language":
            segment = ChatSession.language
        elif self.by == "phone_number_id":
            segment = r.phone_number_id
        else:
            segment = literal("all")
        clauses = [r.flow == self.flow.name, r.step.in_(self.path), r.entered_at.is_not(None)]
        if f.phone_number_id:
            clauses.append(r.phone_number_id == f.phone_number_id)
        if f.since:
            clauses.append(r.entered_at >= f.since)
        if f.until:
            clauses.append(r.entered_at < f.until)
        in_time: ColumnElement[bool] = true()
        if self.window_seconds is not None:
            in_time = _seconds_between(db, r.first_at, r.entered_at) <= self.window_seconds
        steps = [
            func.max(case((and_(r.step == step, in_time), _epoch(db, r.first_at)), else_=None)).label(f"s{i}")
            for i, step in enumerate(self.path)
        ]
        stmt = select(r.phone_number_id, r.user_id, segment.label("segment"),
                      _epoch(db, r.entered_at).label("entered"), *steps)
        if f.language or self.by == "language":
            stmt = stmt.join(ChatSession, and_(ChatSession.phone_number_id == r.phone_number_id,
                                               ChatSession.user_id == r.user_id))
            if f.language:
                clauses.append(ChatSession.language == f.language)
        # All rows of a journey share entered_at (refresh_rollups keeps it so): grouping by it first follows
        # ix_step_reach_journeys, so PostgreSQL aggregates the index scan as it comes.
        keys = [r.entered_at, r.phone_number_id, r.user_id, *([segment] if self.by else [])]
        return stmt.where(*clauses).group_by(*keys).subquery("journeys")


def _session_value(phone_number_id: Any, user_id: Any, column: Expr) -> Any:
    """`column` of the session (phone_number_id, user_id), looked up per row: a primary-key probe each, so the
    cost follows the rows asked about. A join lets PostgreSQL's estimates pick hashing all sessions instead."""
    session = and_(ChatSession.phone_number_id == phone_number_id, ChatSession.user_id == user_id)
    return select(column).where(session).scalar_subquery()


def _went_on(j: Any, i: int) -> ColumnElement[bool]:
    return j.c[f"s{i + 1}"] >= j.c[f"s{i}"]


def _funnel_sums(db: Database, q: _FunnelQuery) -> pd.DataFrame:
    """Per segment: reached<i>, went<i> and median<i> (seconds to the next step), on either backend."""
    j, n = q.journeys(), len(q.path)
    if db.is_postgres:
        columns: list[Any] = [func.count(j.c[f"s{i}"]).label(f"reached{i}") for i in range(n)]
        for i in range(n - 1):
            gap = case((_went_on(j, i), j.c[f"s{i + 1}"] - j.c[f"s{i}"]), else_=None)
            columns.append(func.count(gap).label(f"went{i}"))
            columns.append(func.percentile_cont(0.5).within_group(gap).label(f"median{i}"))
        return _frame(db, select(j.c.segment, *columns).group_by(j.c.segment))
    rows = _frame(db, select(j))
    out = []
    for segment, group in rows.groupby("segment", sort=False):
        record: dict[str, Any] = {"segment": segment}
        for i in range(n):
            record[f"reached{i}"] = int(group[f"s{i}"].notna().sum())
        for i in range(n - 1):
            a, b = group[f"s{i}"].astype(float), group[f"s{i + 1}"].astype(float)
            gaps = (b - a)[b >= a]
            record[f"went{i}"] = len(gaps)
            record[f"median{i}"] = float(gaps.median()) if len(gaps) else None
        out.append(record)
    return pd.DataFrame(out)


def funnel(
    db: Database, flow: Flow, filters: Filters = Filters(), window_seconds: float | None = None, by: str | None = None
) -> pd.DataFrame:
    """Step-by-step funnel along the flow's main path (see `_FunnelQuery` for cohort and window).

    Per step: reached, went_on (also reached the next step, after this one), conversion_pct (reached /
    cohort), drop_off_pct (reached but did not go on, % of reached) and median_seconds_to_next. With `by`
    ("language" | "phone_number_id") one block of rows per segment.
    """
    refresh_rollups(db)
    q = _FunnelQuery(db, flow, filters, window_seconds, by)
    sums = _funnel_sums(db, q)
    columns = ["segment", "position", "step", "reached", "went_on", "conversion_pct", "drop_off_pct",
               "median_seconds_to_next"]
    rows: list[dict[str, Any]] = []
    path = q.path
    for record in sorted(sums.to_dict("records"), key=lambda rec: str(rec["segment"])):
        cohort = int(record["reached0"])
        if not cohort:
            continue
        for i, step in enumerate(path):
            reached = int(record[f"reached{i}"])
            last = i == len(path) - 1
            went = None if last else int(record[f"went{i}"])
            median = None if last else record[f"median{i}"]
            rows.append({
                "segment": record["segment"], "position": i + 1, "step": step, "reached": reached, "went_on": went,
                "conversion_pct": round(100.0 * reached / cohort, 1),
                "drop_off_pct": None if last or not reached else round(100.0 * (reached - (went or 0)) / reached, 1),
                "median_seconds_to_next": None if median is None or pd.isna(median) else round(float(median), 3),
            })
    frame = pd.DataFrame(rows, columns=columns)
    frame["went_on"] = frame["went_on"].astype("Int64")
    frame["drop_off_pct"] = frame["drop_off_pct"].astype("Float64")
    frame["median_seconds_to_next"] = frame["median_seconds_to_next"].astype("Float64")
    return frame


def time_to_complete(
    db: Database, flow: Flow, filters: Filters = Filters(), window_seconds: float | None = None,
    limit: int | None = 20000,
) -> pd.DataFrame:
    """Per cohort user who reached the flow's last path step: seconds from entering to getting there.

    The `limit` most recent entrants (a distribution needs no more; None: all of them).
    """
    refresh_rollups(db)
    q = _FunnelQuery(db, flow, filters, window_seconds)
    j, last = q.journeys(), f"s{len(q.path) - 1}"
    stmt = select(j.c.phone_number_id, j.c.user_id, (j.c[last] - j.c.entered).label("seconds")).where(
        j.c[last].is_not(None)
    ).order_by(j.c.entered.desc(), j.c.phone_number_id, j.c.user_id).limit(limit)
    frame = _frame(db, stmt)
    frame["seconds"] = frame["seconds"].astype(float).round(3)
    return frame


def dropped_users(
    db: Database, flow: Flow, step: str, filters: Filters = Filters(), window_seconds: float | None = None,
    limit: int = 5000,
) -> pd.DataFrame:
    """Cohort users who reached `step` but not the next path step: who dropped there, and where they are now."""
    q = _FunnelQuery(db, flow, filters, window_seconds)
    path = q.path
    if step not in path[:-1]:
        raise ValueError(f"{step!r} is not a non-final step of {flow.name}'s funnel {path}")
    refresh_rollups(db)
    j, i = q.journeys(), path.index(step)
    here, there = j.c[f"s{i}"], j.c[f"s{i + 1}"]
    dropped = (
        select(j.c.phone_number_id, j.c.user_id, j.c.entered, here.label("reached"))
        .where(here.is_not(None), or_(there.is_(None), there < here),
               _session_value(j.c.phone_number_id, j.c.user_id, ChatSession.status).is_not(None))
        .order_by(here.desc(), j.c.phone_number_id, j.c.user_id)
        .limit(limit)
        .subquery("dropped")
    )
    current = [ChatSession.current_step, ChatSession.status, ChatSession.language, ChatSession.last_inbound_at]
    stmt = select(
        dropped, *(_session_value(dropped.c.phone_number_id, dropped.c.user_id, c).label(c.key) for c in current)
    ).order_by(dropped.c.reached.desc(), dropped.c.phone_number_id, dropped.c.user_id)
    frame = _frame(db, stmt)
    frame.insert(2, "entered_at", pd.to_datetime(frame.pop("entered").astype(float), unit="s", utc=True).dt.round("ms"))
    frame.insert(3, "reached_at", pd.to_datetime(frame.pop("reached").astype(float), unit="s", utc=True).dt.round("ms"))
    frame["last_inbound_at"] = _to_utc(frame["last_inbound_at"])
    return frame
