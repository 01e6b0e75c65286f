-- 003: operators published by the processes that register them.
--
-- Operational data, not a projection: which operators exist somewhere, with
-- their queue and the JSON Schema of their inputs and result, so that
-- `ledger.operators()` and `jobledger operators` answer from any process and
-- a service can submit to an operator whose code lives only on the workers.

CREATE TABLE jobledger.operators (
    name          text        PRIMARY KEY,
    queue         text        NOT NULL,
    max_attempts  integer     NOT NULL,
    timeout       double precision,
    description   text,
    input_schema  jsonb,
    output_schema jsonb,
    published_by  text        NOT NULL,
    published_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
