-- 011: events by time through a BRIN index; the audit trail in log order.
--
-- events_recorded_at was a B-tree entry for every event (three a job that
-- runs; a drained job wrote 17 index entries in all, two of them here), read
-- only by `jobledger audit`: newest first, and time windows. Newest first is
-- now the log's own order, (tx_id, position) descending, a backward scan of
-- the primary key: the order replay folds and the gap-free read follows. A
-- time window (--since/--until) reads this BRIN index: events are appended,
-- so recorded_at follows the heap order and a block range's [min, max]
-- summary finds a window's pages. Inserting into a range not yet summarised
-- costs no index write; autosummarize has autovacuum summarise each range
-- as it fills.
--
-- Operators: building the BRIN index reads jobledger.events once under a
-- SHARE lock (writers wait; about a second per ten million events).
DROP INDEX jobledger.events_recorded_at;
CREATE INDEX events_recorded_at_brin ON jobledger.events USING brin (recorded_at)
    WITH (autosummarize = on);
