-- 001: the event log, jobledger's only source of truth.
--
-- One row per event, append-only. Everything else (the jobs table, reports,
-- checkpoints) is a projection that can be rebuilt from these rows.
--
-- Operators: this migration only creates objects; it takes no locks on
-- existing tables.

CREATE SCHEMA IF NOT EXISTS jobledger;

CREATE TABLE jobledger.events (
    -- Global order of appends. Identity values are handed out before commit,
    -- so readers of the whole log must NOT follow position alone: see the
    -- gap-free read in engine/store.py, which orders by (tx_id, position).
    position    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id      uuid        NOT NULL,
    -- 1..n within a stream; UNIQUE (job_id, version) is the optimistic
    -- concurrency guard: two writers that read the same version cannot both
    -- append the next one.
    version     integer     NOT NULL CHECK (version > 0),
    type        text        NOT NULL,
    data        jsonb       NOT NULL,
    -- who and why: actor, reason, message, worker, forced, schema version.
    meta        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- The writer supplies the event time, so the inline projection (computed
    -- in Python before the statement) and the stored event carry the very same
    -- instant. The default serves hand-written appends.
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The writing transaction; (tx_id, position) is the gap-free read order.
    tx_id       xid8        NOT NULL DEFAULT pg_current_xact_id(),
    CONSTRAINT events_stream_version UNIQUE (job_id, version)
);

-- Serves the gap-free whole-log read (projections, rebuilds, verify).
CREATE INDEX events_tx_order ON jobledger.events (tx_id, position);
-- Serves audit queries and replay --at TIME across jobs.
CREATE INDEX events_recorded_at ON jobledger.events (recorded_at);

-- Immutability is enforced by the database, not by convention. Retention,
-- when it comes, is one explicit audited path (a later migration replaces
-- this function to admit it); nothing else may change or remove an event.
CREATE FUNCTION jobledger.reject_event_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'jobledger.events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'JL001',
              HINT = 'events are immutable; use `jobledger prune` for retention';
END;
$$;

CREATE TRIGGER events_immutable_rows
    BEFORE UPDATE OR DELETE ON jobledger.events
    FOR EACH ROW EXECUTE FUNCTION jobledger.reject_event_change();

CREATE TRIGGER events_immutable_truncate
    BEFORE TRUNCATE ON jobledger.events
    FOR EACH STATEMENT EXECUTE FUNCTION jobledger.reject_event_change();
