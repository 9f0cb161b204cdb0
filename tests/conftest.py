"""Fixtures: every database test runs on SQLite and PostgreSQL, each test in a database of its own.

Schemas are built once per run by the real migrations into a template (a SQLite file / a PostgreSQL
template database) and copied per test, so tests are isolated without a delete-everything teardown.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.flows import FlowRegistry, load_flows
from core.migrate import ensure_schema

ROOT = Path(__file__).resolve().parent.parent
TEST_FLOWS = ROOT / "tests" / "data" / "flows"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
RUN_ID = uuid.uuid4().hex[:8]


def pg_admin_url() -> str:
    return os.environ.get("TEST_DATABASE_URL", DEFAULT_PG_URL)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


class PgServer:
    """Creates and drops per-test databases on the PostgreSQL server named by TEST_DATABASE_URL."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = make_url(admin_url)
        self.admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT", pool_size=2)
        self.template = f"waflow_tpl_{RUN_ID}"

    def url_for(self, name: str) -> str:
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def create(self, name: str, template: str | None = None) -> str:
        suffix = f' TEMPLATE "{template}"' if template else ""
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"{suffix}'))
        return self.url_for(name)

    def drop(self, name: str) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer(pg_admin_url())
    try:
        with server.admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 - any connection failure means "no PostgreSQL here"
        message = f"PostgreSQL unreachable at {server.admin_url.render_as_string()}: {e}"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    url = server.create(server.template)
    db = Database(url)
    ensure_schema(db)
    db.dispose()
    yield server
    server.drop(server.template)
    server.admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    db = Database(f"sqlite:///{path}")
    ensure_schema(db)
    db.dispose()
    return path


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    name = f"waflow_t_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    url = pg_server.create(name, template=pg_server.template)
    yield url
    pg_server.drop(name)


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "waflow.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """The same test on both backends."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def flows_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped flows plus the test-only counter flow."""
    directory = tmp_path_factory.mktemp("flows")
    for path in [*(ROOT / "flows").glob("*.yaml"), TEST_FLOWS / "counter.yaml"]:
        shutil.copyfile(path, directory / path.name)
    return directory


@pytest.fixture(scope="session")
def registry(flows_dir: Path) -> FlowRegistry:
    return load_flows(flows_dir)


def make_settings(database_url: str, flows_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "flows_dir": flows_dir,
        "default_flow": "lead_qualification",
        "flow_routes": "",
        "whatsapp_app_secret": "test-app-secret",
        "whatsapp_verify_token": "test-verify-token",
        "admin_token": "test-admin-token",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(database_url: str, flows_dir: Path) -> Settings:
    return make_settings(database_url, flows_dir)


@pytest.fixture
def engine(db: Database, registry: FlowRegistry, settings: Settings) -> Engine:
    return Engine(db, registry, settings)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric_total(exposition: str, sample: str, **labels: str) -> float:
    """The sum of one sample's values in Prometheus text, over series carrying `labels`."""
    return sum(
        s.value for family in text_string_to_metric_families(exposition) for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )
