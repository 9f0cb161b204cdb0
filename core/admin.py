"""Operations endpoints: health, Prometheus metrics and the read-only admin API (bearer token)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from core import metrics
from core.errors import DatabaseUnavailableError
from core.views import outbound_view, session_view

ops_router = APIRouter()
admin_router = APIRouter(prefix="/admin")


@ops_router.get("/healthz")
async def healthz(request: Request) -> Response:
    db = request.app.state.service.db
    try:
        await run_in_threadpool(db.ping)
    except DatabaseUnavailableError as e:
        return JSONResponse({"status": "unavailable", "error": str(e)}, status_code=503)
    return JSONResponse({"status": "ok", "database": db.url.get_backend_name()})


@ops_router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    service = request.app.state.service
    try:
        await run_in_threadpool(service.refresh_gauges)
    except DatabaseUnavailableError:
        pass  # the process metrics are still worth serving while the database is down
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
