"""Prometheus metrics shared by the webhook, the engine and the jobs (exposed on GET /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

WEBHOOK_REQUESTS = Counter("waflow_webhook_requests_total", "Webhook POSTs by result", ["result"])
SIGNATURE_FAILURES = Counter("waflow_signature_failures_total", "Webhook POSTs rejected by the signature check")
MESSAGES_STORED = Counter("waflow_messages_stored_total", "Inbound messages stored for the first time")
DUPLICATES_DROPPED = Counter("waflow_duplicates_dropped_total", "Inbound messages dropped as already seen (wamid)")
MESSAGES_APPLIED = Counter("waflow_messages_applied_total", "Inbound messages applied, by result", ["result"])
MESSAGES_PENDING = Gauge("waflow_messages_pending", "Inbound messages stored but not yet applied")
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
)
JOB_RUNS = Counter("waflow_job_runs_total", "Job runs by job and result (ok, error, skipped)", ["job", "result"])
