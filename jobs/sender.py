"""The outbox sender: claim due messages, send them outside any transaction, record each outcome.

Claim: one short transaction moves up to `send_batch_size` due rows to "sending" (claimed_at, claimed_by),
PostgreSQL taking them with FOR UPDATE SKIP LOCKED so concurrent senders never take the same row. A row is
not due while an earlier message to the same user is still waiting (keeps each user's messages in order)
or was sent less than `send_user_spacing_seconds` ago.

Recheck: a follow-up (a campaign row) may leave long after it was queued, so every try of one is checked
again (`core.campaigns.recheck_followup`) against the session, its FollowUp row and the campaign, in the
transaction that commits `send_started_at` right before the HTTP call. It is cancelled when the user replied,
moved on, completed the flow or opted out, or the campaign is paused, and a template when the user stopped
marketing messages (marketing_optouts) since it was queued; a free text whose 24 h window closed since
queueing is switched to the campaign's template (or cancelled without one). The session row is read FOR SHARE
(PostgreSQL), so a message being applied right now is waited for rather than missed; messages stored but not yet
applied count as a reply too. Replies to a user's own messages are never rechecked: they always go.

Meta's 131050 on a send (the user stopped marketing messages) fails that message and records the user in
marketing_optouts in the same transaction, so no campaign template goes to them again until they resume.

Send: rows are grouped per user (sent in order, spaced) and the groups spread over `send_workers`
threads; a per-business-number rate limiter keeps each number under `send_rate_per_second`. One sender runs
at a time (the scheduler's singleton lock), so this in-process limiter is the global rate.

At-least-once window. The Cloud API has no idempotency key, so one window cannot be closed: between the
moment a request leaves and the moment its answer is stored, a crash or a lost answer leaves us not knowing
whether WhatsApp delivered it. We keep that window to exactly one HTTP call: `send_started_at` (and the
attempt count) is committed right before the call, and the outcome right after it. A read timeout or a
connection lost after sending marks the row "uncertain"; a claim whose sender died after `send_started_at`
becomes "uncertain" in the sweeper. Uncertain rows are never resent automatically. Everything else (errors
Meta answered, connections that never opened) is safe to retry and is retried per `core.whatsapp.classify`.

SEND_MODE=dry-run (the default) marks rows sent with the synthetic wamid "wamid.dryrun.<outbox id>" and
makes no HTTP request at all.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from core import logsafe, metrics
from core.campaigns import LiveSession, QueuedFollowUp, Recheck, facts_of, recheck_followup
from core.config import Settings
from core.db import Database, insert_for
from core.messages import FLOW_KINDS
from core.models import Campaign, ChatSession, FollowUp, InboundEvent, MarketingOptOut, Outbox, SenderPause
from core.whatsapp import ErrorClass, GraphClient, SendResult, pause_sending, refresh_pause_gauge

log = logging.getLogger(__name__)

SLOW_RETRY_CAP = timedelta(days=1)
MARKETING_OPTED_OUT_CODE = 131050  # the user stopped marketing messages from this business


@dataclass(frozen=True)
class Claimed:
    id: int
    phone_number_id: str
    user_id: str
    body: dict[str, Any]
    attempts: int
    claimed_at: datetime
    kind: str = "text"
    campaign_id: int | None = None  # set: a follow-up, rechecked before every try
    step: str | None = None


class RateLimiter:
    """At most `rate` calls per second per key, spaced evenly. Thread-safe; sleeps outside the lock."""

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.clock = clock
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait(self, key: str) -> float:
        with self._lock:
            now = self.clock()
            slot = max(now, self._next.get(key, now))
            self._next[key] = slot + self.interval
        delay = slot - now
        if delay > 0:
            time.sleep(delay)
        return delay


_limiters: dict[float, RateLimiter] = {}
_limiters_lock = threading.Lock()


def shared_limiter(rate: float) -> RateLimiter:
    """One limiter per process and rate, so the per-number rate also holds from one run to the next."""
    with _limiters_lock:
        return _limiters.setdefault(rate, RateLimiter(rate))


def make_client(settings: Settings) -> GraphClient:
    return GraphClient(
        settings.graph_api_url,
        settings.whatsapp_access_token,
        connect_timeout=settings.send_connect_timeout_seconds,
        read_timeout=settings.send_timeout_seconds,
        pool_size=max(settings.send_workers, 1),
    )


def run_sender(
    db: Database,
    settings: Settings,
    now: datetime,
    *,
    client: GraphClient | None = None,
    owner: str = "sender",
    max_batches: int = 20,
) -> dict[str, Any]:
    """Send what is due. Returns counts per outcome."""
    started = time.monotonic()

    def clock() -> datetime:
        # The run's `now` moved on by real elapsed time: tests control time, waits still count.
        return now + timedelta(seconds=time.monotonic() - started)

    totals: Counter[str] = Counter()
    own_client = client is None and settings.send_mode == "live"
    http = make_client(settings) if own_client else client
    try:
        run = _Run(db, settings, owner, clock, http)
        for _ in range(max_batches):
            claimed = claim_due(db, clock(), owner, settings.send_batch_size, settings.send_user_spacing_seconds)
            if not claimed:
                break
            totals.update(run.send(claimed))
            if len(claimed) < settings.send_batch_size:
                break
    finally:
        if own_client and http is not None:
            http.close()
    refresh_pause_gauge(db)
    return {k: v for k, v in totals.items() if v}


def claim_due(db: Database, now: datetime, owner: str, limit: int, user_spacing: float) -> list[Claimed]:
    o = Outbox
    earlier = aliased(Outbox)
    blocked = exists().where(
        earlier.phone_number_id == o.phone_number_id,
        earlier.user_id == o.user_id,
        earlier.id < o.id,
        or_(
            earlier.status == "sending",
            and_(earlier.status == "queued", earlier.next_attempt_at > now),
            and_(earlier.status == "sent", earlier.sent_at > now - timedelta(seconds=user_spacing)),
        ),
    )
    due = (
        select(o.id)
        .where(
            o.status == "queued",
            o.next_attempt_at <= now,
            o.phone_number_id.not_in(select(SenderPause.phone_number_id)),
            ~blocked,
        )
        .order_by(o.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=o)
    )
    stmt = (
        update(o)
        .where(o.id.in_(due))
        .values(status="sending", claimed_at=now, claimed_by=owner, send_started_at=None)
        .returning(o.id, o.phone_number_id, o.user_id, o.body, o.attempts, o.kind, o.campaign_id, o.step)
    )
    with db.begin() as conn:
        rows = conn.execute(stmt).all()
    claimed = (
        Claimed(r.id, r.phone_number_id, r.user_id, r.body, r.attempts, now, r.kind, r.campaign_id, r.step)
        for r in rows
    )
    return sorted(claimed, key=lambda c: c.id)


class _Run:
    """One sender run: sends claimed rows and writes each outcome in its own short transaction."""

    def __init__(
        self, db: Database, settings: Settings, owner: str, clock: Callable[[], datetime], client: GraphClient | None
    ) -> None:
        self.db = db
        self.settings = settings
        self.owner = owner
        self.clock = clock
        self.client = client
        self.limiter = shared_limiter(settings.send_rate_per_second)
        self.paused: set[str] = set()
        self._lock = threading.Lock()
        self._notes: Counter[str] = Counter()  # counts besides each row's outcome (follow-ups switched to templates)

    def send(self, claimed: list[Claimed]) -> Counter[str]:
        groups: dict[tuple[str, str], list[Claimed]] = {}
        for row in claimed:
            groups.setdefault((row.phone_number_id, row.user_id), []).append(row)
        counts: Counter[str] = Counter()
        workers = max(1, min(self.settings.send_workers, len(groups)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sender") as pool:
            for result in pool.map(self._send_group, groups.values()):
                counts.update(result)
        counts["released"] += self._release([row.id for row in claimed])
        with self._lock:
            counts.update(self._notes)
            self._notes.clear()
        return counts

    def _send_group(self, rows: list[Claimed]) -> Counter[str]:
        """One user's messages in order; the rest wait when one of them cannot go now."""
        counts: Counter[str] = Counter()
        tried = False
        for row in rows:
            if row.phone_number_id in self.paused:
                break
            if tried:
                time.sleep(self.settings.send_user_spacing_seconds)
            outcome = self._send_one(row)
            counts[outcome] += 1
            if outcome.startswith("cancelled_"):
                continue  # never sent: nothing to space from, and the user's next message need not wait
            tried = True
            if outcome not in ("sent", "failed"):
                break  # keep this user's order: later messages wait for this one
        return counts

    def _send_one(self, row: Claimed) -> str:
        self.limiter.wait(row.phone_number_id)
        started = self._mark_started(row)
        if isinstance(started, str):
            return started
        row = started
        try:
            result = self._call(row)
        except Exception as e:  # noqa: BLE001 - a bug here must not leave the row claimed forever
            log.exception("sending outbox %s failed unexpectedly", row.id)
            result = SendResult(error_class=ErrorClass.UNCERTAIN, error_title=f"sender error: {e}"[:1000])
        outcome = self._record(row, result)
        metrics.OUTBOX_RESULTS.labels(outcome).inc()
        if result.error_code is not None:
            metrics.OUTBOX_ERRORS.labels(str(result.error_code)).inc()
        return outcome

    def _call(self, row: Claimed) -> SendResult:
        if self.settings.send_mode != "live":
            return SendResult(wamid=f"wamid.dryrun.{row.id}")
        assert self.client is not None
        started = time.perf_counter()
        try:
            return self.client.send(row.phone_number_id, row.user_id, row.body, row.id)
        finally:
            metrics.SEND_LATENCY.observe(time.perf_counter() - started)

    def _mark_started(self, row: Claimed) -> Claimed | str:
        """Commit the try right before the HTTP call. Returns the row to send (a follow-up's body possibly
        switched to its template), or the outcome when it must not go: "lost_claim", "cancelled_<cause>".

        A follow-up is rechecked in this same transaction: nothing but the call lies between check and request."""
        now = self.clock()
        with self.db.session() as s:
            check, followup = _recheck(s, row, now) if row.campaign_id is not None else (None, None)
            values: dict[str, Any] = {"send_started_at": now, "attempts": Outbox.attempts + 1}
            if check is not None and check.action == "cancel":
                values = {"status": "cancelled", "error_title": check.reason}
            elif check is not None and check.plan is not None:
                plan = check.plan
                values.update(kind=plan.kind, body=plan.body, text=plan.text, template=plan.template)
            mine = (Outbox.id == row.id, Outbox.status == "sending", Outbox.claimed_by == self.owner)
            if not s.connection().execute(update(Outbox).where(*mine).values(**values)).rowcount:
                return "lost_claim"
            if followup is not None and check is not None:
                _note_on_followup(followup, check)
        return row if check is None else self._after_recheck(row, check)

    def _after_recheck(self, row: Claimed, check: Recheck) -> Claimed | str:
        if check.action == "cancel":
            log.info("follow-up outbox %s to %s/%s cancelled: %s", row.id, row.phone_number_id,
                     logsafe.masked(row.user_id), logsafe.clean(check.reason))
            metrics.OUTBOX_RESULTS.labels("cancelled").inc()
            return f"cancelled_{check.cause}"
        if check.plan is None or check.plan.body is None:
            return row
        with self._lock:
            self._notes["switched_to_template"] += 1
        return replace(row, body=check.plan.body, kind=check.plan.kind or "template")

    def _record(self, row: Claimed, result: SendResult) -> str:
        attempts = row.attempts + 1
        now = self.clock()
        values: dict[str, Any] = {"error_code": result.error_code, "error_title": result.error_title}
        if result.ok:
            values.update(status="sent", wamid=result.wamid, sent_at=now, error_code=None, error_title=None)
            outcome = "sent"
        else:
            outcome, extra = self._failure(row, result, attempts, now)
            values.update(extra)
        with self.db.begin() as conn:
            mine = (Outbox.id == row.id, Outbox.claimed_by == self.owner, Outbox.status.in_(("sending", "uncertain")))
            conn.execute(update(Outbox).where(*mine).values(**values))
            if result.error_class == ErrorClass.WINDOW_CLOSED:
                # Only if the user has not written since we claimed: a newer message reopened the window.
                conn.execute(
                    update(ChatSession)
                    .where(
                        ChatSession.phone_number_id == row.phone_number_id,
                        ChatSession.user_id == row.user_id,
                        or_(ChatSession.last_inbound_at.is_(None), ChatSession.last_inbound_at <= row.claimed_at),
                    )
                    .values(window_closed_at=now)
                )
            if result.error_code == MARKETING_OPTED_OUT_CODE:
                conn.execute(
                    insert_for(self.db.engine.dialect.name)(MarketingOptOut)
                    .values(phone_number_id=row.phone_number_id, user_id=row.user_id, source="error_131050",
                            opted_out_at=now)
                    .on_conflict_do_nothing(index_elements=["phone_number_id", "user_id"])
                )
        return outcome

    def _failure(self, row: Claimed, result: SendResult, attempts: int, now: datetime) -> tuple[str, dict[str, Any]]:
        cls = result.error_class
        retry_at = self._retry_at(cls, result, attempts, now)
        if cls == ErrorClass.PAUSE_NUMBER:
            with self._lock:
                self.paused.add(row.phone_number_id)
            pause_sending(self.db, row.phone_number_id, result.error_code, result.error_title or "", now)
            # Not the message's fault: it goes when an operator resumes the number, and the try is not counted.
            return "paused", {"status": "queued", "next_attempt_at": now, "attempts": row.attempts}
        if cls == ErrorClass.UNCERTAIN:
            return "uncertain", {"status": "uncertain"}
        if retry_at is None:
            return "failed", {"status": "failed"}
        if attempts >= self.settings.send_max_attempts:
            return "failed", {"status": "failed", "error_title": f"{result.error_title} (gave up after {attempts})"}
        return "retry", {"status": "queued", "next_attempt_at": retry_at}

    def _retry_at(self, cls: ErrorClass | None, result: SendResult, attempts: int, now: datetime) -> datetime | None:
        s = self.settings
        if cls == ErrorClass.RETRY:
            # Exponential backoff with full jitter in [50 %, 100 %] of the step; Retry-After is a floor.
            step = min(s.send_backoff_max_seconds, s.send_backoff_base_seconds * 2 ** (attempts - 1))
            delay = max(step * random.uniform(0.5, 1.0), result.retry_after or 0.0)
        elif cls == ErrorClass.RETRY_RECIPIENT:
            delay = s.send_recipient_retry_seconds * attempts * random.uniform(1.0, 1.5)
        elif cls == ErrorClass.SLOW_RETRY:
            delay = min(SLOW_RETRY_CAP.total_seconds(), s.send_slow_retry_seconds * 4 ** (attempts - 1))
        else:
            return None
        return now + timedelta(seconds=delay)

    def _release(self, ids: list[int]) -> int:
        """Give back claimed rows this run did not attempt (user order, paused number)."""
        with self.db.begin() as conn:
            return int(
                conn.execute(
                    update(Outbox)
                    .where(
                        Outbox.id.in_(ids),
                        Outbox.status == "sending",
                        Outbox.claimed_by == self.owner,
                        Outbox.send_started_at.is_(None),
                    )
                    .values(status="queued", claimed_at=None, claimed_by=None)
                ).rowcount
            )


def _recheck(s: Session, row: Claimed, now: datetime) -> tuple[Recheck, FollowUp | None]:
    """The follow-up against the session, its FollowUp row and its campaign as they are now."""
    # The session first, FOR SHARE: an apply holds it FOR UPDATE until it commits, so a message being applied
    # right now is waited for, not missed. (The engine's lock order too: session, then outbox.)
    session = s.get(ChatSession, (row.phone_number_id, row.user_id), with_for_update={"read": True})
    followup = s.scalars(
        select(FollowUp).where(
            FollowUp.phone_number_id == row.phone_number_id, FollowUp.user_id == row.user_id,
            FollowUp.outbox_id == row.id,
        )
    ).first()
    campaign = s.get(Campaign, row.campaign_id)
    if followup is not None:
        queued = QueuedFollowUp(kind=row.kind, step=followup.step, stalled_since=followup.stalled_since)
    else:  # an outbox row written by hand: its own step, and no stall to compare replies with
        queued = QueuedFollowUp(kind=row.kind, step=row.step or "", stalled_since=None)
    live = None
    # A session without any inbound message was never targeted: treated like a missing one.
    if session is not None and session.last_inbound_at is not None:
        live = LiveSession(
            flow=session.flow, current_step=session.current_step, status=session.status,
            archived_from=session.archived_from, facts=facts_of(session), pending_inbound_at=_pending_at(s, row),
            marketing_opted_out=s.get(MarketingOptOut, (row.phone_number_id, row.user_id)) is not None,
        )
    return recheck_followup(campaign, queued, live, now), followup


def _pending_at(s: Session, row: Claimed) -> datetime | None:
    """WhatsApp time of the user's newest message stored but not applied yet (ix_inbound_pending)."""
    newest = s.scalar(
        select(func.max(InboundEvent.timestamp)).where(
            InboundEvent.phone_number_id == row.phone_number_id, InboundEvent.user_id == row.user_id,
            InboundEvent.processed_at.is_(None), InboundEvent.kind.in_(FLOW_KINDS),
        )
    )
    return None if newest is None else datetime.fromtimestamp(newest, UTC)


def _note_on_followup(followup: FollowUp, check: Recheck) -> None:
    """Results read follow-ups. A cancelled one counts as neither sent nor against the campaign's max_sends
    (core.campaigns.targeting counts status "queued"), so a user who stalls again can get a new one."""
    if check.action == "cancel":
        followup.status = "cancelled"
        followup.reason = check.reason
    elif check.action == "template":
        followup.reason = "24 h window closed after queueing: sent as the template"
