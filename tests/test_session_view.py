"""The admin session view (and `sessions show`) reads one snapshot, even while the user's messages are applied."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from core.db import Database
from core.engine import Engine
from core.flows import FlowRegistry
from core.views import session_view
from tests.conftest import make_settings
from tests.factories import BASE_TS, PHONE, text


def test_session_view_is_never_torn_by_a_concurrent_writer(database_url: str, flows_dir: Path,
                                                           registry: FlowRegistry) -> None:
    """Each applied message bumps `version`, adds one inbound message, one transition and one reply, and
    counts in `data`: a view mixing two moments breaks one of these equalities."""
    settings = make_settings(database_url, flows_dir, default_flow="counter")
    db = Database(database_url)
    engine = Engine(db, registry, settings)
    reading, done = threading.Event(), threading.Event()
    writes = 0

    def write() -> None:
        nonlocal writes
        try:
            reading.wait(10)
            for i in range(150):
                result = engine.ingest([text("u", f"m{i}", BASE_TS + i)])
                for key in result.session_keys:
                    engine.apply_all(key)
                writes += 1
                time.sleep(0.001)  # lets the reader in between writes even on a loaded machine (SQLite: one lock)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen: list[int] = []
    try:
        while not done.is_set() or not seen:
            view = session_view(db, PHONE, "u")
            reading.set()
            if view is None:
                continue
            version = view["version"]
            seen.append(version)
            assert len(view["transitions"]) == version, view["transitions"][-3:]
            assert len(view["inbound"]) == version
            assert view["data"] == {"count": version}
            assert len(view["outbound"]) == version
            assert view["transitions"][-1]["wamid"] == view["inbound"][-1]["wamid"]
    finally:
        writer.join()
        db.dispose()
    assert writes == 150
    assert any(0 < version < 150 for version in seen)  # some views were taken while the writer was writing
