"""Crash recovery: apply inbound messages left pending, and free outbox claims whose sender died.

A message that fails to apply does not stop the run: it is counted (and quarantined at its last try) and the
other users go on; the result reports how many failed, were quarantined, or raised (core.engine).

A "sending" claim older than `send_claim_timeout_seconds` belongs to a sender that crashed or hung:
- `send_started_at` is NULL: the HTTP request was never started (it is written and committed just before
  the call), so the row goes back to "queued" and is sent normally;
- `send_started_at` is set: the request may have reached Meta and produced a message, and the Cloud API
  has no idempotency key, so the row becomes "uncertain" and is never resent automatically (an operator
  or a status webhook for its wamid settles it). This is the at-least-once window described in
  jobs/sender.py; it is as long as one HTTP call.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update

from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.models import Outbox


def run_sweeper(db: Database, settings: Settings, now: datetime, *, engine: Engine | None = None) -> dict[str, Any]:
    engine = engine or Engine(db, settings=settings)
    report = engine.process_pending_report(older_than=timedelta(seconds=settings.sweeper_pending_age_seconds))
    requeued, uncertain = free_stale_claims(db, now, timedelta(seconds=settings.send_claim_timeout_seconds))
    return {"applied": report.applied, "apply_failed": report.failed, "quarantined": report.quarantined,
            "apply_errors": report.errors, "claims_requeued": requeued, "claims_uncertain": uncertain}


def free_stale_claims(db: Database, now: datetime, timeout: timedelta) -> tuple[int, int]:
    stale = (Outbox.status == "sending", Outbox.claimed_at < now - timeout)
    with db.begin() as conn:
        requeued = conn.execute(
            update(Outbox)
            .where(*stale, Outbox.send_started_at.is_(None))
            .values(status="queued", claimed_at=None, claimed_by=None)
        ).rowcount
        uncertain = conn.execute(
            update(Outbox)
            .where(*stale, Outbox.send_started_at.is_not(None))
            .values(status="uncertain", error_title="sender lost while sending: outcome unknown, not resent")
        ).rowcount
    return requeued, uncertain
