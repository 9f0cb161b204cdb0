"""The migrations, the models and the reviewed SQL in sql/ describe one schema."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from core.db import Database
from core.migrate import ensure_schema, head_revisions, offline_sql
from core.models import Base

SQL_FILE = Path(__file__).resolve().parent.parent / "sql" / "schema.postgresql.sql"


def test_migrated_schema_matches_the_models(db: Database) -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": False})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_migrate_is_idempotent(db: Database) -> None:
    assert ensure_schema(db) == head_revisions()
    assert ensure_schema(db) == head_revisions()


def test_reviewed_sql_is_the_migration_output() -> None:
    # Regenerate with: .venv/bin/python -m core migrate --sql > sql/schema.postgresql.sql
    assert SQL_FILE.read_text() == offline_sql()
