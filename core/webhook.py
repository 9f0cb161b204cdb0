"""The HTTP front: WhatsApp webhook (handshake + signed POSTs), health, metrics and the admin API.

POST /webhook: cap the body → verify the signature on the raw bytes → parse → store (dedupe on wamid)
→ 200. Applying happens right after, off the request path (core.worker); nothing slow runs before the 200.
That one route is served by a thin ASGI layer in front of the FastAPI app, which serves everything else.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from core import logsafe, metrics
from core.admin import AdminUnauthorized, admin_router, ops_router
from core.config import Settings, get_settings
from core.db import Database, first_line
from core.engine import Engine, IngestResult
from core.errors import DatabaseUnavailableError, PayloadError
from core.flows import FlowRegistry
from core.httpserver import BODY_TIMEOUT_SECONDS, MAX_HEADER_BYTES, NOSNIFF
from core.intake import IntakeFailed, IntakeWorker
from core.migrate import ensure_schema
from core.payloads import MAX_BODY_BYTES
from core.signature import verify_signature
from core.whatsapp import refresh_pause_gauge
from core.worker import ApplyWorker, Periodic, RequestStats, sweep

log = logging.getLogger(__name__)

STATS_FLUSH_SECONDS = 5.0
GIL_SWITCH_SECONDS = 0.0005
DATABASE_ERRORS = (DatabaseUnavailableError, OperationalError, DBAPIError)


class BodyTooLarge(Exception):
    pass


class BodyTimeout(HTTPException):
    """The client stopped sending the body. An HTTPException, so FastAPI routes answer it too (with 408)."""

    def __init__(self) -> None:
        super().__init__(408, f"no request body data for {BODY_TIMEOUT_SECONDS:g} s", headers={"Connection": "close"})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _unavailable(exc: Exception, *, count: bool) -> Response:
    if count:
        metrics.WEBHOOK_REQUESTS.labels("unavailable").inc()
    # The first line only: a SQLAlchemy error's text goes on with the statement and its parameters (user data).
    log.warning("database unavailable: %s", logsafe.clean(first_line(exc)))
    # Meta retries non-200 answers for days: a 503 loses nothing.
    return _error(503, "database unavailable, retry later")


async def _read_capped(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge  # stop reading: a lying or missing Content-Length cannot make us buffer more
        chunks.append(chunk)
    return b"".join(chunks)


class WebhookService:
    """Everything a request needs, built once per process by the lifespan."""

    def __init__(self, settings: Settings, db: Database, engine: Engine, *, background: bool = True) -> None:
        self.settings = settings
        self.db = db
        self.engine = engine
        self.stats = RequestStats(db)
        wait = settings.apply_reorder_wait_ms / 1000  # a burst delivered out of order sorts itself meanwhile
        self.worker = ApplyWorker(engine, threads=settings.apply_threads, reorder_wait=wait) if background else None
        self.intake = IntakeWorker(engine, db)
        interval = settings.pending_sweep_interval_seconds
        self.periodic = [
            Periodic("sweeper", interval, lambda: sweep(engine, timedelta(seconds=interval))),
            Periodic("stats", STATS_FLUSH_SECONDS, self.stats.flush),
        ]

    def start(self) -> None:
        self.intake.start()
        if self.worker:
            self.worker.start()
        for job in self.periodic:
            job.start()

    def stop(self) -> None:
        self.intake.stop()
        if self.worker:
            self.worker.stop()
        for job in self.periodic:
            job.stop()
        self.db.dispose()

    def refresh_gauges(self) -> None:
        try:
            self.engine.pending_count()
            self.engine.quarantine_count()  # held quarantine rows per stage (waflow_quarantine_held)
            refresh_pause_gauge(self.db)  # sending paused per business number, and why (error code)
        except DATABASE_ERRORS as e:
            # /metrics must answer during an outage (that is when it is read): the gauges keep their last values.
            log.warning("metrics: database gauges not refreshed: %s", logsafe.clean(first_line(e)))

    def count(self, result: str, n: int = 1) -> None:
        metrics.WEBHOOK_REQUESTS.labels(result).inc(n)
        self.stats.add(result, n)

    def apply_now(self, result: IngestResult) -> None:
        if self.worker:
            self.worker.submit(result.session_keys)
        else:
            for key in result.session_keys:
                self.engine.apply_all(key)


class WebhookFastPath:
    """POST /webhook straight from ASGI; every other request (the GET handshake, health, metrics, admin, the
    lifespan) goes to the FastAPI app behind it. Every HTTP request, on either path, gets the limits of
    core.httpserver here: a head over MAX_HEADER_BYTES is refused (431), a stalled body times out (408) and every
    response says `nosniff` (about 10 µs a request)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Profiled under load (py-spy), FastAPI's middleware stack, router and request_response took about 26 % of
        # the process's GIL time around this endpoint's own 25 %; it needs none of them (no dependencies, no
        # validation, its own error answers).
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_nosniff(send)
        if _head_size(scope) > MAX_HEADER_BYTES:
            # The server caps the head before parsing it (core.httpserver); this covers any other ASGI server.
            await _error(431, f"request headers larger than {MAX_HEADER_BYTES // 1024} KB")(scope, receive, send)
            return
        receive = _with_body_timeout(receive)
        if scope["method"] != "POST" or scope["path"] != "/webhook":
            await self.app(scope, receive, send)
            return
        try:
            response = await receive_post(self.app.state.service, Request(scope, receive))
        except BodyTimeout as e:
            log.warning("POST /webhook: %s; answered 408, nothing stored", e.detail)
            response = JSONResponse({"error": e.detail}, status_code=408, headers=e.headers)
        except DATABASE_ERRORS as e:
            response = _unavailable(e, count=True)
        except Exception:
            # What Starlette's ServerErrorMiddleware did here: a bare 500, then re-raise for the server to log.
            await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
            raise
        await response(scope, receive, send)


def _head_size(scope: Scope) -> int:
    return len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
        len(name) + len(value) for name, value in scope["headers"]
    )


def _with_nosniff(send: Send) -> Send:
    """`send` adding X-Content-Type-Options: nosniff to the response (no browser may guess a type from it)."""

    async def send_nosniff(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), NOSNIFF]}
        await send(message)

    return send_nosniff


def _with_body_timeout(receive: Receive) -> Receive:
    """`receive` raising BodyTimeout when the body stalls for BODY_TIMEOUT_SECONDS. Once the body is complete
    it waits without limit: what is left to receive then is the client's disconnect."""
    complete = False

    async def receive_in_time() -> Message:
        nonlocal complete
        if complete:
            return await receive()
        try:
            async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
                message = await receive()
        except TimeoutError:
            raise BodyTimeout from None
        complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return receive_in_time


def create_app(
    settings: Settings | None = None, *, flows: FlowRegistry | None = None, background: bool = True
) -> WebhookFastPath:
    """The ASGI app. `background=False` applies messages inside the request (tests that need determinism)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The apply threads are CPU-bound Python between round trips; with the default 5 ms GIL switch
        # interval the event loop waited that long behind them to answer a request.
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        db = Database(settings.database_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow)
        ensure_schema(db)
        service = WebhookService(settings, db, Engine(db, flows, settings), background=background)
        service.start()
        app.state.service = service
        try:
            yield
        finally:
            service.stop()

    # No OpenAPI schema or docs (nothing here is for browsing), and no trailing-slash redirects: Starlette builds
    # their Location from the request's Host header.
    app = FastAPI(title="waflow", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.state.settings = settings
    app.include_router(ops_router)
    app.include_router(admin_router)
    _routes(app)
    _error_handlers(app)
    return WebhookFastPath(app)


def app_factory() -> WebhookFastPath:
    """For `uvicorn --factory core.webhook:app_factory` (several worker processes, settings from env)."""
    return create_app()


def _routes(app: FastAPI) -> None:
    app.add_api_route("/webhook", verify, methods=["GET"])


async def verify(request: Request) -> Response:
    """Meta's subscription handshake: echo hub.challenge exactly as received, only for the right token."""
    params = request.query_params
    mode, token, challenge = params.get("hub.mode"), params.get("hub.verify_token"), params.get("hub.challenge")
    expected = request.app.state.settings.whatsapp_verify_token
    if not expected:
        return _error(403, "webhook verification is not configured (WHATSAPP_VERIFY_TOKEN)")
    if mode != "subscribe" or token is None or challenge is None:
        return _error(400, "expected hub.mode=subscribe, hub.verify_token and hub.challenge")
    if not hmac.compare_digest(token.encode(), expected.encode()):
        return _error(403, "verify token does not match")
    return PlainTextResponse(challenge)


async def receive_post(service: WebhookService, request: Request) -> Response:
    try:
        raw = await _read_capped(request)
    except BodyTooLarge:
        service.count("rejected_too_large")
        return _error(413, f"body larger than {MAX_BODY_BYTES} bytes")
    if not verify_signature(raw, request.headers.get("x-hub-signature-256"), service.settings.app_secrets):
        metrics.SIGNATURE_FAILURES.inc()
        service.count("rejected_signature")
        return _error(401, "missing or invalid X-Hub-Signature-256")
    try:
        # Parsed and durably stored (messages and statuses) before any answer but a rejection.
        taken = await service.intake.take(raw)
    except PayloadError as e:
        service.count("rejected_payload")
        return _error(400, str(e))
    except IntakeFailed as e:  # unexpected, this body's alone (logged by the intake): no 500, keep the connection
        service.count("failed")
        return _error(422, str(e))
    parsed, result = taken.parsed, taken.stored
    for note in parsed.notes:
        log.info("webhook: %s", logsafe.clean(note))
    if result is None:
        service.count("ignored_object")
        return JSONResponse({"status": "ignored", "object": parsed.object})
    service.count("accepted")
    if result.duplicates:
        service.count("duplicate", result.duplicates)
    if service.worker is None:
        await run_in_threadpool(service.apply_now, result)
    else:
        service.apply_now(result)
    body = {"status": "ok", "stored": result.stored, "duplicates": result.duplicates, "statuses": len(parsed.statuses)}
    if taken.quarantined:
        service.count("quarantined", taken.quarantined)
        body["quarantined"] = taken.quarantined
    return JSONResponse(body)


def _error_handlers(app: FastAPI) -> None:
    async def unavailable(request: Request, exc: Exception) -> Response:
        return _unavailable(exc, count=getattr(request.app.state, "service", None) is not None)

    async def unauthorized(_request: Request, _exc: Exception) -> Response:
        return JSONResponse(
            {"error": "admin API needs Authorization: Bearer $ADMIN_TOKEN"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    app.add_exception_handler(AdminUnauthorized, unauthorized)
    for error in DATABASE_ERRORS:
        app.add_exception_handler(error, unavailable)
