-- 006: retention, the one audited way to remove events.
--
-- `jobledger prune` removes the streams of finished jobs. Each prune is a row
-- here, inserted in the same transaction as the deletes; the immutability
-- trigger admits a DELETE on the log only inside a transaction that recorded
-- itself here and named itself in the transaction-local setting
-- `jobledger.prune_id`. UPDATE and TRUNCATE stay forbidden, always.
--
-- Operators: replacing the trigger function takes no lock on the events table.

CREATE TABLE jobledger.prunes (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor           text        NOT NULL,
    reason          text,
    finished_before timestamptz NOT NULL,
    operator        text,
    jobs            integer     NOT NULL DEFAULT 0,
    events          integer     NOT NULL DEFAULT 0,
    pruned_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    tx_id           xid8        NOT NULL DEFAULT pg_current_xact_id()
);

CREATE OR REPLACE FUNCTION jobledger.reject_event_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND EXISTS (
        SELECT 1 FROM jobledger.prunes
        WHERE id = nullif(current_setting('jobledger.prune_id', true), '')::bigint
          AND tx_id = pg_current_xact_id()
    ) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'jobledger.events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'JL001',
              HINT = 'events are immutable; use `jobledger prune` for retention';
END;
$$;
