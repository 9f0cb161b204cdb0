"""Analytics commands: funnel, export-stalled, hash-password (for DASHBOARD_USERS)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from core import analytics, csvsafe
from core.auth import hash_password
from core.campaigns import parse_duration
from core.commands.common import open_database
from core.errors import WaflowError
from core.flows import default_flows_dir, load_flows

# WhatsApp timestamps are Unix seconds, so nothing is older than 1970; the last day leaves room for the day after.
FIRST_DAY, LAST_DAY = date(1970, 1, 1), date(9999, 12, 30)


def register(sub: Any) -> None:
    funnel = sub.add_parser("funnel", help="per-step funnel of a flow (the dashboard's numbers)")
    funnel.add_argument("--flow", required=True)
    funnel.add_argument("--since", type=_date, help="first day (UTC) of entry into the flow, YYYY-MM-DD")
    funnel.add_argument("--until", type=_date, help="last day (UTC, inclusive), YYYY-MM-DD")
    funnel.add_argument("--window", type=_duration, help="conversion window, e.g. 24h, 7d (default: none)")
    funnel.add_argument("--format", choices=("table", "csv", "json"), default="table")
    funnel.set_defaults(handler=cmd_funnel)

    stalled = sub.add_parser("export-stalled", help="write users idle in a step to a CSV file")
    stalled.add_argument("--step", required=True)
    stalled.add_argument("--idle", required=True, type=_duration, help="idle at least this long, e.g. 2h, 3d")
    stalled.add_argument("--out", required=True, type=Path)
    stalled.add_argument("--flow")
    stalled.set_defaults(handler=cmd_export_stalled)

    hashed = sub.add_parser("hash-password", help="hash a dashboard password for DASHBOARD_USERS")
    hashed.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    hashed.add_argument("--user", help="also print the whole DASHBOARD_USERS entry for this user")
    hashed.add_argument("--role", choices=("admin", "viewer"), default="viewer")
    hashed.set_defaults(handler=cmd_hash_password)


def _date(text: str) -> date:
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid date {text!r}: use YYYY-MM-DD") from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise argparse.ArgumentTypeError(f"date {text} out of range: use a day from {FIRST_DAY} to {LAST_DAY}")
    return day


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def day_range(since: date | None, until: date | None) -> tuple[datetime | None, datetime | None]:
    """Inclusive UTC days → the half-open [since, until) range the analytics functions take."""
    start = datetime.combine(since, time(), UTC) if since else None
    end = datetime.combine(until, time(), UTC) + timedelta(days=1) if until else None
    return start, end


def cmd_funnel(args: argparse.Namespace) -> int:
    settings, db = open_database()
    flow = load_flows(settings.flows_dir or default_flows_dir()).latest(args.flow)
    since, until = day_range(args.since, args.until)
    frame = analytics.funnel(db, flow, analytics.Filters(since=since, until=until), window_seconds=args.window)
    frame = frame.drop(columns=["segment"])
    if args.format == "json":
        records = json.loads(frame.to_json(orient="records"))
        json.dump(records, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.format == "csv":
        csvsafe.write_csv(frame, sys.stdout)
    else:
        print(_table(frame) if not frame.empty else f"no users entered {args.flow} in that range")
    return 0


def _table(frame: pd.DataFrame) -> str:
    shown = frame.astype(object).where(frame.notna(), "-")
    return shown.to_string(index=False)


def cmd_export_stalled(args: argparse.Namespace) -> int:
    _settings, db = open_database()
    query = analytics.StalledQuery(
        now=datetime.now(UTC), idle_seconds=args.idle, flow=args.flow, step=args.step, limit=None
    )
    frame = analytics.stalled_users(db, query)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        csvsafe.write_csv(frame, args.out)
    except OSError as e:
        raise WaflowError(f"cannot write {args.out}: {e}") from e
    print(f"wrote {len(frame)} user(s) to {args.out}")
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise WaflowError("the two passwords differ")
    if not password:
        raise WaflowError("the password must not be empty")
    encoded = hash_password(password)
    print(f"{args.user}:{args.role}:{encoded}" if args.user else encoded)
    return 0
