"""Operator commands: `sessions reset|move|opt-out|opt-in|end-handoff`, `outbound uncertain|resolve` and
`quarantine list|retry|drop`. Each action goes through core.operator, so it refuses and audits exactly as the admin
API and the dashboard do; the actor is the operating-system user (`cli:<user>`)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from core import operator, quarantine
from core.audit import cli_actor
from core.commands.common import open_database
from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.flows import FlowRegistry, default_flows_dir, load_flows

REASON_HELP = "why (mandatory: written to the audit log with who and when)"


def register(sub: Any) -> None:
    _register_sessions(sub)
    _register_outbound(sub)
    _register_quarantine(sub)


def _session_action(parent: Any, name: str, help_text: str, handler: Callable[[argparse.Namespace], int]) -> Any:
    parser = parent.add_parser(name, help=help_text)
    parser.add_argument("phone_number_id")
    parser.add_argument("user_id")
    parser.add_argument("--reason", required=True, help=REASON_HELP)
    parser.set_defaults(handler=handler)
    return parser


def _sessions_subcommands(sub: Any) -> Any | None:
    """The `sessions` subcommands core.commands.engine declared (`sessions show`): ours go beside them. cli imports
    the modules of a command in COMMAND_MODULES order, engine first; without it `sessions` is not being run."""
    sessions = sub.choices.get("sessions")
    if sessions is None:
        return None
    return next(a for a in sessions._actions if isinstance(a, argparse._SubParsersAction))


def _register_sessions(sub: Any) -> None:
    sessions = _sessions_subcommands(sub)
    if sessions is None:
        return
    _session_action(sessions, "reset", "back to the flow's start (latest version), data cleared", cmd_reset)
    move = _session_action(sessions, "move", "move a user to a step of their flow (data kept)", cmd_move)
    move.add_argument("--step", required=True, help="a step of the session's flow")
    _session_action(sessions, "opt-out", "set the opt-out flag (no follow-ups)", cmd_opt_out)
    _session_action(sessions, "opt-in", "clear the opt-out flag", cmd_opt_in)
    handoff = _session_action(sessions, "end-handoff", "bring a user back from the hand-off step", cmd_end_handoff)
    handoff.add_argument("--step", help="where to (default: the step they were handed off from)")


def _register_outbound(sub: Any) -> None:
    outbound = sub.add_parser("outbound", help="outbound messages whose send's outcome is unknown")
    outbound_sub = outbound.add_subparsers(dest="outbound_command", required=True)
    listing = outbound_sub.add_parser("uncertain", help="list uncertain sends (the answer to the send was lost)")
    listing.add_argument("--limit", type=int, default=500)
    listing.set_defaults(handler=cmd_uncertain)
    resolve = outbound_sub.add_parser("resolve", help="settle an uncertain send as sent or failed")
    resolve.add_argument("outbox_id", type=int)
    resolve.add_argument("--as", dest="status", required=True, choices=operator.RESOLUTIONS)
    resolve.add_argument("--wamid", help="the wamid WhatsApp gave it (with --as sent)")
    resolve.add_argument("--reason", required=True, help=REASON_HELP)
    resolve.set_defaults(handler=cmd_resolve)


def _register_quarantine(sub: Any) -> None:
    held = sub.add_parser("quarantine", help="messages held because they could not be taken or applied")
    held_sub = held.add_subparsers(dest="quarantine_command", required=True)
    listing = held_sub.add_parser("list", help="quarantined messages, newest first")
    listing.add_argument("--status", choices=[*quarantine.STATUSES, "all"], default="held")
    listing.add_argument("--limit", type=int, default=200)
    listing.set_defaults(handler=cmd_quarantine_list)
    for name, handler, help_text in (
        ("retry", cmd_quarantine_retry, "put held messages back on their path (applied exactly once)"),
        ("drop", cmd_quarantine_drop, "close held messages for good"),
    ):
        action = held_sub.add_parser(name, help=help_text)
        action.add_argument("ids", nargs="+", type=int, metavar="ID")
        action.add_argument("--reason", required=True, help=REASON_HELP)
        action.set_defaults(handler=handler)


# ------------------------------------------------------------------------------------------ handlers
def _open() -> tuple[Settings, Database]:
    # Alembic logs INFO lines each time it reads the schema version; a refusal must stay one line on stderr.
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
    return open_database()


def _flows(settings: Settings) -> FlowRegistry:
    return load_flows(settings.flows_dir or default_flows_dir())


def _now() -> datetime:
    return datetime.now(UTC)


def _done(done: operator.Done) -> int:
    print(done.summary)
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    settings, db = _open()
    return _done(operator.reset_session(db, _flows(settings), args.phone_number_id, args.user_id, actor=cli_actor(),
                                        reason=args.reason, now=_now()))


def cmd_move(args: argparse.Namespace) -> int:
    settings, db = _open()
    return _done(operator.move_session(db, _flows(settings), args.phone_number_id, args.user_id, args.step,
                                       actor=cli_actor(), reason=args.reason, now=_now()))


def cmd_opt_out(args: argparse.Namespace) -> int:
    _settings, db = _open()
    return _done(operator.set_opt_out(db, args.phone_number_id, args.user_id, True, actor=cli_actor(),
                                      reason=args.reason, now=_now()))


def cmd_opt_in(args: argparse.Namespace) -> int:
    _settings, db = _open()
    return _done(operator.set_opt_out(db, args.phone_number_id, args.user_id, False, actor=cli_actor(),
                                      reason=args.reason, now=_now()))


def cmd_end_handoff(args: argparse.Namespace) -> int:
    settings, db = _open()
    return _done(operator.end_handoff(db, _flows(settings), args.phone_number_id, args.user_id, step=args.step,
                                      actor=cli_actor(), reason=args.reason, now=_now()))


def cmd_uncertain(args: argparse.Namespace) -> int:
    _settings, db = _open()
    rows = operator.uncertain_sends(db, args.limit)
    print_table(
        ["id", "number", "user", "kind", "started", "wamid", "what"],
        [[r.id, r.phone_number_id, r.user_id, r.kind, _when(r.send_started_at), r.wamid or "",
          _cut(r.text or r.template or "")] for r in rows],
        empty="no uncertain sends",
    )
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    _settings, db = _open()
    return _done(operator.resolve_send(db, args.outbox_id, args.status, wamid=args.wamid, actor=cli_actor(),
                                       reason=args.reason, now=_now()))


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    _settings, db = _open()
    held = quarantine.list_quarantine(db, None if args.status == "all" else args.status, args.limit)
    print_table(
        ["id", "stage", "status", "number", "user", "wamid", "seen", "last seen", "reason"],
        [[h.id, h.stage, h.status, h.phone_number_id or "", h.user_id or "", _cut(h.wamid or "", 30), h.seen,
          _when(h.last_seen_at), _cut(h.reason, 60)] for h in held],
        empty=f"no {args.status} quarantined messages" if args.status != "all" else "no quarantined messages",
    )
    return 0


def cmd_quarantine_retry(args: argparse.Namespace) -> int:
    settings, db = _open()
    result = operator.retry_quarantined(db, Engine(db, settings=settings), args.ids, actor=cli_actor(),
                                        reason=args.reason, now=_now())
    print(result.summary)
    # Some messages still break a bound: a script must notice, though the others were retried.
    return 1 if result.still_rejected else 0


def cmd_quarantine_drop(args: argparse.Namespace) -> int:
    _settings, db = _open()
    return _done(operator.drop_quarantined(db, args.ids, actor=cli_actor(), reason=args.reason, now=_now()))


# ------------------------------------------------------------------------------------------ output
def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else ""


def _cut(text: str, limit: int = 40) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, empty: str) -> None:
    """Aligned columns, one row a line (for people; `sessions show` and the admin API are for machines)."""
    if not rows:
        print(empty)
        return
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
