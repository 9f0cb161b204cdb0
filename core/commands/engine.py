"""Engine commands: migrate, process-pending, replay, sessions show."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from sqlalchemy import select

from core.commands.common import open_database, print_json
from core.config import get_settings
from core.db import Database
from core.engine import Engine
from core.errors import WaflowError
from core.messages import InboundMessage
from core.migrate import ensure_schema, offline_sql
from core.models import InboundEvent
from core.views import session_view


def register(sub: Any) -> None:
    migrate = sub.add_parser("migrate", help="create or upgrade the schema")
    migrate.add_argument("--sql", action="store_true", help="print the PostgreSQL DDL instead of migrating")
    migrate.set_defaults(handler=cmd_migrate)

    pending = sub.add_parser("process-pending", help="apply every inbound message left pending")
    pending.set_defaults(handler=cmd_process_pending)

    replay = sub.add_parser("replay", help="re-apply stored inbound events into a fresh database")
    replay.add_argument("--from", dest="source", required=True, help="DATABASE_URL holding the events")
    replay.add_argument("--to", dest="target", help="fresh database (default: DATABASE_URL)")
    replay.set_defaults(handler=cmd_replay)

    sessions = sub.add_parser("sessions", help="inspect sessions")
    sessions_sub = sessions.add_subparsers(dest="sessions_command", required=True)
    show = sessions_sub.add_parser("show", help="print one session as JSON")
    show.add_argument("phone_number_id")
    show.add_argument("user_id")
    show.set_defaults(handler=cmd_sessions_show)


def _quiet_alembic() -> None:
    # Alembic logs two INFO lines each time it reads the schema version: an operator's error would then be
    # three lines on stderr instead of one. Our commands print their own one-line outcome.
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)


def cmd_migrate(args: argparse.Namespace) -> int:
    if args.sql:
        sys.stdout.write(offline_sql())
        return 0
    _quiet_alembic()
    _settings, db = open_database()
    print(f"schema at {', '.join(sorted(ensure_schema(db)))} on {db.safe_url}")
    return 0


def cmd_process_pending(_args: argparse.Namespace) -> int:
    _quiet_alembic()
    settings, db = open_database()
    report = Engine(db, settings=settings).process_pending_report()
    print(f"applied {report.applied} pending message(s)")
    # A message that cannot be applied is counted and skipped, never the end of the run for everyone else.
    if report.failed:
        print(f"{report.failed} message(s) failed to apply and stay pending: tried again by the next run (up to "
              f"APPLY_MAX_ATTEMPTS={settings.apply_max_attempts} times), then quarantined")
    if report.quarantined:
        print(f"{report.quarantined} message(s) quarantined after APPLY_MAX_ATTEMPTS failed tries: "
              "`python -m core quarantine list`")
    if report.errors:
        print(f"{report.errors} user(s) left pending after an error (logged); the others were applied")
    return 1 if report.errors else 0


def cmd_sessions_show(args: argparse.Namespace) -> int:
    _quiet_alembic()
    _settings, db = open_database()
    view = session_view(db, args.phone_number_id, args.user_id)
    if view is None:
        raise WaflowError(f"no session for {args.phone_number_id}/{args.user_id}")
    print_json(view)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    _quiet_alembic()
    settings = get_settings()
    target_url = args.target or settings.database_url
    if target_url == args.source:
        raise WaflowError("replay needs a fresh target database, not the source itself")
    source = Database(args.source)
    source.ping()
    _settings, target = open_database(settings.model_copy(update={"database_url": target_url}))
    engine = Engine(target, settings=settings)
    stored = replay_events(source, engine)
    applied = engine.process_pending()
    print(f"replayed {stored} event(s), applied {applied}")
    return 0


def replay_events(source: Database, engine: Engine, batch: int = 500) -> int:
    """Feed stored events, in arrival order, through the same ingest path the webhook uses."""
    stored = 0
    last_id = 0
    while True:
        with source.engine.connect() as conn:
            rows = conn.execute(
                select(InboundEvent.id, InboundEvent.message)
                .where(InboundEvent.id > last_id)
                .order_by(InboundEvent.id)
                .limit(batch)
            ).all()
        if not rows:
            return stored
        last_id = rows[-1].id
        result = engine.ingest([InboundMessage.model_validate(r.message) for r in rows])
        stored += result.stored
