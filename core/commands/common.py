"""What every command does first: read settings, open the database, bring the schema to head."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from core.config import Settings, get_settings
from core.db import Database
from core.migrate import ensure_schema


def open_database(settings: Settings | None = None) -> tuple[Settings, Database]:
    # Alembic's INFO lines ("Context impl ...") would come before a command's own output or its one error line.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = settings or get_settings()
    db = Database(settings.database_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow)
    db.ping()
    ensure_schema(db)
    return settings, db


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")
