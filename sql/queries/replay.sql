-- name: stream_all_events
-- Every event of every job, stream by stream, for verify and the jobs rebuild
-- (in job, version order). Only what the reducer folds: not the event's place
-- in the log (position, tx_id), whose conversions were a seventh of reading it.
SELECT job_id, version, type, data::text AS data, meta::text AS meta, recorded_at
FROM jobledger.events
ORDER BY job_id, version;

-- name: stream_events_between
-- The events of the jobs with ids from $1 (included) to $2 (excluded), in job,
-- version order: one part of a jobs rebuild run in several processes.
SELECT job_id, version, type, data::text AS data, meta::text AS meta, recorded_at
FROM jobledger.events
WHERE job_id >= $1 AND job_id < $2
ORDER BY job_id, version;

-- name: stream_events_from
-- The events of the jobs with ids from $1 (included) on, in job, version
-- order: the last part of a jobs rebuild run in several processes.
SELECT job_id, version, type, data::text AS data, meta::text AS meta, recorded_at
FROM jobledger.events
WHERE job_id >= $1
ORDER BY job_id, version;

-- name: stream_all_jobs
-- Every jobs row as JSON, by id, for verify.
SELECT id, to_json(j)::text AS doc FROM jobledger.jobs AS j ORDER BY id;
