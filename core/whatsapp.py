"""WhatsApp Cloud API client: send one message, classify the answer, and the per-number send pauses.

One `requests.Session` per client (connection reuse), (connect, read) timeouts, no automatic retries:
whether a failed request is retried is decided by `classify` from Meta's error code, in one table.

The Cloud API has no idempotency key. A request that reached Meta but whose answer we never read (read
timeout, connection dropped after the body was sent) may or may not have produced a message, so it is
reported as `uncertain` and never retried automatically; only failures that prove nothing was sent
(connection refused, connect timeout) or that Meta answered with an error are retried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from sqlalchemy import delete, select
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from core import logsafe, metrics
from core.db import Database, insert_for
from core.models import SenderPause

log = logging.getLogger(__name__)


class ErrorClass(StrEnum):
    RETRY = "retry"  # transient: exponential backoff with jitter
    RETRY_RECIPIENT = "retry_recipient"  # this user only, a little later (pair rate limit)
    SLOW_RETRY = "slow_retry"  # only at long, growing intervals
    PERMANENT = "permanent"  # this message will never go as it is
    WINDOW_CLOSED = "window_closed"  # outside the 24 h window: free-form fails, a template may still go
    PAUSE_NUMBER = "pause_number"  # account-level problem: stop sending from this business number
    UNCERTAIN = "uncertain"  # the request may have been delivered: never resent automatically


# Meta error code -> what the sender does. Source: Cloud API "Error codes" reference.
ERROR_CLASSES: dict[int, ErrorClass] = {
    # Throttling and temporary failures
    1: ErrorClass.RETRY,  # API unknown
    2: ErrorClass.RETRY,  # API service (temporary downtime)
    4: ErrorClass.RETRY,  # API too many calls (app rate limit)
    17: ErrorClass.RETRY,  # API user too many calls
    80007: ErrorClass.RETRY,  # WABA rate limit
    130429: ErrorClass.RETRY,  # throughput of the business number reached
    131000: ErrorClass.RETRY,  # something went wrong
    131016: ErrorClass.RETRY,  # service unavailable
    131057: ErrorClass.RETRY,  # account in maintenance mode
    131056: ErrorClass.RETRY_RECIPIENT,  # (business, consumer) pair rate limit
    131049: ErrorClass.SLOW_RETRY,  # per-user marketing limit ("healthy ecosystem engagement")
    # This message can never be sent as it is
    100: ErrorClass.PERMANENT,  # invalid parameter
    131008: ErrorClass.PERMANENT,  # required parameter missing
    131009: ErrorClass.PERMANENT,  # parameter value invalid
    131021: ErrorClass.PERMANENT,  # recipient cannot be sender
    131026: ErrorClass.PERMANENT,  # message undeliverable
    131051: ErrorClass.PERMANENT,  # unsupported message type
    131053: ErrorClass.PERMANENT,  # media upload error
    132000: ErrorClass.PERMANENT,  # template param count mismatch
    132001: ErrorClass.PERMANENT,  # template does not exist
    132005: ErrorClass.PERMANENT,  # template hydrated text too long
    132007: ErrorClass.PERMANENT,  # template format character policy violated
    132008: ErrorClass.PERMANENT,  # template parameter format mismatch
    132012: ErrorClass.PERMANENT,  # template parameter format mismatch
    132015: ErrorClass.PERMANENT,  # template paused
    132016: ErrorClass.PERMANENT,  # template disabled
    131047: ErrorClass.WINDOW_CLOSED,  # re-engagement message: more than 24 h since the user's last message
    # The account or the number is unusable until an operator acts
    0: ErrorClass.PAUSE_NUMBER,  # AuthException
    3: ErrorClass.PAUSE_NUMBER,  # API method / capability
    10: ErrorClass.PAUSE_NUMBER,  # permission denied
    190: ErrorClass.PAUSE_NUMBER,  # access token expired
    368: ErrorClass.PAUSE_NUMBER,  # temporarily blocked for policy violations
    131031: ErrorClass.PAUSE_NUMBER,  # account locked
    131042: ErrorClass.PAUSE_NUMBER,  # business eligibility / payment issue
    131045: ErrorClass.PAUSE_NUMBER,  # incorrect certificate (number not registered)
    131048: ErrorClass.PAUSE_NUMBER,  # spam rate limit hit
}


def classify(code: int | None, http_status: int | None) -> ErrorClass:
    """What to do with a failed send: Meta's code decides; without a known code the HTTP status does."""
    if code is not None and code in ERROR_CLASSES:
        return ERROR_CLASSES[code]
    if http_status is not None and (http_status >= 500 or http_status == 429):
        return ErrorClass.RETRY
    return ErrorClass.PERMANENT


@dataclass(frozen=True)
class SendResult:
    wamid: str | None = None
    error_class: ErrorClass | None = None
    error_code: int | None = None
    error_title: str | None = None
    http_status: int | None = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.wamid is not None


class GraphClient:
    """Sends messages through `POST {base_url}/{phone_number_id}/messages`. Thread-safe enough for a pool."""

    def __init__(
        self,
        base_url: str,
        access_token: str,
        *,
        connect_timeout: float = 3.05,
        read_timeout: float = 10.0,
        pool_size: int = 16,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeouts = (connect_timeout, read_timeout)
        self.http = requests.Session()
        adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)
        self.http.headers.update({"Authorization": f"Bearer {access_token}", "Content-Type": "application/json"})

    def close(self) -> None:
        self.http.close()

    @staticmethod
    def payload(user_id: str, body: dict[str, Any], outbox_id: int) -> dict[str, Any]:
        """The request body: our stored Meta message fields plus routing and the id statuses echo back."""
        return {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": user_id,
            **body,
            "biz_opaque_callback_data": str(outbox_id),
        }

    def send(self, phone_number_id: str, user_id: str, body: dict[str, Any], outbox_id: int) -> SendResult:
        url = f"{self.base_url}/{phone_number_id}/messages"
        try:
            response = self.http.post(url, json=self.payload(user_id, body, outbox_id), timeout=self.timeouts)
        except requests.ConnectionError as e:
            if _never_sent(e):
                return SendResult(error_class=ErrorClass.RETRY, error_title=f"connection failed: {_reason(e)}")
            return SendResult(error_class=ErrorClass.UNCERTAIN, error_title=f"connection lost: {_reason(e)}")
        except requests.Timeout as e:  # ReadTimeout: the request went out, the answer never came
            return SendResult(error_class=ErrorClass.UNCERTAIN, error_title=f"no answer in time: {_reason(e)}")
        return parse_response(response)


def parse_response(response: requests.Response) -> SendResult:
    try:
        document = response.json()
    except ValueError:
        document = None
    if response.ok:
        messages = document.get("messages") if isinstance(document, dict) else None
        if isinstance(messages, list) and messages and isinstance(messages[0], dict) and messages[0].get("id"):
            return SendResult(wamid=str(messages[0]["id"]), http_status=response.status_code)
        # 2xx without a wamid: Meta may have accepted it; we cannot correlate it, and must not send it again.
        return SendResult(
            error_class=ErrorClass.UNCERTAIN, error_title="answer without messages[0].id",
            http_status=response.status_code,
        )
    error = document.get("error") if isinstance(document, dict) else None
    code: int | None = None
    title = f"HTTP {response.status_code}"
    if isinstance(error, dict):
        raw_code = error.get("code")
        code = int(raw_code) if isinstance(raw_code, int | str) and str(raw_code).isdigit() else None
        details = (error.get("error_data") or {}).get("details") if isinstance(error.get("error_data"), dict) else None
        title = str(details or error.get("message") or title)[:1000]
    retry_after = _retry_after(response.headers.get("Retry-After"))
    return SendResult(
        error_class=classify(code, response.status_code), error_code=code, error_title=title,
        http_status=response.status_code, retry_after=retry_after,
    )


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _never_sent(error: requests.ConnectionError) -> bool:
    """True when the connection was never established, so the request cannot have reached Meta."""
    if isinstance(error, requests.ConnectTimeout):
        return True
    reason: BaseException | None = error.args[0] if error.args and isinstance(error.args[0], BaseException) else None
    reason = getattr(reason, "reason", reason)
    return isinstance(reason, NewConnectionError | ConnectTimeoutError | NameResolutionError)


def _reason(error: BaseException) -> str:
    return str(error).splitlines()[0][:300] if str(error) else type(error).__name__


# --- send pauses: per business number, cleared only by an operator -----------------------------------------------


def pause_sending(db: Database, phone_number_id: str, code: int | None, reason: str, now: datetime) -> bool:
    """Stop sending from a business number. Returns False if it was already paused (the first reason stays)."""
    with db.begin() as conn:
        insert = insert_for(db.engine.dialect.name)
        stmt = (
            insert(SenderPause)
            .values(phone_number_id=phone_number_id, error_code=code, reason=reason, paused_at=now)
            .on_conflict_do_nothing(index_elements=["phone_number_id"])
            .returning(SenderPause.phone_number_id)
        )
        created = conn.execute(stmt).first() is not None
    if created:
        log.error("sending paused for %s: %s (code %s)", phone_number_id, logsafe.clean(reason), code)
    refresh_pause_gauge(db)
    return created


def resume_sending(db: Database, phone_number_id: str) -> bool:
    """Clear a pause (operator action). Returns False if the number was not paused."""
    with db.begin() as conn:
        deleted = conn.execute(delete(SenderPause).where(SenderPause.phone_number_id == phone_number_id)).rowcount
    refresh_pause_gauge(db)
    return bool(deleted)


def paused_numbers(db: Database) -> list[dict[str, Any]]:
    """Every paused business number with its error code, reason and since when (for /metrics and the dashboard)."""
    with db.session() as s:
        rows = s.scalars(select(SenderPause).order_by(SenderPause.paused_at)).all()
        return [
            {"phone_number_id": r.phone_number_id, "error_code": r.error_code, "reason": r.reason,
             "paused_at": r.paused_at}
            for r in rows
        ]


def refresh_pause_gauge(db: Database) -> list[dict[str, Any]]:
    """Set `waflow_sender_paused{phone_number_id,code}` from the table; /metrics may call this before rendering."""
    paused = paused_numbers(db)
    metrics.set_paused({(pause["phone_number_id"], str(pause["error_code"])) for pause in paused})
    return paused
