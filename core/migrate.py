"""Schema migrations (Alembic, shipped inside the package) and `ensure_schema` for every command."""

from __future__ import annotations

import io
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from core.db import Database, first_line
from core.errors import DatabaseUnavailableError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any fixed number works; it only has to be the same in every process that migrates.
MIGRATION_LOCK_KEY = 0x7761666C  # "wafl"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def offline_sql(url: str = "postgresql+psycopg://") -> str:
    """The full migration DDL for a dialect, as reviewed in sql/schema.postgresql.sql."""
    buffer = io.StringIO()
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["output_buffer"] = buffer
    command.upgrade(config, "heads", sql=True)
    return buffer.getvalue()


def head_revisions() -> set[str]:
    # Parts of the product add their tables on branches of their own from 0001; all heads are applied.
    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_revisions(db: Database) -> set[str]:
    with db.engine.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads())


def ensure_schema(db: Database) -> set[str]:
    """Bring the schema to head. Cheap when already there; safe when several processes start at once."""
    try:
        heads = head_revisions()
        if current_revisions(db) == heads:
            return heads
        config = alembic_config()
        with db.engine.begin() as conn:
            if db.is_postgres:
                # Two processes starting together must not both create the tables.
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            config.attributes["connection"] = conn
            command.upgrade(config, "heads")
    except (OperationalError, DBAPIError) as e:
        raise DatabaseUnavailableError(f"cannot migrate {db.safe_url}: {first_line(e)}") from e
    return heads
