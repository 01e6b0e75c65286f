"""Retention (prune) and schema evolution (upcasting)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
import msgspec
import pytest

from engine import JobLedger
from engine.postgres import connect
from projections import reports, upcasting
from projections.rebuild import rebuild_jobs
from projections.replay import verify_all
from projections.runner import catch_up
from tests.operators import register_basic

register_operators = register_basic


def _window() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(days=1), now + timedelta(days=1)


async def test_prune_removes_finished_streams_and_keeps_reports_whole(
    ledger: JobLedger, db: str
) -> None:
    jobs = await ledger.submit_many(
        [{"operator": "noop"}] * 6
        + [{"operator": "dataset.import", "inputs": {"dataset": "d"}}] * 2
    )
    for j in jobs[:4]:
        await ledger.mark_running(j.id)
        await ledger.mark_completed(j.id)
    await ledger.cancel(jobs[4].id)
    await ledger.mark_running(jobs[6].id)
    await ledger.mark_completed(jobs[6].id, {"imported": 1})
    await catch_up(ledger.pool, reports.ReportProjection())
    since, until = _window()
    before = await ledger.report(since=since, until=until)
    cutoff = datetime.now(UTC) + timedelta(seconds=1)

    dry = await ledger.prune(finished_before=cutoff, operator="noop", dry_run=True)
    assert (dry.jobs, dry.events, dry.dry_run) == (5, 4 * 3 + 2, True)
    assert await ledger.count(include_deleted=True) == 8

    done = await ledger.prune(
        finished_before=cutoff, operator="noop", actor="ops", reason="90-day policy"
    )
    assert (done.jobs, done.events) == (5, 14)
    assert await ledger.count(include_deleted=True) == 3
    assert (await ledger.get(jobs[6].id)).status == "completed"  # other operator: kept
    assert await ledger.report(since=since, until=until) == before  # reports stay whole
    rows = await ledger.pool.fetch("SELECT actor, reason, jobs, events FROM jobledger.prunes")
    assert [tuple(r) for r in rows] == [("ops", "90-day policy", 5, 14)]
    assert await verify_all(ledger.pool) == []

    # And a rebuild after the prune still adds up (the baseline seeds it).
    from projections.rebuild import rebuild_projection

    await rebuild_projection(ledger.pool, reports.ReportProjection())
    assert await ledger.report(since=since, until=until) == before
    assert await verify_all(ledger.pool) == []


async def test_deleting_events_outside_prune_is_still_refused(ledger: JobLedger, db: str) -> None:
    job = await ledger.submit("noop")
    conn = await connect(db)
    try:
        async with conn.transaction():
            # Naming a prune that is not this transaction's does not open the door.
            await conn.execute(
                "INSERT INTO jobledger.prunes (actor, finished_before) VALUES ('x', now())"
            )
        pid = await conn.fetchval("SELECT max(id) FROM jobledger.prunes")
        with pytest.raises(asyncpg.PostgresError) as err:
            async with conn.transaction():
                await conn.execute("SELECT set_config('jobledger.prune_id', $1, true)", str(pid))
                await conn.execute("DELETE FROM jobledger.events WHERE job_id = $1", job.id)
        assert err.value.sqlstate == "JL001"
    finally:
        await conn.close()
    assert len(await ledger.history(job.id)) == 1


def percent_to_fraction(payload: dict) -> dict:
    """The test's upcaster: progress was once a `percent` from 0 to 100."""
    if "percent" in payload and "fraction" not in payload:
        payload = {**payload, "fraction": payload.pop("percent") / 100}
    return payload


@pytest.fixture
def percent_upcaster():
    """Registered before the test database exists and removed after it is verified:
    an upcaster must stay registered as long as events of the old shape exist."""
    upcasting.upcaster("job.progress")(percent_to_fraction)
    yield
    upcasting.unregister("job.progress", percent_to_fraction)


async def _old_progress_event(db: str, ledger: JobLedger) -> UUID:
    """A job whose third event is a progress report in an older shape: `percent`
    (0-100), schema 0, written with its (old reducer's) row as the old writer did."""
    job = await ledger.mark_running((await ledger.submit("noop")).id)
    conn = await connect(db)
    try:
        at = datetime.now(UTC)
        await conn.execute(
            "WITH moved AS (UPDATE jobledger.jobs SET version = 3, updated_at = $3,"
            " progress = $4 WHERE id = $1)"
            " INSERT INTO jobledger.events (job_id, version, type, data, meta, recorded_at)"
            " VALUES ($1, 3, 'job.progress', $2, '{\"schema\": 0}', $3)",
            job.id,
            msgspec.Raw(msgspec.json.encode({"type": "job.progress", "percent": 40})),
            at,
            msgspec.Raw(msgspec.json.encode({"fraction": 0.4, "reported_at": at})),
        )
    finally:
        await conn.close()
    return job.id


async def test_an_old_event_shape_is_upcast_when_read(
    percent_upcaster, ledger: JobLedger, db: str
) -> None:
    job_id = await _old_progress_event(db, ledger)
    history = await ledger.history(job_id)
    assert history[-1].event.fraction == 0.4 and history[-1].meta.schema == 0
    assert (await ledger.state_at(job_id)).progress.fraction == 0.4
    assert await verify_all(ledger.pool) == []


async def test_a_rebuild_in_several_processes_upcasts_in_each(
    percent_upcaster, ledger: JobLedger, db: str
) -> None:
    """The children load the parent's upcasters by name: an old shape folds the same there."""
    await ledger.submit_many([{"operator": "noop"}] * 5)
    await _old_progress_event(db, ledger)  # the newest job: in the last (a child's) part
    conn = await connect(db)
    try:
        await conn.execute("UPDATE jobledger.jobs SET progress = NULL")
    finally:
        await conn.close()
    assert await rebuild_jobs(ledger.pool, dsn=db, processes=2) == 5 + 3
    assert await verify_all(ledger.pool) == []


async def test_an_upcaster_no_other_process_can_load_keeps_the_rebuild_in_one(
    percent_upcaster, ledger: JobLedger, db: str
) -> None:
    def local(payload: dict) -> dict:  # defined in a function: not importable by name
        return percent_to_fraction(payload)

    await _old_progress_event(db, ledger)
    upcasting.upcaster("job.progress")(local)
    try:
        with pytest.raises(ValueError, match=r"upcaster .*local \(for job.progress\) cannot"):
            await rebuild_jobs(ledger.pool, dsn=db, processes=2)
        assert await rebuild_jobs(ledger.pool, dsn=db, processes=None) == 3  # one, by choice
        assert await verify_all(ledger.pool) == []
    finally:
        upcasting.unregister("job.progress", local)


async def test_state_at_a_position_and_a_time(ledger: JobLedger) -> None:
    job = await ledger.submit("noop")
    await ledger.set_label(job.id, "second")
    history = await ledger.history(job.id)
    assert (await ledger.state_at(job.id, history[0].position)).label == "noop"
    assert (await ledger.state_at(job.id, history[1].recorded_at)).label == "second"
    assert await ledger.state_at(job.id, history[0].recorded_at - timedelta(seconds=1)) is None
    with pytest.raises(ValueError, match="timezone-aware"):
        await ledger.state_at(job.id, datetime(2020, 1, 1))
