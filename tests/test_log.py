"""The event log itself: immutability, the version guard, verification."""

from __future__ import annotations

import asyncpg
import msgspec
import pytest

from engine import JobLedger
from engine.postgres import connect
from projections.replay import verify_jobs
from tests.operators import register_basic

register_operators = register_basic


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE jobledger.events SET type = 'job.completed'",
        "DELETE FROM jobledger.events",
        "TRUNCATE jobledger.events",
        "TRUNCATE jobledger.events CASCADE",
    ],
)
async def test_the_log_rejects_changes(ledger: JobLedger, db: str, statement: str) -> None:
    job = await ledger.submit("noop")
    conn = await connect(db)
    try:
        with pytest.raises(asyncpg.PostgresError) as err:
            await conn.execute(statement)
        assert err.value.sqlstate == "JL001"
        assert "append-only" in str(err.value)
        assert await conn.fetchval("SELECT count(*) FROM jobledger.events") == 1
    finally:
        await conn.close()
    assert (await ledger.history(job.id))[0].type == "job.submitted"


async def test_the_version_guard_rejects_a_stale_write(ledger: JobLedger, db: str) -> None:
    job = await ledger.submit("noop")
    conn = await connect(db)
    try:
        with pytest.raises(asyncpg.UniqueViolationError) as err:
            await conn.execute(
                "INSERT INTO jobledger.events (job_id, version, type, data) "
                "VALUES ($1, 1, 'job.cancelled', '{}')",
                job.id,
            )
        assert err.value.constraint_name == "events_stream_version"
    finally:
        await conn.close()


async def test_verify_finds_a_tampered_projection(ledger: JobLedger, db: str) -> None:
    """The teardown check is real: a row that disagrees with the log is reported."""
    a = await ledger.submit("noop", label="a")
    b = await ledger.submit("noop", label="b")
    assert await verify_jobs(ledger.pool) == []
    conn = await connect(db)
    try:
        await conn.execute("UPDATE jobledger.jobs SET status = 'completed' WHERE id = $1", a.id)
        await conn.execute("DELETE FROM jobledger.jobs WHERE id = $1", b.id)
        diffs = await verify_jobs(ledger.pool)
        assert {(d.key, d.problem) for d in diffs} == {
            (str(a.id), "fields differ"),
            (str(b.id), "the log has the job, the table has no row"),
        }
        [changed] = [d for d in diffs if d.fields]
        assert changed.fields == {"status": ("queued", "completed")}
        # Put the table back as the log says, so the teardown check passes.
        await conn.execute("UPDATE jobledger.jobs SET status = 'queued' WHERE id = $1", a.id)
        await conn.execute(
            "INSERT INTO jobledger.jobs SELECT * FROM jsonb_populate_record("
            "NULL::jobledger.jobs, $1::jsonb)",
            msgspec.Raw(msgspec.json.encode(b)),
        )
    finally:
        await conn.close()
    assert await verify_jobs(ledger.pool) == []
