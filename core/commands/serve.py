"""`serve`: the webhook + admin API under uvicorn (one process, or several with --workers)."""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

from core.commands.common import open_database


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the webhook server (also applies pending messages in the background)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes (each with its own pool and applier)"
    )
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    # Fail with one clear line before uvicorn starts, and migrate once rather than in every worker.
    settings, db = open_database()
    db.dispose()
    from core.webhook import create_app  # imported here: the other commands need not load the web stack

    if args.workers > 1:
        uvicorn.run(
            "core.webhook:app_factory", factory=True, host=args.host, port=args.port, workers=args.workers,
            access_log=False, log_level="info",
        )
    else:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, access_log=False, log_level="info")
    return 0
