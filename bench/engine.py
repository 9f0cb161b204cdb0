"""Engine benchmark on PostgreSQL: applied messages/s and apply latency, against a raw upsert loop baseline.

    .venv/bin/python bench/engine.py [--messages 4000] [--workers 1,4,16] [--rate 200] [--batch 20]

Each scenario runs in a fresh database created (and dropped) on the server of BENCH_DATABASE_URL /
TEST_DATABASE_URL. Every worker is an OS process with its own engine and pool, consuming its share of the
messages like a queue consumer: each call takes what has arrived, up to a batch. Paths, as path/batch:
  deliver/20  `Engine.deliver` of up to --batch messages: store and apply in one transaction (a consumer that
              acknowledges after applying); flat out the batches are full, at a fixed rate they hold what
              arrived during the previous call (mostly one message);
  deliver/1   the same, one message per call;
  2-step/1    `Engine.ingest`, then `apply_all` for that user, one message at a time: two transactions (the
              webhook's order, which acknowledges once the message is stored, before applying it).
Printed per scenario: throughput, p50/p99 latency per message (from its arrival, flat out from the start of
the call that took it, to the end of the call that applied it), the raw `INSERT ... ON CONFLICT DO UPDATE`
loop (one row per statement, autocommit) with the same worker count in the same run (before and after ours),
our throughput as a ratio of their mean, and lost/duplicated transitions checked in the database.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from sqlalchemy import create_engine, func, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from core.config import Settings  # noqa: E402
from core.db import Database  # noqa: E402
from core.engine import Engine  # noqa: E402
from core.flows import load_flows  # noqa: E402
from core.messages import InboundMessage  # noqa: E402
from core.migrate import ensure_schema  # noqa: E402
from core.models import ChatSession, Transition  # noqa: E402

BASE_TS = 1_767_268_800
FLOWS_DIR = ROOT / "tests" / "data" / "flows"
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _message(user: str, i: int, run: str, worker: int) -> dict[str, object]:
    wamid = f"wamid.{run}.{user}.{i}.{worker}"
    # One WhatsApp second for all: the hot user's messages come from every worker in any order, and one older than a
    # message already applied would be late (logged, not counted: core.machine), which is not the load measured.
    raw = {"from": user, "id": wamid, "timestamp": str(BASE_TS), "type": "text", "text": {"body": f"m{i}"}}
    return InboundMessage(
        phone_number_id="100000000000111", user_id=user, wamid=wamid, timestamp=BASE_TS, kind="text",
        text=f"m{i}", raw=raw,
    ).model_dump(mode="json")


def _plans(scenario: str, workers: int, messages: int, run: str) -> list[list[dict[str, object]]]:
    per_worker = messages // workers
    plans: list[list[dict[str, object]]] = []
    for w in range(workers):
        plan = []
        for i in range(per_worker):
            if scenario == "hot":
                # one hot user receives a quarter of all traffic, from every worker at once
                user = "14150000000" if i % 4 == 0 else f"1416{w:03d}{i:05d}"
            else:
                user = f"1416{w:03d}{i:05d}"
            plan.append(_message(user, i, run, w))
        plans.append(plan)
    return plans


def _worker(
    url: str, plan: list[dict[str, object]], start_at: float, rate: float | None, path: str, batch: int
) -> list[float]:
    """A consumer: each call takes the messages that have arrived (all of them, flat out; those due by now at a
    fixed rate), up to `batch`. Latency runs from a message's arrival (flat out: the call's start) to the
    end of the call that applied it."""
    settings = Settings(database_url=url, flows_dir=FLOWS_DIR, default_flow="counter")
    db = Database(url, pool_size=1, max_overflow=1)
    engine = Engine(db, load_flows(FLOWS_DIR), settings)
    messages = [InboundMessage.model_validate(m) for m in plan]
    latencies: list[float] = []
    time.sleep(max(0.0, start_at - time.time()))
    began = time.perf_counter()
    due = [began + n / rate if rate else began for n in range(len(messages))]
    n = 0
    while n < len(messages):
        time.sleep(max(0.0, due[n] - time.perf_counter()))
        t0 = time.perf_counter()
        end = n + 1
        while end < len(messages) and end - n < batch and due[end] <= t0:
            end += 1
        chunk = messages[n:end]
        if path == "deliver":
            engine.deliver(chunk)
        else:
            for key in engine.ingest(chunk).session_keys:
                engine.apply_all(key)
        done = time.perf_counter()
        latencies += [done - (due[i] if rate else t0) for i in range(n, end)]
        n = end
    db.dispose()
    return latencies


def _raw_worker(conninfo: str, worker: int, count: int, start_at: float) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        time.sleep(max(0.0, start_at - time.time()))
        for i in range(count):
            conn.execute(
                "INSERT INTO bench_raw (k, v) VALUES (%s, 1) ON CONFLICT (k) DO UPDATE SET v = bench_raw.v + 1",
                (f"{worker}:{i}",),
            )
    return count


class Server:
    def __init__(self, admin_url: str) -> None:
        self.admin_url = make_url(admin_url)
        self.admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")

    def fresh(self) -> tuple[str, str]:
        name = f"waflow_bench_{uuid.uuid4().hex[:8]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = self.admin_url.set(database=name).render_as_string(hide_password=False)
        db = Database(url)
        ensure_schema(db)
        db.dispose()
        return name, url

    def drop(self, name: str) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run_engine(
    server: Server, scenario: str, path: str, batch: int, workers: int, messages: int, rate: float | None = None
) -> dict[str, float]:
    name, url = server.fresh()
    try:
        plans = _plans(scenario, workers, messages, uuid.uuid4().hex[:6])
        ctx = multiprocessing.get_context("spawn")
        start_at = time.time() + 2.0 + workers * 0.15
        per_worker_rate = rate / workers if rate else None
        with ctx.Pool(workers) as pool:
            jobs = [pool.apply_async(_worker, (url, plan, start_at, per_worker_rate, path, batch)) for plan in plans]
            results = [job.get(timeout=1800) for job in jobs]
        wall = time.time() - start_at
        latencies = [x for r in results for x in r]
        lost, duplicated = _verify(url, plans)
        return {
            "applied": len(latencies),
            "per_s": len(latencies) / wall,
            "p50_ms": _percentile(latencies, 50) * 1000,
            "p99_ms": _percentile(latencies, 99) * 1000,
            "lost": lost,
            "duplicated": duplicated,
        }
    finally:
        server.drop(name)


def _verify(url: str, plans: list[list[dict[str, object]]]) -> tuple[int, int]:
    """Lost: sessions whose version/counter fall short of their messages. Duplicated: extra transitions."""
    expected: dict[str, int] = {}
    for plan in plans:
        for m in plan:
            expected[str(m["user_id"])] = expected.get(str(m["user_id"]), 0) + 1
    db = Database(url)
    with db.session() as s:
        rows = s.execute(select(ChatSession.user_id, ChatSession.version, ChatSession.data)).all()
        transitions = s.scalar(select(func.count()).select_from(Transition)) or 0
        distinct = s.scalar(select(func.count(func.distinct(Transition.wamid)))) or 0
    db.dispose()
    got = {user: (version, int(data.get("count", 0))) for user, version, data in rows}
    lost = sum(n - min(got.get(user, (0, 0))) for user, n in expected.items() if min(got.get(user, (0, 0))) < n)
    duplicated = int(transitions) - int(distinct) + sum(max(0, got.get(u, (0, 0))[0] - n) for u, n in expected.items())
    return lost, duplicated


def run_raw(server: Server, workers: int, messages: int) -> float:
    name, url = server.fresh()
    try:
        conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_raw (k text PRIMARY KEY, v bigint NOT NULL)")
        ctx = multiprocessing.get_context("spawn")
        start_at = time.time() + 1.0 + workers * 0.05
        per_worker = messages // workers
        with ctx.Pool(workers) as pool:
            jobs = [pool.apply_async(_raw_worker, (conninfo, w, per_worker, start_at)) for w in range(workers)]
            done = sum(job.get(timeout=1800) for job in jobs)
        return done / (time.time() - start_at)
    finally:
        server.drop(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=4000, help="messages per scenario")
    parser.add_argument("--workers", default="1,4,16")
    parser.add_argument("--rate", type=float, default=200.0, help="fixed rate for the latency run (messages/s)")
    parser.add_argument("--batch", type=int, default=20, help="most messages a consumer takes per deliver call")
    args = parser.parse_args()
    paths = [("deliver", args.batch), ("deliver", 1), ("2-step", 1)]
    server = Server(os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL") or DEFAULT_URL)
    print(f"{'scenario':<10}{'path':<13}{'workers':>8}{'msgs/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'raw/s':>10}{'ratio':>7}"
          f"{'lost':>6}{'dup':>5}")
    failed = False
    for workers in [int(w) for w in args.workers.split(",")]:
        # The raw loop swings with the server's WAL and checkpoint state: it runs before and after our
        # scenarios and the ratio uses the mean of the two.
        raw_before = run_raw(server, workers, args.messages)
        rows = [
            (scenario, f"{path}/{batch}", run_engine(server, scenario, path, batch, workers, args.messages))
            for path, batch in paths
            for scenario in ("uniform", "hot")
        ]
        raw_after = run_raw(server, workers, args.messages)
        raw = (raw_before + raw_after) / 2
        for scenario, path, r in rows:
            failed |= bool(r["lost"] or r["duplicated"])
            print(f"{scenario:<10}{path:<13}{workers:>8}{r['per_s']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                  f"{raw:>10.0f}{r['per_s'] / raw:>7.2f}{int(r['lost']):>6}{int(r['duplicated']):>5}", flush=True)
        print(f"{'':<31}  raw loop before / after: {raw_before:.0f} / {raw_after:.0f} per s", flush=True)
    print()
    for path, batch in paths:
        paced = run_engine(server, "uniform", path, batch, 4, int(args.rate * 10), rate=args.rate)
        failed |= bool(paced["lost"] or paced["duplicated"])
        print(f"fixed rate {args.rate:.0f} msgs/s, 4 workers, {path}/{batch}: achieved {paced['per_s']:.0f}/s, "
              f"p50 {paced['p50_ms']:.2f} ms, p99 {paced['p99_ms']:.2f} ms (target < 20 ms), "
              f"lost {int(paced['lost'])}, duplicated {int(paced['duplicated'])}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
