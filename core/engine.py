"""Ingest inbound messages exactly once and apply each user's pending messages under that user's lock.

ingest: one INSERT ... ON CONFLICT DO NOTHING per batch (unique (phone_number_id, wamid)) → the dedupe.
apply_pending: one transaction per user batch (core.batch): upsert + lock the session row, apply pending
messages in (timestamp, arrival) order through the flow, write state, transitions, outbox and processed
marks together; on PostgreSQL pipelined into two round trips (core.pipelined).

Nothing one sender does holds back anyone else. A message the flow cannot take is counted in its batch and
quarantined at its `APPLY_MAX_ATTEMPTS`-th failure (core.batch). A write the database refuses (a data error)
rolls back the whole transaction, so the engine retries smaller: the joint transaction's users one by one,
then the refused user's messages one per transaction until the one at fault is found and counted in a short
transaction of its own. `process_pending` (the sweeper, crash recovery) reports what failed and goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError

from core import logsafe, metrics
from core.batch import SESSIONS, ApplyResult, CoreBatch, SessionKey, WriteRefusedError, record_failure
from core.config import Settings, get_settings
from core.db import Database, first_line, insert_for
from core.errors import DatabaseUnavailableError, WaflowError
from core.flows import FlowRegistry, default_flows_dir, load_flows
from core.messages import InboundMessage
from core.models import InboundEvent
from core.pipelined import apply_pipelined, apply_pipelined_together, deliver_pipelined, store_events
from core.quarantine import held_counts

__all__ = ["JOINT_USERS", "ApplyResult", "DeliverResult", "Engine", "IngestResult", "PendingReport", "SessionKey"]

log = logging.getLogger(__name__)

# Users per joint transaction when many are waiting (the webhook's apply thread, the sweeper).
JOINT_USERS = 32


@dataclass(frozen=True)
class IngestResult:
    stored: int
    duplicates: int
    session_keys: list[SessionKey]


@dataclass(frozen=True)
class DeliverResult:
    stored: int
    duplicates: int
    applied: int


@dataclass
class PendingReport:
    """What `process_pending_report` did: messages applied, failed (counted; tried again next time), quarantined,
    and users left pending after an error their apply raised (logged)."""

    applied: int = 0
    failed: int = 0
    quarantined: int = 0
    errors: int = 0

    def add(self, result: ApplyResult) -> None:
        self.applied += result.applied
        self.failed += result.failed
        self.quarantined += result.quarantined


def _unique(messages: Sequence[InboundMessage]) -> dict[tuple[str, str], InboundMessage]:
    unique: dict[tuple[str, str], InboundMessage] = {}
    for message in messages:
        unique.setdefault((message.phone_number_id, message.wamid), message)
    return unique


class Engine:
    """The session engine. Stateless between calls: every process may run one."""

    def __init__(
        self,
        db: Database,
        flows: FlowRegistry | None = None,
        settings: Settings | None = None,
        *,
        lock_sessions: bool = True,
    ) -> None:
        self.db = db
        self.settings = settings or get_settings()
        self.flows = flows or load_flows(self.settings.flows_dir or default_flows_dir())
        # False only for the control experiment in the tests/benchmark: a naive read-then-write applier.
        self.lock_sessions = lock_sessions
        for flow_name in {self.settings.default_flow, *self.settings.routes.values()}:
            self.flows.latest(flow_name)  # an unknown routed flow fails at start-up, not on a user's message

    @property
    def pipelines(self) -> bool:
        """Whether applies take PostgreSQL's pipelined path (core.pipelined); the naive control never does."""
        return self.db.is_postgres and self.lock_sessions

    # ----------------------------------------------------------------------------------------- ingest
    def ingest(self, messages: Sequence[InboundMessage], *, now: datetime | None = None) -> IngestResult:
        """Store each message once. Returns the session keys that received new messages."""
        return self.ingest_each([messages], now=now)[0]

    def ingest_each(
        self, deliveries: Sequence[Sequence[InboundMessage]], *, now: datetime | None = None
    ) -> list[IngestResult]:
        """Store several deliveries (webhook POSTs) in one statement and one commit, with a result for each: a
        message new to the database counts as stored for the first delivery carrying it, a duplicate for
        any other."""
        now = now or datetime.now(UTC)
        unique = _unique([m for delivery in deliveries for m in delivery])
        stored: set[tuple[str, str]] = set()
        if unique:
            try:
                if self.db.is_postgres:
                    stored = store_events(self, list(unique.values()), now)
                else:
                    stored = self._store_events(list(unique.values()), now)
            except (OperationalError, DBAPIError) as e:
                raise DatabaseUnavailableError(f"cannot store messages: {first_line(e)}") from e
        results = []
        for delivery in deliveries:
            new = {}
            for message in delivery:
                dedupe_key = (message.phone_number_id, message.wamid)
                if dedupe_key in stored:
                    stored.discard(dedupe_key)  # claimed: later copies are duplicates
                    new[dedupe_key] = message
            keys = list(dict.fromkeys(m.session_key for m in new.values()))
            results.append(IngestResult(len(new), len(delivery) - len(new), keys))
        metrics.MESSAGES_STORED.inc(sum(r.stored for r in results))
        metrics.DUPLICATES_DROPPED.inc(sum(r.duplicates for r in results))
        return results

    def deliver(self, messages: Sequence[InboundMessage], *, now: datetime | None = None) -> DeliverResult:
        """Store and apply in one go, for callers that process messages synchronously and acknowledge only
        afterwards (a queue consumer, say; bench/engine.py measures it). On PostgreSQL it is one transaction of two
        round trips: nothing is stored unless its user's batch is applied, so after an error the caller
        delivers again and loses nothing. Elsewhere, and for a number change, it is `ingest` then `apply_all`."""
        now = now or datetime.now(UTC)
        unique = _unique(messages)
        if not unique:
            return DeliverResult(0, len(messages), 0)
        if self.pipelines:
            started = time.perf_counter()
            try:
                done = deliver_pipelined(self, list(unique.values()), now)
            except WriteRefusedError as e:
                # Nothing was stored: store, then apply user by user, so the message at fault is found and counted.
                log.warning("delivery of %d messages refused (%s); storing, then applying user by user", len(unique),
                            logsafe.clean(first_line(e)))
                done = None
            if done is not None:
                stored, results = done
                duplicates = len(messages) - len(stored)
                metrics.MESSAGES_STORED.inc(len(stored))
                metrics.DUPLICATES_DROPPED.inc(duplicates)
                applied = sum(r.applied for r in results.values())
                if applied:
                    metrics.APPLY_LATENCY.observe(time.perf_counter() - started)
                applied += sum(self.apply_all(key) for key, r in results.items() if r.more_pending)
                return DeliverResult(len(stored), duplicates, applied)
        counted = self.ingest(messages, now=now)
        return DeliverResult(counted.stored, counted.duplicates, sum(self.apply_all(k) for k in counted.session_keys))

    def _store_events(self, messages: list[InboundMessage], now: datetime) -> set[tuple[str, str]]:
        rows = [
            {
                "phone_number_id": m.phone_number_id,
                "wamid": m.wamid,
                "user_id": m.user_id,
                "timestamp": m.timestamp,
                "kind": m.kind,
                "message": m.model_dump(mode="json"),
                "received_at": now,
            }
            for m in messages
        ]
        with self.db.single_statement() as conn:
            stmt = (
                insert_for(conn.dialect.name)(InboundEvent)
                .on_conflict_do_nothing(index_elements=["phone_number_id", "wamid"])
                .returning(InboundEvent.phone_number_id, InboundEvent.wamid)
            )
            # Rows as parameters, not .values(rows): the statement's compiled form is then cached
            # (a multi-row VALUES is compiled again on every request), and SQLAlchemy still sends one
            # multi-row INSERT per 1000 rows ("insertmanyvalues").
            return {(r.phone_number_id, r.wamid) for r in conn.execute(stmt, rows)}

    # ------------------------------------------------------------------------------------------ apply
    def apply_pending(
        self, key: SessionKey, *, skip_locked: bool = False, now: datetime | None = None
    ) -> ApplyResult:
        """Apply one user's pending messages (up to the batch limit) in one transaction; after a write the
        database refused, one message per transaction until the one at fault is counted."""
        started = time.perf_counter()
        now = now or datetime.now(UTC)
        try:
            result = self._apply_batch(key, now, skip_locked=skip_locked)
        except WriteRefusedError as e:
            if len(e.event_ids) == 1:
                result = self._count_refused(key, e, now)
            else:
                log.warning("apply of %s refused (%s); applying its messages one at a time", logsafe.key(key),
                            logsafe.clean(first_line(e)))
                result = self._apply_singly(key, now, skip_locked=skip_locked)
        if result.applied:
            metrics.APPLY_LATENCY.observe(time.perf_counter() - started)
        if result.failed or result.quarantined:
            metrics.APPLY_FAILURES.labels("retried").inc(result.failed)
            metrics.APPLY_FAILURES.labels("quarantined").inc(result.quarantined)
        return result

    def _apply_batch(
        self, key: SessionKey, now: datetime, *, skip_locked: bool, limit: int | None = None
    ) -> ApplyResult:
        try:
            result = None
            if self.pipelines:
                result = apply_pipelined(self, key, now, skip_locked=skip_locked, limit=limit)
            if result is None:
                with self.db.begin() as conn:
                    batch = CoreBatch(self, conn, key, now, limit=limit)
                    try:
                        result = batch.run(skip_locked=skip_locked)
                    except (DataError, IntegrityError) as e:
                        raise WriteRefusedError(f"cannot apply messages of {key}: {first_line(e)}", batch.tried) from e
        except (OperationalError, DBAPIError) as e:
            raise DatabaseUnavailableError(f"cannot apply messages of {key}: {first_line(e)}") from e
        return result

    def _apply_singly(self, key: SessionKey, now: datetime, *, skip_locked: bool) -> ApplyResult:
        """One message per transaction, in order, until the database refuses one (counted on its own) or a
        batch's worth went through: the messages before the one at fault are applied meanwhile."""
        total = ApplyResult()
        for _ in range(self.settings.apply_batch_limit):
            try:
                result = self._apply_batch(key, now, skip_locked=skip_locked, limit=1)
            except WriteRefusedError as e:
                return total + self._count_refused(key, e, now)
            total += result
            if result.skipped_locked or result.failed or not result.more_pending:
                break
        return total

    def _count_refused(self, key: SessionKey, refused: WriteRefusedError, now: datetime) -> ApplyResult:
        """Count the failure of the one message a refused single-message batch held, in a short transaction of
        its own under the user's lock (the refused one rolled back); quarantine it at the last try."""
        if len(refused.event_ids) != 1:
            raise refused  # not a single message's fault: the caller reports it, the message stays pending
        phone, user = key
        try:
            with self.db.begin() as conn:
                conn.execute(
                    select(SESSIONS.c.version)
                    .where(SESSIONS.c.phone_number_id == phone, SESSIONS.c.user_id == user)
                    .with_for_update()
                )
                counted = record_failure(conn, refused.event_ids[0], refused.reason,
                                         self.settings.apply_max_attempts, now)
        except (OperationalError, DBAPIError) as e:
            raise DatabaseUnavailableError(f"cannot count a failed apply of {key}: {first_line(e)}") from e
        log.warning("a message of %s was refused by the database (%s): %s", logsafe.key(key),
                    counted or "no longer pending", logsafe.clean(refused.reason))
        if counted == "quarantined":
            return ApplyResult(quarantined=1, more_pending=True)  # the user's later messages go on
        return ApplyResult(failed=1 if counted == "failed" else 0)

    def apply_all(self, key: SessionKey, *, skip_locked: bool = False) -> int:
        """Apply every pending message of one user, batch after batch; returns how many were applied."""
        return self.apply_user(key, skip_locked=skip_locked).applied

    def apply_user(self, key: SessionKey, *, skip_locked: bool = False) -> ApplyResult:
        """`apply_all` with everything it did: it stops at a message that failed and has tries left (the
        user's later messages wait behind it) or at a user locked by another applier."""
        total = ApplyResult()
        while True:
            result = self.apply_pending(key, skip_locked=skip_locked)
            total += result
            if not result.more_pending or result.skipped_locked or result.failed:
                return total

    def apply_together(self, keys: Sequence[SessionKey]) -> list[SessionKey]:
        """Apply several users' pending messages in one transaction where the database allows (PostgreSQL,
        pipelined): fewer round trips and commits per message under load. Returns the keys still to apply
        one by one: users locked elsewhere, with more than a batch pending, or all of them when the joint
        transaction could not be used (a number change, SQLite, or any error: one user must not hold back
        the others)."""
        return self._apply_jointly(keys)[1]

    def _apply_jointly(self, keys: Sequence[SessionKey]) -> tuple[int, list[SessionKey]]:
        """`apply_together`, also counting the messages it applied."""
        keys = list(dict.fromkeys(keys))
        if len(keys) < 2 or not self.pipelines:
            return 0, keys
        started = time.perf_counter()
        try:
            results = apply_pipelined_together(self, keys, datetime.now(UTC))
        except Exception as e:
            log.warning("joint apply of %d users failed (%s); applying them one by one", len(keys),
                        logsafe.clean(first_line(e)))
            return 0, keys
        if results is None:
            return 0, keys
        applied = sum(r.applied for r in results.values())
        if applied:
            metrics.APPLY_LATENCY.observe(time.perf_counter() - started)
        return applied, [key for key, r in results.items() if r.skipped_locked or r.more_pending]

    def pending_keys(self, *, limit: int = 1000, older_than: timedelta | None = None) -> list[SessionKey]:
        stmt = (
            select(InboundEvent.phone_number_id, InboundEvent.user_id)
            .where(InboundEvent.processed_at.is_(None))
            .group_by(InboundEvent.phone_number_id, InboundEvent.user_id)
            .limit(limit)
        )
        if older_than is not None:
            cutoff = datetime.now(UTC) - older_than
            stmt = stmt.having(func.min(InboundEvent.received_at) < cutoff)
        with self.db.engine.connect() as conn:
            return [(r.phone_number_id, r.user_id) for r in conn.execute(stmt)]

    def pending_count(self) -> int:
        with self.db.engine.connect() as conn:
            count = conn.scalar(select(func.count()).where(InboundEvent.processed_at.is_(None)))
        metrics.MESSAGES_PENDING.set(count or 0)
        return int(count or 0)

    def quarantine_count(self) -> dict[str, int]:
        """Quarantined messages held, per stage (intake, apply); also sets the `/metrics` gauge."""
        counts = held_counts(self.db)
        for stage, held in counts.items():
            metrics.QUARANTINE_HELD.labels(stage).set(held)
        return counts

    def process_pending(self, *, older_than: timedelta | None = None, max_users: int | None = None) -> int:
        """Apply everything left pending (crash recovery, the sweeper); returns how many messages were applied.
        See `process_pending_report`."""
        return self.process_pending_report(older_than=older_than, max_users=max_users).applied

    def process_pending_report(
        self, *, older_than: timedelta | None = None, max_users: int | None = None
    ) -> PendingReport:
        """Apply everything left pending: users in groups of `JOINT_USERS` per transaction where the database
        allows. Users being applied elsewhere are skipped. A user whose message failed (or whose apply raised)
        is reported and left for the next run; the others go on."""
        report = PendingReport()
        done: set[SessionKey] = set()  # failed or raised in this run: tried again next run, not in a loop now
        seen = 0
        while True:
            keys = [key for key in self.pending_keys(older_than=older_than) if key not in done]
            if not keys:
                return report
            before = report.applied + report.quarantined
            for start in range(0, len(keys), JOINT_USERS):
                group = keys[start:start + JOINT_USERS]
                if max_users is not None:
                    group = group[:max_users - seen]
                self._sweep_group(group, report, done)
                seen += len(group)
                if max_users is not None and seen >= max_users:
                    return report
            if report.applied + report.quarantined == before:
                return report  # everything left is locked by another applier right now, or failed

    def _sweep_group(self, group: list[SessionKey], report: PendingReport, done: set[SessionKey]) -> None:
        applied, rest = self._apply_jointly(group)
        report.applied += applied
        for key in rest:
            try:
                # Skip-locked: a user held by another applier is skipped again here, and left to it.
                result = self.apply_user(key, skip_locked=True)
            except Exception as e:
                report.errors += 1
                done.add(key)
                if isinstance(e, WaflowError):
                    log.warning("apply of %s failed, left pending: %s", logsafe.key(key), logsafe.clean(e))
                else:
                    log.exception("apply of %s failed, left pending", logsafe.key(key))
                continue
            report.add(result)
            if result.failed:
                done.add(key)
