-- 010: the listing indexes in ascending order; newest first is a backward scan.
--
-- Job ids are time-ordered (UUIDv7) and created_at grows with them, so new
-- rows sort last in (..., created_at, id). In the descending indexes of 002
-- they sorted first (in jobs_owner too): every insert landed on the leftmost leaf of its range,
-- and a full leftmost leaf splits in half, where the rightmost one splits
-- 90/10 and stays packed. The four indexes held 351 bytes a job, against 206
-- now, and a submit wrote 1,400 bytes of WAL a job against 1,255 (bench
-- figures in bench/RESULTS.md). PostgreSQL reads a B-tree in either
-- direction at the same cost, so `ORDER BY created_at DESC, id DESC` (the
-- default listing order, with no NULLS clause: engine/filters.py) is still a
-- range scan of these indexes, and the ascending order is one too.
--
-- Operators: each CREATE INDEX takes a SHARE lock on jobledger.jobs while it
-- builds (reads go on; writers wait, about a second per index per million
-- jobs).
DROP INDEX jobledger.jobs_status_created;
DROP INDEX jobledger.jobs_operator_status_created;
DROP INDEX jobledger.jobs_queue_created;
DROP INDEX jobledger.jobs_created;
DROP INDEX jobledger.jobs_owner;
CREATE INDEX jobs_status_created ON jobledger.jobs (status, created_at, id);
CREATE INDEX jobs_operator_status_created
    ON jobledger.jobs (operator, status, created_at, id);
CREATE INDEX jobs_queue_created ON jobledger.jobs (queue, created_at, id);
CREATE INDEX jobs_created ON jobledger.jobs (created_at, id);
CREATE INDEX jobs_owner ON jobledger.jobs (owner, created_at) WHERE owner IS NOT NULL;
