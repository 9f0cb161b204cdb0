"""Health page: webhook results, pending queue, quarantine, apply latency, outbox backlog, send failures, jobs."""

from __future__ import annotations

from dataclasses import asdict, fields
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import (
    and_,
    func,
    literal,
    select,
)

from core.analytics.common import _bucket, _frame, _quantiles, _seconds_between, _to_utc
from core.db import Database
from core.models import (
    InboundEvent,
    JobRun,
    MessageStatus,
    Outbox,
    SenderPause,
    WebhookStat,
)
from core.quarantine import Held, held_counts, list_quarantine


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


def quarantine_counts(db: Database) -> pd.DataFrame:
    """Messages held in the quarantine, per stage (intake: could not be taken; apply: failed to apply
    APPLY_MAX_ATTEMPTS times): stage, held."""
    return pd.DataFrame(list(held_counts(db).items()), columns=["stage", "held"])


def quarantined_recent(db: Database, limit: int = 20) -> pd.DataFrame:
    """The newest held quarantined messages, newest first, with the reason."""
    rows = [asdict(held) for held in list_quarantine(db, "held", limit)]
    return pd.DataFrame(rows, columns=[f.name for f in fields(Held)])


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
