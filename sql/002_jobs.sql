-- 002: the inline `jobs` projection: the current state of every job.
--
-- Every row is written in the same statement as the event that produced it
-- (sql/queries/append.sql), with values computed by projections/job_state.py,
-- the same reducer that replay uses. `version` is the last applied event and
-- guards every write. This table is also the queue: see jobs_ready below.
--
-- Column order matters: jsonb_populate_record(NULL::jobledger.jobs, ...) maps
-- the reducer's JSON onto this row type, and tests/test_schema.py checks that
-- the columns equal the fields of projections.job_state.Job.

CREATE TABLE jobledger.jobs (
    id                uuid        PRIMARY KEY,
    version           integer     NOT NULL,
    operator          text        NOT NULL,
    label             text        NOT NULL,
    description       text,
    queue             text        NOT NULL,
    status            text        NOT NULL,
    priority          integer     NOT NULL,
    inputs            jsonb,
    context           jsonb       NOT NULL,
    tags              text[]      NOT NULL,
    pinned            boolean     NOT NULL,
    owner             text,
    parent_id         uuid,
    attempt           integer     NOT NULL,
    max_attempts      integer     NOT NULL,
    restart_policy    text        NOT NULL,
    retry_backoff     double precision NOT NULL,
    retry_backoff_max double precision NOT NULL,
    run               integer     NOT NULL,
    run_at            timestamptz,
    timeout           double precision,
    progress          jsonb,
    result            jsonb,
    error             jsonb,
    artifacts         jsonb       NOT NULL,
    worker            text,
    run_link          text,
    status_reason     text,
    status_message    text,
    idempotency_key   text,
    created_at        timestamptz NOT NULL,
    started_at        timestamptz,
    finished_at       timestamptz,
    updated_at        timestamptz NOT NULL,
    status_changed_at timestamptz NOT NULL,
    deleted_at        timestamptz
);

-- The queue: only ready rows are indexed, in claim order, so the claim query
-- reads the head of this small index and nothing else.
CREATE INDEX jobs_ready ON jobledger.jobs (priority DESC, run_at, id)
    WHERE status IN ('queued', 'scheduled') AND deleted_at IS NULL;

-- Running jobs by worker: rescue of dead workers, cancellation delivery.
CREATE INDEX jobs_running ON jobledger.jobs (worker)
    WHERE status IN ('running', 'cancelling');

-- A second submit with the same key returns the first job.
CREATE UNIQUE INDEX jobs_idempotency_key ON jobledger.jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Listing: the common filters with the default order (newest first, then id,
-- the tie-breaker every listing ends with), so a page is an index range scan.
CREATE INDEX jobs_status_created ON jobledger.jobs (status, created_at DESC, id DESC);
CREATE INDEX jobs_operator_status_created
    ON jobledger.jobs (operator, status, created_at DESC, id DESC);
CREATE INDEX jobs_queue_created ON jobledger.jobs (queue, created_at DESC, id DESC);
CREATE INDEX jobs_created ON jobledger.jobs (created_at DESC, id DESC);
CREATE INDEX jobs_parent ON jobledger.jobs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX jobs_owner ON jobledger.jobs (owner, created_at DESC) WHERE owner IS NOT NULL;
CREATE INDEX jobs_tags ON jobledger.jobs USING gin (tags);
CREATE INDEX jobs_context ON jobledger.jobs USING gin (context jsonb_path_ops);
