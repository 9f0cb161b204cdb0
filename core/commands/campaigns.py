"""Follow-up campaign commands (add, list, pause, resume, results, preview) and send pauses (sending ...)."""

from __future__ import annotations

import argparse
import logging
from datetime import UTC, datetime
from typing import Any

from core import campaigns as api
from core.commands.common import open_database
from core.config import Settings
from core.db import Database
from core.errors import WaflowError
from core.flows import default_flows_dir, load_flows
from core.whatsapp import paused_numbers, resume_sending

LIST_COLUMNS = ("id", "name", "active", "flow", "step", "after", "message", "max_sends", "quiet")
COST_LABELS = {"campaign": "campaign", "category": "pricing category", "messages": "messages",
               "billable": "billable"}


def register(sub: Any) -> None:
    campaigns = sub.add_parser("campaigns", help="follow-up campaigns to users stalled in a step")
    commands = campaigns.add_subparsers(dest="campaigns_command", required=True)

    add = commands.add_parser("add", help="create a campaign")
    add.add_argument("--name", required=True)
    add.add_argument("--flow", required=True)
    add.add_argument("--step", required=True)
    add.add_argument("--after", required=True, help="delay since the user's last message: 90s, 30m, 2h, 3d, 1h30m")
    add.add_argument("--text", help="free text (only inside the 24 h window); {key} is filled from session data "
                     "or {profile_name}, {key|fallback} falls back when the user has no value")
    add.add_argument("--template", help="approved template name (used outside the 24 h window)")
    add.add_argument("--language", help="template language code, e.g. en_US")
    add.add_argument("--param", action="append", default=[],
                     help='template body parameter: a literal, "{key}" or "{key|fallback}"')
    add.add_argument("--max-sends", type=int, default=1)
    add.add_argument("--quiet", help="quiet hours HH:MM-HH:MM in --timezone, e.g. 21:00-08:00")
    add.add_argument("--timezone", help="IANA timezone of the quiet hours (default: QUIET_HOURS_TIMEZONE, UTC)")
    add.add_argument("--only-language", help="only sessions in this language")
    add.add_argument("--only-number", help="only sessions of this business phone_number_id")
    add.add_argument("--recovery-window", help="a user who advances within this after a follow-up is 'recovered' "
                     "(default: RECOVERY_WINDOW_HOURS, 48h)")
    add.add_argument("--inactive", action="store_true", help="create paused")
    add.set_defaults(handler=cmd_add)

    listing = commands.add_parser("list", help="list campaigns")
    listing.set_defaults(handler=cmd_list)

    for name, active in (("pause", False), ("resume", True)):
        toggle = commands.add_parser(name, help=f"{name} a campaign")
        toggle.add_argument("campaign", help="name or id")
        toggle.set_defaults(handler=cmd_set_active, active=active)

    results = commands.add_parser("results", help="targeted, sent, delivered, read, failed, replied, recovered, "
                                  "skipped, cancelled (and why), cost by Meta pricing category")
    results.add_argument("campaign", nargs="?", help="name or id (default: all)")
    results.set_defaults(handler=cmd_results)

    preview = commands.add_parser("preview", help="who a campaign would reach, when and as what")
    preview.add_argument("campaign", help="name or id")
    preview.set_defaults(handler=cmd_preview)

    sending = sub.add_parser("sending", help="business numbers whose sending is paused after an account error")
    sending_commands = sending.add_subparsers(dest="sending_command", required=True)
    paused = sending_commands.add_parser("paused", help="list paused business numbers and why")
    paused.set_defaults(handler=cmd_paused)
    resume = sending_commands.add_parser("resume", help="resume sending from a business number")
    resume.add_argument("phone_number_id")
    resume.set_defaults(handler=cmd_resume_sending)


def _open_database() -> tuple[Settings, Database]:
    # Alembic logs two INFO lines each time it reads the schema version: an operator's error (a typo in a
    # placeholder, a taken name) would then be three lines on stderr instead of one.
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
    return open_database()


def _duration(text: str, option: str) -> int:
    try:
        return api.parse_duration(text)
    except ValueError as e:
        raise WaflowError(f"{option}: {e}") from e


def _quiet(text: str | None) -> tuple[str | None, str | None]:
    if text is None:
        return None, None
    start, sep, end = text.partition("-")
    if not sep:
        raise WaflowError(f"--quiet: expected HH:MM-HH:MM, got {text!r}")
    return start.strip(), end.strip()


def cmd_add(args: argparse.Namespace) -> int:
    settings, db = _open_database()
    quiet_start, quiet_end = _quiet(args.quiet)
    spec = api.build_spec(
        name=args.name, flow=args.flow, step=args.step, delay_seconds=_duration(args.after, "--after"),
        text=args.text, template_name=args.template, template_language=args.language, template_params=args.param,
        max_sends=args.max_sends, quiet_start=quiet_start, quiet_end=quiet_end,
        timezone=args.timezone or settings.quiet_hours_timezone, active=not args.inactive,
        filter_language=args.only_language, filter_phone_number_id=args.only_number,
        recovery_window_seconds=(
            _duration(args.recovery_window, "--recovery-window") if args.recovery_window
            else int(settings.recovery_window_hours * 3600)
        ),
    )
    flows = load_flows(settings.flows_dir or default_flows_dir())
    campaign = api.create_campaign(db, spec, flows)
    print(f"campaign {campaign.id} {campaign.name!r} created ({'active' if campaign.active else 'paused'})")
    return 0


def _describe(c: Any) -> dict[str, str]:
    message = []
    if c.text:
        message.append(f"text {c.text[:40]!r}")
    if c.template_name:
        message.append(f"template {c.template_name}/{c.template_language}")
    return {
        "id": str(c.id), "name": c.name, "active": "yes" if c.active else "no", "flow": c.flow, "step": c.step,
        "after": _format_seconds(c.delay_seconds), "message": " + ".join(message), "max_sends": str(c.max_sends),
        "quiet": f"{c.quiet_start}-{c.quiet_end} {c.timezone}" if c.quiet_start else "-",
    }


def _format_seconds(seconds: int) -> str:
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def print_table(rows: list[dict[str, str]], columns: tuple[str, ...]) -> None:
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())


def cmd_list(_args: argparse.Namespace) -> int:
    _settings, db = _open_database()
    rows = [_describe(c) for c in api.list_campaigns(db)]
    if not rows:
        print("no campaigns")
        return 0
    print_table(rows, LIST_COLUMNS)
    return 0


def cmd_set_active(args: argparse.Namespace) -> int:
    _settings, db = _open_database()
    campaign = api.set_active(db, args.campaign, args.active)
    print(f"campaign {campaign.id} {campaign.name!r} {'resumed' if campaign.active else 'paused'}")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    _settings, db = _open_database()
    frame = api.campaign_results(db, args.campaign, datetime.now(UTC))
    if frame.empty:
        print("no campaigns")
        return 0
    print(frame.to_string(index=False))
    for row in frame[frame["cancelled"] > 0].itertuples():
        print(f"\ncancelled before sending, {row.campaign}:")
        print(api.cancellations_by_reason(db, int(row.campaign_id)).to_string(index=False))
    _print_costs(db, frame)
    return 0


def _print_costs(db: Database, results: Any) -> None:
    """Meta's pricing of the campaigns' messages: one table, a row per campaign and category."""
    import pandas as pd
    costs = [
        api.campaign_costs(db, int(row.campaign_id)).assign(campaign=row.campaign)
        for row in results.itertuples()
    ]
    table = pd.concat([c for c in costs if not c.empty] or [pd.DataFrame(columns=["campaign", *api.COST_COLUMNS])])
    print("\ncost (follow-ups by Meta pricing category):")
    if table.empty:
        print("no pricing reported yet")
        return
    print(table.rename(columns=COST_LABELS)[list(COST_LABELS.values())].to_string(index=False))


def cmd_preview(args: argparse.Namespace) -> int:
    _settings, db = _open_database()
    frame = api.preview_targets(db, args.campaign, datetime.now(UTC))
    if frame.empty:
        print("no session is in that step")
        return 0
    print(f"cost estimate: {api.preview_cost(frame).describe()}\n")
    print(frame.to_string(index=False))
    return 0


def cmd_paused(_args: argparse.Namespace) -> int:
    _settings, db = _open_database()
    paused = paused_numbers(db)
    if not paused:
        print("no business number is paused")
    for p in paused:
        print(f"{p['phone_number_id']}  code {p['error_code']}  since {p['paused_at'].isoformat()}  {p['reason']}")
    return 0


def cmd_resume_sending(args: argparse.Namespace) -> int:
    _settings, db = _open_database()
    if not resume_sending(db, args.phone_number_id):
        raise WaflowError(f"{args.phone_number_id} is not paused")
    print(f"sending from {args.phone_number_id} resumed")
    return 0
