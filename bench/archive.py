"""Benchmark: archive 1,000,000 idle sessions on PostgreSQL while workers keep applying messages.

    .venv/bin/python bench/archive.py                 # the full run: 1,000,000 idle sessions
    .venv/bin/python bench/archive.py --sessions 50000  # a quick run

Creates a dedicated database (dropped at the end unless --keep), bulk-generates the idle sessions with
INSERT ... SELECT generate_series, starts worker processes that ingest and apply messages for active users
through the real Engine, and runs the archive job (jobs.archive.run_archive) against the idle ones.
Targets: all idle sessions archived in < 60 s, p99 apply latency of the active users' messages < 100 ms.
Exit status 0 when both targets are met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from core.config import Settings  # noqa: E402
from core.db import Database  # noqa: E402
from core.engine import Engine  # noqa: E402
from core.messages import InboundMessage  # noqa: E402
from core.migrate import ensure_schema  # noqa: E402
from jobs.archive import run_archive  # noqa: E402

PHONE = "100000000000111"
DEFAULT_ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

GENERATE = """
INSERT INTO sessions (phone_number_id, user_id, flow, flow_version, current_step, data, version, failure_count,
                      language, status, opted_out, created_at, updated_at, last_inbound_at, step_entered_at,
                      last_transition_at, completed_at)
SELECT :phone, 'idle' || lpad(g::text, 9, '0'), 'lead_qualification', 1,
       CASE WHEN g % 10 = 0 THEN 'done' ELSE 'ask_email' END,
       jsonb_build_object('name', 'User ' || g),
       2, 0, 'en',
       CASE WHEN g % 10 = 0 THEN 'completed' ELSE 'active' END,
       false,
       :now - interval '3 days', :now - interval '2 days',
       :now - interval '25 hours' - (g % 86400) * interval '1 second',
       :now - interval '25 hours' - (g % 86400) * interval '1 second',
       :now - interval '25 hours' - (g % 86400) * interval '1 second',
       CASE WHEN g % 10 = 0 THEN :now - interval '25 hours' END
FROM generate_series(:start, :stop) AS g
"""


def worker(url: str, index: int, users: int, rate: float, stop: mp.Event, results: mp.Queue) -> None:  # type: ignore[type-arg]
    """Applies messages for its own active users through the Engine; reports every apply's latency."""
    settings = Settings(database_url=url, db_pool_size=2, db_max_overflow=2)
    db = Database(url, pool_size=2, max_overflow=2)
    engine = Engine(db, settings=settings)
    latencies: list[tuple[float, float]] = []  # (wall clock at start, seconds)
    interval = 1.0 / rate
    sent = 0
    next_at = time.monotonic()
    while not stop.is_set():
        user = f"active{index}-{sent % users}"
        message = InboundMessage(
            phone_number_id=PHONE, user_id=user, wamid=f"wamid.bench.{index}.{sent}.{uuid.uuid4().hex[:6]}",
            timestamp=int(time.time()), kind="text", text=f"Answer {sent}",
        )
        engine.ingest([message])
        at, started = time.time(), time.perf_counter()
        engine.apply_pending((PHONE, user))
        latencies.append((at, time.perf_counter() - started))
        sent += 1
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    results.put(latencies)
    db.dispose()


def generate(db: Database, count: int, now: datetime, chunk: int = 250_000) -> float:
    started = time.perf_counter()
    for start in range(1, count + 1, chunk):
        with db.begin() as conn:
            conn.execute(text(GENERATE), {"phone": PHONE, "now": now, "start": start,
                                          "stop": min(count, start + chunk - 1)})
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE sessions"))
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(values: list[float]) -> str:
    return (f"p50 {statistics.median(values) * 1000:.1f} ms   p95 {percentile(values, 0.95) * 1000:.1f} ms   "
            f"p99 {percentile(values, 0.99) * 1000:.1f} ms   max {max(values) * 1000:.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2, help="processes applying messages for active users")
    parser.add_argument("--archive-workers", type=int, default=4, help="connections archiving in parallel")
    parser.add_argument("--rate", type=float, default=40.0, help="messages per second per worker")
    parser.add_argument("--users", type=int, default=200, help="active users per worker")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of applying before the archive starts")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="a PostgreSQL URL allowed to CREATE DATABASE")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    args = parser.parse_args()

    admin_url = make_url(Settings(database_url=args.admin_url).database_url)
    name = f"waflow_bench_archive_{os.getpid()}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    try:
        return run(url, args)
    finally:
        if not args.keep:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run(url: str, args: argparse.Namespace) -> int:
    db = Database(url)
    ensure_schema(db)
    now = datetime.now(UTC)
    print(f"generating {args.sessions:,} idle sessions ...", flush=True)
    print(f"  generated in {generate(db, args.sessions, now):.1f} s", flush=True)

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    results: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=worker, args=(url, i, args.users, args.rate, stop, results))
             for i in range(args.workers)]
    for p in procs:
        p.start()
    time.sleep(args.warmup)  # workers import, connect and warm up; the last seconds are the baseline

    settings = Settings(database_url=url, archive_after_hours=24.0)
    archive_from = time.time()
    started = time.perf_counter()
    result = run_archive(db, settings, datetime.now(UTC), batch_size=args.batch_size, workers=args.archive_workers)
    archive_seconds = time.perf_counter() - started
    archive_to = time.time()
    time.sleep(1)
    stop.set()
    samples = [value for _ in procs for value in results.get(timeout=120)]
    for p in procs:
        p.join(60)
    latencies = [seconds for at, seconds in samples if archive_from <= at <= archive_to]
    baseline = [seconds for at, seconds in samples if archive_from - args.warmup / 2 <= at < archive_from]

    with db.engine.connect() as conn:
        left = conn.scalar(text("SELECT count(*) FROM sessions WHERE user_id LIKE 'idle%' AND status <> 'archived'"))
        active = conn.scalar(text("SELECT count(*) FROM sessions WHERE user_id LIKE 'active%' AND status = 'active'"))
    db.dispose()

    p99 = percentile(latencies, 0.99) * 1000
    ok = archive_seconds < 60 and p99 < 100 and left == 0 and result["archived"] == args.sessions
    print(f"archived        {result['archived']:,} sessions ({result['from_active']:,} active, "
          f"{result['from_completed']:,} completed) in {result['batches']} batches of <= {args.batch_size} "
          f"on {args.archive_workers} connections")
    print(f"archive time    {archive_seconds:.1f} s ({result['archived'] / archive_seconds:,.0f} sessions/s)"
          f"   target < 60 s")
    print(f"left unarchived {left}   active sessions untouched: {active}")
    print(f"applies         {len(latencies):,} by {args.workers} workers while archiving "
          f"({args.workers * args.rate:.0f} msg/s offered); load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    print(f"apply latency   {_summary(latencies)}   target p99 < 100 ms")
    if baseline:
        print(f"  baseline      {_summary(baseline)}   (same workers, {args.warmup / 2:g} s before the archive)")
    print("RESULT          " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
