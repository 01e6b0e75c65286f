-- Tags and context are indexed only on the jobs that have some.
--
-- Every transition changes a job's status, so no update of a jobs row is HOT:
-- each new row version is inserted into every index, and a job writes three
-- versions on its way through a worker. GIN indexes on an empty array or
-- object still take an entry per version. Restricting them to non-empty values
-- spares the jobs without tags or context (many of them) that cost, and loses
-- nothing: a tag or context filter asks for something non-empty, and the
-- listing code (engine/filters.py) states that in its WHERE clause so the
-- planner can use these indexes.
DROP INDEX jobledger.jobs_tags;
DROP INDEX jobledger.jobs_context;
CREATE INDEX jobs_tags ON jobledger.jobs USING gin (tags) WHERE tags <> '{}';
CREATE INDEX jobs_context ON jobledger.jobs USING gin (context jsonb_path_ops)
    WHERE context <> '{}';
