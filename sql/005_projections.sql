-- 005: checkpoints of the async projections, and the report projection.
--
-- Each async projection (projections/runner.py) keeps one checkpoint row,
-- updated in the same transaction as its own writes: a crash never applies an
-- event twice or skips one. The checkpoint is the (tx_id, position) of the last
-- event read, in the gap-free order of engine/store.py.

CREATE TABLE jobledger.projection_checkpoints (
    name        text        PRIMARY KEY,
    tx_id       xid8        NOT NULL DEFAULT '0',
    position    bigint      NOT NULL DEFAULT 0,
    applied     bigint      NOT NULL DEFAULT 0,   -- events handled so far
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Histograms (run and wait times) are jsonb objects {bucket index: count} on
-- a logarithmic scale (projections/reports.py); merging is adding counts.
CREATE FUNCTION jobledger.hist_merge(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_object_agg(k, v), '{}'::jsonb)
    FROM (
        SELECT k, sum(v::bigint) AS v
        FROM (
            SELECT key AS k, value::text AS v FROM jsonb_each(coalesce(a, '{}'::jsonb))
            UNION ALL
            SELECT key, value::text FROM jsonb_each(coalesce(b, '{}'::jsonb))
        ) AS both_sides
        GROUP BY k
    ) AS merged;
$$;

-- The report projection: per dimension (operator or queue), key and hour.
CREATE TABLE jobledger.report_buckets (
    dimension  text        NOT NULL,           -- 'operator' or 'queue'
    key        text        NOT NULL,
    bucket     timestamptz NOT NULL,           -- the hour
    submitted  bigint      NOT NULL DEFAULT 0,
    started    bigint      NOT NULL DEFAULT 0,
    completed  bigint      NOT NULL DEFAULT 0,
    failed     bigint      NOT NULL DEFAULT 0, -- attempts that failed for good
    retried    bigint      NOT NULL DEFAULT 0, -- attempts that failed and were retried
    cancelled  bigint      NOT NULL DEFAULT 0,
    rescued    bigint      NOT NULL DEFAULT 0,
    run_hist   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    wait_hist  jsonb       NOT NULL DEFAULT '{}'::jsonb,
    CONSTRAINT report_buckets_pkey PRIMARY KEY (dimension, key, bucket)
);

-- Working state of the report projection: what it needs to know about a job
-- to measure wait and run times (its own, folded from events it handled).
CREATE TABLE jobledger.report_jobs (
    job_id     uuid        PRIMARY KEY,
    operator   text        NOT NULL,
    queue      text        NOT NULL,
    due_at     timestamptz,
    started_at timestamptz
);

-- Contributions of pruned streams (sql/006): rebuild and verify start from it.
CREATE TABLE jobledger.report_baseline (LIKE jobledger.report_buckets INCLUDING ALL);
