-- name: report_add
-- Add a batch of per-(dimension, key, hour) deltas to the report ($1: JSON array).
INSERT INTO jobledger.report_buckets AS r
    (dimension, key, bucket, submitted, started, completed, failed, retried, cancelled,
     rescued, run_hist, wait_hist)
SELECT d.dimension, d.key, d.bucket, d.submitted, d.started, d.completed, d.failed, d.retried,
       d.cancelled, d.rescued, d.run_hist, d.wait_hist
FROM jsonb_to_recordset($1::jsonb)
     AS d(dimension text, key text, bucket timestamptz, submitted bigint, started bigint,
          completed bigint, failed bigint, retried bigint, cancelled bigint, rescued bigint,
          run_hist jsonb, wait_hist jsonb)
ON CONFLICT (dimension, key, bucket) DO UPDATE SET
    submitted = r.submitted + EXCLUDED.submitted,
    started   = r.started + EXCLUDED.started,
    completed = r.completed + EXCLUDED.completed,
    failed    = r.failed + EXCLUDED.failed,
    retried   = r.retried + EXCLUDED.retried,
    cancelled = r.cancelled + EXCLUDED.cancelled,
    rescued   = r.rescued + EXCLUDED.rescued,
    run_hist  = jobledger.hist_merge(r.run_hist, EXCLUDED.run_hist),
    wait_hist = jobledger.hist_merge(r.wait_hist, EXCLUDED.wait_hist);

-- name: report_baseline_add
-- Add deltas to the baseline (the contributions of pruned streams).
INSERT INTO jobledger.report_baseline AS r
    (dimension, key, bucket, submitted, started, completed, failed, retried, cancelled,
     rescued, run_hist, wait_hist)
SELECT d.dimension, d.key, d.bucket, d.submitted, d.started, d.completed, d.failed, d.retried,
       d.cancelled, d.rescued, d.run_hist, d.wait_hist
FROM jsonb_to_recordset($1::jsonb)
     AS d(dimension text, key text, bucket timestamptz, submitted bigint, started bigint,
          completed bigint, failed bigint, retried bigint, cancelled bigint, rescued bigint,
          run_hist jsonb, wait_hist jsonb)
ON CONFLICT (dimension, key, bucket) DO UPDATE SET
    submitted = r.submitted + EXCLUDED.submitted,
    started   = r.started + EXCLUDED.started,
    completed = r.completed + EXCLUDED.completed,
    failed    = r.failed + EXCLUDED.failed,
    retried   = r.retried + EXCLUDED.retried,
    cancelled = r.cancelled + EXCLUDED.cancelled,
    rescued   = r.rescued + EXCLUDED.rescued,
    run_hist  = jobledger.hist_merge(r.run_hist, EXCLUDED.run_hist),
    wait_hist = jobledger.hist_merge(r.wait_hist, EXCLUDED.wait_hist);

-- name: report_jobs_get
-- The report's working rows of these jobs.
SELECT job_id, operator, queue, due_at, started_at
FROM jobledger.report_jobs WHERE job_id = ANY($1::uuid[]);

-- name: report_jobs_put
-- Upsert the report's working rows ($1: JSON array).
INSERT INTO jobledger.report_jobs AS r (job_id, operator, queue, due_at, started_at)
SELECT j.job_id, j.operator, j.queue, j.due_at, j.started_at
FROM jsonb_to_recordset($1::jsonb)
     AS j(job_id uuid, operator text, queue text, due_at timestamptz, started_at timestamptz)
ON CONFLICT (job_id) DO UPDATE SET
    operator = EXCLUDED.operator, queue = EXCLUDED.queue,
    due_at = EXCLUDED.due_at, started_at = EXCLUDED.started_at;

-- name: report_rows
-- Report rows of one dimension in [since, until). (Pruned streams' contributions
-- are already in report_buckets; report_baseline only seeds rebuilds and verify.)
SELECT key, bucket, submitted, started, completed, failed, retried, cancelled, rescued,
       run_hist, wait_hist
FROM jobledger.report_buckets
WHERE dimension = $1 AND bucket >= $2 AND bucket < $3
ORDER BY bucket, key;

-- name: report_all_buckets
-- Every stored report row (for verify).
SELECT dimension, key, bucket, submitted, started, completed, failed, retried, cancelled,
       rescued, run_hist, wait_hist
FROM jobledger.report_buckets;

-- name: report_all_baseline
-- Every baseline row (for verify and rebuild).
SELECT dimension, key, bucket, submitted, started, completed, failed, retried, cancelled,
       rescued, run_hist, wait_hist
FROM jobledger.report_baseline;

-- name: report_all_jobs
-- Every working row (for verify).
SELECT job_id, operator, queue, due_at, started_at FROM jobledger.report_jobs;

-- name: report_clear
-- Empty the report tables down to the baseline (the contributions of pruned
-- streams), inside a rebuild's transaction: readers keep the old rows until it commits.
DELETE FROM jobledger.report_buckets;
DELETE FROM jobledger.report_jobs;
INSERT INTO jobledger.report_buckets SELECT * FROM jobledger.report_baseline;
