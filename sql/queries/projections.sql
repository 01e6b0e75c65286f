-- name: projection_lock
-- One batch of a projection at a time across all processes (transaction-level).
SELECT pg_try_advisory_xact_lock(hashtext('jobledger.projection.' || $1));

-- name: projection_lock_wait
-- Wait for a projection's lock (rebuild: running batches finish first).
SELECT pg_advisory_xact_lock(hashtext('jobledger.projection.' || $1));

-- name: checkpoint_ensure
-- Make sure a projection has a checkpoint row (at the start of the log).
INSERT INTO jobledger.projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING;

-- name: checkpoint_get
-- A projection's checkpoint, locked for the batch that will move it.
SELECT tx_id::text::bigint AS tx_id, position, applied
FROM jobledger.projection_checkpoints WHERE name = $1 FOR UPDATE;

-- name: checkpoint_read
-- A projection's checkpoint, without locking it.
SELECT tx_id::text::bigint AS tx_id, position, applied, updated_at
FROM jobledger.projection_checkpoints WHERE name = $1;

-- name: checkpoint_set
-- Move a projection's checkpoint, in the transaction of the writes it covers.
UPDATE jobledger.projection_checkpoints
SET tx_id = $2::text::xid8, position = $3, applied = applied + $4, updated_at = clock_timestamp()
WHERE name = $1;

-- name: checkpoint_reset
-- Back to the start of the log (rebuild), in the rebuild's transaction.
UPDATE jobledger.projection_checkpoints
SET tx_id = '0', position = 0, applied = 0, updated_at = clock_timestamp()
WHERE name = $1;

-- name: lock_jobs_for_rebuild
-- Hold writers of the jobs table (readers are not blocked) during its rebuild.
LOCK TABLE jobledger.jobs IN EXCLUSIVE MODE;

-- name: jobs_delete_all
-- The first half of a jobs rebuild: the rebuilt rows are then copied in, and
-- readers see the old rows until the rebuild's transaction commits.
DELETE FROM jobledger.jobs;

-- name: event_count
-- How many events the log holds.
SELECT count(*) FROM jobledger.events;
