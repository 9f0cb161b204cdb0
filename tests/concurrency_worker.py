"""Worker processes for the concurrency tests: each has its own engine and connection pool."""

from __future__ import annotations

import time
from pathlib import Path

from core.config import Settings
from core.db import Database
from core.engine import Engine
from core.flows import load_flows
from core.messages import InboundMessage


def deliver_all(
    database_url: str, flows_dir: str, messages: list[dict[str, object]], start_at: float, lock_sessions: bool
) -> int:
    """Deliver each message like the webhook does (store, then apply that user), starting all workers together."""
    settings = Settings(database_url=database_url, flows_dir=Path(flows_dir), default_flow="counter")
    db = Database(database_url, pool_size=2, max_overflow=0)
    engine = Engine(db, load_flows(flows_dir), settings, lock_sessions=lock_sessions)
    parsed = [InboundMessage.model_validate(m) for m in messages]
    time.sleep(max(0.0, start_at - time.time()))
    applied = 0
    for message in parsed:
        result = engine.ingest([message])
        for key in result.session_keys:
            applied += engine.apply_all(key)
    db.dispose()
    return applied
