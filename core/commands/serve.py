"""`serve`: the webhook + admin API under uvicorn (one process, or several with --workers)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from core.commands.common import open_database
from core.engine import Engine
from core.httpserver import LimitedHttpToolsProtocol
from core.metrics import MULTIPROCESS_DIR_ENV

# Every uvicorn we start: the protocol with the head-size cap and deadline, no access log (it would log every
# webhook POST), no `server: uvicorn` header telling a scanner what to try.
UVICORN_OPTIONS: dict[str, Any] = {
    "http": LimitedHttpToolsProtocol, "access_log": False, "log_level": "info", "server_header": False,
}


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the webhook server (also applies pending messages in the background)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_bounded(1, 65535), default=8000)
    serve.add_argument(
        "--workers", type=_bounded(1, 256), default=1,
        help="uvicorn worker processes (each with its own pool and applier)",
    )
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    # Fail with one clear line before uvicorn starts, and migrate once rather than in every worker.
    settings, db = open_database()
    flows = Engine(db, settings=settings).flows  # a missing FLOWS_DIR or an unknown routed flow: one line, here
    db.dispose()
    from core.webhook import create_app  # imported here: the other commands need not load the web stack

    if args.workers > 1:
        with _shared_metrics_dir():
            uvicorn.run(
                "core.webhook:app_factory", factory=True, host=args.host, port=args.port, workers=args.workers,
                **UVICORN_OPTIONS,
            )
    else:
        uvicorn.run(create_app(settings, flows=flows), host=args.host, port=args.port, **UVICORN_OPTIONS)
    return 0


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range ({low} to {high})")
        return value

    return parse


@contextmanager
def _shared_metrics_dir() -> Iterator[None]:
    """Worker processes write their metrics to one directory so that /metrics sums them (prometheus-client's
    multiprocess mode). An operator's own PROMETHEUS_MULTIPROC_DIR is used as it is (empty it at each start)."""
    if os.environ.get(MULTIPROCESS_DIR_ENV):
        yield
        return
    directory = tempfile.mkdtemp(prefix="waflow-metrics-")
    os.environ[MULTIPROCESS_DIR_ENV] = directory  # inherited by the workers uvicorn spawns
    try:
        yield
    finally:
        del os.environ[MULTIPROCESS_DIR_ENV]
        shutil.rmtree(directory, ignore_errors=True)
