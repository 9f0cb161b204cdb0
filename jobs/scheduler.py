"""Wiring only: which jobs run, how often, under which ids, in which job store.

APScheduler 3 with a persistent SQLAlchemyJobStore in the application database (table apscheduler_jobs),
stable job ids "waflow.<job>" and intervals from settings. Every scheduled firing goes through
`jobs.runs.run_job`, so with several scheduler processes each slot of each job still runs once.
The job functions (jobs/archive.py, followups.py, sender.py, sweeper.py) know nothing of this module.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import text

from core.analytics import refresh_rollups
from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.whatsapp import GraphClient
from jobs.archive import run_archive
from jobs.followups import run_followups
from jobs.runs import RunOutcome, advisory_key, default_owner, run_job
from jobs.sender import make_client, run_sender
from jobs.sweeper import run_sweeper

log = logging.getLogger(__name__)

JOB_STORE_TABLE = "apscheduler_jobs"
# Firing times are aligned to multiples of the interval since this instant, so every process computes the
# same slot number for the same firing.
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
# (job name, the setting holding its interval in seconds)
JOBS: dict[str, str] = {
    "archive": "archive_interval_seconds",
    "followups": "followups_interval_seconds",
    "sender": "sender_interval_seconds",
    "sweeper": "sweeper_interval_seconds",
    "rollups": "rollups_interval_seconds",
}


@dataclass
class JobContext:
    """What the jobs of one process share: settings, database, and lazily the engine and HTTP client."""

    settings: Settings
    db: Database
    owner: str = field(default_factory=default_owner)

    @cached_property
    def engine(self) -> Engine:
        return Engine(self.db, settings=self.settings)

    @cached_property
    def client(self) -> GraphClient | None:
        return make_client(self.settings) if self.settings.send_mode == "live" else None

    def function(self, job: str) -> Callable[[datetime], dict[str, Any]]:
        db, settings = self.db, self.settings
        functions: dict[str, Callable[[datetime], dict[str, Any]]] = {
            "archive": lambda now: run_archive(db, settings, now),
            "followups": lambda now: run_followups(db, settings, now),
            "sender": lambda now: run_sender(db, settings, now, client=self.client, owner=self.owner),
            "sweeper": lambda now: run_sweeper(db, settings, now, engine=self.engine),
            "rollups": lambda now: {"transitions_read": refresh_rollups(db, now)},
        }
        return functions[job]

    def interval(self, job: str) -> float:
        return float(getattr(self.settings, JOBS[job]))


_context: JobContext | None = None


def slot_of(now: datetime, interval: float) -> int:
    # The epsilon absorbs float error when a firing lands exactly on its slot boundary.
    return math.floor((now - EPOCH).total_seconds() / interval + 1e-6)


def scheduled_run(job: str) -> None:
    """What APScheduler calls (by textual reference, so the job store holds no pickled objects)."""
    context = _context
    if context is None:
        raise RuntimeError("jobs.scheduler.scheduled_run called outside a running scheduler")
    now = datetime.now(UTC)
    run_key = f"{job}:{slot_of(now, context.interval(job))}"
    run_job(
        context.db, job, context.function(job), now=now, owner=context.owner, run_key=run_key,
        lease_seconds=context.settings.job_lease_seconds,
    )


def run_once(context: JobContext, job: str, now: datetime | None = None) -> RunOutcome:
    """`python -m jobs --once JOB`: run now, still singleton against running schedulers."""
    return run_job(
        context.db, job, context.function(job), now=now or datetime.now(UTC), owner=context.owner,
        lease_seconds=context.settings.job_lease_seconds,
    )


def build_scheduler(context: JobContext) -> BackgroundScheduler:
    global _context
    _context = context
    store = SQLAlchemyJobStore(engine=context.db.engine, tablename=JOB_STORE_TABLE)
    _create_store_table(context.db, store)
    scheduler = BackgroundScheduler(
        jobstores={"default": store},
        executors={"default": ThreadPoolExecutor(max_workers=len(JOBS))},
        job_defaults={"coalesce": True, "max_instances": 1},
        timezone=UTC,
    )
    for job in JOBS:
        interval = context.interval(job)
        scheduler.add_job(
            "jobs.scheduler:scheduled_run",
            trigger=IntervalTrigger(seconds=interval, start_date=EPOCH, timezone=UTC),
            args=[job],
            id=f"waflow.{job}",
            name=job,
            replace_existing=True,
            misfire_grace_time=max(1, math.ceil(interval)),
        )
    return scheduler


def _create_store_table(db: Database, store: SQLAlchemyJobStore) -> None:
    # Two schedulers starting together would both try CREATE TABLE; serialize them.
    with db.begin() as conn:
        if db.is_postgres:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key("jobstore")})
        store.jobs_t.create(conn, checkfirst=True)


def serve(context: JobContext, stop: threading.Event) -> None:
    """Run the scheduler until `stop` is set (SIGINT/SIGTERM), then shut it down, waiting for running jobs."""
    scheduler = build_scheduler(context)
    scheduler.start()
    intervals = ", ".join(f"{job} every {context.interval(job):g}s" for job in JOBS)
    log.info("scheduler %s started: %s", context.owner, intervals)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        scheduler.shutdown(wait=True)
        client = context.__dict__.get("client")  # only if a run created it
        if client is not None:
            client.close()
        log.info("scheduler %s stopped", context.owner)
