-- name: prune_candidates
-- Finished jobs to prune, locked so no transition can race the prune.
SELECT id FROM jobledger.jobs
WHERE status IN ('completed', 'failed', 'cancelled')
  AND finished_at < $1
  AND ($2::text IS NULL OR operator = $2)
ORDER BY id
FOR UPDATE;

-- name: prune_events_of
-- The events of the streams being pruned (to fold into the report baseline).
SELECT position, job_id, version, type, data::text AS data, meta::text AS meta,
       recorded_at, tx_id::text::bigint AS tx_id
FROM jobledger.events WHERE job_id = ANY($1::uuid[])
ORDER BY job_id, version;

-- name: prune_record
-- Record the prune (who, when, what) in the transaction that performs it.
INSERT INTO jobledger.prunes (actor, reason, finished_before, operator)
VALUES ($1, $2, $3, $4) RETURNING id;

-- name: prune_authorise
-- Name this transaction's prune to the immutability trigger (transaction-local).
SELECT set_config('jobledger.prune_id', $1::text, true);

-- name: prune_delete
-- Remove the streams and everything derived from them.
WITH e AS (DELETE FROM jobledger.events WHERE job_id = ANY($1::uuid[]) RETURNING 1),
     j AS (DELETE FROM jobledger.jobs WHERE id = ANY($1::uuid[]) RETURNING 1),
     r AS (DELETE FROM jobledger.report_jobs WHERE job_id = ANY($1::uuid[]) RETURNING 1)
SELECT (SELECT count(*) FROM e) AS events, (SELECT count(*) FROM j) AS jobs;

-- name: prune_finish
-- The counts of a prune.
UPDATE jobledger.prunes SET jobs = $2, events = $3 WHERE id = $1;

-- name: prunes_list
-- Every prune, newest first.
SELECT id, actor, reason, finished_before, operator, jobs, events, pruned_at
FROM jobledger.prunes ORDER BY id DESC;
