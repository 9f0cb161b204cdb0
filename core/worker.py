"""Background work inside the webhook server: apply stored messages off the request path, sweep leftovers,
and flush per-minute request counts. Threads, because every step is blocking database I/O."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from core import logsafe
from core.db import Database, insert_for
from core.engine import JOINT_USERS, Engine, SessionKey
from core.errors import WaflowError
from core.models import WebhookStat

log = logging.getLogger(__name__)

T = TypeVar("T")


def take_batch(source: queue.SimpleQueue[T | None], limit: int) -> list[T]:
    """The next item (waiting for one) and whatever else is queued, up to `limit`; [] for a stop request (None).
    A stop request met after other items is put back, for the next call (or the next consumer thread)."""
    first = source.get()
    if first is None:
        return []
    batch = [first]
    while len(batch) < limit:
        try:
            item = source.get_nowait()
        except queue.Empty:
            break
        if item is None:
            source.put(None)
            break
        batch.append(item)
    return batch


class ApplyWorker:
    """Applies users' pending messages right after the webhook stored them. Losing this queue loses
    nothing: the messages are durable and the sweeper applies whatever is still pending.

    A user is applied `reorder_wait` seconds after the first of their messages was queued (APPLY_REORDER_WAIT_MS):
    Meta delivers a burst in any order, in separate POSTs, and whatever of it arrives within the wait is then
    applied in WhatsApp timestamp order instead of being late (core.machine). Messages queued during the wait
    join that apply; the wait is not extended, so a chatty user is not held back."""

    def __init__(
        self, engine: Engine, threads: int = 2, batch_users: int = JOINT_USERS, *, reorder_wait: float = 0.0
    ) -> None:
        self.engine = engine
        self.batch_users = batch_users
        self.reorder_wait = reorder_wait
        # (due time, key) in queueing order, which is due order: everyone waits the same.
        self.due: deque[tuple[float, SessionKey]] = deque()
        # Keys waiting in the queue: a user's burst queues one apply, not one per POST.
        self.queued: set[SessionKey] = set()
        self.changed = threading.Condition()
        self.stopping = False
        self.threads = [threading.Thread(target=self._run, name=f"apply-{i}", daemon=True) for i in range(threads)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def submit(self, keys: list[SessionKey]) -> None:
        due = time.monotonic() + self.reorder_wait
        with self.changed:
            fresh = [key for key in keys if key not in self.queued]
            self.queued.update(fresh)
            self.due.extend((due, key) for key in fresh)
            if fresh:
                self.changed.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Apply what is queued (without waiting for it to be due), then end the threads."""
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        for thread in self.threads:
            thread.join(timeout)

    def _take(self) -> list[SessionKey]:
        """The keys due now, up to `batch_users`, waiting for the first one; [] once stopped and drained."""
        with self.changed:
            while not self.due or (not self.stopping and self.due[0][0] > time.monotonic()):
                if self.stopping and not self.due:
                    return []
                self.changed.wait(self.due[0][0] - time.monotonic() if self.due else None)
            now = time.monotonic()
            keys: list[SessionKey] = []
            while self.due and len(keys) < self.batch_users and (self.stopping or self.due[0][0] <= now):
                keys.append(self.due.popleft()[1])
            # Forget the keys before applying: a message stored from now on queues the user again, and one
            # stored before was committed before this apply reads the pending messages.
            self.queued.difference_update(keys)
            return keys

    def _run(self) -> None:
        while True:
            keys = self._take()
            if not keys:
                return
            # Under load the queue holds many users: they are applied together (one transaction, two round
            # trips); whoever that leaves (locked elsewhere, more pending, errors) goes one by one.
            for key in self.engine.apply_together(keys):
                try:
                    self.engine.apply_all(key)
                except WaflowError as e:
                    log.warning("apply of %s deferred to the sweeper: %s", logsafe.key(key), logsafe.clean(e))
                except Exception:
                    log.exception("apply of %s failed; it stays pending for the sweeper", logsafe.key(key))


class Periodic:
    """Runs `fn` every `interval` seconds on a daemon thread until stopped."""

    def __init__(self, name: str, interval: float, fn: Any) -> None:
        self.interval = interval
        self.fn = fn
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopped.set()
        self.thread.join(timeout)
        self._once()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            self._once()

    def _once(self) -> None:
        try:
            self.fn()
        except WaflowError as e:
            log.warning("%s: %s", self.thread.name, e)
        except Exception:
            log.exception("%s failed", self.thread.name)


def sweep(engine: Engine, grace: timedelta) -> None:
    """Apply messages pending for longer than `grace` (the live worker handles fresh ones)."""
    report = engine.process_pending_report(older_than=grace)
    if report.applied:
        log.info("sweeper applied %d message(s) left pending", report.applied)
    if report.failed or report.quarantined or report.errors:
        log.warning("sweeper: %d message(s) failed to apply (tried again later), %d quarantined, %d user(s) left "
                    "pending after an error", report.failed, report.quarantined, report.errors)
    engine.pending_count()
    engine.quarantine_count()


class RequestStats:
    """Counts webhook results in memory; `flush` adds them to webhook_stats (one row per minute+result)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.lock = threading.Lock()
        self.counts: Counter[tuple[datetime, str]] = Counter()

    def add(self, result: str, n: int = 1) -> None:
        bucket = datetime.now(UTC).replace(second=0, microsecond=0)
        with self.lock:
            self.counts[(bucket, result)] += n

    def flush(self) -> None:
        with self.lock:
            counts, self.counts = self.counts, Counter()
        if not counts:
            return
        rows = [{"bucket": b, "result": r, "count": n} for (b, r), n in counts.items()]
        try:
            with self.db.begin() as conn:
                insert = insert_for(conn.dialect.name)
                stmt = insert(WebhookStat).values(rows)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["bucket", "result"], set_={"count": WebhookStat.count + stmt.excluded["count"]}
                )
                conn.execute(stmt)
        except Exception:
            with self.lock:
                self.counts.update(counts)  # keep them for the next flush
            raise
