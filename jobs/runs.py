"""Run a job once per slot, never two runs of one job at a time, and record every run in `job_runs`.

Production runs two scheduler processes for availability; both fire every job. What keeps each run single:
- a run key "<job>:<slot>" that is unique in `job_runs`: the second process to claim a slot does nothing;
- PostgreSQL: a session-level `pg_try_advisory_lock` per job held for the whole run, so a run that
  outlasts its interval is not overlapped by the next slot (released automatically if the process dies);
- SQLite: the claim is one `BEGIN IMMEDIATE` transaction that also refuses while an unfinished run of the
  same job is younger than `job_lease_seconds`.
The job functions themselves know nothing of this (they take `now` and return a dict of figures).
"""

from __future__ import annotations

import logging
import os
import socket
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, select, text, update

from core import metrics
from core.db import Database, insert_for
from core.models import JobRun

log = logging.getLogger(__name__)

JobFunction = Callable[[datetime], dict[str, Any]]


@dataclass(frozen=True)
class RunOutcome:
    status: str  # ok | error | skipped
    result: dict[str, Any] = field(default_factory=dict)
    run_id: int | None = None
    reason: str | None = None


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def advisory_key(job: str) -> int:
    # A stable signed 64-bit key per job; the high word keeps it apart from the migration lock.
    return (0x7761 << 32) | zlib.crc32(f"waflow-job:{job}".encode())


def run_job(
    db: Database,
    job: str,
    function: JobFunction,
    *,
    now: datetime,
    owner: str,
    run_key: str | None = None,
    lease_seconds: float = 900.0,
) -> RunOutcome:
    if db.is_postgres:
        with db.engine.connect() as lock_conn:
            if not _try_lock(lock_conn, job):
                return _skipped(job, "another process is running this job")
            try:
                return _claim_and_run(db, job, function, now, owner, run_key, lease_seconds)
            finally:
                lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": advisory_key(job)})
                lock_conn.commit()
    return _claim_and_run(db, job, function, now, owner, run_key, lease_seconds)


def _try_lock(conn: Connection, job: str) -> bool:
    locked = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": advisory_key(job)}).scalar())
    conn.commit()  # the lock is session-level: it outlives this transaction, not the connection
    return locked


def _claim_and_run(
    db: Database, job: str, function: JobFunction, now: datetime, owner: str, run_key: str | None, lease: float
) -> RunOutcome:
    run_id = _claim(db, job, now, owner, run_key, lease)
    if run_id is None:
        return _skipped(job, f"run {run_key} already done or a run is in progress")
    try:
        result = function(now)
    except Exception as e:  # noqa: BLE001 - a failed run is recorded and the scheduler keeps going
        log.exception("job %s failed", job)
        _finish(db, run_id, ok=False, result={"error": f"{type(e).__name__}: {e}"[:2000]})
        metrics.JOB_RUNS.labels(job, "error").inc()
        return RunOutcome("error", {"error": str(e)}, run_id)
    _finish(db, run_id, ok=True, result=result)
    metrics.JOB_RUNS.labels(job, "ok").inc()
    log.info("job %s done: %s", job, result)
    return RunOutcome("ok", result, run_id)


def _claim(db: Database, job: str, now: datetime, owner: str, run_key: str | None, lease: float) -> int | None:
    row = {"job": job, "started_at": now, "owner": owner, "run_key": run_key, "result": {}}
    with db.begin() as conn:
        if db.is_sqlite:
            running = conn.scalar(
                select(JobRun.id).where(
                    JobRun.job == job, JobRun.finished_at.is_(None), JobRun.started_at > now - timedelta(seconds=lease)
                ).limit(1)
            )
            if running is not None:
                return None
        insert = insert_for(db.engine.dialect.name)
        stmt = insert(JobRun).values(row)
        if run_key is not None:
            stmt = stmt.on_conflict_do_nothing(index_elements=["run_key"])
        return conn.execute(stmt.returning(JobRun.id)).scalar()


def _finish(db: Database, run_id: int, *, ok: bool, result: dict[str, Any]) -> None:
    with db.begin() as conn:
        conn.execute(
            update(JobRun).where(JobRun.id == run_id).values(finished_at=datetime.now(UTC), ok=ok, result=result)
        )


def _skipped(job: str, reason: str) -> RunOutcome:
    log.info("job %s skipped: %s", job, reason)
    metrics.JOB_RUNS.labels(job, "skipped").inc()
    return RunOutcome("skipped", reason=reason)


def last_runs(db: Database) -> list[dict[str, Any]]:
    """The latest run of each job (for the health page)."""
    with db.session() as s:
        latest = select(func.max(JobRun.id)).group_by(JobRun.job)
        runs = s.scalars(select(JobRun).where(JobRun.id.in_(latest)).order_by(JobRun.job)).all()
        return [
            {"job": r.job, "started_at": r.started_at, "finished_at": r.finished_at, "ok": r.ok, "result": r.result,
             "owner": r.owner}
            for r in runs
        ]
