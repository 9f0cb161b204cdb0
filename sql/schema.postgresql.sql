BEGIN;

CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL, 
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);

-- Running upgrade  -> 0001

CREATE TABLE campaigns (
    id BIGSERIAL NOT NULL, 
    name VARCHAR(200) NOT NULL, 
    flow VARCHAR(100) NOT NULL, 
    step VARCHAR(100) NOT NULL, 
    delay_seconds INTEGER NOT NULL, 
    text TEXT, 
    template_name VARCHAR(200), 
    template_language VARCHAR(16), 
    template_params JSONB NOT NULL, 
    max_sends INTEGER NOT NULL, 
    quiet_start VARCHAR(5), 
    quiet_end VARCHAR(5), 
    timezone VARCHAR(64) NOT NULL, 
    active BOOLEAN NOT NULL, 
    filter_language VARCHAR(16), 
    filter_phone_number_id VARCHAR(64), 
    recovery_window_seconds INTEGER NOT NULL, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    PRIMARY KEY (id), 
    UNIQUE (name)
);

CREATE TABLE inbound_events (
    id BIGSERIAL NOT NULL, 
    phone_number_id VARCHAR(64) NOT NULL, 
    wamid VARCHAR(256) NOT NULL, 
    user_id VARCHAR(128) NOT NULL, 
    timestamp BIGINT NOT NULL, 
    kind VARCHAR(32) NOT NULL, 
    message JSONB NOT NULL, 
    received_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    processed_at TIMESTAMP WITH TIME ZONE, 
    result VARCHAR(16), 
    PRIMARY KEY (id), 
    CONSTRAINT uq_inbound_wamid UNIQUE (phone_number_id, wamid)
);

CREATE INDEX ix_inbound_pending ON inbound_events (phone_number_id, user_id, timestamp) WHERE processed_at IS NULL;

CREATE INDEX ix_inbound_received ON inbound_events (received_at);

CREATE INDEX ix_inbound_session ON inbound_events (phone_number_id, user_id, timestamp);

CREATE TABLE job_runs (
    id BIGSERIAL NOT NULL, 
    job VARCHAR(50) NOT NULL, 
    started_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    finished_at TIMESTAMP WITH TIME ZONE, 
    ok BOOLEAN, 
    result JSONB NOT NULL, 
    owner VARCHAR(100), 
    PRIMARY KEY (id)
);

CREATE INDEX ix_job_runs_job_started ON job_runs (job, started_at);

CREATE TABLE message_status (
    wamid VARCHAR(256) NOT NULL, 
    phone_number_id VARCHAR(64) NOT NULL, 
    recipient_id VARCHAR(128), 
    status VARCHAR(16) NOT NULL, 
    rank INTEGER NOT NULL, 
    error_code INTEGER, 
    status_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    PRIMARY KEY (wamid)
);

CREATE TABLE message_status_events (
    id BIGSERIAL NOT NULL, 
    wamid VARCHAR(256) NOT NULL, 
    phone_number_id VARCHAR(64) NOT NULL, 
    status VARCHAR(16) NOT NULL, 
    timestamp BIGINT NOT NULL, 
    errors JSONB NOT NULL, 
    received_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    PRIMARY KEY (id), 
    CONSTRAINT uq_status_event UNIQUE (wamid, status, timestamp)
);

CREATE INDEX ix_status_events_received ON message_status_events (received_at);

CREATE TABLE sender_pauses (
    phone_number_id VARCHAR(64) NOT NULL, 
    error_code INTEGER, 
    reason TEXT NOT NULL, 
    paused_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    PRIMARY KEY (phone_number_id)
);

CREATE TABLE sessions (
    phone_number_id VARCHAR(64) NOT NULL, 
    user_id VARCHAR(128) NOT NULL, 
    flow VARCHAR(100) NOT NULL, 
    flow_version INTEGER NOT NULL, 
    current_step VARCHAR(100) NOT NULL, 
    data JSONB NOT NULL, 
    version BIGINT NOT NULL, 
    failure_count INTEGER NOT NULL, 
    language VARCHAR(16) NOT NULL, 
    status VARCHAR(16) NOT NULL, 
    profile_name VARCHAR(256), 
    opted_out BOOLEAN NOT NULL, 
    opted_out_at TIMESTAMP WITH TIME ZONE, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    last_inbound_at TIMESTAMP WITH TIME ZONE, 
    window_closed_at TIMESTAMP WITH TIME ZONE, 
    step_entered_at TIMESTAMP WITH TIME ZONE, 
    last_transition_at TIMESTAMP WITH TIME ZONE, 
    completed_at TIMESTAMP WITH TIME ZONE, 
    archived_at TIMESTAMP WITH TIME ZONE, 
    archived_from VARCHAR(16), 
    PRIMARY KEY (phone_number_id, user_id)
);

CREATE INDEX ix_sessions_status_inbound ON sessions (status, last_inbound_at);

CREATE INDEX ix_sessions_step_updated ON sessions (flow, current_step, updated_at);

CREATE TABLE transitions (
    id BIGSERIAL NOT NULL, 
    phone_number_id VARCHAR(64) NOT NULL, 
    user_id VARCHAR(128) NOT NULL, 
    flow VARCHAR(100) NOT NULL, 
    flow_version INTEGER NOT NULL, 
    from_step VARCHAR(100), 
    to_step VARCHAR(100) NOT NULL, 
    outcome VARCHAR(16) NOT NULL, 
    wamid VARCHAR(256) NOT NULL, 
    at TIMESTAMP WITH TIME ZONE NOT NULL, 
    applied_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    elapsed_seconds FLOAT, 
    session_version BIGINT NOT NULL, 
    language VARCHAR(16), 
    PRIMARY KEY (id), 
    CONSTRAINT uq_transitions_wamid UNIQUE (phone_number_id, wamid)
);

CREATE INDEX ix_transitions_flow_at ON transitions (flow, at);

CREATE INDEX ix_transitions_session ON transitions (phone_number_id, user_id, id);

CREATE TABLE outbox (
    id BIGSERIAL NOT NULL, 
    idempotency_key VARCHAR(300) NOT NULL, 
    phone_number_id VARCHAR(64) NOT NULL, 
    user_id VARCHAR(128) NOT NULL, 
    kind VARCHAR(16) NOT NULL, 
    body JSONB NOT NULL, 
    text TEXT, 
    template VARCHAR(200), 
    campaign_id BIGINT, 
    step VARCHAR(100), 
    in_reply_to VARCHAR(256), 
    status VARCHAR(16) NOT NULL, 
    wamid VARCHAR(256), 
    attempts INTEGER NOT NULL, 
    next_attempt_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    claimed_at TIMESTAMP WITH TIME ZONE, 
    claimed_by VARCHAR(100), 
    error_code INTEGER, 
    error_title TEXT, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    sent_at TIMESTAMP WITH TIME ZONE, 
    PRIMARY KEY (id), 
    FOREIGN KEY(campaign_id) REFERENCES campaigns (id), 
    UNIQUE (idempotency_key)
);

CREATE INDEX ix_outbox_due ON outbox (status, next_attempt_at);

CREATE INDEX ix_outbox_session ON outbox (phone_number_id, user_id, id);

CREATE INDEX ix_outbox_wamid ON outbox (wamid);

CREATE TABLE followups (
    id BIGSERIAL NOT NULL, 
    campaign_id BIGINT NOT NULL, 
    phone_number_id VARCHAR(64) NOT NULL, 
    user_id VARCHAR(128) NOT NULL, 
    attempt INTEGER NOT NULL, 
    step VARCHAR(100) NOT NULL, 
    status VARCHAR(16) NOT NULL, 
    reason TEXT, 
    outbox_id BIGINT, 
    stalled_since TIMESTAMP WITH TIME ZONE, 
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    PRIMARY KEY (id), 
    FOREIGN KEY(campaign_id) REFERENCES campaigns (id), 
    FOREIGN KEY(outbox_id) REFERENCES outbox (id), 
    CONSTRAINT uq_followup_attempt UNIQUE (campaign_id, phone_number_id, user_id, attempt)
);

CREATE INDEX ix_followups_session ON followups (phone_number_id, user_id);

INSERT INTO alembic_version (version_num) VALUES ('0001') RETURNING alembic_version.version_num;

-- Running upgrade 0001 -> 0002

CREATE TABLE webhook_stats (
    bucket TIMESTAMP WITH TIME ZONE NOT NULL, 
    result VARCHAR(32) NOT NULL, 
    count BIGINT NOT NULL, 
    PRIMARY KEY (bucket, result)
);

UPDATE alembic_version SET version_num='0002' WHERE alembic_version.version_num = '0001';

-- Running upgrade 0002 -> 0003

ALTER TABLE outbox ADD COLUMN send_started_at TIMESTAMP WITH TIME ZONE;

CREATE INDEX ix_outbox_campaign ON outbox (campaign_id);

ALTER TABLE job_runs ADD COLUMN run_key VARCHAR(200);

CREATE UNIQUE INDEX uq_job_runs_run_key ON job_runs (run_key);

UPDATE alembic_version SET version_num='0003' WHERE alembic_version.version_num = '0002';

-- Running upgrade 0003 -> 0006

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
$fn$;

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
$fn$;

UPDATE alembic_version SET version_num='0006' WHERE alembic_version.version_num = '0003';

-- Running upgrade 0002 -> 0004

CREATE TABLE analytics_step_reach (
    phone_number_id VARCHAR(64) NOT NULL, 
    user_id VARCHAR(128) NOT NULL, 
    flow VARCHAR(100) NOT NULL, 
    step VARCHAR(100) NOT NULL, 
    first_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    entered_at TIMESTAMP WITH TIME ZONE, 
    PRIMARY KEY (phone_number_id, user_id, flow, step)
);

CREATE INDEX ix_step_reach_flow_entered ON analytics_step_reach (flow, entered_at) INCLUDE (phone_number_id, user_id, step, first_at);

CREATE INDEX ix_transitions_outcome_at ON transitions (outcome, at);

CREATE INDEX ix_inbound_timestamp ON inbound_events (timestamp);

CREATE TABLE analytics_watermarks (
    name VARCHAR(50) NOT NULL, 
    last_id BIGINT NOT NULL, 
    refreshed_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    PRIMARY KEY (name)
);

INSERT INTO alembic_version (version_num) VALUES ('0004') RETURNING alembic_version.version_num;

-- Running upgrade 0004 -> 0005

CREATE INDEX IF NOT EXISTS ix_transitions_moves ON transitions (at, id) INCLUDE (flow, phone_number_id, language, from_step, to_step, elapsed_seconds) WHERE outcome IN ('advanced', 'completed', 'handoff') AND elapsed_seconds IS NOT NULL;

CREATE INDEX IF NOT EXISTS ix_transitions_session_at ON transitions (phone_number_id, user_id, at) INCLUDE (outcome, from_step);

DROP INDEX ix_transitions_session;

CREATE INDEX IF NOT EXISTS ix_step_reach_journeys ON analytics_step_reach (flow, entered_at, phone_number_id, user_id) INCLUDE (step, first_at);

DROP INDEX ix_step_reach_flow_entered;

ALTER TABLE transitions SET (autovacuum_vacuum_insert_threshold = 10000, autovacuum_vacuum_insert_scale_factor = 0);

ALTER TABLE analytics_step_reach SET (autovacuum_vacuum_insert_threshold = 10000, autovacuum_vacuum_insert_scale_factor = 0);

UPDATE alembic_version SET version_num='0005' WHERE alembic_version.version_num = '0004';

-- Running upgrade 0005, 0006 -> 0007

ALTER TABLE transitions ADD COLUMN restored BOOLEAN DEFAULT false NOT NULL;

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
$fn$;

DELETE FROM alembic_version WHERE alembic_version.version_num = '0005';

UPDATE alembic_version SET version_num='0007' WHERE alembic_version.version_num = '0006';

-- Running upgrade 0007 -> 0008

CREATE INDEX IF NOT EXISTS ix_sessions_in_progress ON sessions (last_inbound_at, phone_number_id, user_id) INCLUDE (flow, current_step, language, status, opted_out, window_closed_at, step_entered_at, created_at) WHERE status = 'active' OR (status = 'archived' AND archived_from = 'active');

CREATE INDEX IF NOT EXISTS ix_sessions_step_in_progress ON sessions (flow, current_step, last_inbound_at, phone_number_id, user_id) WHERE status = 'active' OR (status = 'archived' AND archived_from = 'active');

CREATE INDEX IF NOT EXISTS ix_outbox_window_closed ON outbox (id) WHERE error_code = 131047;

CREATE STATISTICS IF NOT EXISTS st_sessions_flow_step (dependencies, mcv) ON flow, current_step FROM sessions;

ANALYZE sessions;

UPDATE alembic_version SET version_num='0008' WHERE alembic_version.version_num = '0007';

-- Running upgrade 0008 -> 0009

CREATE TABLE quarantine (
    id BIGSERIAL NOT NULL, 
    stage VARCHAR(16) NOT NULL, 
    phone_number_id VARCHAR(64), 
    user_id VARCHAR(128), 
    wamid VARCHAR(256), 
    event_id BIGINT, 
    reason TEXT NOT NULL, 
    payload TEXT, 
    fingerprint VARCHAR(80) NOT NULL, 
    seen INTEGER NOT NULL, 
    status VARCHAR(16) NOT NULL, 
    first_seen_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    last_seen_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    resolved_at TIMESTAMP WITH TIME ZONE, 
    resolved_by VARCHAR(100), 
    PRIMARY KEY (id), 
    UNIQUE (fingerprint)
);

CREATE INDEX ix_quarantine_status_seen ON quarantine (status, last_seen_at);

CREATE TABLE audit_log (
    id BIGSERIAL NOT NULL, 
    at TIMESTAMP WITH TIME ZONE NOT NULL, 
    actor VARCHAR(100) NOT NULL, 
    action VARCHAR(50) NOT NULL, 
    target TEXT NOT NULL, 
    reason TEXT NOT NULL, 
    details JSONB NOT NULL, 
    PRIMARY KEY (id)
);

CREATE INDEX ix_audit_log_at ON audit_log (at);

ALTER TABLE inbound_events ADD COLUMN apply_attempts INTEGER DEFAULT 0 NOT NULL;

ALTER TABLE inbound_events ADD COLUMN apply_error TEXT;

UPDATE alembic_version SET version_num='0009' WHERE alembic_version.version_num = '0008';

-- Running upgrade 0009 -> 0010

ALTER TABLE message_status ADD COLUMN pricing_category VARCHAR(32);

ALTER TABLE message_status ADD COLUMN pricing_billable BOOLEAN;

ALTER TABLE message_status ADD COLUMN pricing_model VARCHAR(32);

CREATE TABLE marketing_optouts (
    phone_number_id VARCHAR(64) NOT NULL, 
    user_id VARCHAR(128) NOT NULL, 
    source VARCHAR(32) NOT NULL, 
    opted_out_at TIMESTAMP WITH TIME ZONE NOT NULL, 
    PRIMARY KEY (phone_number_id, user_id)
);

UPDATE alembic_version SET version_num='0010' WHERE alembic_version.version_num = '0009';

COMMIT;

