"""Typed tables. Every table that grows with users carries the session key (phone_number_id, user_id)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL ids must not wrap at 2**31.
BigId = BigInteger().with_variant(Integer(), "sqlite")
JsonDoc = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on both backends (SQLite would hand back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JsonDoc, list[Any]: JsonDoc}


class ChatSession(Base):
    """Where one user of one business number is in its flow. `version` counts applied inbound messages."""

    __tablename__ = "sessions"

    phone_number_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    flow: Mapped[str] = mapped_column(String(100))
    flow_version: Mapped[int] = mapped_column(Integer)
    current_step: Mapped[str] = mapped_column(String(100))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    failure_count: Mapped[int] = mapped_column(Integer, default=0)
    language: Mapped[str] = mapped_column(String(16))
    # new (created, nothing applied yet) | active | completed | archived
    status: Mapped[str] = mapped_column(String(16))
    profile_name: Mapped[str | None] = mapped_column(String(256))
    opted_out: Mapped[bool] = mapped_column(Boolean, default=False)
    opted_out_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # WhatsApp time of the user's latest message: opens the 24 h customer-service window.
    last_inbound_at: Mapped[datetime | None]
    # Set when Meta reports 131047 (outside the window) and cleared by the user's next message.
    window_closed_at: Mapped[datetime | None]
    step_entered_at: Mapped[datetime | None]
    last_transition_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    archived_at: Mapped[datetime | None]
    # Status before archiving, so analytics can still tell completed from abandoned.
    archived_from: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (
        Index("ix_sessions_step_updated", "flow", "current_step", "updated_at"),
        Index("ix_sessions_status_inbound", "status", "last_inbound_at"),
    )


class InboundEvent(Base):
    """Every accepted inbound message, once: the dedupe store, the pending queue and the replay log."""

    __tablename__ = "inbound_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    phone_number_id: Mapped[str] = mapped_column(String(64))
    wamid: Mapped[str] = mapped_column(String(256))
    user_id: Mapped[str] = mapped_column(String(128))
    timestamp: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))
    # The normalized InboundMessage as JSON; its "raw" member is the message exactly as WhatsApp sent it.
    message: Mapped[dict[str, Any]]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    processed_at: Mapped[datetime | None]
    # applied | ignored (no transition: reaction, system, unsupported) | moved (user changed number)
    # | late (older than a message already applied: logged, never taken as an answer)
    # | quarantined (failed to apply `APPLY_MAX_ATTEMPTS` times: see `quarantine`)
    result: Mapped[str | None] = mapped_column(String(16))
    # Failed applies of this message so far, and the last error: bounded retries before quarantine.
    apply_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    apply_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("phone_number_id", "wamid", name="uq_inbound_wamid"),
        Index(
            "ix_inbound_pending",
            "phone_number_id",
            "user_id",
            "timestamp",
            postgresql_where=text("processed_at IS NULL"),
            sqlite_where=text("processed_at IS NULL"),
        ),
        Index("ix_inbound_session", "phone_number_id", "user_id", "timestamp"),
        Index("ix_inbound_received", "received_at"),
    )


class Transition(Base):
    """Append-only: one row per applied inbound message. Funnels, drop-off and latency read this table."""

    __tablename__ = "transitions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    phone_number_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(128))
    flow: Mapped[str] = mapped_column(String(100))
    flow_version: Mapped[int] = mapped_column(Integer)
    from_step: Mapped[str | None] = mapped_column(String(100))
    to_step: Mapped[str] = mapped_column(String(100))
    outcome: Mapped[str] = mapped_column(String(16))
    wamid: Mapped[str] = mapped_column(String(256))
    # WhatsApp time of the message (user timing survives replays and delays) and when we applied it.
    at: Mapped[datetime]
    applied_at: Mapped[datetime] = mapped_column(default=utcnow)
    elapsed_seconds: Mapped[float | None] = mapped_column(Float)
    session_version: Mapped[int] = mapped_column(BigInteger)
    language: Mapped[str | None] = mapped_column(String(16))
    # The message brought an archived session back; `outcome` says what it did there (see core.lifecycle).
    restored: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (
        Index("ix_transitions_flow_at", "flow", "at"),
        # A session's history by WhatsApp time; covering on PostgreSQL, so "did this user answer after the
        # follow-up, and advance out of its step?" (campaign results) never reads the table (migration 0005).
        Index("ix_transitions_session_at", "phone_number_id", "user_id", "at",
              postgresql_include=["outcome", "from_step"]),
        UniqueConstraint("phone_number_id", "wamid", name="uq_transitions_wamid"),
    )


class Outbox(Base):
    """Every message we want to send. The unique idempotency key makes re-runs and retries send once."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(300), unique=True)
    phone_number_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # text | interactive | template
    # Meta message fields without messaging_product/to (the sender adds them).
    body: Mapped[dict[str, Any]]
    text: Mapped[str | None] = mapped_column(Text)
    template: Mapped[str | None] = mapped_column(String(200))
    campaign_id: Mapped[int | None] = mapped_column(ForeignKey("campaigns.id"))
    step: Mapped[str | None] = mapped_column(String(100))
    in_reply_to: Mapped[str | None] = mapped_column(String(256))
    # queued | sending | sent | failed | uncertain | cancelled
    status: Mapped[str] = mapped_column(String(16), default="queued")
    wamid: Mapped[str | None] = mapped_column(String(256), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[datetime | None]
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    error_code: Mapped[int | None] = mapped_column(Integer)
    error_title: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]
    # Written (and committed) just before the HTTP call: a stale claim without it was never sent.
    send_started_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_outbox_due", "status", "next_attempt_at"),
        Index("ix_outbox_session", "phone_number_id", "user_id", "id"),
        Index("ix_outbox_campaign", "campaign_id"),
    )


class MessageStatus(Base):
    """Current delivery state of one outbound wamid: monotonic sent → delivered → read, or failed."""

    __tablename__ = "message_status"

    wamid: Mapped[str] = mapped_column(String(256), primary_key=True)
    phone_number_id: Mapped[str] = mapped_column(String(64))
    recipient_id: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    rank: Mapped[int] = mapped_column(Integer)
    error_code: Mapped[int | None] = mapped_column(Integer)
    status_at: Mapped[datetime]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Meta's `pricing` object from the statuses of this message (campaign cost): category (marketing, utility,
    # service, authentication...), whether it is billable, and the pricing model (PMP, CBP).
    pricing_category: Mapped[str | None] = mapped_column(String(32))
    pricing_billable: Mapped[bool | None] = mapped_column(Boolean)
    pricing_model: Mapped[str | None] = mapped_column(String(32))


class MessageStatusEvent(Base):
    """Every status webhook as received: the history behind `message_status`."""

    __tablename__ = "message_status_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    wamid: Mapped[str] = mapped_column(String(256))
    phone_number_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    timestamp: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[list[Any]] = mapped_column(default=list)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("wamid", "status", "timestamp", name="uq_status_event"),
        Index("ix_status_events_received", "received_at"),
    )


class Campaign(Base):
    """A follow-up rule: nudge users stalled in (flow, step) for `delay_seconds` since their last message."""

    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    flow: Mapped[str] = mapped_column(String(100))
    step: Mapped[str] = mapped_column(String(100))
    delay_seconds: Mapped[int] = mapped_column(Integer)
    text: Mapped[str | None] = mapped_column(Text)
    template_name: Mapped[str | None] = mapped_column(String(200))
    template_language: Mapped[str | None] = mapped_column(String(16))
    # Template body parameters: each a session data key ("{name}") or a literal.
    template_params: Mapped[list[Any]] = mapped_column(default=list)
    max_sends: Mapped[int] = mapped_column(Integer, default=1)
    quiet_start: Mapped[str | None] = mapped_column(String(5))  # "HH:MM" in `timezone`
    quiet_end: Mapped[str | None] = mapped_column(String(5))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    filter_language: Mapped[str | None] = mapped_column(String(16))
    filter_phone_number_id: Mapped[str | None] = mapped_column(String(64))
    recovery_window_seconds: Mapped[int] = mapped_column(Integer, default=48 * 3600)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class FollowUp(Base):
    """One follow-up decision per (campaign, session, attempt): queued with its outbox row, or skipped with why."""

    __tablename__ = "followups"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    phone_number_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(128))
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[str] = mapped_column(String(100))
    # queued | skipped | cancelled (the sender's re-check found the user no longer stalled: `reason` says why)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    outbox_id: Mapped[int | None] = mapped_column(ForeignKey("outbox.id"))
    # The session's last inbound time when this follow-up was decided: a reply is anything after it.
    stalled_since: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("campaign_id", "phone_number_id", "user_id", "attempt", name="uq_followup_attempt"),
        Index("ix_followups_session", "phone_number_id", "user_id"),
    )


class MarketingOptOut(Base):
    """A user who stopped marketing messages from one business number: Meta's 131050 on a send, or a
    `user_preferences` webhook with `marketing_messages` stop (a resume deletes the row). Marketing templates
    never go to them; replies and utility messages still do."""

    __tablename__ = "marketing_optouts"

    phone_number_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    source: Mapped[str] = mapped_column(String(32))  # error_131050 | user_preferences | operator
    opted_out_at: Mapped[datetime] = mapped_column(default=utcnow)


class SenderPause(Base):
    """Sending paused for a business number after an account-level error (e.g. 131031 account locked)."""

    __tablename__ = "sender_pauses"

    phone_number_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    error_code: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    paused_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobRun(Base):
    """The last run of each job, for the health page and to make singleton runs visible."""

    __tablename__ = "job_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(String(50))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    ok: Mapped[bool | None] = mapped_column(Boolean)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    owner: Mapped[str | None] = mapped_column(String(100))
    # "<job>:<slot>" for scheduled runs: unique, so two schedulers firing the same slot run it once.
    run_key: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        Index("ix_job_runs_job_started", "job", "started_at"),
        Index("uq_job_runs_run_key", "run_key", unique=True),
    )


class QuarantinedMessage(Base):
    """A message we could not take (intake: a value out of bounds) or could not apply (apply: the flow or the
    engine failed on it `APPLY_MAX_ATTEMPTS` times). Held here with the reason until an operator retries or drops
    it; it never blocks the user's later messages, other users, or the sweeper."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    stage: Mapped[str] = mapped_column(String(16))  # intake | apply
    # Identifying fields as far as they could be read, cleaned and cut to their column sizes (the originals
    # may be exactly what was out of bounds).
    phone_number_id: Mapped[str | None] = mapped_column(String(64))
    user_id: Mapped[str | None] = mapped_column(String(128))
    wamid: Mapped[str | None] = mapped_column(String(256))
    # apply: the stored message (inbound_events.id), which keeps processed_at set and result "quarantined".
    event_id: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    # intake: the message as received, as JSON text with what PostgreSQL cannot store escaped (core.quarantine).
    payload: Mapped[str | None] = mapped_column(Text)
    # One row per poison, however often Meta retries it: sha256 of the payload (intake) or "event:<id>" (apply).
    fingerprint: Mapped[str] = mapped_column(String(80), unique=True)
    seen: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(16), default="held")  # held | retried | dropped
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None]
    resolved_by: Mapped[str | None] = mapped_column(String(100))

    __table_args__ = (Index("ix_quarantine_status_seen", "status", "last_seen_at"),)


class AuditEntry(Base):
    """Every operator action (CLI, admin API, dashboard): who, when, what, on what, and why."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(100))  # "cli:<os user>", "admin-api", "dashboard:<user>"
    action: Mapped[str] = mapped_column(String(50))
    target: Mapped[str] = mapped_column(Text)  # e.g. "session 100000000000111/34600111222", "quarantine 7"
    reason: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)

    __table_args__ = (Index("ix_audit_log_at", "at"),)


class WebhookStat(Base):
    """Webhook request counts per minute and result (accepted, duplicate, rejected_signature, ...).

    Prometheus counters live per process; these rows give the dashboard one history across processes.
    """

    __tablename__ = "webhook_stats"

    bucket: Mapped[datetime] = mapped_column(primary_key=True)  # start of the minute, UTC
    result: Mapped[str] = mapped_column(String(32), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)


class StepReach(Base):
    """Analytics rollup: when each session first reached each step of a flow, and first entered the flow.

    Rebuilt incrementally from `transitions` by `core.analytics.refresh_rollups`; funnels read this table.
    """

    __tablename__ = "analytics_step_reach"

    phone_number_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    flow: Mapped[str] = mapped_column(String(100), primary_key=True)
    step: Mapped[str] = mapped_column(String(100), primary_key=True)
    first_at: Mapped[datetime]
    # The session's first arrival anywhere in this flow (the funnel cohort is chosen by it).
    entered_at: Mapped[datetime | None]

    # A funnel over a date range is one index-only range scan (covering on PostgreSQL) that returns each
    # journey's rows next to each other (they share entered_at), so it is grouped without hashing or sorting.
    __table_args__ = (
        Index("ix_step_reach_journeys", "flow", "entered_at", "phone_number_id", "user_id",
              postgresql_include=["step", "first_at"]),
    )


class AnalyticsWatermark(Base):
    """How far each rollup has read its source table (transitions.id)."""

    __tablename__ = "analytics_watermarks"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger)
    refreshed_at: Mapped[datetime] = mapped_column(default=utcnow)


# Analytics indexes on the engine's tables (migration 0004): new sessions / completions per day read
# transitions by outcome and time; messages per hour reads inbound events by WhatsApp timestamp.
Index("ix_transitions_outcome_at", Transition.outcome, Transition.at)
Index("ix_inbound_timestamp", InboundEvent.timestamp)

# Outcomes that move a user from one step to another: the ones transition latency is about.
MOVING_OUTCOMES = ("advanced", "completed", "handoff")
# Migration 0005: the step changes alone, newest last, with every column the latency page reads (covering on
# PostgreSQL), so its percentiles and histogram are index-only range scans. Queries must spell the outcomes
# as literals (not bind parameters) for the planner to prove they imply this predicate.
MOVES = text(f"outcome IN ({', '.join(repr(o) for o in MOVING_OUTCOMES)}) AND elapsed_seconds IS NOT NULL")
Index("ix_transitions_moves", Transition.at, Transition.id,
      postgresql_include=["flow", "phone_number_id", "language", "from_step", "to_step", "elapsed_seconds"],
      postgresql_where=MOVES, sqlite_where=MOVES)

# Migration 0008: sessions still in their flow (core.lifecycle.in_progress: active, or archived while active),
# the ones every stalled, state and campaign read covers. Most sessions are archived, most of those finished:
# the stalled list and count and the state distribution are index-only scans of the first index (by last
# message, with what those pages show), campaign preview and the follow-up job walk the second one step by step,
# oldest stall first. Queries spell the statuses as literals (core.lifecycle) for the planner to prove this.
# (On PostgreSQL the migration also creates statistics st_sessions_flow_step on (flow, current_step), which the
# metadata cannot declare: without them the planner expects half the sessions a step has.)
IN_PROGRESS = text("status = 'active' OR (status = 'archived' AND archived_from = 'active')")
Index("ix_sessions_in_progress", ChatSession.last_inbound_at, ChatSession.phone_number_id, ChatSession.user_id,
      postgresql_include=["flow", "current_step", "language", "status", "opted_out", "window_closed_at",
                          "step_entered_at", "created_at"],
      postgresql_where=IN_PROGRESS, sqlite_where=IN_PROGRESS)
Index("ix_sessions_step_in_progress", ChatSession.flow, ChatSession.current_step, ChatSession.last_inbound_at,
      ChatSession.phone_number_id, ChatSession.user_id,
      postgresql_where=IN_PROGRESS, sqlite_where=IN_PROGRESS)
# Also migration 0008: the few messages Meta refused because the 24 h window had closed (131047,
# core.campaigns.WINDOW_CLOSED_CODE). The follow-up job checks, for every session stalled in a campaign's step,
# whether its follow-up failed so (then a template may follow): an index-only probe of this index instead of the
# outbox row itself.
WINDOW_CLOSED = text("error_code = 131047")
Index("ix_outbox_window_closed", Outbox.id, postgresql_where=WINDOW_CLOSED, sqlite_where=WINDOW_CLOSED)
