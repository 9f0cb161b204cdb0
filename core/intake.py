"""Webhook bodies parsed and stored in group commits: one thread takes every request waiting at that moment,
parses each, stores all their messages in one statement and one commit, and answers each request its own.

Under load a request's store waits for the commit in flight, then shares the next one with every request
that arrived meanwhile; alone, it is stored at once, as before. One thread instead of a pool of them: the
threads only ever contended for the GIL, and every POST paid a hop into anyio's pool and a commit of its own.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass

from core.db import Database
from core.engine import Engine, IngestResult
from core.payloads import ParsedWebhook, parse_webhook
from core.statuses import record_statuses
from core.worker import take_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Intake:
    """What became of one body: parsed, and stored unless its object is not ours (`stored` None)."""

    parsed: ParsedWebhook
    stored: IngestResult | None


_Outcome = Intake | BaseException
_Request = tuple[bytes, asyncio.AbstractEventLoop, "asyncio.Future[Intake]"]


class IntakeWorker:
    def __init__(self, engine: Engine, db: Database, max_requests: int = 64) -> None:
        self.engine = engine
        self.db = db
        self.max_requests = max_requests
        self.queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="intake", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.queue.put(None)
        self.thread.join(timeout)

    async def take(self, raw: bytes) -> Intake:
        """Parse and durably store one body. Raises PayloadError (reject with 400), DatabaseUnavailableError."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Intake] = loop.create_future()
        self.queue.put((raw, loop, future))
        return await future

    def _run(self) -> None:
        while True:
            batch = take_batch(self.queue, self.max_requests)
            if not batch:
                return
            try:
                outcomes = self.process([raw for raw, _, _ in batch])
            except BaseException as e:  # noqa: BLE001 — every waiting request must get an answer, whatever happened
                log.exception("intake of %d request(s) failed", len(batch))
                outcomes = [e] * len(batch)
            for (_, loop, future), outcome in zip(batch, outcomes, strict=True):
                loop.call_soon_threadsafe(_settle, future, outcome)

    def process(self, bodies: list[bytes]) -> list[_Outcome]:
        """Parse every body, then store every relevant one's messages and statuses together."""
        outcomes: list[_Outcome | None] = []
        relevant: list[tuple[int, ParsedWebhook]] = []
        for body in bodies:
            try:
                parsed = parse_webhook(body)
            except Exception as e:  # noqa: BLE001 — PayloadError (400); anything else is a bug, this body's alone
                outcomes.append(e)
                continue
            if parsed.relevant:
                relevant.append((len(outcomes), parsed))
                outcomes.append(None)
            else:
                outcomes.append(Intake(parsed, None))
        if relevant:
            try:
                results = self.engine.ingest_each([parsed.messages for _, parsed in relevant])
                record_statuses(self.db, [status for _, parsed in relevant for status in parsed.statuses])
            except Exception as e:  # noqa: BLE001 — each request answers it (503 for the database)
                for index, _ in relevant:
                    outcomes[index] = e
            else:
                for (index, parsed), result in zip(relevant, results, strict=True):
                    outcomes[index] = Intake(parsed, result)
        done = [outcome for outcome in outcomes if outcome is not None]
        assert len(done) == len(bodies)
        return done


def _settle(future: asyncio.Future[Intake], outcome: _Outcome) -> None:
    if future.done():
        return  # the request went away
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
