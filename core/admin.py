"""Operations endpoints: health, Prometheus metrics and the admin API (bearer token): read-only views, and the
operator actions of core.operator as POSTs, each with a mandatory reason written to the audit log."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core import metrics, operator, quarantine
from core.errors import DatabaseUnavailableError
from core.views import outbound_view, session_view

log = logging.getLogger(__name__)
ops_router = APIRouter()
admin_router = APIRouter(prefix="/admin")


@ops_router.get("/healthz")
async def healthz(request: Request) -> Response:
    db = request.app.state.service.db
    try:
        await run_in_threadpool(db.ping)
    except DatabaseUnavailableError as e:
        # Whoever reaches /healthz (a load balancer, anyone) learns nothing of the database's address, user or
        # driver: those go to the log.
        log.warning("healthz: %s", e)
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok"})


@ops_router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    # Never fails for a database outage (the gauges keep their last values): that is when metrics are read.
    await run_in_threadpool(request.app.state.service.refresh_gauges)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def require_admin(request: Request) -> None:
    expected = request.app.state.settings.admin_token
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # No ADMIN_TOKEN configured means the admin API is closed, never open.
    if not expected or scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise AdminUnauthorized


class AdminUnauthorized(Exception):
    pass


@admin_router.get("/sessions/{phone_number_id}/{user_id}", dependencies=[Depends(require_admin)])
async def admin_session(request: Request, phone_number_id: str, user_id: str) -> Response:
    view = await run_in_threadpool(session_view, request.app.state.service.db, phone_number_id, user_id)
    if view is None:
        return JSONResponse({"error": f"no session for {phone_number_id}/{user_id}"}, status_code=404)
    return JSONResponse(view)


@admin_router.get("/outbound/{wamid}", dependencies=[Depends(require_admin)])
async def admin_outbound(request: Request, wamid: str) -> Response:
    view = await run_in_threadpool(outbound_view, request.app.state.service.db, wamid)
    if view is None:
        return JSONResponse({"error": f"nothing known about {wamid}"}, status_code=404)
    return JSONResponse(view)


# ------------------------------------------------------------------------------------------ operator actions
class ActionRequest(BaseModel):
    """Every action: why (written to the audit log) and, optionally, who (recorded as admin-api:<actor>)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)
    actor: str | None = Field(default=None, max_length=80)

    @property
    def who(self) -> str:
        return f"admin-api:{self.actor.strip()}" if self.actor and self.actor.strip() else "admin-api"


class MoveRequest(ActionRequest):
    step: str = Field(min_length=1, max_length=100)


class OptOutRequest(ActionRequest):
    opted_out: bool


class EndHandoffRequest(ActionRequest):
    step: str | None = Field(default=None, min_length=1, max_length=100)


class ResolveRequest(ActionRequest):
    status: Literal["sent", "failed"]
    wamid: str | None = Field(default=None, min_length=1, max_length=256)


Body = TypeVar("Body", bound=ActionRequest)
ADMIN = [Depends(require_admin)]


def _refusal(error: operator.OperatorError) -> Response:
    return JSONResponse({"error": str(error)}, status_code=error.http_status)


async def _body(request: Request, model: type[Body]) -> Body | Response:
    """The request body as `model`, or a 422 whose error names each wrong field on one line."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)


async def _act(request: Request, model: type[Body], action: Callable[[Body], operator.Done], *,
               session: tuple[str, str] | None = None) -> Response:
    body = await _body(request, model)
    if isinstance(body, Response):
        return body
    try:
        done = await run_in_threadpool(action, body)
    except operator.OperatorError as e:
        return _refusal(e)
    answer: dict[str, Any] = asdict(done)
    if session is not None:
        answer["session"] = await run_in_threadpool(session_view, request.app.state.service.db, *session)
    return JSONResponse(answer)


def _now() -> datetime:
    return datetime.now(UTC)


@admin_router.post("/sessions/{phone_number_id}/{user_id}/reset", dependencies=ADMIN)
async def admin_reset(request: Request, phone_number_id: str, user_id: str) -> Response:
    engine = request.app.state.service.engine
    return await _act(request, ActionRequest, lambda b: operator.reset_session(
        engine.db, engine.flows, phone_number_id, user_id, actor=b.who, reason=b.reason, now=_now(),
    ), session=(phone_number_id, user_id))


@admin_router.post("/sessions/{phone_number_id}/{user_id}/move", dependencies=ADMIN)
async def admin_move(request: Request, phone_number_id: str, user_id: str) -> Response:
    engine = request.app.state.service.engine
    return await _act(request, MoveRequest, lambda b: operator.move_session(
        engine.db, engine.flows, phone_number_id, user_id, b.step, actor=b.who, reason=b.reason, now=_now(),
    ), session=(phone_number_id, user_id))


@admin_router.post("/sessions/{phone_number_id}/{user_id}/opt-out", dependencies=ADMIN)
async def admin_opt_out(request: Request, phone_number_id: str, user_id: str) -> Response:
    db = request.app.state.service.db
    return await _act(request, OptOutRequest, lambda b: operator.set_opt_out(
        db, phone_number_id, user_id, b.opted_out, actor=b.who, reason=b.reason, now=_now(),
    ), session=(phone_number_id, user_id))


@admin_router.post("/sessions/{phone_number_id}/{user_id}/end-handoff", dependencies=ADMIN)
async def admin_end_handoff(request: Request, phone_number_id: str, user_id: str) -> Response:
    engine = request.app.state.service.engine
    return await _act(request, EndHandoffRequest, lambda b: operator.end_handoff(
        engine.db, engine.flows, phone_number_id, user_id, step=b.step, actor=b.who, reason=b.reason, now=_now(),
    ), session=(phone_number_id, user_id))


@admin_router.post("/outbound/{outbox_id}/resolve", dependencies=ADMIN)
async def admin_resolve(request: Request, outbox_id: int) -> Response:
    db = request.app.state.service.db
    return await _act(request, ResolveRequest, lambda b: operator.resolve_send(
        db, outbox_id, b.status, wamid=b.wamid, actor=b.who, reason=b.reason, now=_now(),
    ))


@admin_router.get("/quarantine", dependencies=ADMIN)
async def admin_quarantine(
    request: Request,
    status: Literal["held", "retried", "dropped", "all"] = "held",
    limit: int = Query(default=200, ge=1, le=1000),
) -> Response:
    held = await run_in_threadpool(quarantine.list_quarantine, request.app.state.service.db,
                                   None if status == "all" else status, limit)
    return JSONResponse({"messages": [
        {**asdict(h), "first_seen_at": h.first_seen_at.isoformat(), "last_seen_at": h.last_seen_at.isoformat()}
        for h in held
    ]})


@admin_router.post("/quarantine/{entry_id}/retry", dependencies=ADMIN)
async def admin_quarantine_retry(request: Request, entry_id: int) -> Response:
    service = request.app.state.service
    body = await _body(request, ActionRequest)
    if isinstance(body, Response):
        return body
    try:
        result = await run_in_threadpool(lambda: operator.retry_quarantined(
            service.db, service.engine, [entry_id], actor=body.who, reason=body.reason, now=_now()))
    except operator.OperatorError as e:
        return _refusal(e)
    return JSONResponse({"summary": result.summary, "retried": result.retried, "still_rejected": [
        {"id": i, "reason": why} for i, why in result.still_rejected]})


@admin_router.post("/quarantine/{entry_id}/drop", dependencies=ADMIN)
async def admin_quarantine_drop(request: Request, entry_id: int) -> Response:
    db = request.app.state.service.db
    return await _act(request, ActionRequest, lambda b: operator.drop_quarantined(
        db, [entry_id], actor=b.who, reason=b.reason, now=_now(),
    ))
