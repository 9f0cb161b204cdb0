"""Database access: one `Database` per process, wrapping a SQLAlchemy engine for SQLite or PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import DatabaseUnavailableError

SQLITE_BUSY_TIMEOUT_SECONDS = 30.0


class Database:
    """Owns the engine and hands out short transactions. Safe to share across threads."""

    def __init__(self, url: str, *, pool_size: int = 10, max_overflow: int = 20) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.is_postgres = self.url.get_backend_name() == "postgresql"
        if not (self.is_sqlite or self.is_postgres):
            raise DatabaseUnavailableError(f"unsupported DATABASE_URL backend {self.url.get_backend_name()!r}")
        self.engine = _sqlite_engine(url) if self.is_sqlite else _postgres_engine(url, pool_size, max_overflow)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # PostgreSQL's default READ COMMITTED gives each statement its own snapshot: a view built from several
        # statements could show a session's step from one moment and its history from another.
        consistent = self.engine if self.is_sqlite else self.engine.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
        self.snapshots = sessionmaker(consistent, expire_on_commit=False)
        self.autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction on a Core connection (SQLite: BEGIN IMMEDIATE, i.e. the single writer lock)."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def single_statement(self) -> Iterator[Connection]:
        """For one statement that is atomic on its own: on PostgreSQL it runs in autocommit, saving the
        BEGIN and COMMIT round trips; on SQLite it is an ordinary (immediate) transaction."""
        if self.is_sqlite:
            with self.begin() as conn:
                yield conn
            return
        with self.autocommit.connect() as conn:
            yield conn

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as orm_session, orm_session.begin():
            yield orm_session

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        """A read-only ORM session whose every statement sees the same committed state (PostgreSQL: one
        REPEATABLE READ, READ ONLY transaction; SQLite: one transaction is already one snapshot)."""
        with self.snapshots() as orm_session, orm_session.begin():
            yield orm_session

    def ping(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except (OperationalError, DBAPIError) as e:
            raise DatabaseUnavailableError(f"database unreachable at {self.safe_url}: {first_line(e)}") from e

    @property
    def safe_url(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()


def insert_for(dialect: str) -> Any:
    """The dialect's INSERT construct (PostgreSQL or SQLite): both offer ON CONFLICT DO NOTHING / DO UPDATE."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def first_line(error: BaseException) -> str:
    message = str(getattr(error, "orig", None) or error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def _sqlite_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.database and parsed.database != ":memory:":
        try:
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatabaseUnavailableError(f"cannot create the SQLite directory for {url}: {e.strerror}") from e
    # hide_parameters: a failed statement's values are user data (numbers, texts); errors, logs and the
    # quarantine's reasons name the statement and the problem, never the values.
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
                           hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so that our BEGIN IMMEDIATE below is the only BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_SECONDS * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # SQLite has one writer: taking the write lock at BEGIN (instead of at the first write) means a
        # read-then-write transaction can never be overtaken between its read and its write.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _postgres_engine(url: str, pool_size: int, max_overflow: int) -> Engine:
    return create_engine(
        url,
        hide_parameters=True,
        pool_size=pool_size,
        max_overflow=max_overflow,
        # No pre-ping: it costs a round trip per transaction on the hot path. A connection broken by a
        # server restart fails once (callers answer 503 / retry) and SQLAlchemy then invalidates the pool.
        pool_pre_ping=False,
        connect_args={"connect_timeout": 5},
    )
