-- waflow_write, version 2 (migration 0007): everything the engine decided for every user of one apply
-- transaction: session updates, blank sessions deleted, transitions and replies inserted, messages marked
-- processed. Version 2 writes transitions.restored (the message brought an archived session back).
-- Loaded by name by its migration; a changed function ships as a new file and a new migration.
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
                             at, applied_at, elapsed_seconds, session_version, language, restored)
    SELECT phone_number_id, user_id, flow, flow_version, from_step, to_step, outcome, wamid,
           at, applied_at, elapsed_seconds, session_version, language, coalesce(restored, false)
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
