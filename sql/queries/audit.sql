-- name: audit
-- Who changed what, across jobs, newest first in log order (a backward scan of
-- the primary key; a time window reads events_recorded_at_brin: sql/011).
-- Filters are optional: $1 actor, $2 since, $3 until, $4 operator, $5 event
-- type; $6 limit.
SELECT e.position, e.job_id, e.version, e.type, e.recorded_at, e.data::text AS data,
       e.meta::text AS meta, e.tx_id::text::bigint AS tx_id, j.operator, j.label
FROM jobledger.events AS e
LEFT JOIN jobledger.jobs AS j ON j.id = e.job_id
WHERE ($1::text IS NULL OR e.meta->>'actor' = $1)
  AND ($2::timestamptz IS NULL OR e.recorded_at >= $2)
  AND ($3::timestamptz IS NULL OR e.recorded_at < $3)
  AND ($4::text IS NULL OR j.operator = $4)
  AND ($5::text IS NULL OR e.type = $5)
ORDER BY e.tx_id DESC, e.position DESC
LIMIT $6;
