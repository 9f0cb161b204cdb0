"""Webhook bodies parsed and stored in group commits: one thread takes every request waiting at that moment,
parses each, stores all their messages in one statement and one commit, and answers each request its own.

Under load a request's store waits for the commit in flight, then shares the next one with every request
that arrived meanwhile; alone, it is stored at once, as before. One thread instead of a pool of them: the
threads only ever contended for the GIL, and every POST paid a hop into anyio's pool and a commit of its own.

Nothing in one body can fail another's (the issue "nothing a sender does can hurt other users"):
- a message that breaks a bound (core.bounds) never reaches the shared statement: the parser lists it and it is
  held in the quarantine with the reason, before the 200;
- should the shared INSERT still fail on a value (a DataError, IntegrityError or any error that is not the
  database being unreachable), each body is stored on its own, then each message of a failing body on its own,
  and the one that fails alone is quarantined with the database's reason. Only an outage answers 503;
- anything unexpected in one body is that body's alone: it answers `IntakeFailed` (422), the others go on;
- statuses are recorded on a thread of their own, in chunks of STATUS_CHUNK per transaction taken in turn from
  every waiting request, so one POST with thousands of statuses never holds the messages of other POSTs. SQLite has
  a single writer lock, and its busy handler polls (every 100 ms after a while): chunk after chunk would win it
  every time, starving the apply thread, readers (every transaction takes the lock there) and other processes. So
  on SQLite chunks are smaller, the status thread lets the messages of waiting POSTs go first, and it rests as long
  as each chunk took before the next. A POST is still answered only once its statuses are stored: Meta does not
  send them again after a 200, and a lost `failed` (131047: outside the 24 h window) would have us keep sending
  free-form messages that cannot arrive. A POST of thousands of statuses takes longer itself (5,000: 10-18 s on
  PostgreSQL, 16-27 s on SQLite on the loaded development machine), which is its own business.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from sqlalchemy import delete
from sqlalchemy import exc as sa_exc

from core import logsafe
from core.db import Database, first_line, insert_for
from core.engine import Engine, IngestResult
from core.errors import DatabaseUnavailableError, PayloadError, WaflowError
from core.messages import InboundMessage, RejectedMessage, StatusUpdate
from core.models import MarketingOptOut
from core.payloads import MarketingPreference, ParsedWebhook, parse_webhook, rejected_message
from core.quarantine import record_rejected
from core.statuses import record_statuses
from core.worker import take_batch

log = logging.getLogger(__name__)

# Statuses per transaction: how long one POST's statuses may hold the status thread before the next waiting
# request's turn. About 2 ms per status on PostgreSQL on the development machine (0.2 s a chunk), 1.2-1.5 ms on
# SQLite, where a chunk also holds the write lock.
STATUS_CHUNK = 100
SQLITE_STATUS_CHUNK = 25
MAX_DEFERENCE_SECONDS = 1.0


class IntakeFailed(WaflowError):
    """This body met an unexpected error (logged with its traceback): answered 422, other bodies are unaffected."""


@dataclass(frozen=True)
class Intake:
    """What became of one body: parsed, and stored unless its object is not ours (`stored` None); `quarantined`
    messages of it broke a bound or could not be stored, and are held in the quarantine."""

    parsed: ParsedWebhook
    stored: IngestResult | None
    quarantined: int = 0


_Outcome = Intake | BaseException
_Request = tuple[bytes, asyncio.AbstractEventLoop, "asyncio.Future[Intake]"]
_OUTAGES = (
    sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, psycopg.OperationalError,
    psycopg.InterfaceError, sqlite3.OperationalError, sqlite3.InterfaceError, ConnectionError, TimeoutError,
)


def is_outage(error: BaseException) -> bool:
    """Whether the database could not be reached or used (answer 503, Meta retries), as opposed to refusing a value
    (a data error: the value is ours to deal with). Reads the whole chain: the engine wraps every database error
    in DatabaseUnavailableError."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _OUTAGES):
            return True
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, DatabaseUnavailableError) and current.__cause__ is None:
            return True
        current = current.__cause__ or current.__context__
    return False


def failure(error: BaseException, what: str) -> BaseException:
    """What a request answers for `error`: PayloadError (400), DatabaseUnavailableError (503) or IntakeFailed."""
    if isinstance(error, (PayloadError, IntakeFailed)):
        return error
    if is_outage(error):
        if isinstance(error, DatabaseUnavailableError):
            return error
        unavailable = DatabaseUnavailableError(f"{what}: {first_line(error)}")
        unavailable.__cause__ = error
        return unavailable
    log.error("%s failed", what, exc_info=error)
    failed = IntakeFailed(f"{what} failed ({type(error).__name__}); logged, retry later")
    failed.__cause__ = error
    return failed


@dataclass
class _Body:
    """One relevant body on its way through the store."""

    parsed: ParsedWebhook
    rejected: list[RejectedMessage] = field(default_factory=list)
    stored: IngestResult | None = None
    error: BaseException | None = None

    def outcome(self) -> _Outcome:
        if self.error is not None:
            return self.error
        assert self.stored is not None
        return Intake(self.parsed, self.stored, len(self.rejected))


def _merge(results: Sequence[IngestResult]) -> IngestResult:
    keys = list(dict.fromkeys(key for result in results for key in result.session_keys))
    return IngestResult(sum(r.stored for r in results), sum(r.duplicates for r in results), keys)


class _MessagesFirst:
    """SQLite has one writer: between two chunks of statuses, the status thread waits while bodies are being stored."""

    def __init__(self) -> None:
        self.storing = 0
        self.changed = threading.Condition()

    @contextmanager
    def storing_messages(self) -> Iterator[None]:
        with self.changed:
            self.storing += 1
        try:
            yield
        finally:
            with self.changed:
                self.storing -= 1
                self.changed.notify_all()

    def wait_for_messages(self) -> None:
        with self.changed:
            # Bounded: under a steady stream of messages statuses must still get their turn.
            self.changed.wait_for(lambda: self.storing == 0, timeout=MAX_DEFERENCE_SECONDS)


class IntakeWorker:
    def __init__(self, engine: Engine, db: Database, max_requests: int = 64) -> None:
        self.engine = engine
        self.db = db
        self.max_requests = max_requests
        self.queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="intake", daemon=True)
        # On PostgreSQL statuses and messages write other rows and never wait on each other.
        self.turns = _MessagesFirst() if db.is_sqlite else None
        self.statuses = (
            StatusRecorder(db, SQLITE_STATUS_CHUNK, before_chunk=self.turns.wait_for_messages, rest=True)
            if self.turns else StatusRecorder(db)
        )

    def start(self) -> None:
        self.thread.start()
        self.statuses.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.queue.put(None)
        self.thread.join(timeout)
        self.statuses.stop(timeout)

    async def take(self, raw: bytes) -> Intake:
        """Parse and durably store one body, statuses included. Raises PayloadError (reject with 400),
        DatabaseUnavailableError (503), IntakeFailed (422)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Intake] = loop.create_future()
        self.queue.put((raw, loop, future))
        taken = await future
        if taken.stored is not None and taken.parsed.statuses:
            await self.statuses.record(taken.parsed.statuses)
        return taken

    def _run(self) -> None:
        while True:
            batch = take_batch(self.queue, self.max_requests)
            if not batch:
                return
            try:
                if self.turns is None:
                    outcomes = self.store([raw for raw, _, _ in batch])
                else:
                    with self.turns.storing_messages():
                        outcomes = self.store([raw for raw, _, _ in batch])
            except BaseException as e:  # noqa: BLE001 — every waiting request must get an answer, whatever happened
                outcomes = [failure(e, f"intake of {len(batch)} request(s)")] * len(batch)
            for (_, loop, future), outcome in zip(batch, outcomes, strict=True):
                loop.call_soon_threadsafe(_settle, future, outcome)

    def process(self, bodies: list[bytes]) -> list[_Outcome]:
        """`store`, then each body's statuses on this thread (for callers without the intake threads)."""
        outcomes = self.store(bodies)
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, Intake) and outcome.stored is not None and outcome.parsed.statuses:
                try:
                    self.statuses.record_now(outcome.parsed.statuses)
                except Exception as e:  # noqa: BLE001 — this body's answer
                    outcomes[index] = failure(e, "storing statuses")
        return outcomes

    def store(self, bodies: list[bytes]) -> list[_Outcome]:
        """Parse every body, then store every relevant one's messages together and hold their rejects."""
        now = datetime.now(UTC)
        outcomes: list[_Outcome | None] = []
        relevant: list[tuple[int, _Body]] = []
        for body in bodies:
            try:
                parsed = parse_webhook(body, now=now)
            except Exception as e:  # noqa: BLE001 — PayloadError (400); anything else is a bug, this body's alone
                outcomes.append(failure(e, "parsing a body"))
                continue
            if parsed.relevant:
                relevant.append((len(outcomes), _Body(parsed, list(parsed.rejected))))
                outcomes.append(None)
            else:
                outcomes.append(Intake(parsed, None))
        if relevant:
            items = [item for _, item in relevant]
            self._store_messages(items, now)
            self._quarantine([item for item in items if item.rejected and item.error is None], now)
            self._preferences([item for item in items if item.parsed.preferences and item.error is None], now)
            for index, item in relevant:
                outcomes[index] = item.outcome()
        done = [outcome for outcome in outcomes if outcome is not None]
        assert len(done) == len(bodies)
        return done

    def _store_messages(self, items: list[_Body], now: datetime) -> None:
        try:
            results = self.engine.ingest_each([item.parsed.messages for item in items], now=now)
        except Exception as e:  # noqa: BLE001 — an outage answers every body; anything else is about one value
            if is_outage(e):
                self._fail(items, e, "storing messages")
                return
            log.warning("storing %d bodies together failed (%s); storing each on its own", len(items),
                        logsafe.clean(first_line(e)))
            for item in items:
                if len(items) == 1 or not self._store_body(item, now):
                    self._store_each(item, now)
            return
        for item, result in zip(items, results, strict=True):
            item.stored = result

    def _store_body(self, item: _Body, now: datetime) -> bool:
        """One body's messages in a statement of their own. False when a value failed it."""
        try:
            item.stored = self.engine.ingest(item.parsed.messages, now=now)
        except Exception as e:  # noqa: BLE001 — classified here
            if not is_outage(e):
                return False
            item.error = failure(e, "storing messages")
        return True

    def _store_each(self, item: _Body, now: datetime) -> None:
        """Each message of one body on its own: one that fails alone on a value is quarantined with the reason."""
        results: list[IngestResult] = []
        for message in item.parsed.messages:
            try:
                results.append(self.engine.ingest([message], now=now))
            except Exception as e:  # noqa: BLE001 — classified here
                if is_outage(e):
                    item.error = failure(e, "storing messages")
                    return
                log.warning("message %s could not be stored: %s", logsafe.clean(message.wamid),
                            logsafe.clean(first_line(e)))
                item.rejected.append(_unstorable(message, e))
        item.stored = _merge(results)

    def _fail(self, items: list[_Body], error: BaseException, what: str) -> None:
        answer = failure(error, what)
        for item in items:
            item.error = answer

    def _preferences(self, items: list[_Body], now: datetime) -> None:
        """`user_preferences` stop/resume of marketing messages, all bodies' in one transaction."""
        if not items:
            return
        try:
            record_preferences(self.db, [p for item in items for p in item.parsed.preferences], now)
        except Exception as e:  # noqa: BLE001 — these bodies' answer (Meta retries them)
            self._fail(items, e, "recording marketing preferences")

    def _quarantine(self, items: list[_Body], now: datetime) -> None:
        """Hold every body's rejects, together; should that fail on a value, each body's on its own."""
        if not items:
            return
        try:
            record_rejected(self.db, [r for item in items for r in item.rejected], now)
            return
        except Exception as e:  # noqa: BLE001 — classified here
            if is_outage(e) or len(items) == 1:
                self._fail(items, e, "holding messages in the quarantine")
                return
        for item in items:
            try:
                record_rejected(self.db, item.rejected, now)
            except Exception as e:  # noqa: BLE001 — this body's answer
                item.error = failure(e, "holding messages in the quarantine")


def record_preferences(db: Database, preferences: Sequence[MarketingPreference], now: datetime) -> None:
    """A stop records the user in marketing_optouts (kept from the first stop), a resume deletes the row; in
    WhatsApp timestamp order within the batch; across deliveries the last one recorded wins."""
    insert = insert_for(db.engine.dialect.name)
    with db.begin() as conn:
        for p in sorted(preferences, key=lambda p: p.timestamp or 0):
            key = (MarketingOptOut.phone_number_id == p.phone_number_id, MarketingOptOut.user_id == p.user_id)
            if not p.stop:
                conn.execute(delete(MarketingOptOut).where(*key))
                continue
            at = datetime.fromtimestamp(p.timestamp, UTC) if p.timestamp else now
            conn.execute(
                insert(MarketingOptOut)
                .values(phone_number_id=p.phone_number_id, user_id=p.user_id, source="user_preferences",
                        opted_out_at=at)
                .on_conflict_do_nothing(index_elements=["phone_number_id", "user_id"])
            )


def _unstorable(message: InboundMessage, error: BaseException) -> RejectedMessage:
    return rejected_message(message, f"could not be stored: {first_line(error)[:300]!r}")


def _settle(future: asyncio.Future[Intake], outcome: _Outcome) -> None:
    if future.done():
        return  # the request went away
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


# ------------------------------------------------------------------------------------------------- statuses


@dataclass(eq=False)
class _StatusJob:
    """One request's statuses, recorded a chunk at a time."""

    statuses: Sequence[StatusUpdate]
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[int] | None = None
    taken: int = 0  # statuses handed to a chunk so far
    recorded: int = 0  # statuses stored so far
    skipped: int = 0  # statuses that could not be stored, even alone (logged)

    def take(self, limit: int) -> list[StatusUpdate]:
        part = list(self.statuses[self.taken : self.taken + limit])
        self.taken += len(part)
        return part

    @property
    def remaining(self) -> int:
        return len(self.statuses) - self.taken

    def settle(self, outcome: int | BaseException) -> None:
        if self.loop is not None and self.future is not None:
            self.loop.call_soon_threadsafe(_settle_count, self.future, outcome)


def _settle_count(future: asyncio.Future[int], outcome: int | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class StatusRecorder:
    """Records statuses off the message intake: one thread, chunks of `chunk` statuses per transaction, taken in
    turn from every waiting request (a small POST waits for at most one chunk of a big one)."""

    def __init__(
        self, db: Database, chunk: int = STATUS_CHUNK, *, before_chunk: Callable[[], None] | None = None,
        rest: bool = False,
    ) -> None:
        self.db = db
        self.chunk = chunk
        self.before_chunk = before_chunk
        self.rest = rest  # after each chunk, pause as long as it took (SQLite: other writers get the lock)
        self.queue: queue.SimpleQueue[_StatusJob | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="statuses", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.queue.put(None)
        self.thread.join(timeout)

    async def record(self, statuses: Sequence[StatusUpdate]) -> int:
        """Store one request's statuses; returns how many were stored. Raises DatabaseUnavailableError."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self.queue.put(_StatusJob(statuses, loop, future))
        return await future

    def record_now(self, statuses: Sequence[StatusUpdate]) -> int:
        """The same on the calling thread, chunk after chunk."""
        job = _StatusJob(statuses)
        while job.remaining:
            failed = self._record([(job, job.take(self.chunk))])
            if failed:
                raise failed[job]
        return job.recorded

    def _run(self) -> None:
        jobs: collections.deque[_StatusJob] = collections.deque()
        stopping = False
        while True:
            stopping = self._collect(jobs, block=not (jobs or stopping)) or stopping
            if not jobs:
                if stopping:
                    return
                continue
            if self.before_chunk is not None:
                self.before_chunk()
            started = time.monotonic()
            self._chunk(jobs)
            if self.rest:
                time.sleep(time.monotonic() - started)

    def _chunk(self, jobs: collections.deque[_StatusJob]) -> None:
        parts = self._next_chunk(jobs)
        try:
            failed = self._record(parts)
        except BaseException as e:  # noqa: BLE001 — every waiting request must get an answer, whatever happened
            failed = {job: failure(e, "storing statuses") for job, _ in parts}
        for job, _ in parts:
            if job in failed:
                job.settle(failed[job])
                if job in jobs:
                    jobs.remove(job)
            elif not job.remaining:
                job.settle(job.recorded)

    def _collect(self, jobs: collections.deque[_StatusJob], *, block: bool) -> bool:
        """Move queued jobs into `jobs` (waiting for one when `block`); True when asked to stop."""
        while True:
            try:
                item = self.queue.get() if block else self.queue.get_nowait()
            except queue.Empty:
                return False
            block = False
            if item is None:
                return True
            jobs.append(item)

    def _next_chunk(self, jobs: collections.deque[_StatusJob]) -> list[tuple[_StatusJob, list[StatusUpdate]]]:
        """Up to `chunk` statuses, from the waiting jobs in turn; a job not finished goes to the back of the line."""
        parts: list[tuple[_StatusJob, list[StatusUpdate]]] = []
        budget = self.chunk
        for _ in range(len(jobs)):
            if budget <= 0:
                break
            job = jobs.popleft()
            part = job.take(budget)
            budget -= len(part)
            parts.append((job, part))
            if job.remaining:
                jobs.append(job)
        return parts

    def _record(self, parts: list[tuple[_StatusJob, list[StatusUpdate]]]) -> dict[_StatusJob, BaseException]:
        """One transaction for the chunk; should it fail on a value, each status on its own (one that fails alone
        is skipped and logged). Returns the jobs that must answer an error."""
        statuses = [status for _, part in parts for status in part]
        try:
            record_statuses(self.db, statuses)
        except Exception as e:  # noqa: BLE001 — classified here
            if is_outage(e):
                answer = failure(e, "storing statuses")
                return {job: answer for job, _ in parts}
            log.warning("storing %d statuses together failed (%s); storing each on its own", len(statuses),
                        logsafe.clean(first_line(e)))
            return self._record_each(parts)
        for job, part in parts:
            job.recorded += len(part)
        return {}

    def _record_each(self, parts: list[tuple[_StatusJob, list[StatusUpdate]]]) -> dict[_StatusJob, BaseException]:
        failed: dict[_StatusJob, BaseException] = {}
        for job, part in parts:
            for status in part:
                try:
                    record_statuses(self.db, [status])
                    job.recorded += 1
                except Exception as e:  # noqa: BLE001 — classified here
                    if is_outage(e):
                        failed[job] = failure(e, "storing statuses")
                        break
                    job.skipped += 1
                    log.warning("status %s (%s) skipped: it could not be stored: %s", logsafe.clean(status.wamid),
                                logsafe.clean(status.status), logsafe.clean(first_line(e)))
        return failed
