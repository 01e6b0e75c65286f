-- The parts the three write statements share (fragments: see engine/sqlfiles.py).

-- name: _template
-- The template row: the reducer's first row of the write, as a record, once.
t AS MATERIALIZED (
    SELECT jsonb_populate_record(NULL::jobledger.jobs, $1::jsonb) AS r
),

-- name: _rows
-- Each job's row: the template, overlaid with the columns in which the job's
-- row differs ($3, NULL when none does), for the ids of $2 in their order (n).
x.version, x.operator, x.label, x.description, x.queue, x.status,
x.priority, x.inputs, x.context, x.tags, x.pinned, x.owner, x.parent_id,
x.attempt, x.max_attempts, x.restart_policy, x.retry_backoff,
x.retry_backoff_max, x.run, x.run_at, x.timeout, x.progress, x.result,
x.error, x.artifacts, x.worker, x.run_link, x.status_reason,
x.status_message, x.idempotency_key, x.created_at, x.started_at,
x.finished_at, x.updated_at, x.status_changed_at, x.deleted_at
FROM t, unnest($2::uuid[]) WITH ORDINALITY AS u(id, n),
     LATERAL jsonb_populate_record(t.r, $3::jsonb -> (u.n::int - 1)) AS x

-- name: _events
-- The events' values, once a statement: each one shared by all (a string
-- type or time, an object of data or meta) or an array of one per job. The
-- shared ones are extracted here, so a row takes them with no JSON operation
-- at all (0.3 us less server time a job for 100-job batches).
ev AS MATERIALIZED (
    SELECT $4::jsonb -> 'type' AS type, $4::jsonb -> 'data' AS data,
           $4::jsonb -> 'meta' AS meta, $4::jsonb -> 'at' AS at,
           CASE WHEN jsonb_typeof($4::jsonb -> 'type') = 'string'
                THEN $4::jsonb ->> 'type' END AS shared_type,
           CASE WHEN jsonb_typeof($4::jsonb -> 'data') = 'object'
                THEN $4::jsonb -> 'data' END AS shared_data,
           CASE WHEN jsonb_typeof($4::jsonb -> 'meta') = 'object'
                THEN $4::jsonb -> 'meta' END AS shared_meta,
           CASE WHEN jsonb_typeof($4::jsonb -> 'at') = 'string'
                THEN ($4::jsonb ->> 'at')::timestamptz END AS shared_at
),

-- name: _event_values
-- The event of the n-th job (u.n): the shared type, data, meta and time, or
-- its own (COALESCE stops at the first value that is not NULL).
coalesce(ev.shared_type, ev.type ->> (u.n::int - 1)),
coalesce(ev.shared_data, ev.data -> (u.n::int - 1)),
coalesce(ev.shared_meta, ev.meta -> (u.n::int - 1)),
coalesce(ev.shared_at, (ev.at ->> (u.n::int - 1))::timestamptz)

-- name: _set_row
-- An UPDATE of jobs to the new row s, every column but the id.
    SET (version, operator, label, description, queue, status, priority, inputs,
         context, tags, pinned, owner, parent_id, attempt, max_attempts,
         restart_policy, retry_backoff, retry_backoff_max, run, run_at, timeout,
         progress, result, error, artifacts, worker, run_link, status_reason,
         status_message, idempotency_key, created_at, started_at, finished_at,
         updated_at, status_changed_at, deleted_at)
      = (s.version, s.operator, s.label, s.description, s.queue, s.status, s.priority,
         s.inputs, s.context, s.tags, s.pinned, s.owner, s.parent_id, s.attempt,
         s.max_attempts, s.restart_policy, s.retry_backoff, s.retry_backoff_max, s.run,
         s.run_at, s.timeout, s.progress, s.result, s.error, s.artifacts, s.worker,
         s.run_link, s.status_reason, s.status_message, s.idempotency_key,
         s.created_at, s.started_at, s.finished_at, s.updated_at, s.status_changed_at,
         s.deleted_at)

-- name: append_events
-- Append one event to each of several existing streams and write each job's
-- new row, in one statement. The parameters are those of create_streams
-- (below): $1 a template row, $2 the jobs' ids, $3 NULL or the columns in
-- which each job's row differs from the template, $4 the events' type, data,
-- meta and time (each one shared or one per job), $5 a NOTIFY payload or
-- NULL. The event's version is its job's new row's.
--
-- The UPDATE is guarded by the version the writer read (the new version - 1):
-- a job that another writer moved first matches no row, so its event is not
-- inserted and it is missing from the result. The UNIQUE (job_id, version)
-- constraint on events is the second guard. At most one event per job.
--
-- The result is one row, the ids of the jobs written, or no row at all when
-- none was: the uncorrelated sub-select (the NOTIFY) runs once, and only when
-- that row is produced.
WITH
-- include: _template
s AS (
    SELECT u.n, u.id,
-- include: _rows
),
moved AS (
    UPDATE jobledger.jobs AS j
-- include: _set_row
    FROM s
    WHERE j.id = ANY($2::uuid[]) AND j.id = s.id AND j.version = s.version - 1
    RETURNING j.id, j.version, s.n
),
-- include: _events
ins AS (
    INSERT INTO jobledger.events (job_id, version, type, data, meta, recorded_at)
    SELECT u.id, u.version,
-- include: _event_values
    FROM ev, moved AS u
    RETURNING job_id
)
SELECT array_agg(ins.job_id),
       (SELECT count(*) FROM (SELECT pg_notify('jobledger', $5::text)
                              WHERE $5::text IS NOT NULL) AS n) AS notified
FROM ins
HAVING count(*) > 0;

-- name: append_event
-- append_events for a single job, the shape of every one-job transition (an
-- API call, a claim or an outcome of one): its new row is the template ($1)
-- itself, so there is no unnest, no per-row overlay and no shared-event CTE
-- (27 us less server time a statement than append_events with one job: 137
-- against 164, EXPLAIN ANALYZE side by side). $1: the job's new row (JSON);
-- $2: its id; $3: its event, {type, data, meta, at}; $4: a NOTIFY payload or
-- NULL. Guarded by the version as append_events is; the result is the same:
-- one row holding the id when it was written, no row when it was not.
WITH moved AS (
    UPDATE jobledger.jobs AS j
-- include: _set_row
    FROM jsonb_populate_record(NULL::jobledger.jobs, $1::jsonb) AS s
    WHERE j.id = $2::uuid AND j.version = s.version - 1
    RETURNING j.id, j.version
),
ins AS (
    INSERT INTO jobledger.events (job_id, version, type, data, meta, recorded_at)
    SELECT moved.id, moved.version, $3::jsonb ->> 'type', $3::jsonb -> 'data',
           $3::jsonb -> 'meta', ($3::jsonb ->> 'at')::timestamptz
    FROM moved
    RETURNING job_id
)
SELECT array_agg(ins.job_id),
       (SELECT count(*) FROM (SELECT pg_notify('jobledger', $4::text)
                              WHERE $4::text IS NOT NULL) AS n) AS notified
FROM ins
HAVING count(*) > 0;

-- name: create_streams
-- Start new streams: insert each job's first row and its job.submitted event,
-- in one statement. A job whose idempotency key is already taken is skipped
-- (ON CONFLICT DO NOTHING) and missing from the result; the caller then reads
-- the existing job by its key.
--
-- The rows come as one template and what each job changes in it (see
-- store._encode_writes): the jobs of one write share most of their row, and
-- turning a whole row of JSON into a record for every job was half of the
-- statement's server time. $1: the template row (the reducer's first row, as
-- JSON); $2: the jobs' ids; $3: NULL when the rows differ only in their ids,
-- else a JSON array of one object per job holding the columns that differ
-- (keys absent keep the template's value); $4: the events, {type, data, meta,
-- at}, each one value shared by all or an array of one per job (data and
-- meta are objects, so an array is always the per-job form); $5: a NOTIFY
-- payload or NULL. The events go as one JSON parameter, not one array each:
-- an array parameter costs the client ~3 us a statement to encode, and a
-- single submit paid 24 us more client time with three of them. As in
-- append_events: one row of the ids stored, or none (and no NOTIFY).
WITH
-- include: _template
created AS (
    INSERT INTO jobledger.jobs
    SELECT u.id,
-- include: _rows
    ON CONFLICT DO NOTHING
    RETURNING id
),
-- include: _events
ins AS (
    INSERT INTO jobledger.events (job_id, version, type, data, meta, recorded_at)
    SELECT u.id, 1,
-- include: _event_values
    FROM ev, unnest($2::uuid[]) WITH ORDINALITY AS u(id, n)
    JOIN created ON created.id = u.id
    RETURNING job_id
)
SELECT array_agg(ins.job_id),
       (SELECT count(*) FROM (SELECT pg_notify('jobledger', $5::text)
                              WHERE $5::text IS NOT NULL) AS n) AS notified
FROM ins
HAVING count(*) > 0;

-- name: create_streams_plain
-- create_streams for a batch in which no job has an idempotency key: no job
-- can be skipped, so no conflict clause (a speculative insertion per row), no
-- join of the events to the rows created, and nothing back but whether it
-- notified (a failing row fails it all, so success means every job was
-- stored): 4% more jobs a second than create_streams for batches of 100 (3
-- us less server time a job); returning no row of the inserted events saves
-- 0.5-0.8 us more (EXPLAIN ANALYZE, 100 jobs, medians of 60: 14.77 -> 14.25
-- and 14.96 -> 14.19). The same parameters.
WITH
-- include: _template
created AS (
    INSERT INTO jobledger.jobs
    SELECT u.id,
-- include: _rows
),
-- include: _events
ins AS (
    INSERT INTO jobledger.events (job_id, version, type, data, meta, recorded_at)
    SELECT u.id, 1,
-- include: _event_values
    FROM ev, unnest($2::uuid[]) WITH ORDINALITY AS u(id, n)
)
SELECT count(*) AS notified FROM (SELECT pg_notify('jobledger', $5::text)
                                  WHERE $5::text IS NOT NULL) AS n;

-- name: create_stream
-- create_streams_plain for a single job, the most common submission: its row
-- is the template ($1) itself and its event one row of VALUES, so the plan has
-- no unnest, no per-row overlay and no shared-event CTE. 44 us less server
-- time a statement than create_streams_plain with one job (101 against 145,
-- EXPLAIN ANALYZE, measured side by side). $1: the job's row (JSON); $2: its
-- id; $3: its event, {type, data, meta, at}; $4: a NOTIFY payload or NULL.
-- One row; a failing insert fails the statement.
WITH created AS (
    INSERT INTO jobledger.jobs
    SELECT * FROM jsonb_populate_record(NULL::jobledger.jobs, $1::jsonb)
),
ins AS (
    INSERT INTO jobledger.events (job_id, version, type, data, meta, recorded_at)
    VALUES ($2::uuid, 1, $3::jsonb ->> 'type', $3::jsonb -> 'data', $3::jsonb -> 'meta',
            ($3::jsonb ->> 'at')::timestamptz)
)
SELECT 1 AS stored,
       (SELECT count(*) FROM (SELECT pg_notify('jobledger', $4::text)
                              WHERE $4::text IS NOT NULL) AS n) AS notified;

-- name: load_job
-- One job's current row, as JSON for msgspec.
SELECT to_json(j) FROM jobledger.jobs AS j WHERE j.id = $1;

-- name: load_jobs
-- Several jobs' current rows, as JSON for msgspec.
SELECT to_json(j) FROM jobledger.jobs AS j WHERE j.id = ANY($1::uuid[]);

-- name: jobs_by_idempotency_key
-- The jobs holding these idempotency keys.
SELECT to_json(j) FROM jobledger.jobs AS j WHERE j.idempotency_key = ANY($1::text[]);

-- name: read_stream
-- One job's events, in version order.
SELECT position, job_id, version, type, data::text AS data, meta::text AS meta,
       recorded_at, tx_id::text::bigint AS tx_id
FROM jobledger.events
WHERE job_id = $1
ORDER BY version;

-- name: read_streams
-- Several jobs' events, by job then version.
SELECT position, job_id, version, type, data::text AS data, meta::text AS meta,
       recorded_at, tx_id::text::bigint AS tx_id
FROM jobledger.events
WHERE job_id = ANY($1::uuid[])
ORDER BY job_id, version;

-- name: read_log
-- The next events of the whole log after checkpoint ($1 tx_id, $2 position),
-- in (tx_id, position) order, only below the fence: transactions with an id
-- under pg_snapshot_xmin(pg_current_snapshot()) have all ended, so nothing
-- below it can still appear. See engine/store.py for why this is gap-free.
-- ORDER BY names the table's columns (e.): a bare tx_id would mean the output
-- column, the bigint cast, and sort the whole rest of the log on every batch
-- instead of walking the events_pkey index, (tx_id, position).
SELECT e.position, e.job_id, e.version, e.type, e.data::text AS data, e.meta::text AS meta,
       e.recorded_at, e.tx_id::text::bigint AS tx_id
FROM jobledger.events AS e
WHERE (e.tx_id, e.position) > ($1::text::xid8, $2::bigint)
  AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY e.tx_id, e.position
LIMIT $3;

-- name: log_ahead_of_cluster
-- Whether the log holds transaction ids from another cluster's future (a
-- logical dump restored here): such a log cannot be read gap-free by tx_id.
SELECT max(tx_id) > pg_current_xact_id() FROM jobledger.events;

-- name: log_lag
-- Events after a checkpoint, and the age of the oldest of them.
SELECT count(*) AS events, clock_timestamp() - min(recorded_at) AS age
FROM jobledger.events
WHERE (tx_id, position) > ($1::text::xid8, $2::bigint);
