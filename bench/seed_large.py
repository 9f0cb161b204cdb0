"""Generate a large analytics dataset on PostgreSQL: 1,000,000 sessions and 10,000,000 transitions.

    PYTHONPATH=. .venv/bin/python bench/seed_large.py [--admin-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
                                                      [--database waflow_bench] [--sessions 1000000] [--days 90]

Creates (drops first) a dedicated database, migrates it, and fills it with INSERT ... SELECT
generate_series (no row leaves the server): sessions of both shipped flows on two business numbers,
spread over `--days` days before now, ten transitions each (some reprompts at the first step, then
advances as deep as each session got), inbound events for the last 14 days, a week of per-minute
webhook stats, outbox rows with some failures, two campaigns with follow-ups (each queued one with its outbox
message and delivery status); then builds the funnel rollup.

Sessions are archived as the archive job (jobs/archive.py) leaves production: every session whose last
message is more than 24 h old is archived (`archived_from` completed if it finished its path, else active:
idle in its step; `archived_at` 24 h to 24 h 5 min after that message), the others stay active or
completed. Over 90 days that is about 99 % of them. The follow-ups cover every session stalled in a
campaign's step past its delay, archived ones included (archived means idle, not gone: core.lifecycle).

Prints the DATABASE_URL to give bench/dashboard.py. Measured on the 2-core machine, shared with other work:
233 s in all at load average about 1.3 (2.5 min of loading and index builds, 65 s for the first build of the
funnel rollup), 363 s at load average 4 to 5 (2026-11-30).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, make_url

from core.analytics import refresh_rollups
from core.db import Database
from core.migrate import ensure_schema

TRANSITIONS_PER_SESSION = 10
# Deterministic pseudo-random numbers in SQL: Knuth's multiplicative hash of the row number.
H = "((({x})::bigint * 2654435761 + {salt}) % 4294967296)"


def h(x: str, salt: int) -> str:
    return H.format(x=x, salt=salt)


SESSION_FACTS = f"""
    SELECT i,
           CASE WHEN i % 2 = 0 THEN '1001' ELSE '1002' END AS phone,
           (34600000000 + i)::text AS user_id,
           CASE WHEN i % 2 = 0 THEN 'lead_qualification' ELSE 'service_booking' END AS flow,
           CASE WHEN i % 2 = 0 THEN ARRAY['ask_name','ask_email','ask_city','done']
                ELSE ARRAY['choose_service','choose_date','choose_time','confirm','done'] END AS path,
           CASE WHEN i % 2 = 0 THEN 4 ELSE 5 END AS plen,
           CASE WHEN {h("i", 7)} % 10 < 3 THEN 'es' ELSE 'en' END AS language,
           now() - make_interval(secs => ({h("i", 11)} % (:days * 86400))::double precision) AS started_at,
           (30 + {h("i", 13)} % 900)::int AS gap
    FROM generate_series(1, :sessions) AS i
"""
# How deep each session got along its path: weighted so that the funnel narrows step by step.
DEPTH = f"LEAST(plen, 1 + ({h('i', 17)} % 100 < 70)::int + ({h('i', 19)} % 100 < 65)::int " \
        f"+ ({h('i', 23)} % 100 < 75)::int + ({h('i', 29)} % 100 < 80)::int)"

# Archived as the archive job (jobs/archive.py) leaves real traffic: a session whose last message is more than
# 24 h old is archived, from "completed" if it finished its path, else from "active" (idle in its step), by the
# run after the cutoff (every 5 minutes); the recent ones stay active or completed. With 90 days of traffic
# that is about 99 % archived.
SESSIONS = f"""
WITH s AS (SELECT *, {DEPTH} AS depth, started_at + gap * interval '9 seconds' AS last_at FROM ({SESSION_FACTS}) f),
a AS (SELECT *, last_at < now() - interval '24 hours' AS archived FROM s)
INSERT INTO sessions (phone_number_id, user_id, flow, flow_version, current_step, data, version, failure_count,
                      language, status, opted_out, created_at, updated_at, last_inbound_at, step_entered_at,
                      last_transition_at, completed_at, archived_at, archived_from)
SELECT phone, user_id, flow, 1, path[depth], '{{}}'::jsonb, {TRANSITIONS_PER_SESSION}, 0, language,
       CASE WHEN archived THEN 'archived' WHEN depth = plen THEN 'completed' ELSE 'active' END,
       i % 97 = 0,
       started_at, last_at, last_at,
       CASE WHEN depth > 1 THEN last_at ELSE started_at END,
       last_at,
       CASE WHEN depth = plen THEN last_at END,
       CASE WHEN archived THEN last_at + interval '24 hours' + ({h("i", 47)} % 300) * interval '1 second' END,
       CASE WHEN archived THEN CASE WHEN depth = plen THEN 'completed' ELSE 'active' END END
FROM a
"""

# Transition k (1..10) of a session with r = 10 - depth reprompts: k=1 starts at path[1], k=2..r+1 are
# reprompts there, then each k advances one step, so the last one lands on path[depth].
TRANSITIONS = f"""
WITH s AS (SELECT *, {DEPTH} AS depth FROM ({SESSION_FACTS}) f WHERE i % :parts = :part),
t AS (
    SELECT s.*, k, GREATEST(1, k - ({TRANSITIONS_PER_SESSION} - depth)) AS idx
    FROM s CROSS JOIN generate_series(1, {TRANSITIONS_PER_SESSION}) AS k
)
INSERT INTO transitions (phone_number_id, user_id, flow, flow_version, from_step, to_step, outcome, wamid, at,
                         applied_at, elapsed_seconds, session_version, language)
SELECT phone, user_id, flow, 1,
       CASE WHEN k = 1 THEN NULL WHEN idx = 1 THEN path[1] ELSE path[idx - 1] END,
       path[idx],
       CASE WHEN k = 1 THEN 'started' WHEN idx = 1 THEN 'reprompted'
            WHEN idx = plen THEN 'completed' ELSE 'advanced' END,
       'wamid.' || i || '.' || k,
       started_at + gap * (k - 1) * interval '1 second',
       started_at + gap * (k - 1) * interval '1 second' + ({h('i * 10 + k', 31)} % 400) * interval '1 millisecond',
       CASE WHEN k = 1 THEN NULL ELSE (gap * (1 + (idx - 1) * 0.35) * (0.5 + ({h('i * 10 + k', 37)} % 1000) / 1000.0))
            END,
       k, language
FROM t
"""

INBOUND = """
INSERT INTO inbound_events (phone_number_id, wamid, user_id, timestamp, kind, message, received_at, processed_at,
                            result)
SELECT phone_number_id, wamid, user_id, extract(epoch FROM at)::bigint, 'text', '{}'::jsonb,
       at + interval '1 second', applied_at, 'applied'
FROM transitions WHERE at > now() - interval '14 days'
"""

WEBHOOK_STATS = """
INSERT INTO webhook_stats (bucket, result, count)
SELECT date_trunc('minute', now()) - m * interval '1 minute', r.result, (r.base + m % 7)::bigint
FROM generate_series(0, 7 * 1440 - 1) AS m
CROSS JOIN (VALUES ('accepted', 40), ('duplicate', 2), ('rejected_signature', 0)) AS r(result, base)
"""

OUTBOX = f"""
INSERT INTO outbox (idempotency_key, phone_number_id, user_id, kind, body, text, status, wamid, attempts,
                    next_attempt_at, error_code, created_at, sent_at)
SELECT 'reply:' || wamid, phone_number_id, user_id, 'text', '{{}}'::jsonb, 'prompt',
       CASE WHEN {h('id', 41)} % 1000 < 8 THEN 'failed' WHEN applied_at > now() - interval '2 minutes' THEN 'queued'
            ELSE 'sent' END,
       'out.' || wamid, 1, applied_at,
       CASE WHEN {h('id', 41)} % 1000 < 8 THEN (ARRAY[131026, 131047, 131049, 130429])[1 + {h('id', 43)} % 4] END,
       applied_at, applied_at + interval '300 milliseconds'
FROM transitions WHERE at > now() - interval '7 days'
"""

CAMPAIGNS = """
INSERT INTO campaigns (name, flow, step, delay_seconds, text, template_params, max_sends, timezone, active,
                       recovery_window_seconds, created_at, updated_at)
VALUES ('email-nudge', 'lead_qualification', 'ask_email', 7200, 'Still there?', '[]', 1, 'UTC', true, 172800,
        now(), now()),
       ('date-nudge', 'service_booking', 'choose_date', 7200, 'Pick a day?', '[]', 1, 'UTC', true, 172800,
        now(), now())
"""

# Every session stalled in a campaign's step for more than its delay got its follow-up, archived ones included
# (archived means idle, not gone: core.lifecycle), as if both campaigns had run all along.
FOLLOWUPS = """
INSERT INTO followups (campaign_id, phone_number_id, user_id, attempt, step, status, created_at, stalled_since)
SELECT c.id, s.phone_number_id, s.user_id, 1, s.current_step, 'queued', s.last_inbound_at + interval '2 hours',
       s.last_inbound_at
FROM sessions s JOIN campaigns c ON c.flow = s.flow AND c.step = s.current_step
WHERE (s.status = 'active' OR (s.status = 'archived' AND s.archived_from = 'active'))
  AND s.last_inbound_at < now() - interval '2 hours'
"""

# What the follow-up job and the sender leave: each queued follow-up's outbox message (2 % failed, the rest sent)
# and its delivery status (sent, delivered or read), as campaign results and failures read them.
FOLLOWUP_OUTBOX = f"""
INSERT INTO outbox (idempotency_key, phone_number_id, user_id, kind, body, text, campaign_id, step, status, wamid,
                    attempts, next_attempt_at, error_code, created_at, sent_at)
SELECT 'followup:' || f.campaign_id || ':' || f.phone_number_id || ':' || f.user_id || ':' || f.attempt,
       f.phone_number_id, f.user_id, 'text', '{{}}'::jsonb, c.text, f.campaign_id, f.step,
       CASE WHEN {h('f.id', 53)} % 100 < 2 THEN 'failed' ELSE 'sent' END, 'fu.' || f.id, 1, f.created_at,
       CASE WHEN {h('f.id', 53)} % 100 < 2 THEN 131026 END, f.created_at, f.created_at + interval '300 milliseconds'
FROM followups f JOIN campaigns c ON c.id = f.campaign_id
WHERE f.status = 'queued'
"""
FOLLOWUP_LINKS = """
UPDATE followups f SET outbox_id = o.id
FROM outbox o
WHERE o.campaign_id = f.campaign_id AND o.phone_number_id = f.phone_number_id AND o.user_id = f.user_id
"""
FOLLOWUP_STATUSES = f"""
INSERT INTO message_status (wamid, phone_number_id, recipient_id, status, rank, status_at, updated_at)
SELECT wamid, phone_number_id, user_id, (ARRAY['sent', 'delivered', 'read'])[rank], rank,
       sent_at + rank * interval '1 minute', sent_at + rank * interval '1 minute'
FROM (SELECT o.*, CASE WHEN {h('o.id', 59)} % 100 < 35 THEN 3 WHEN {h('o.id', 59)} % 100 < 85 THEN 2 ELSE 1 END AS rank
      FROM outbox o WHERE o.campaign_id IS NOT NULL AND o.status = 'sent') o
"""


@contextmanager
def timed(label: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    print(f"  {label:<28} {time.perf_counter() - started:7.1f} s", flush=True)


def recreate(admin_url: str, name: str) -> str:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@contextmanager
def indexes_dropped(conn: Connection, tables: tuple[str, ...]) -> Iterator[None]:
    """Bulk load without maintaining secondary indexes row by row; rebuild them (same definitions) after."""
    unique: list[tuple[str, str, str]] = []
    plain: list[tuple[str, str]] = []
    for table in tables:
        unique += [(table, r.conname, r.definition) for r in conn.execute(text(
            "SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint "
            "WHERE conrelid = CAST(:t AS regclass) AND contype = 'u'"), {"t": table})]
        plain += [(r.indexname, r.indexdef) for r in conn.execute(text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :t AND indexname NOT IN "
            "(SELECT conname FROM pg_constraint WHERE conrelid = CAST(:t AS regclass))"), {"t": table})]
    for table, name, _ in unique:
        conn.execute(text(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'))
    for name, _ in plain:
        conn.execute(text(f'DROP INDEX "{name}"'))
    yield
    with timed(f"rebuild {len(unique) + len(plain)} indexes"):
        for table, name, definition in unique:
            conn.execute(text(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}'))
        for _, definition in plain:
            conn.execute(text(definition))


def fill(conn: Connection, sessions: int, days: int, parts: int) -> None:
    params = {"sessions": sessions, "days": days}
    conn.execute(text("SET synchronous_commit = off"))
    conn.execute(text("SET maintenance_work_mem = '1GB'"))
    with timed(f"{sessions:,} sessions"):
        conn.execute(text(SESSIONS), params)
    with timed(f"{sessions * TRANSITIONS_PER_SESSION:,} transitions"):
        for part in range(parts):
            conn.execute(text(TRANSITIONS), {**params, "parts": parts, "part": part})
    with timed("inbound events (14 days)"):
        conn.execute(text(INBOUND))
    with timed("webhook stats (7 days)"):
        conn.execute(text(WEBHOOK_STATS))
    with timed("outbox (7 days)"):
        conn.execute(text(OUTBOX))
    with timed("campaigns + follow-ups"):
        conn.execute(text(CAMPAIGNS))
        conn.execute(text(FOLLOWUPS))
        conn.execute(text(FOLLOWUP_OUTBOX))
        conn.execute(text(FOLLOWUP_LINKS))
        conn.execute(text(FOLLOWUP_STATUSES))


def vacuum_until_visible(db: Database, table: str, attempts: int = 5) -> None:
    """VACUUM ANALYZE until the table's pages are marked all-visible, as the dashboard's index-only scans need.

    A VACUUM run while some other transaction still holds an older snapshot cannot mark the pages just
    written (seen once right after the rollup's first build: funnels then read the table, twice as slow;
    seen for sessions after the database-wide VACUUM).
    """
    for _ in range(attempts):
        with db.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f"VACUUM ANALYZE {table}"))
            pages, visible = conn.execute(text(
                "SELECT relpages, relallvisible FROM pg_class WHERE oid = CAST(:t AS regclass)"), {"t": table}).one()
        if visible >= 0.99 * pages:
            return
        time.sleep(5)
    print(f"  {table}: only {visible:,} of {pages:,} pages all-visible after {attempts} VACUUMs", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--database", default="waflow_bench")
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=90)
    args = parser.parse_args()
    started = time.perf_counter()
    url = recreate(args.admin_url, args.database)
    db = Database(url)
    ensure_schema(db)
    print(f"seeding {url}", flush=True)
    parts = max(1, args.sessions // 250_000)
    with db.engine.begin() as conn, indexes_dropped(conn, ("sessions", "transitions", "inbound_events", "outbox")):
        fill(conn, args.sessions, args.days, parts)
    with timed("VACUUM ANALYZE"), db.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    with timed("funnel rollup (first build)"):
        refresh_rollups(db)
    with timed("VACUUM until all-visible"):
        # The rollup, and the tables the in-progress indexes cover: the database-wide VACUUM above has been
        # seen to leave sessions and followups without a single all-visible page (stalled counts and the
        # state distribution then read the table instead of ix_sessions_in_progress alone).
        for table in ("analytics_step_reach", "sessions", "followups"):
            vacuum_until_visible(db, table)
    with db.engine.connect() as conn:
        counts = {t: conn.scalar(text(f"SELECT count(*) FROM {t}")) for t in ("sessions", "transitions")}
    db.dispose()
    print(f"done in {time.perf_counter() - started:.0f} s: {counts['sessions']:,} sessions, "
          f"{counts['transitions']:,} transitions")
    print(f"DATABASE_URL={url}")


if __name__ == "__main__":
    main()
