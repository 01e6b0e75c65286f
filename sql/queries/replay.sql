-- name: stream_all_events
-- Every event of every job, stream by stream, for verify (in job, version order).
SELECT position, job_id, version, type, data::text AS data, meta::text AS meta,
       recorded_at, tx_id::text::bigint AS tx_id
FROM jobledger.events
ORDER BY job_id, version;

-- name: stream_all_jobs
-- Every jobs row as JSON, by id, for verify.
SELECT id, to_json(j)::text AS doc FROM jobledger.jobs AS j ORDER BY id;
