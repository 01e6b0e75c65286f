-- 008: the log's primary key is its gap-free read order, (tx_id, position).
--
-- position alone was the primary key, and (tx_id, position) a second index
-- for the gap-free read. Nothing looks an event up by position alone, and
-- (tx_id, position) is unique because position is, so one index serves as
-- both: every event (three per job that runs) now updates three indexes
-- instead of four.
--
-- Operators: building the new key takes an ACCESS EXCLUSIVE lock on
-- jobledger.events for the duration (seconds per million events): writers and
-- readers of the log wait.
ALTER TABLE jobledger.events DROP CONSTRAINT events_pkey;
ALTER TABLE jobledger.events ADD CONSTRAINT events_pkey PRIMARY KEY (tx_id, position);
DROP INDEX jobledger.events_tx_order;
