"""The event log itself: immutability, the version guard, verification."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest

from engine import JobLedger, store
from engine import events as ev
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


async def test_one_append_writes_each_jobs_own_event_and_row(ledger: JobLedger, db: str) -> None:
    # One append of jobs at different versions, with events of different types,
    # data, metas and times (sent once per job, against a template row and each
    # job's differing columns), and one stale change, which is left out alone.
    jobs = await ledger.submit_many(
        [{"operator": "noop", "inputs": {"n": n}, "label": f"j{n}"} for n in (1, 1.0, 2, 3)]
    )
    a, b, c, stale = jobs
    await ledger.mark_running(b.id, worker="w1")
    await ledger.mark_running(c.id, worker="w2")
    await ledger.report_progress(c.id, fraction=0.5)
    at = datetime.now(UTC)
    states = {j.id: await ledger.get(j.id) for j in jobs}
    changes = [
        ledger.make_change(states[a.id], ev.Pinned(pinned=True), actor="ana", at=at),
        ledger.make_change(
            states[b.id], ev.Completed(result={"n": 1.0}), worker="w1", correlation_id="x/1"
        ),
        ledger.make_change(
            states[c.id],
            ev.Failed(error=ev.ErrorInfo(type="OSError", message="disk")),
            reason="io",
            at=at + timedelta(seconds=1),
        ),
        ledger.make_change(
            msgspec.structs.replace(states[stale.id], version=0), ev.Pinned(pinned=True)
        ),
    ]
    conn = await connect(db)
    try:
        assert await store.append(conn, changes) == {a.id, b.id, c.id}
    finally:
        await conn.close()
    for change in changes[:3]:
        assert await ledger.get(change.state.id) == change.state
        rec = (await ledger.history(change.state.id))[-1]
        assert (rec.version, rec.type, rec.event) == (
            change.recorded.version,
            change.recorded.type,
            change.recorded.event,
        )
        assert (rec.meta, rec.recorded_at) == (change.recorded.meta, change.recorded.recorded_at)
    assert type((await ledger.get(b.id)).result["n"]) is float
    assert await ledger.get(stale.id) == stale and len(await ledger.history(stale.id)) == 1


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


async def test_a_stored_payload_leaves_its_type_to_the_type_column(
    ledger: JobLedger, db: str
) -> None:
    # The row's type column names the event; data holds only its fields (a
    # field-less event stores {}). A row written with the tag in data, as
    # jobledger did before, reads the same.
    job = await ledger.submit("noop", label="first")
    await ledger.mark_running(job.id, worker="w1")
    conn = await connect(db)
    try:
        rows = await conn.fetch(
            "SELECT type, data::text AS data FROM jobledger.events WHERE job_id = $1"
            " ORDER BY version",
            job.id,
        )
        assert [(r["type"], msgspec.json.decode(r["data"])) for r in rows] == [
            ("job.submitted", {"operator": "noop", "label": "first"}),
            ("job.started", {"worker": "w1"}),
        ]
        tagged = msgspec.json.encode(ev.Pinned(pinned=True))
        assert msgspec.json.decode(tagged)["type"] == "job.pinned"
        state = await ledger.get(job.id)
        change = ledger.make_change(state, ev.Pinned(pinned=True))
        await conn.execute(
            "INSERT INTO jobledger.events (job_id, version, type, data, meta, recorded_at)"
            " VALUES ($1, $2, 'job.pinned', $3::text::jsonb, '{}', $4)",
            job.id,
            change.recorded.version,
            tagged.decode(),
            change.recorded.recorded_at,
        )
        await conn.execute(
            "UPDATE jobledger.jobs SET version = $2, pinned = true, updated_at = $3 WHERE id = $1",
            job.id,
            change.recorded.version,
            change.recorded.recorded_at,
        )
    finally:
        await conn.close()
    history = await ledger.history(job.id)
    assert [r.event for r in history][-1] == ev.Pinned(pinned=True)
    assert await ledger.get(job.id) == change.state


def test_equal_payloads_of_two_kinds_are_each_checked_as_their_own() -> None:
    # Without the tag, events of two kinds can store the same bytes; the check
    # that the log's readers can decode every payload must decode each kind,
    # not only the first of equal payloads: {} is a job.started but not a
    # job.labelled, which needs its label.
    from uuid import uuid4

    from projections.job_state import apply

    at = datetime.now(UTC)
    sub = ev.Recorded(
        job_id=uuid4(), version=1, event=ev.Submitted(operator="op", label="op"), recorded_at=at
    )
    job = apply(None, sub)
    recs = [
        ev.Recorded(job_id=job.id, version=2, event=e, recorded_at=at)
        for e in (ev.Started(), ev.Labelled(label="x"))
    ]
    changes = [store.Change(apply(job, r), r) for r in recs]
    kinds = [ev.Started, ev.Labelled]
    store._check_readable(changes[:1], kinds[:1], [b"{}"], [b"{}"])
    with pytest.raises(ValueError, match=r"the job\.labelled event of job"):
        store._check_readable(changes, kinds, [b"{}", b"{}"], [b"{}"])


async def test_a_batch_that_fails_at_one_job_stores_none_of_them(
    ledger: JobLedger, db: str
) -> None:
    # create_streams_plain returns nothing of the rows it inserts: that the
    # batch was stored whole rests on the statement being all or nothing.
    taken = await ledger.submit("noop")
    jobs = await ledger.submit_many([{"operator": "noop"}] * 2)
    from uuid import uuid4

    from projections.job_state import apply

    at = datetime.now(UTC)
    changes = []
    for job_id in (uuid4(), uuid4(), taken.id):  # the last id is a job's already
        rec = ev.Recorded(
            job_id=job_id, version=1, event=ev.Submitted(operator="noop", label="x"), recorded_at=at
        )
        changes.append(store.Change(apply(None, rec), rec))
    conn = await connect(db)
    try:
        with pytest.raises(asyncpg.UniqueViolationError):
            await store.create(conn, changes)
        ids = [c.state.id for c in changes[:2]]
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM jobledger.jobs WHERE id = ANY($1::uuid[])", ids
            )
            == 0
        )
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM jobledger.events WHERE job_id = ANY($1::uuid[])", ids
            )
            == 0
        )
    finally:
        await conn.close()
    assert await ledger.get(taken.id) == taken
    assert [await ledger.get(j.id) for j in jobs] == jobs
