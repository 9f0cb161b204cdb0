"""Analytics queries for the dashboard and the CLI: every number they show comes from a function here.

Each function takes the `Database` (plus filters) and returns a pandas DataFrame. The heavy lifting
(filtering, grouping, counting) runs in SQL through SQLAlchemy Core, the same statement on SQLite and
PostgreSQL. Percentiles run as `percentile_cont` on PostgreSQL and as pandas' linear quantile on
SQLite: both interpolate the same way, so the two backends give the same numbers.

Times that describe users are WhatsApp times (`transitions.at`, `sessions.last_inbound_at`), see
DESIGN.md; `applied_at` / `received_at` only feed the operational health figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import (
    ColumnElement,
    Float,
    Select,
    TextClause,
    and_,
    case,
    cast,
    false,
    func,
    literal,
    literal_column,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.orm import InstrumentedAttribute, aliased

from core.db import Database, insert_for
from core.flows import Flow
from core.models import (
    MOVES,
    AnalyticsWatermark,
    ChatSession,
    FollowUp,
    InboundEvent,
    JobRun,
    MessageStatus,
    Outbox,
    SenderPause,
    StepReach,
    Transition,
    WebhookStat,
)
from core.views import SERVICE_WINDOW

QUANTILES = (0.5, 0.9, 0.99)
# Subscription changes are logged as transitions but say nothing about progress through a flow.
NOT_PROGRESS = ("opted_out", "opted_in")
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
    clauses: list[ColumnElement[bool]] = []
    if filters.flow:
        clauses.append(Transition.flow == filters.flow)
    if filters.phone_number_id:
        clauses.append(Transition.phone_number_id == filters.phone_number_id)
    if filters.language:
        clauses.append(Transition.language == filters.language)
    if dates and filters.since:
        clauses.append(Transition.at >= filters.since)
    if dates and filters.until:
        clauses.append(Transition.at < filters.until)
    return clauses


def _session_filters(filters: Filters) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    if filters.flow:
        clauses.append(ChatSession.flow == filters.flow)
    if filters.phone_number_id:
        clauses.append(ChatSession.phone_number_id == filters.phone_number_id)
    if filters.language:
        clauses.append(ChatSession.language == filters.language)
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


# -------------------------------------------------------------------------------------- overview
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
    """Where active users are: flow, step, users and how long they have been in that step (hours, p50/p90).

    The date range selects users by their last message (`last_inbound_at`).
    """
    clauses = [ChatSession.status == "active", *_session_filters(filters)]
    if filters.since:
        clauses.append(ChatSession.last_inbound_at >= filters.since)
    if filters.until:
        clauses.append(ChatSession.last_inbound_at < filters.until)
    entered = func.coalesce(ChatSession.step_entered_at, ChatSession.last_inbound_at, ChatSession.created_at)
    stmt = select(
        ChatSession.flow,
        ChatSession.current_step.label("step"),
        (now.timestamp() - _epoch(db, entered)).label("seconds"),
    ).where(*clauses)
    frame = _quantiles(db, stmt, ["flow", "step"], "seconds", (0.5, 0.9))
    frame = frame.rename(columns={"n": "users"})
    frame["users"] = frame["users"].astype(int)
    frame["p50_hours_in_step"] = (frame.pop("p50").astype(float) / 3600).round(2)
    frame["p90_hours_in_step"] = (frame.pop("p90").astype(float) / 3600).round(2)
    return frame.sort_values(["flow", "users"], ascending=[True, False]).reset_index(drop=True)


# ---------------------------------------------------------------------------------------- funnel
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


# --------------------------------------------------------------------------------------- latency
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


# --------------------------------------------------------------------------------------- stalled
@dataclass(frozen=True)
class StalledQuery:
    """Users idle in a step: active sessions whose last message is at least `idle_seconds` before `now`."""

    now: datetime
    idle_seconds: float
    flow: str | None = None
    step: str | None = None
    phone_number_id: str | None = None
    language: str | None = None
    window: str = "any"  # any | inside | outside (the 24 h customer-service window)
    opted_out: str = "any"  # any | yes | no
    limit: int | None = 10000


def _window_open(now: datetime) -> ColumnElement[bool]:
    """SQL twin of core.views.window_expires_at: open if the last message is < 24 h old and not closed since."""
    return and_(
        ChatSession.last_inbound_at > now - SERVICE_WINDOW,
        or_(ChatSession.window_closed_at.is_(None), ChatSession.window_closed_at < ChatSession.last_inbound_at),
    )


def _stalled_clauses(q: StalledQuery) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = [
        ChatSession.status == "active",
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


# ---------------------------------------------------------------------------------------- health
def webhook_results(
    db: Database, since: datetime | None = None, until: datetime | None = None, unit: str = "hour"
) -> pd.DataFrame:
    """Webhook requests per UTC hour/day and result (accepted, duplicate, rejected_...): bucket, result, count."""
    bucket = _bucket(db, WebhookStat.bucket, unit)
    stmt = select(bucket.label("bucket"), WebhookStat.result, func.sum(WebhookStat.count).label("count"))
    if since:
        stmt = stmt.where(WebhookStat.bucket >= since)
    if until:
        stmt = stmt.where(WebhookStat.bucket < until)
    frame = _frame(db, stmt.group_by(bucket, WebhookStat.result).order_by(bucket))
    frame["bucket"] = _to_utc(frame["bucket"])
    frame["count"] = frame["count"].astype(int)
    return frame


def webhook_totals(db: Database, since: datetime | None = None, until: datetime | None = None) -> pd.DataFrame:
    """Webhook requests per result over the range: result, count."""
    stmt = select(WebhookStat.result, func.sum(WebhookStat.count).label("count"))
    if since:
        stmt = stmt.where(WebhookStat.bucket >= since)
    if until:
        stmt = stmt.where(WebhookStat.bucket < until)
    frame = _frame(db, stmt.group_by(WebhookStat.result).order_by(WebhookStat.result))
    frame["count"] = frame["count"].astype(int)
    return frame


def pending_queue(db: Database, now: datetime) -> pd.DataFrame:
    """One row: inbound messages stored but not applied yet, and the age (s) of the oldest one."""
    stmt = select(func.count().label("pending"), func.min(InboundEvent.received_at).label("oldest")).where(
        InboundEvent.processed_at.is_(None)
    )
    frame = _frame(db, stmt)
    oldest = frame.loc[0, "oldest"]
    frame["pending"] = frame["pending"].astype(int)
    frame["oldest_age_seconds"] = (now - oldest).total_seconds() if oldest is not None else 0.0
    return frame.drop(columns=["oldest"])


def apply_latency(db: Database, since: datetime | None = None, until: datetime | None = None,
                  unit: str | None = None) -> pd.DataFrame:
    """Seconds from storing an inbound message to applying it, for messages received in [since, until).

    The engine stamps `inbound_events.processed_at` and the transition's `applied_at` with the same time, so
    this reads the one table (by its received_at index) instead of joining transitions to events.
    Overall (one row) or per UTC hour/day `bucket` of received_at: n, p50, p90, p99.
    """
    e = InboundEvent
    seconds = _seconds_between(db, e.processed_at, e.received_at).label("seconds")
    columns: list[Any] = [seconds]
    groups: list[str] = []
    if unit:
        columns.insert(0, _bucket(db, e.received_at, unit).label("bucket"))
        groups = ["bucket"]
    stmt = select(*columns).where(e.result == "applied", e.processed_at.is_not(None))
    if since:
        stmt = stmt.where(e.received_at >= since)
    if until:
        stmt = stmt.where(e.received_at < until)
    frame = _quantiles(db, stmt, groups, "seconds")
    if unit and not frame.empty:
        frame["bucket"] = _to_utc(frame["bucket"])
        frame = frame.sort_values("bucket").reset_index(drop=True)
    if not unit and (frame.empty or int(frame.loc[0, "n"]) == 0):
        return pd.DataFrame([{"n": 0, "p50": None, "p90": None, "p99": None}])
    return frame


def outbox_backlog(db: Database, now: datetime) -> pd.DataFrame:
    """Outbox rows per status with the age (s) of the oldest: status, messages, oldest_age_seconds."""
    stmt = (
        select(Outbox.status, func.count().label("messages"), func.min(Outbox.created_at).label("oldest"))
        .group_by(Outbox.status)
        .order_by(Outbox.status)
    )
    frame = _frame(db, stmt)
    frame["messages"] = frame["messages"].astype(int)
    frame["oldest_age_seconds"] = [(now - o).total_seconds() if o is not None else None for o in frame.pop("oldest")]
    return frame


def send_failures(db: Database, since: datetime | None = None) -> pd.DataFrame:
    """Failures by Meta error code: source (send = our API call, delivery = a failed status), error_code, count."""
    sends = select(
        literal("send").label("source"), Outbox.error_code, func.count().label("count")
    ).where(Outbox.status == "failed", Outbox.error_code.is_not(None))
    deliveries = select(
        literal("delivery").label("source"), MessageStatus.error_code, func.count().label("count")
    ).where(MessageStatus.status == "failed")
    if since:
        sends = sends.where(Outbox.created_at >= since)
        deliveries = deliveries.where(MessageStatus.status_at >= since)
    frame = pd.concat(
        [_frame(db, sends.group_by(Outbox.error_code)), _frame(db, deliveries.group_by(MessageStatus.error_code))],
        ignore_index=True,
    )
    frame = frame[frame["count"].astype(int) > 0].copy()
    frame["error_code"] = frame["error_code"].astype("Int64").astype(str).replace("<NA>", "unknown")
    frame["count"] = frame["count"].astype(int)
    return frame.sort_values(["count", "error_code"], ascending=[False, True]).reset_index(drop=True)


def job_runs(db: Database) -> pd.DataFrame:
    """The latest run of each job: job, started_at, finished_at, ok."""
    latest = select(JobRun.job, func.max(JobRun.started_at).label("started_at")).group_by(JobRun.job).subquery()
    stmt = (
        select(JobRun.job, JobRun.started_at, JobRun.finished_at, JobRun.ok)
        .join(latest, and_(latest.c.job == JobRun.job, latest.c.started_at == JobRun.started_at))
        .order_by(JobRun.job)
    )
    return _frame(db, stmt)


def sender_pauses(db: Database) -> pd.DataFrame:
    """Business numbers whose sending is paused, and why."""
    stmt = select(SenderPause.phone_number_id, SenderPause.error_code, SenderPause.reason, SenderPause.paused_at)
    return _frame(db, stmt.order_by(SenderPause.paused_at))
