"""Alembic environment: migrations run on the connection `core.migrate` hands in (or DATABASE_URL)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from core.config import get_settings
from core.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    if context.is_offline_mode():
        # `core.migrate.offline_sql`: render the DDL for review (sql/schema.postgresql.sql) without a database.
        context.configure(
            url=config.get_main_option("sqlalchemy.url"),
            target_metadata=target_metadata,
            literal_binds=True,
            output_buffer=config.attributes.get("output_buffer"),
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(get_settings().database_url)
        with engine.connect() as conn:
            _run(conn)
        return
    _run(connection)


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
