-- name: claim_jobs
-- Lock up to $3 ready jobs of queues $1 and operators $2 that are due at $4,
-- in claim order, skipping rows other workers hold. Served by the jobs_ready
-- partial index. $5, when not NULL, restricts to jobs whose context contains it
-- (burst mode filters). Runs inside the claiming transaction; the caller then
-- appends job.started for each row, in the same transaction.
SELECT to_json(j)
FROM jobledger.jobs AS j
WHERE j.status IN ('queued', 'scheduled')
  AND j.deleted_at IS NULL
  AND j.run_at <= $4
  AND j.queue = ANY($1::text[])
  AND j.operator = ANY($2::text[])
  AND ($5::jsonb IS NULL OR j.context @> $5::jsonb)
ORDER BY j.priority DESC, j.run_at, j.id
LIMIT $3
FOR UPDATE SKIP LOCKED;

-- name: next_due
-- When the next scheduled job of these queues/operators becomes due (or NULL).
SELECT min(run_at)
FROM jobledger.jobs
WHERE status IN ('queued', 'scheduled') AND deleted_at IS NULL
  AND queue = ANY($1::text[]) AND operator = ANY($2::text[]);

-- name: register_worker
-- A worker starts: one row, heartbeating from now. Run again after a lost
-- reply, it finds its row and does nothing.
INSERT INTO jobledger.workers (id, host, pid, queues, operators, concurrency)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (id) DO NOTHING;

-- name: heartbeat
-- The worker is alive and runs $2 jobs. Returns every job the log says this
-- worker holds, with its status: the worker cancels the cancelling ones (the
-- delivery path when NOTIFY is off) and adopts any it does not know it holds
-- (a claim whose commit succeeded but whose reply was lost). Served by the
-- jobs_running partial index.
WITH beat AS (
    UPDATE jobledger.workers
    SET last_heartbeat = clock_timestamp(), running = $2, stopped_at = NULL
    WHERE id = $1
)
SELECT id, status FROM jobledger.jobs
WHERE worker = $1 AND status IN ('running', 'cancelling');

-- name: worker_stopped
-- The worker shut down cleanly.
UPDATE jobledger.workers SET stopped_at = clock_timestamp(), running = 0 WHERE id = $1;

-- name: list_workers
-- Workers, live first; stopped ones only when $1 is true.
SELECT id, host, pid, queues, operators, concurrency, running, started_at, last_heartbeat,
       stopped_at, clock_timestamp() - last_heartbeat AS silent_for
FROM jobledger.workers
WHERE stopped_at IS NULL OR $1
ORDER BY stopped_at IS NOT NULL, started_at;

-- name: rescue_lock
-- One rescuer at a time across all workers (transaction-level advisory lock).
SELECT pg_try_advisory_xact_lock($1);

-- name: abandoned_jobs
-- Running or cancelling jobs held by workers that stopped heartbeating more
-- than $1 seconds ago (or stopped without finishing them). Jobs started by
-- external executors (mark_running with a worker name that is not a jobledger
-- worker) are not touched: their executor owns them.
SELECT to_json(j)
FROM jobledger.jobs AS j
JOIN jobledger.workers AS w ON w.id = j.worker
WHERE j.status IN ('running', 'cancelling')
  AND (w.stopped_at IS NOT NULL
       OR w.last_heartbeat < clock_timestamp() - make_interval(secs => $1))
ORDER BY j.id
LIMIT $2;

-- name: event_at_version
-- The type and meta of one event of a stream (to tell whether a write whose
-- reply was lost landed).
SELECT type, meta::text FROM jobledger.events WHERE job_id = $1 AND version = $2;
