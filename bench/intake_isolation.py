"""Intake isolation benchmark: how long one huge POST holds the others, on a real `python -m core serve`.

    .venv/bin/python bench/intake_isolation.py [--backend postgresql|sqlite|both] [--statuses 5000]
                                               [--interval 0.05] [--baseline-seconds 3]

For each backend: a fresh database (PostgreSQL on BENCH_DATABASE_URL / TEST_DATABASE_URL, default
postgresql+psycopg://postgres@127.0.0.1:5432/test, or a temporary SQLite file) and a server on a free loopback
port. A probe sends one clean signed message POST every --interval seconds on its own keep-alive connection and
times each answer:

1. baseline: the probe alone for --baseline-seconds;
2. big:      one POST of --statuses delivery statuses (about 150 bytes each) on another connection, the probe
             running until it is answered.

The figure is the delay a concurrent POST suffers: the probe's worst answer while the big POST was in flight,
minus the baseline median. Target: under 1 s on both databases. Also printed: how long the big POST itself
took (its statuses are stored before its 200), and that every probe message was stored and applied once.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

# The webhook benchmark's server (same secret, env and health wait); bench/ is this script's own directory.
from webhook import SECRET, free_port, start_server  # noqa: E402

from core.signature import sign  # noqa: E402

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PN = "100000000000111"
TS = 1_767_268_800


def envelope(messages: list[dict[str, Any]], statuses: list[dict[str, Any]] | None = None) -> bytes:
    value: dict[str, Any] = {"messaging_product": "whatsapp",
                             "metadata": {"display_phone_number": "15550001111", "phone_number_id": PN}}
    if messages:
        value["contacts"] = [{"profile": {"name": "Probe"}, "wa_id": m["from"]} for m in messages]
        value["messages"] = messages
    if statuses:
        value["statuses"] = statuses
    doc = {"object": "whatsapp_business_account",
           "entry": [{"id": "109876543210001", "changes": [{"field": "messages", "value": value}]}]}
    return json.dumps(doc, separators=(",", ":")).encode()


def probe_body(wamid: str, user: str) -> bytes:
    return envelope([{"from": user, "id": wamid, "timestamp": str(TS), "type": "text", "text": {"body": "hi"}}])


def big_body(run: str, count: int) -> bytes:
    statuses = [{"id": f"wamid.{run}.out{i}", "status": ("sent", "delivered", "read")[i % 3],
                 "timestamp": str(TS + i % 60), "recipient_id": f"1555{i % 1000:07d}"} for i in range(count)]
    return envelope([], statuses)


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    conn.request("POST", "/webhook", body=body, headers={"Content-Type": "application/json",
                                                          "X-Hub-Signature-256": sign(body, SECRET)})
    response = conn.getresponse()
    response.read()
    return response.status, time.perf_counter() - started


class Probe:
    """Clean POSTs at a fixed interval on one connection, until stopped; records (sent at, seconds, status)."""

    def __init__(self, port: int, run: str, interval: float) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.run, self.interval = run, interval
        self.records: list[tuple[float, float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop)
        self.sent = 0

    def _loop(self) -> None:
        next_at = time.perf_counter()
        while not self.stop.is_set():
            wamid, user = f"wamid.{self.run}.probe{self.sent}", f"1666{self.sent:08d}"
            status, seconds = post(self.conn, probe_body(wamid, user))
            self.records.append((time.perf_counter() - seconds, seconds, status))
            self.sent += 1
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.perf_counter()))

    def between(self, start: float, end: float) -> list[float]:
        return [seconds for at, seconds, _ in self.records if start <= at <= end]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def measure(url: str, label: str, args: argparse.Namespace) -> bool:
    port, run = free_port(), uuid.uuid4().hex[:8]
    log_path = Path(tempfile.gettempdir()) / f"bench_intake_{run}.log"
    server = start_server(url, port, 1, 1, log_path, reorder_wait_ms=None)
    db = create_engine(url)
    try:
        probe = Probe(port, run, args.interval)
        probe.thread.start()
        time.sleep(args.baseline_seconds)
        baseline = [seconds for _, seconds, _ in probe.records]
        big = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = big_body(run, args.statuses)
        started = time.perf_counter()
        status, took = post(big, body)
        time.sleep(args.interval * 2)  # the probe's next answer, after the big one
        probe.stop.set()
        probe.thread.join(60)
        during = probe.between(started, started + took)
        with db.connect() as conn:
            stored = conn.scalar(text("SELECT count(*) FROM message_status_events WHERE wamid LIKE :p"),
                                 {"p": f"wamid.{run}.out%"})
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                applied = conn.scalar(text("SELECT count(*) FROM transitions WHERE wamid LIKE :p"),
                                      {"p": f"wamid.{run}.probe%"})
                if applied == probe.sent:
                    break
                time.sleep(0.2)
                conn.rollback()
        delay = max(during, default=0.0) - median(baseline)
        bad = [s for _, _, s in probe.records if s != 200]
        print(f"{label:<10} baseline: {len(baseline)} probe POSTs, median {median(baseline) * 1000:.1f} ms, "
              f"max {max(baseline, default=0) * 1000:.1f} ms")
        print(f"{label:<10} big POST: {args.statuses} statuses ({len(body) / 1e6:.2f} MB) answered {status} in "
              f"{took:.2f} s, {stored} stored")
        print(f"{label:<10} during it: {len(during)} probe POSTs, median {median(during) * 1000:.1f} ms, "
              f"max {max(during, default=0) * 1000:.1f} ms -> delay {delay * 1000:.0f} ms "
              f"(target < 1000 ms: {'met' if delay < 1.0 else 'MISSED'}); probe messages applied "
              f"{applied}/{probe.sent}, non-200 answers {len(bad)}")
        return delay < 1.0 and not bad and status == 200 and stored == args.statuses and applied == probe.sent
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["postgresql", "sqlite", "both"], default="both")
    parser.add_argument("--statuses", type=int, default=5000)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between two probe POSTs")
    parser.add_argument("--baseline-seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}; probe every {args.interval * 1000:.0f} ms on its own keep-alive connection")
    ok = True
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            ok = measure(f"sqlite:///{tmp}/bench.db", "sqlite", args) and ok
    if args.backend in ("postgresql", "both"):
        admin_url = make_url(os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
                             or DEFAULT_URL)
        name = f"waflow_bench_intake_{os.getpid()}"
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            ok = measure(admin_url.set(database=name).render_as_string(hide_password=False), "postgresql", args) and ok
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
