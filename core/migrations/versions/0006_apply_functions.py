"""apply functions: PostgreSQL's apply path in two statements per transaction, whatever the number of users

Revision ID: 0006
Revises: 0003
Create Date: 2026-11-23 21:40:00.000000

- waflow_claim(sessions, limit, skip_locked): for each user in the order given (the engine sorts them, so two
  appliers lock in the same order): insert the session if missing, lock it (FOR UPDATE, or SKIP LOCKED), and
  read up to `limit` pending messages in (timestamp, id) order with the step of the prompt each one
  answers. One row per user: the session as JSON (NULL when skipped) and the pending messages.
- waflow_write(sessions, blanks, transitions, outbox, marks, at): everything the engine decided, for every
  user of the transaction: session updates, blank sessions deleted, transitions and replies inserted,
  messages marked processed.

Client-side, each statement costs far more (psycopg's per-statement work, parameters one by one) than the
server's work on it: four statements per user became two per transaction. Rows are reached by key one
at a time in loops, never by joining a JSON set to a table: a cached generic plan for such a join would
scan the whole table once it grows. Each statement of a (volatile) PL/pgSQL function takes a fresh snapshot
under READ COMMITTED, so the pending read still sees everything committed before the lock was granted.
SQLite has no functions; it keeps the statement-by-statement path.
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0003"
branch_labels = None
depends_on = None

CLAIM = """
CREATE OR REPLACE FUNCTION waflow_claim(p_sessions jsonb, p_limit integer, p_skip_locked boolean)
RETURNS TABLE (session jsonb, pending jsonb)
LANGUAGE plpgsql AS $fn$
DECLARE
    r jsonb;
    k_phone varchar;
    k_user varchar;
BEGIN
    FOR r IN SELECT value FROM jsonb_array_elements(p_sessions) LOOP
        k_phone := r->>'phone_number_id';
        k_user := r->>'user_id';
        INSERT INTO sessions SELECT * FROM jsonb_populate_record(NULL::sessions, r)
            ON CONFLICT (phone_number_id, user_id) DO NOTHING;
        IF p_skip_locked THEN
            SELECT to_jsonb(s) INTO session FROM sessions s
             WHERE s.phone_number_id = k_phone AND s.user_id = k_user FOR UPDATE SKIP LOCKED;
        ELSE
            SELECT to_jsonb(s) INTO session FROM sessions s
             WHERE s.phone_number_id = k_phone AND s.user_id = k_user FOR UPDATE;
        END IF;
        pending := NULL;
        IF session IS NOT NULL THEN
            SELECT jsonb_agg(jsonb_build_array(e.id, e.message, e.context_step) ORDER BY e.timestamp, e.id)
              INTO pending
              FROM (SELECT i.id, i.message, i.timestamp,
                           (SELECT o.step FROM outbox o WHERE o.wamid = i.message->>'context_id' LIMIT 1)
                               AS context_step
                      FROM inbound_events i
                     WHERE i.phone_number_id = k_phone AND i.user_id = k_user AND i.processed_at IS NULL
                     ORDER BY i.timestamp, i.id
                     LIMIT p_limit) e;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$fn$
"""

WRITE = """
CREATE OR REPLACE FUNCTION waflow_write(
    p_sessions jsonb, p_blanks jsonb, p_transitions jsonb, p_outbox jsonb, p_marks jsonb, p_at timestamptz
) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    r jsonb;
    m record;
BEGIN
    FOR r IN SELECT value FROM jsonb_array_elements(p_sessions) LOOP
        UPDATE sessions s
           SET flow = n.flow, flow_version = n.flow_version, current_step = n.current_step, data = n.data,
               version = n.version, failure_count = n.failure_count, language = n.language,
               status = n.status, profile_name = n.profile_name, opted_out = n.opted_out,
               opted_out_at = n.opted_out_at, updated_at = n.updated_at, last_inbound_at = n.last_inbound_at,
               window_closed_at = n.window_closed_at, step_entered_at = n.step_entered_at,
               last_transition_at = n.last_transition_at, completed_at = n.completed_at,
               archived_at = n.archived_at, archived_from = n.archived_from
          FROM jsonb_populate_record(NULL::sessions, r) n
         WHERE s.phone_number_id = n.phone_number_id AND s.user_id = n.user_id;
    END LOOP;
    FOR r IN SELECT value FROM jsonb_array_elements(p_blanks) LOOP
        DELETE FROM sessions s
         WHERE s.phone_number_id = r->>'phone_number_id' AND s.user_id = r->>'user_id' AND s.status = 'new';
    END LOOP;
    INSERT INTO transitions (phone_number_id, user_id, flow, flow_version, from_step, to_step, outcome, wamid,
                             at, applied_at, elapsed_seconds, session_version, language)
    SELECT phone_number_id, user_id, flow, flow_version, from_step, to_step, outcome, wamid,
           at, applied_at, elapsed_seconds, session_version, language
      FROM jsonb_populate_recordset(NULL::transitions, p_transitions);
    INSERT INTO outbox (idempotency_key, phone_number_id, user_id, kind, body, text, step, in_reply_to, status,
                        attempts, next_attempt_at, created_at)
    SELECT idempotency_key, phone_number_id, user_id, kind, body, text, step, in_reply_to, status,
           attempts, next_attempt_at, created_at
      FROM jsonb_populate_recordset(NULL::outbox, p_outbox)
        ON CONFLICT (idempotency_key) DO NOTHING;
    -- By id alone: the claim read these messages unprocessed under the session's lock, which every applier
    -- of this user takes. With "AND processed_at IS NULL" the planner may serve the update from the partial
    -- pending index (the smaller one), reading every pending message for each one marked: quadratic
    -- exactly when a backlog is being worked off.
    FOR m IN SELECT * FROM jsonb_to_recordset(p_marks) AS x(id bigint, result varchar) LOOP
        UPDATE inbound_events SET processed_at = p_at, result = m.result WHERE id = m.id;
    END LOOP;
END
$fn$
"""


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(CLAIM)
        op.execute(WRITE)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS waflow_write(jsonb, jsonb, jsonb, jsonb, jsonb, timestamptz)")
        op.execute("DROP FUNCTION IF EXISTS waflow_claim(jsonb, integer, boolean)")
