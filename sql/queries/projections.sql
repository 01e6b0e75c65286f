-- name: projection_lock
-- One batch of a projection at a time across all processes (transaction-level).
SELECT pg_try_advisory_xact_lock(hashtext('jobledger.projection.' || $1));

-- name: projection_lock_wait
-- Wait for a projection's lock (rebuild: running batches finish first).
SELECT pg_advisory_xact_lock(hashtext('jobledger.projection.' || $1));

-- name: checkpoint_ensure
-- Make sure a projection has a checkpoint row (at the start of the log).
INSERT INTO jobledger.projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING;

-- name: checkpoint_get
-- A projection's checkpoint, locked for the batch that will move it.
SELECT tx_id::text::bigint AS tx_id, position, applied
FROM jobledger.projection_checkpoints WHERE name = $1 FOR UPDATE;

-- name: checkpoint_read
-- A projection's checkpoint, without locking it.
SELECT tx_id::text::bigint AS tx_id, position, applied, updated_at
FROM jobledger.projection_checkpoints WHERE name = $1;

-- name: checkpoint_set
-- Move a projection's checkpoint, in the transaction of the writes it covers.
UPDATE jobledger.projection_checkpoints
SET tx_id = $2::text::xid8, position = $3, applied = applied + $4, updated_at = clock_timestamp()
WHERE name = $1;

-- name: checkpoint_reset
-- Back to the start of the log (rebuild), in the rebuild's transaction.
UPDATE jobledger.projection_checkpoints
SET tx_id = '0', position = 0, applied = 0, updated_at = clock_timestamp()
WHERE name = $1;

-- name: lock_jobs_for_rebuild
-- Hold writers of the jobs table (readers are not blocked) during its rebuild.
LOCK TABLE jobledger.jobs IN EXCLUSIVE MODE;

-- name: jobs_rebuild_create
-- A jobs rebuild folds the log into this bare copy of the table (its columns,
-- defaults and checks, no indexes: rows load fastest into an unindexed table).
-- Run under the rebuild's lock on jobs, so a jobs_rebuild found here is what a
-- rebuild in several processes left when it was killed: nothing uses it.
DROP TABLE IF EXISTS jobledger.jobs_rebuild;
CREATE TABLE jobledger.jobs_rebuild (LIKE jobledger.jobs INCLUDING ALL EXCLUDING INDEXES);

-- name: jobs_rebuild_parts
-- Where to split the log into $1 parts of about the same work, every job's
-- events in one part: the job ids at those quantiles of a sample of $2
-- percent of the events (whole pages, so it reads only those pages), where a
-- job's first event counts twice (a folded job costs about what one more
-- event does: its row, its first state).
WITH sample AS (
    SELECT job_id, version FROM jobledger.events TABLESAMPLE SYSTEM ($2)
)
SELECT percentile_disc(array(SELECT g::float8 / $1 FROM generate_series(1, $1 - 1) AS g))
       WITHIN GROUP (ORDER BY job_id)
FROM (SELECT job_id FROM sample UNION ALL SELECT job_id FROM sample WHERE version = 1) AS weighed;

-- name: export_snapshot
-- The rebuild's view of the log, for its other processes to read exactly it.
SELECT pg_export_snapshot();

-- name: jobs_rebuild_drop
-- After a failed rebuild in several processes: its table (committed, so that
-- the other processes could load it) goes, under the lock every rebuild holds,
-- so that it is never another rebuild's table.
LOCK TABLE jobledger.jobs IN EXCLUSIVE MODE;
DROP TABLE IF EXISTS jobledger.jobs_rebuild;

-- name: jobs_rebuild_ddl
-- What makes jobs_rebuild a copy of jobs after its rows are in: `build` gives
-- it jobs's indexes and constraints under temporary names, its storage
-- options, owner and grants; `rename` gives the indexes their names back once
-- jobs_rebuild has become jobs. Index definitions come from the catalog, so
-- whatever the migrations made is what the rebuilt table gets. The indexes
-- come largest first (their size in jobs now): built on several connections,
-- the longest builds start first and the short ones fill in after them.
SELECT build, rename FROM (
    SELECT 1 AS part, pg_relation_size(x.indexrelid) AS size,
           CASE
               WHEN c.oid IS NOT NULL THEN format(
                   'ALTER TABLE jobledger.jobs_rebuild ADD CONSTRAINT %I %s',
                   'jobs_rebuild_' || x.n, pg_get_constraintdef(c.oid))
               ELSE regexp_replace(
                   pg_get_indexdef(x.indexrelid),
                   '^(CREATE (UNIQUE )?INDEX )("(?:[^"]|"")+"|\S+) ON jobledger\.jobs USING ',
                   '\1' || quote_ident('jobs_rebuild_' || x.n) || ' ON jobledger.jobs_rebuild USING ')
           END AS build,
           format('ALTER INDEX jobledger.%I RENAME TO %I', 'jobs_rebuild_' || x.n, i.relname) AS rename
    FROM (SELECT indexrelid, indrelid, row_number() OVER (ORDER BY indexrelid) AS n
          FROM pg_index WHERE indrelid = 'jobledger.jobs'::regclass) AS x
    JOIN pg_class AS i ON i.oid = x.indexrelid
    LEFT JOIN pg_constraint AS c ON c.conindid = x.indexrelid AND c.conrelid = x.indrelid
    UNION ALL
    SELECT 2, 0, format('ALTER TABLE jobledger.jobs_rebuild SET (%s)', array_to_string(reloptions, ', ')), NULL
    FROM pg_class WHERE oid = 'jobledger.jobs'::regclass AND reloptions IS NOT NULL
    UNION ALL
    SELECT 3, 0, format('ALTER TABLE jobledger.jobs_rebuild OWNER TO %s', relowner::regrole), NULL
    FROM pg_class WHERE oid = 'jobledger.jobs'::regclass
    UNION ALL
    SELECT 4, 0, format('GRANT %s ON jobledger.jobs_rebuild TO %s%s', a.privilege_type,
                  CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END,
                  CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END), NULL
    FROM pg_class AS t, aclexplode(t.relacl) AS a
    WHERE t.oid = 'jobledger.jobs'::regclass
) AS ddl
ORDER BY part, size DESC, build;

-- name: jobs_rebuild_analyze
-- Statistics for the planner before the swap, so the first listings after it
-- plan well (autovacuum would get there later).
ANALYZE jobledger.jobs_rebuild;

-- name: jobs_rebuild_swap
-- The rebuilt table takes the place of jobs. Readers wait only for this swap
-- (the brief ACCESS EXCLUSIVE lock); they read the old rows until it commits.
LOCK TABLE jobledger.jobs IN ACCESS EXCLUSIVE MODE;
DROP TABLE jobledger.jobs;
ALTER TABLE jobledger.jobs_rebuild RENAME TO jobs;

-- name: jobs_rebuild_copy_back
-- When the swap cannot be made (a user's view depends on jobs, or the swap
-- deadlocked with a reader turned writer) the rows are replaced instead, and
-- readers see the old ones until the rebuild's transaction commits.
DELETE FROM jobledger.jobs;
INSERT INTO jobledger.jobs SELECT * FROM jobledger.jobs_rebuild;
DROP TABLE jobledger.jobs_rebuild;

-- name: event_count
-- How many events the log holds.
SELECT count(*) FROM jobledger.events;
