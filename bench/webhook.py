"""Webhook benchmark: a real `python -m core serve` on PostgreSQL, loaded over loopback by another process.

    .venv/bin/python bench/webhook.py [--rate 300] [--duration 10] [--max-seconds 10] [--workers 1]
                                      [--apply-threads 1] [--connections 16] [--users 2000]

The bench creates its own PostgreSQL database on the server of BENCH_DATABASE_URL / TEST_DATABASE_URL
(default postgresql+psycopg://postgres@127.0.0.1:5432/test), starts the server on a free loopback port,
and drops the database at the end. The load generator runs in its own OS processes (multiprocessing, one
keep-alive connection per thread sending pre-built, pre-signed requests). Every phase is bounded in
request count and time:

1. ceiling: GET /healthz as fast as the generator can for --max-seconds → requests/s;
2. max:     signed webhooks as fast as possible for --max-seconds → accepted/s, then applied/s (first
            received → last applied, from the database);
3. rate:    signed webhooks at a fixed --rate for --duration seconds (open loop: each request has a
            scheduled send time) → ack p50/p99 (scheduled send → response, so queueing is counted) and
            end-to-end p50/p99 (inbound_events.received_at → transitions.applied_at, from the database).

Payloads are realistic WhatsApp bodies for the shipped lead flow: mixed users, 5 % duplicates (the same
wamid re-sent with other bytes, as a Meta retry may be), and same-user bursts (two or three messages of
one user in one POST, or back to back). At the end the bench checks in the database that every
acknowledged message has exactly one transition (none lost, none duplicated).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from core.signature import sign  # noqa: E402

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SECRET = "bench-app-secret"
PN = "100000000000111"
BASE_TS = 1_767_268_800
NAMES = ["Ana Lima", "Bob Stone", "Chloé Dubois", "Dmitri Ivanov", "Eitan Cohen", "Fatima Zahra", "Gao Wei"]
CITIES = ["Lisboa", "São Paulo", "Zürich", "Kraków", "Tel Aviv", "Nairobi", "北京"]


# ---------------------------------------------------------------------------------------------- payloads


def _message(user: str, wamid: str, ts: int, step: int) -> dict[str, Any]:
    body = ["hi 👋", NAMES[hash(user) % len(NAMES)], f"{user}@example.com", CITIES[hash(user) % len(CITIES)]][step % 4]
    return {"from": user, "id": wamid, "timestamp": str(ts), "type": "text", "text": {"body": body}}


def _envelope(messages: list[dict[str, Any]]) -> bytes:
    users = sorted({m["from"] for m in messages})
    doc = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "109876543210001", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001111", "phone_number_id": PN},
            "contacts": [{"profile": {"name": "Bench User"}, "wa_id": u} for u in users],
            "messages": messages,
        }}]}],
    }
    return json.dumps(doc, separators=(",", ":")).encode()  # ASCII with \\u escapes, as Meta sends


def make_requests(count: int, users: int, run: str, rng: random.Random) -> list[tuple[bytes, list[str]]]:
    """`count` POST bodies with the wamids each carries."""
    out: list[tuple[bytes, list[str]]] = []
    sent: list[tuple[list[dict[str, Any]], list[str]]] = []
    steps: dict[str, int] = {}
    seq = 0
    while len(out) < count:
        if sent and rng.random() < 0.05:
            # A duplicate delivery: same wamids, other bytes.
            messages, wamids = rng.choice(sent)
            body = json.dumps(json.loads(_envelope(messages)), indent=1).encode()
            out.append((body, wamids))
            continue
        user = f"1555{rng.randrange(users):07d}"
        burst = rng.choice([1] * 8 + [2, 3])  # some same-user bursts in one POST
        messages = []
        for _ in range(burst):
            seq += 1
            step = steps.get(user, 0)
            steps[user] = step + 1
            messages.append(_message(user, f"wamid.BENCH.{run}.{seq:08d}", BASE_TS + seq, step))
        wamids = [m["id"] for m in messages]
        sent.append((messages, wamids))
        out.append((_envelope(messages), wamids))
        if rng.random() < 0.05 and len(out) < count:  # the same user again, right behind
            seq += 1
            steps[user] += 1
            again = [_message(user, f"wamid.BENCH.{run}.{seq:08d}", BASE_TS + seq, steps[user])]
            sent.append((again, [again[0]["id"]]))
            out.append((_envelope(again), [again[0]["id"]]))
    return out


# ---------------------------------------------------------------------------------------------- load


def _worker(index: int, port: int, jobs: list[tuple[float, bytes | None]], t0: float, threads: int,
            results: Any) -> None:
    """One load process: `threads` keep-alive connections; job = (scheduled offset or -1, body or None=GET)."""
    lock = threading.Lock()
    cursor = [0]
    records: list[tuple[int, float, float, int]] = []  # (job index, latency s, offset of completion, status)
    last_scheduled = max((s for s, _ in jobs), default=0.0)
    raws = [_raw_request(body) for _, body in jobs]

    def run() -> None:
        conn = _Connection(port)
        while True:
            with lock:
                i = cursor[0]
                cursor[0] += 1
            if i >= len(jobs):
                break
            scheduled = jobs[i][0]
            if scheduled >= 0:
                delay = t0 + scheduled - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                start = t0 + scheduled
            else:
                start = time.perf_counter()
            if time.perf_counter() - t0 > last_scheduled + 60:
                break  # hard time bound: a stuck server cannot keep the bench running
            status = conn.request(raws[i])
            if status < 0:
                conn.close()
                conn = _Connection(port)
            done = time.perf_counter()
            records.append((i, done - start, done - t0, status))
        conn.close()

    _run_threads(run, threads)
    results.put((index, records))


def _run_threads(target: Callable[[], None], threads: int) -> None:
    pool = [threading.Thread(target=target) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


class _Connection:
    """A keep-alive HTTP/1.1 connection that sends pre-built requests and reads just the status line and body.
    The generator shares the server's two cores, so every microsecond it spends per request is taken from
    the server being measured: no http.client objects, no signing or header building in the timed loop."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def request(self, raw: bytes) -> int:
        """Send one request; its status, or -1 when the connection failed (the caller reconnects)."""
        try:
            self.sock.sendall(raw)
            while b"\r\n\r\n" not in self.buffer:
                self.buffer += self._recv()
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(rest) < length:
                rest += self._recv()
            self.buffer = rest[length:]
            return int(head[9:12])
        except (OSError, ValueError):
            return -1

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise OSError("connection closed by the server")
        return chunk

    def close(self) -> None:
        self.sock.close()


def _raw_request(body: bytes | None) -> bytes:
    """The request's bytes, signed, built before the timed phase."""
    if body is None:
        return b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    return (b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"X-Hub-Signature-256: " + sign(body, SECRET).encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def drive(port: int, jobs: list[tuple[float, bytes | None]], processes: int, threads: int,
          deadline_s: float | None = None) -> tuple[list[tuple[int, float, float, int]], float]:
    """Run jobs split round-robin over `processes` load processes; returns records and wall time."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    t0 = time.perf_counter() + 1.5  # let the processes start before the first scheduled send
    parts = [jobs[p::processes] for p in range(processes)]
    # Scheduled offsets stay global, so the union of the parts is the planned rate.
    procs = [ctx.Process(target=_worker, args=(p, port, part, t0, threads, results)) for p, part in enumerate(parts)]
    for p in procs:
        p.start()
    records: list[tuple[int, float, float, int]] = []
    for _ in range(processes):
        p_index, part_records = results.get(timeout=(deadline_s or 0) + 120)
        records += [(i * processes + p_index, lat, off, st) for i, lat, off, st in part_records]
    for p in procs:
        p.join(10)
    wall = max((off for _, _, off, _ in records), default=0.0)
    return records, wall


def closed_loop(bodies: list[bytes | None], seconds: float, port: int, processes: int,
                threads: int) -> tuple[list[tuple[int, float, float, int]], float, int]:
    """As fast as possible: every thread sends back to back; bounded by len(bodies) and `seconds`."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    stop_at = time.perf_counter() + 1.5 + seconds
    parts = [bodies[p::processes] for p in range(processes)]
    procs = [ctx.Process(target=_closed_worker, args=(p, port, part, stop_at, threads, results))
             for p, part in enumerate(parts)]
    for p in procs:
        p.start()
    records: list[tuple[int, float, float, int]] = []
    for _ in range(processes):
        p_index, part_records = results.get(timeout=seconds + 120)
        records += [(i * processes + p_index, lat, off, st) for i, lat, off, st in part_records]
    for p in procs:
        p.join(10)
    first = min(off for _, _, off, _ in records) if records else 0.0
    last = max(off for _, _, off, _ in records) if records else 0.0
    return records, last - first, len(records)


def _closed_worker(index: int, port: int, bodies: list[bytes | None], stop_at: float, threads: int,
                   results: Any) -> None:
    lock = threading.Lock()
    cursor = [0]
    records: list[tuple[int, float, float, int]] = []
    raws = [_raw_request(body) for body in bodies]

    def run() -> None:
        conn = _Connection(port)
        while time.perf_counter() < stop_at:
            with lock:
                i = cursor[0]
                cursor[0] += 1
            if i >= len(bodies):
                break
            start = time.perf_counter()
            status = conn.request(raws[i])
            if status < 0:
                conn.close()
                conn = _Connection(port)
            done = time.perf_counter()
            records.append((i, done - start, done, status))
        conn.close()

    _run_threads(run, threads)
    results.put((index, records))


# ---------------------------------------------------------------------------------------------- server & db


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(url: str, port: int, workers: int, apply_threads: int, log_path: Path,
                 reorder_wait_ms: float | None = 0.0) -> subprocess.Popen[bytes]:
    """A `core serve` on `port`, answering /healthz; `reorder_wait_ms` None keeps the product's default."""
    env = dict(os.environ, DATABASE_URL=url, WHATSAPP_APP_SECRET=SECRET, WHATSAPP_VERIFY_TOKEN="bench",
               ADMIN_TOKEN="bench-admin", PENDING_SWEEP_INTERVAL_SECONDS="2", APPLY_THREADS=str(apply_threads))
    if reorder_wait_ms is not None:
        env["APPLY_REORDER_WAIT_MS"] = str(reorder_wait_ms)
    args = [sys.executable, "-m", "core", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:
        args += ["--workers", str(workers)]
    log = log_path.open("wb")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def wait_applied(engine: Any, prefix: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            pending = conn.scalar(text(
                "SELECT count(*) FROM inbound_events WHERE wamid LIKE :p AND processed_at IS NULL"), {"p": prefix})
        if not pending:
            return
        time.sleep(0.2)
    raise SystemExit(f"messages still pending after {timeout}s")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def e2e_latencies(engine: Any, prefix: str) -> tuple[list[float], float, float]:
    """received → applied per message (ms), and the first received / last applied as epoch seconds."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT EXTRACT(EPOCH FROM t.applied_at - e.received_at), EXTRACT(EPOCH FROM e.received_at),"
            " EXTRACT(EPOCH FROM t.applied_at) FROM transitions t JOIN inbound_events e"
            " ON e.phone_number_id = t.phone_number_id AND e.wamid = t.wamid WHERE t.wamid LIKE :p"), {"p": prefix}
        ).all()
    if not rows:
        return [], 0.0, 0.0
    return [float(r[0]) * 1000 for r in rows], min(float(r[1]) for r in rows), max(float(r[2]) for r in rows)


def verify(engine: Any, acknowledged: set[str], prefix: str) -> tuple[int, int, int]:
    """(lost, duplicated, unexpected) transitions for the acknowledged wamids."""
    with engine.connect() as conn:
        counts = dict(conn.execute(text(
            "SELECT wamid, count(*) FROM transitions WHERE wamid LIKE :p GROUP BY wamid"), {"p": prefix}).all())
    lost = sum(1 for w in acknowledged if w not in counts)
    duplicated = sum(1 for n in counts.values() if n > 1)
    unexpected = sum(1 for w in counts if w not in acknowledged)
    return lost, duplicated, unexpected


# ---------------------------------------------------------------------------------------------- main


def main() -> None:  # noqa: C901 - a linear script: phases one after the other
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=300.0, help="fixed request rate of the latency phase")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of the fixed-rate phase")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="seconds of each as-fast-as-possible phase")
    parser.add_argument("--max-requests", type=int, default=20000, help="request cap of each max phase")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the server")
    parser.add_argument("--apply-threads", type=int, default=1, help="APPLY_THREADS of each server process")
    parser.add_argument("--reorder-wait-ms", type=float, default=0.0,
                        help="APPLY_REORDER_WAIT_MS of the server (product default 200: every message then waits that "
                             "long before it is applied, which received->applied latency includes by design)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections of the generator")
    parser.add_argument("--load-processes", type=int, default=2)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    admin_url = make_url(os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL") or DEFAULT_URL)
    name = f"waflow_bench_webhook_{os.getpid()}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    db = create_engine(url)
    port = free_port()
    log_path = Path(f"/tmp/{name}.log")
    server = None
    run = uuid.uuid4().hex[:6]
    threads = max(1, args.connections // args.load_processes)
    rng = random.Random(args.seed)
    try:
        server = start_server(url, port, args.workers, args.apply_threads, log_path, args.reorder_wait_ms)
        print(f"server: python -m core serve --workers {args.workers} (APPLY_THREADS={args.apply_threads}, "
              f"APPLY_REORDER_WAIT_MS={args.reorder_wait_ms:g}) on "
              f"127.0.0.1:{port}, database {name}; "
              f"load: {args.load_processes} processes x {threads} keep-alive connections; cpus: {os.cpu_count()}")

        # 1. ceiling
        records, wall, n = closed_loop([None] * args.max_requests, args.max_seconds, port, args.load_processes,
                                       threads)
        ok = sum(1 for r in records if r[3] == 200)
        ceiling = ok / wall if wall else 0.0
        print(f"ceiling  GET /healthz: {ok}/{n} ok in {wall:.1f}s = {ceiling:.0f} req/s, "
              f"p50 {pct([r[1] for r in records], .5) * 1000:.1f} ms")

        # 2. max signed webhooks
        acknowledged: set[str] = set()
        max_prefix = f"wamid.BENCH.{run}M.%"
        max_reqs = make_requests(args.max_requests, args.users, run + "M", rng)
        records, wall, n = closed_loop([b for b, _ in max_reqs], args.max_seconds, port, args.load_processes,
                                       threads)
        ok_records = [r for r in records if r[3] == 200]
        for i, *_ in ok_records:
            acknowledged.update(max_reqs[i][1])
        accepted = len(ok_records) / wall if wall else 0.0
        wait_applied(db, max_prefix)
        lat, first_received, last_applied = e2e_latencies(db, max_prefix)
        applied_rate = len(lat) / (last_applied - first_received) if lat else 0.0
        statuses = sorted({r[3] for r in records})
        print(f"max      POST /webhook: {len(ok_records)}/{n} 200 in {wall:.1f}s = {accepted:.0f} accepted/s "
              f"({accepted / ceiling:.0%} of the healthz ceiling); {len(lat)} transitions applied at "
              f"{applied_rate:.0f}/s; ack p50 {pct([r[1] for r in ok_records], .5) * 1000:.1f} ms "
              f"p99 {pct([r[1] for r in ok_records], .99) * 1000:.1f} ms; statuses {statuses}")

        # 3. fixed rate
        rate_prefix = f"wamid.BENCH.{run}R.%"
        count = int(args.rate * args.duration)
        rate_reqs = make_requests(count, args.users, run + "R", rng)
        jobs: list[tuple[float, bytes | None]] = [(i / args.rate, b) for i, (b, _) in enumerate(rate_reqs)]
        records, wall = drive(port, jobs, args.load_processes, threads, deadline_s=args.duration)
        ok_records = [r for r in records if r[3] == 200]
        for i, *_ in ok_records:
            acknowledged.update(rate_reqs[i][1])
        wait_applied(db, rate_prefix)
        lat, _, _ = e2e_latencies(db, rate_prefix)
        acks = [r[1] * 1000 for r in ok_records]
        print(f"rate     {args.rate:.0f} req/s for {args.duration:.0f}s: {len(ok_records)}/{len(records)} 200 "
              f"(achieved {len(records) / wall:.0f} req/s); ack p50 {pct(acks, .5):.1f} ms p99 {pct(acks, .99):.1f} ms"
              f" max {max(acks, default=0):.1f} ms; end-to-end (received->applied) p50 {pct(lat, .5):.1f} ms "
              f"p99 {pct(lat, .99):.1f} ms over {len(lat)} transitions")

        lost, duplicated, unexpected = verify(db, acknowledged, "wamid.BENCH.%")
        print(f"verify   {len(acknowledged)} acknowledged messages: lost {lost}, duplicated {duplicated}, "
              f"unacknowledged but applied {unexpected}")
        print(f"targets  >=800 accepted/s: {'met' if accepted >= 800 else 'MISSED'} ({accepted:.0f}); "
              f"ack p99 <25 ms @ {args.rate:.0f}/s: {'met' if pct(acks, .99) < 25 else 'MISSED'}; "
              f"e2e p99 <100 ms: {'met' if pct(lat, .99) < 100 else 'MISSED'}; "
              f"zero lost/duplicated: {'met' if not (lost or duplicated) else 'MISSED'}")
        if lost or duplicated:
            sys.exit(1)
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
        db.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
