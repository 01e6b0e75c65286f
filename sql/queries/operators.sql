-- name: publish_operators
-- Upsert the operators this process registered ($1: JSON array of OperatorInfo).
INSERT INTO jobledger.operators
    (name, queue, max_attempts, timeout, description, input_schema, output_schema,
     published_by, published_at)
SELECT o.name, o.queue, o.max_attempts, o.timeout, o.description, o.input_schema,
       o.output_schema, o.published_by, clock_timestamp()
FROM jsonb_to_recordset($1::jsonb)
     AS o(name text, queue text, max_attempts integer, timeout double precision,
          description text, input_schema jsonb, output_schema jsonb, published_by text)
ON CONFLICT (name) DO UPDATE SET
    queue = EXCLUDED.queue,
    max_attempts = EXCLUDED.max_attempts,
    timeout = EXCLUDED.timeout,
    description = EXCLUDED.description,
    input_schema = EXCLUDED.input_schema,
    output_schema = EXCLUDED.output_schema,
    published_by = EXCLUDED.published_by,
    published_at = EXCLUDED.published_at;

-- name: list_operators
-- Every published operator, by name.
SELECT name, queue, max_attempts, timeout, description, input_schema, output_schema,
       published_by, published_at
FROM jobledger.operators
ORDER BY name;
