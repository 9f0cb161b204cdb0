"""`python -m jobs`: run the scheduler; `python -m jobs --once JOB` runs one job now and exits."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from prometheus_client import start_http_server

from core.commands.common import open_database
from core.startup import explain, log_level
from jobs.scheduler import JOBS, JobContext, run_once, serve


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m jobs", description="waflow jobs: archive, follow-ups, outbox sender, sweeper")
    parser.add_argument("--once", choices=sorted(JOBS), help="run one job now and exit")
    parser.add_argument("--log-level", default="INFO", type=log_level)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings, db = open_database()
        context = JobContext(settings, db)
        # Built now so that a missing FLOWS_DIR or an unknown flow in FLOW_ROUTES stops the start with one line,
        # not every sweeper run later.
        _ = context.engine
        if args.once:
            outcome = run_once(context, args.once)
            print(json.dumps({"job": args.once, "status": outcome.status, "result": outcome.result,
                              "reason": outcome.reason}, default=str))
            return 1 if outcome.status == "error" else 0
        if settings.jobs_metrics_port:
            # The sender's and the jobs' metrics live in this process, not in the webhook's /metrics.
            start_http_server(settings.jobs_metrics_port, addr=settings.jobs_metrics_host)
        stop = threading.Event()

        def _stop(signum: int, _frame: FrameType | None) -> None:
            logging.getLogger("jobs").info("signal %s: stopping", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        serve(context, stop)
        return 0
    except Exception as e:
        # A bad setting, database URL or flow, an unreachable database: one line, no traceback. A bug keeps its.
        line = explain(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
