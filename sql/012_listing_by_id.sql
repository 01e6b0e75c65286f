-- 012: the listing indexes keyed by the job id, which is the creation order.
--
-- A job id is a UUIDv7 (engine.ledger.new_job_id): its first 48 bits are the
-- millisecond of submission and, within a process, ids increase in
-- submission order. Listing "by creation" is therefore listing by id, and
-- the listing order of created_at is now the id's (engine/filters.py). The
-- primary key serves the unfiltered listing, so jobs_created goes; the
-- others lose the 8-byte created_at from every entry. Every insert and every
-- status change (an UPDATE that changes an indexed column writes an entry
-- in every index) maintains one index fewer: 100-row submits, ad hoc, 12.6
-- against 14.0 us of server CPU a job and 1,005 against 1,117 bytes of WAL.
--
-- Operators: each CREATE INDEX takes a SHARE lock on jobledger.jobs while it
-- builds (reads go on; writers wait, about a second per index per million
-- jobs). Cursors made before this migration name the old order and are
-- refused with "the cursor was made for order ...": start the listing again.
DROP INDEX jobledger.jobs_status_created;
DROP INDEX jobledger.jobs_operator_status_created;
DROP INDEX jobledger.jobs_queue_created;
DROP INDEX jobledger.jobs_created;
DROP INDEX jobledger.jobs_owner;
CREATE INDEX jobs_status_id ON jobledger.jobs (status, id);
CREATE INDEX jobs_operator_status_id ON jobledger.jobs (operator, status, id);
CREATE INDEX jobs_queue_id ON jobledger.jobs (queue, id);
CREATE INDEX jobs_owner_id ON jobledger.jobs (owner, id) WHERE owner IS NOT NULL;
