-- name: migration_lock
-- Serialise migrators across processes (session-level advisory lock).
SELECT pg_advisory_lock($1);

-- name: migration_unlock
-- Release the migrators' advisory lock.
SELECT pg_advisory_unlock($1);

-- name: create_migrations_table
-- The record of applied migrations; created before migration 001 runs.
CREATE SCHEMA IF NOT EXISTS jobledger;
CREATE TABLE IF NOT EXISTS jobledger.migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- name: applied_migrations
-- Every applied migration with the checksum of the file it ran.
SELECT version, checksum FROM jobledger.migrations;

-- name: record_migration
-- Record one applied migration, in the migration's own transaction.
INSERT INTO jobledger.migrations (version, name, checksum) VALUES ($1, $2, $3);

-- name: database_exists
-- Whether a database exists (the embedded server's is created on first use).
SELECT 1 FROM pg_database WHERE datname = $1;

-- name: quote_ident
-- PostgreSQL's own quoting of an identifier (database names cannot be parameters).
SELECT quote_ident($1);
