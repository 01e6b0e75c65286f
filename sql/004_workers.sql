-- 004: workers, an operational table (liveness, not history).
--
-- Each worker process registers one row and heartbeats it. It is not a
-- projection and is not rebuilt from the log: it says who is alive now. The
-- rescuer (engine/rescuer.py) reads it to find running jobs whose worker
-- stopped heartbeating. Rows of stopped workers are kept for a while so
-- `jobledger workers --all` can show recent history; they are small.

CREATE TABLE jobledger.workers (
    id             text        PRIMARY KEY,   -- host:pid:random, unique per process start
    host           text        NOT NULL,
    pid            integer     NOT NULL,
    queues         text[]      NOT NULL,
    operators      text[]      NOT NULL,
    concurrency    integer     NOT NULL,
    running        integer     NOT NULL DEFAULT 0,
    started_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_heartbeat timestamptz NOT NULL DEFAULT clock_timestamp(),
    stopped_at     timestamptz
);

CREATE INDEX workers_live ON jobledger.workers (last_heartbeat) WHERE stopped_at IS NULL;
