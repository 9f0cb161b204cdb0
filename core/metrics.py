"""Prometheus metrics shared by the webhook, the engine and the jobs.

The webhook serves them on GET /metrics, `python -m jobs` on JOBS_METRICS_PORT. With several webhook worker
processes (`serve --workers N`) every process writes its values under PROMETHEUS_MULTIPROC_DIR and /metrics
sums them, so a scrape answered by any worker shows the whole server.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

WEBHOOK_REQUESTS = Counter("waflow_webhook_requests_total", "Webhook POSTs by result", ["result"])
SIGNATURE_FAILURES = Counter("waflow_signature_failures_total", "Webhook POSTs rejected by the signature check")
MESSAGES_STORED = Counter("waflow_messages_stored_total", "Inbound messages stored for the first time")
DUPLICATES_DROPPED = Counter("waflow_duplicates_dropped_total", "Inbound messages dropped as already seen (wamid)")
MESSAGES_APPLIED = Counter("waflow_messages_applied_total", "Inbound messages applied, by result", ["result"])
# Read from the database, the same from any process: with several processes the latest reading counts.
MESSAGES_PENDING = Gauge(
    "waflow_messages_pending", "Inbound messages stored but not yet applied", multiprocess_mode="mostrecent"
)
APPLY_FAILURES = Counter(
    "waflow_apply_failures_total",
    "Failed attempts to apply a stored message, by what followed (retried later, quarantined)",
    ["result"],
)
# Held rows of the quarantine table (messages we could not take or could not apply), read from the database.
QUARANTINE_HELD = Gauge(
    "waflow_quarantine_held", "Quarantined messages held for an operator, by stage (intake, apply)", ["stage"],
    multiprocess_mode="mostrecent",
)
APPLY_LATENCY = Histogram(
    "waflow_apply_seconds",
    "Time to apply one user's batch of pending messages (one transaction)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
LOCK_WAIT = Histogram(
    "waflow_lock_wait_seconds",
    "Time spent waiting for a user's session lock",
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
)

# Outbox sender (jobs/sender.py)
OUTBOX_RESULTS = Counter(
    "waflow_outbox_results_total",
    "Outbox send attempts by result (sent, retry, failed, uncertain, paused, cancelled)",
    ["result"],
)
OUTBOX_ERRORS = Counter("waflow_outbox_errors_total", "Graph API errors by Meta error code", ["code"])
SEND_LATENCY = Histogram(
    "waflow_send_seconds",
    "Graph API send call duration",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SENDER_PAUSED = Gauge(
    "waflow_sender_paused",
    "1 while sending from a business number is paused, by error code",
    ["phone_number_id", "code"],
    multiprocess_mode="mostrecent",
)
JOB_RUNS = Counter("waflow_job_runs_total", "Job runs by job and result (ok, error, skipped)", ["job", "result"])


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROCESS_DIR_ENV))


def render() -> bytes:
    """The exposition text: this process's metrics, or every worker's when they share a directory."""
    if multiprocess_mode():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


_paused_labels: set[tuple[str, str]] = set()


def set_paused(labels: set[tuple[str, str]]) -> None:
    """`waflow_sender_paused` = 1 for each (phone_number_id, code) paused now. Across processes a removed
    label would keep its last written 1, so there a pause that ended is written as 0 instead."""
    if multiprocess_mode():
        for ended in _paused_labels - labels:
            SENDER_PAUSED.labels(*ended).set(0)
        _paused_labels.update(labels)
    else:
        SENDER_PAUSED.clear()
    for label in labels:
        SENDER_PAUSED.labels(*label).set(1)
