"""Async projections: gap-free reading, checkpoints, crashes, rebuilds, reports."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from typing import Any
from uuid import UUID

import anyio
import msgspec
import pytest

from engine import JobLedger
from engine import events as ev
from engine.errors import DatabaseUnavailable
from engine.postgres import connect
from engine.store import Checkpoint, LogFromAnotherCluster, check_log_cluster, read_log
from projections import reports
from projections.rebuild import rebuild_jobs, rebuild_projection
from projections.replay import verify_all
from projections.runner import ProjectionRunner, catch_up, step
from tests.operators import register_basic

register_operators = register_basic
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # PostgreSQL's timestamp zero


async def read_all(conn, after: Checkpoint = Checkpoint()) -> list[ev.Recorded]:
    out = []
    while batch := await read_log(conn, after, 100):
        out += batch
        after = Checkpoint.after(batch[-1])
    return out


async def test_gap_free_read_waits_for_a_late_committer(ledger: JobLedger, db: str) -> None:
    """A appends then sleeps before committing while B appends and commits: the reader must
    not pass A, and must deliver A's event once it commits."""
    a_job = await ledger.submit("noop", label="a")
    b_job = await ledger.submit("noop", label="b")
    seen = await read_all(ledger.pool)
    after = Checkpoint.after(seen[-1])
    a_conn, b_conn, reader = await connect(db), await connect(db), await connect(db)
    try:
        tx_a = a_conn.transaction()
        await tx_a.start()
        a_state = await ledger.get(a_job.id)
        change_a = ledger.make_change(a_state, ev.Pinned(pinned=True))
        from engine import store

        assert await store.append(a_conn, [change_a])  # A holds its position, uncommitted
        b_state = await ledger.get(b_job.id)
        assert await store.append(b_conn, [ledger.make_change(b_state, ev.Pinned(pinned=True))])
        # B committed (autocommit) with a later tx id: the fence stops the reader at A.
        assert await read_all(reader, after) == []
        await tx_a.commit()
        late = await read_all(reader, after)
        assert [(e.job_id, e.type) for e in late] == [
            (a_job.id, "job.pinned"),
            (b_job.id, "job.pinned"),
        ]
        assert late[0].tx_id < late[1].tx_id
    finally:
        for c in (a_conn, b_conn, reader):
            await c.close()


async def test_reading_the_log_walks_its_index(ledger: JobLedger) -> None:
    """Each batch of read_log is an index range scan in (tx_id, position) order, never a
    sort of the rest of the log (which made catch-up and rebuilds quadratic)."""
    from engine.sqlfiles import Q

    await ledger.submit_many([{"operator": "noop"}] * 50)
    async with ledger.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + Q.read_log, "0", 0, 10)
    text = plan if isinstance(plan, str) else msgspec.json.encode(plan).decode()
    assert "events_pkey" in text
    assert '"Sort"' not in text


async def test_runner_applies_every_event_once(ledger: JobLedger) -> None:
    jobs = await ledger.submit_many([{"operator": "noop"}] * 20)
    for j in jobs[:10]:
        await ledger.mark_running(j.id)
        await ledger.mark_completed(j.id)
    projection = reports.ReportProjection()
    runner = ProjectionRunner(ledger, [projection], batch_size=7, poll_interval=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        for j in jobs[10:15]:
            await ledger.mark_running(j.id)
            await ledger.mark_failed(j.id, "boom")
        with anyio.fail_after(10):
            while runner.applied["reports"] < 20 + 20 + 10:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    now = datetime.now(UTC)
    [row] = await ledger.report(since=now - timedelta(hours=1), until=now + timedelta(hours=1))
    assert (row.key, row.submitted, row.started, row.completed, row.failed) == (
        "noop",
        20,
        15,
        10,
        5,
    )
    assert row.failure_rate == pytest.approx(5 / 15)
    assert row.run_p50_ms is not None and row.wait_p99_ms is not None
    assert await verify_all(ledger.pool) == []


async def test_a_report_is_current_without_a_runner(ledger: JobLedger) -> None:
    """No runner runs: the report catches its projection up with the log first,
    unless told to read it as it is."""
    jobs = await ledger.submit_many([{"operator": "noop"}] * 3)
    await ledger.mark_running(jobs[0].id)
    await ledger.mark_completed(jobs[0].id)
    now = datetime.now(UTC)
    window = {"since": now - timedelta(hours=1), "until": now + timedelta(hours=1)}
    assert await ledger.report(**window, catch_up=False) == []
    [row] = await ledger.report(**window)
    assert (row.submitted, row.started, row.completed) == (3, 1, 1)
    await ledger.mark_running(jobs[1].id)
    [stale] = await ledger.report(**window, catch_up=False)
    assert stale.started == 1
    [row] = await ledger.report(**window)
    assert row.started == 2


class Crashing(reports.ReportProjection):
    """A report projection that dies after writing part of a chosen batch."""

    def __init__(self, crash_on_batch: int) -> None:
        self.batches = 0
        self.crash_on_batch = crash_on_batch

    async def handle(self, conn, events) -> None:
        self.batches += 1
        await super().handle(conn, events)  # its writes are in the batch's transaction
        if self.batches == self.crash_on_batch:
            raise RuntimeError("power cut")


async def test_a_crash_mid_batch_applies_nothing_twice_and_skips_nothing(ledger: JobLedger) -> None:
    await ledger.submit_many([{"operator": "noop"}] * 25)
    crashing = Crashing(crash_on_batch=2)
    async with ledger.pool.acquire() as conn:
        assert await step(conn, crashing, batch_size=10) == 10
        with pytest.raises(RuntimeError, match="power cut"):
            await step(conn, crashing, batch_size=10)
        cp = await conn.fetchrow("SELECT position, applied FROM jobledger.projection_checkpoints")
        assert cp["applied"] == 10
        total = await conn.fetchval(
            "SELECT sum(submitted) FROM jobledger.report_buckets WHERE dimension = 'operator'"
        )
        assert total == 10  # the crashed batch left nothing behind
    assert await catch_up(ledger.pool, reports.ReportProjection(), batch_size=10) == 15
    assert await verify_all(ledger.pool) == []


async def test_two_runners_at_once_share_the_work(ledger: JobLedger, db: str) -> None:
    async with JobLedger(db) as other:
        r1 = ProjectionRunner(ledger, batch_size=5, poll_interval=0.02)
        r2 = ProjectionRunner(other, batch_size=5, poll_interval=0.02)
        async with anyio.create_task_group() as tg:
            await tg.start(r1.run)
            await tg.start(r2.run)
            for _ in range(10):
                await ledger.submit_many([{"operator": "noop"}] * 10)
            with anyio.fail_after(10):
                while r1.applied["reports"] + r2.applied["reports"] < 100:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    assert r1.applied["reports"] + r2.applied["reports"] == 100
    assert await verify_all(ledger.pool) == []


@pytest.mark.parametrize("processes", [1, 3])
async def test_rebuilds_reproduce_the_projections(
    ledger: JobLedger, db: str, processes: int
) -> None:
    jobs = await ledger.submit_many([{"operator": "noop", "tags": ["x"]}] * 30)
    for j in jobs[:12]:
        await ledger.mark_running(j.id)
        await ledger.mark_completed(j.id)
    await catch_up(ledger.pool, reports.ReportProjection())
    before = await ledger.report(
        since=datetime.now(UTC) - timedelta(days=1), until=datetime.now(UTC) + timedelta(days=1)
    )
    # Damage both, then rebuild both from the log.
    conn = await connect(db)
    try:
        await conn.execute("UPDATE jobledger.jobs SET label = 'wrong'")
        await conn.execute("UPDATE jobledger.report_buckets SET completed = 999")
        assert len(await verify_all(ledger.pool)) > 30
    finally:
        await conn.close()
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))

    assert await rebuild_jobs(ledger.pool, progress=progress, dsn=db, processes=processes) == 54
    assert seen[-1] == (54, 54)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert await rebuild_projection(ledger.pool, reports.ReportProjection(), batch_size=7) == 54
    assert await verify_all(ledger.pool) == []
    after = await ledger.report(
        since=datetime.now(UTC) - timedelta(days=1), until=datetime.now(UTC) + timedelta(days=1)
    )
    assert after == before


async def test_a_jobs_rebuild_keeps_every_timestamp_to_the_microsecond(
    ledger: JobLedger, db: str
) -> None:
    """The rebuild moves timestamps as integers (its own codec): scheduled times in
    other zones, far-future and pre-2000 instants come back exactly as replay has them."""
    plus5 = timezone(timedelta(hours=5, minutes=30))
    run_ats = [
        datetime(2031, 7, 4, 12, 0, 0, 123456, tzinfo=plus5),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
    ]
    jobs = await ledger.submit_many([{"operator": "noop", "run_at": t} for t in run_ats])
    done = await ledger.submit("noop")
    await ledger.mark_running(done.id)
    await ledger.mark_completed(done.id)
    conn = await connect(db)
    try:
        await conn.execute("UPDATE jobledger.jobs SET run_at = NULL, created_at = now()")
    finally:
        await conn.close()
    assert await rebuild_jobs(ledger.pool) == len(run_ats) + 3
    assert await verify_all(ledger.pool) == []
    for job, at in zip(jobs, run_ats, strict=True):
        assert (await ledger.get(job.id)).run_at == at


async def test_a_jobs_rebuild_gives_its_connection_back_with_asyncpgs_codecs(
    ledger: JobLedger,
) -> None:
    from projections import rebuild

    async with ledger.pool.acquire() as conn:
        async with rebuild._timestamps_as_integers(conn):
            assert await conn.fetchval("SELECT '2000-01-01 00:00:01+00'::timestamptz") == (
                datetime(2000, 1, 1, 0, 0, 1, tzinfo=UTC)
            )
        # A failing rebuild puts the codec back too, after its rollback.
        with pytest.raises(ZeroDivisionError):
            async with rebuild._timestamps_as_integers(conn), conn.transaction():
                await conn.execute("SELECT 1")
                1 / 0  # noqa: B018
        value = await conn.fetchval("SELECT 'infinity'::timestamptz")
        assert value == datetime.max  # asyncpg's own decoder again
        assert await conn.fetchval("SELECT $1::timestamptz = '2000-01-01Z'", _EPOCH) is True


def test_the_rebuilds_timestamp_codec_starts_over_when_full(monkeypatch: Any) -> None:
    from projections import rebuild

    monkeypatch.setattr(rebuild, "_REMEMBERED", 2)
    encode, decode = rebuild._timestamp_encoder(), rebuild._timestamp_decoder()
    times = [datetime(2026, 12, 2, 8, 0, s, tzinfo=UTC) for s in range(5)]
    for _ in range(2):
        for at in times:
            (micros,) = encode(at)
            assert micros == (at - _EPOCH) // timedelta(microseconds=1)
            assert decode((micros,)) == at


def test_the_rebuilds_timestamp_codec_matches_asyncpgs() -> None:
    from projections import rebuild

    encode, decode = rebuild._timestamp_encoder(), rebuild._timestamp_decoder()
    for at in (
        datetime(2000, 1, 1, tzinfo=UTC),
        datetime(2026, 12, 1, 10, 7, 31, 999999, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=-7))),
    ):
        (micros,) = encode(at)
        assert encode(at) == (micros,)  # the remembered value
        assert encode(at.astimezone(UTC)) == (micros,)  # the same instant, another object
        assert rebuild._timestamp_decode((micros,)) == at
        assert decode((micros,)) == at and decode((micros,)) is decode((micros,))
    naive = datetime(2026, 6, 1, 12, 0)  # local time, as asyncpg reads it
    assert rebuild._timestamp_decode(encode(naive)) == naive.astimezone(UTC)
    assert rebuild._timestamp_decode((2**63 - 1,)) == datetime.max
    assert rebuild._timestamp_decode((-(2**63),)) == datetime.min


async def test_readers_are_not_blocked_during_a_jobs_rebuild(ledger: JobLedger, db: str) -> None:
    await ledger.submit_many([{"operator": "noop"}] * 5)
    reader = await connect(db)
    counts: list[int] = []
    try:
        async with ledger.pool.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE jobledger.jobs IN EXCLUSIVE MODE")  # what rebuild holds
            with anyio.fail_after(2):
                counts.append(await reader.fetchval("SELECT count(*) FROM jobledger.jobs"))
    finally:
        await reader.close()
    assert counts == [5]


async def _jobs_table(conn) -> tuple[list[tuple[str, str]], object, object]:
    """The jobs table's indexes, storage options and grants, as the catalog has them."""
    indexes = await conn.fetch(
        "SELECT indexname, indexdef FROM pg_indexes"
        " WHERE schemaname = 'jobledger' AND tablename = 'jobs' ORDER BY indexname"
    )
    options, acl = await conn.fetchrow(
        "SELECT reloptions, relacl::text[] FROM pg_class WHERE oid = 'jobledger.jobs'::regclass"
    )
    return [tuple(r) for r in indexes], options, acl


@pytest.mark.parametrize("processes", [1, 2])
async def test_a_jobs_rebuild_keeps_the_tables_indexes_options_and_grants(
    ledger: JobLedger, db: str, processes: int
) -> None:
    jobs = await ledger.submit_many(
        [{"operator": "noop", "tags": ["t"], "context": {"k": i}} for i in range(20)]
    )
    await ledger.mark_running(jobs[0].id)
    conn = await connect(db)
    try:
        await conn.execute("ALTER TABLE jobledger.jobs SET (fillfactor = 70, parallel_workers = 1)")
        await conn.execute("GRANT SELECT ON jobledger.jobs TO PUBLIC")
        await conn.execute('CREATE INDEX "an index, of mine" ON jobledger.jobs (label)')
        await conn.execute("UPDATE jobledger.jobs SET label = 'wrong'")
        before = await _jobs_table(conn)
        table = await _jobs_oid(conn)
        listed = await ledger.list(status="queued", limit=50)  # prepared before the swap
        assert await rebuild_jobs(ledger.pool, dsn=db, processes=processes) == 21
        assert await _jobs_oid(conn) != table  # a new table took its place
        assert await _jobs_table(conn) == before
        assert before[1] == ["fillfactor=70", "parallel_workers=1"]
        assert any("=r/" in a for a in before[2])
        assert (
            "an index, of mine",
            'CREATE INDEX "an index, of mine" ON jobledger.jobs USING btree (label)',
        ) in before[0]
        assert await conn.fetchval("SELECT to_regclass('jobledger.jobs_rebuild')") is None
        assert {j.label for j in await ledger.list(limit=50)} == {"noop"}
    finally:
        await conn.close()
    # The pooled connections' prepared statements follow the new table.
    assert [j.id for j in await ledger.list(status="queued", limit=50)] == [j.id for j in listed]
    assert (await ledger.get(jobs[0].id)).status == "running"
    await ledger.submit("noop")
    assert await ledger.count(tags=["t"]) == 20
    assert await verify_all(ledger.pool) == []


async def test_a_jobs_rebuild_waits_for_readers_at_the_swap(ledger: JobLedger, db: str) -> None:
    await ledger.submit_many([{"operator": "noop"}] * 5)
    reader, watcher = await connect(db), await connect(db)
    try:
        await reader.execute("UPDATE jobledger.jobs SET label = 'wrong'")
        tx = reader.transaction()
        await tx.start()
        # A reader inside a transaction: the rebuild builds its table meanwhile,
        # then waits for this reader at the swap, and never disturbs what it reads.
        assert await reader.fetchval("SELECT count(*) FROM jobledger.jobs") == 5
        async with anyio.create_task_group() as tg:
            tg.start_soon(rebuild_jobs, ledger.pool)
            await _waiting(watcher, "AccessExclusiveLock", "jobledger.jobs")
            assert await reader.fetchval("SELECT min(label) FROM jobledger.jobs") == "wrong"
            await tx.commit()
        assert await reader.fetchval("SELECT min(label) FROM jobledger.jobs") == "noop"
    finally:
        await reader.close()
        await watcher.close()
    assert await verify_all(ledger.pool) == []


async def _waiting(watcher, mode: str, table: str) -> None:
    """Until some session waits for ``mode`` on ``table``."""
    with anyio.fail_after(10):
        while not await watcher.fetchval(  # noqa: ASYNC110 (polls the server)
            "SELECT count(*) FROM pg_locks WHERE NOT granted"
            " AND mode = $1 AND relation = $2::regclass",
            mode,
            table,
        ):
            await anyio.sleep(0.02)


async def _jobs_oid(conn) -> int:
    return await conn.fetchval("SELECT 'jobledger.jobs'::regclass::oid")


@pytest.mark.parametrize("processes", [1, 2])
async def test_a_jobs_rebuild_deadlocked_at_the_swap_replaces_the_rows(
    ledger: JobLedger, db: str, processes: int
) -> None:
    await ledger.submit_many([{"operator": "noop"}] * 4)
    reader, watcher, blocker = await connect(db), await connect(db), await connect(db)
    try:
        await reader.execute("UPDATE jobledger.jobs SET label = 'wrong'")
        table = await _jobs_oid(watcher)
        tx = reader.transaction()
        await tx.start()
        assert await reader.fetchval("SELECT count(*) FROM jobledger.jobs") == 4
        # Hold the rebuild after it has taken jobs (it then reads the log),
        # long enough for the reader to queue a write behind its lock.
        hold = blocker.transaction()
        await hold.start()
        await blocker.execute("LOCK TABLE jobledger.events IN ACCESS EXCLUSIVE MODE")
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(rebuild_jobs, ledger.pool, dsn=db, processes=processes))
            await _waiting(watcher, "AccessShareLock", "jobledger.events")

            async def write() -> None:
                await reader.execute("UPDATE jobledger.jobs SET pinned = pinned WHERE false")
                await tx.commit()

            tg.start_soon(write)
            await _waiting(watcher, "RowExclusiveLock", "jobledger.jobs")
            # The swap now waits for the reader's read while the reader waits
            # for the rebuild: PostgreSQL fails the swap, the rows are replaced.
            await hold.rollback()
        assert await reader.fetchval("SELECT min(label) FROM jobledger.jobs") == "noop"
        assert await watcher.fetchval("SELECT to_regclass('jobledger.jobs_rebuild')") is None
        assert await _jobs_oid(watcher) == table  # replaced in place, not swapped
    finally:
        for conn in (reader, watcher, blocker):
            await conn.close()
    assert await verify_all(ledger.pool) == []


async def test_a_jobs_rebuild_under_a_dependent_view_replaces_the_rows(
    ledger: JobLedger, db: str
) -> None:
    await ledger.submit_many([{"operator": "noop"}] * 3)
    conn = await connect(db)
    try:
        await conn.execute("CREATE VIEW public.job_labels AS SELECT id, label FROM jobledger.jobs")
        await conn.execute("UPDATE jobledger.jobs SET label = 'wrong'")
        table = await _jobs_oid(conn)
        assert await rebuild_jobs(ledger.pool) == 3
        assert await _jobs_oid(conn) == table  # replaced in place, not swapped
        assert await conn.fetch("SELECT DISTINCT label FROM public.job_labels") == [("noop",)]
        assert await conn.fetchval("SELECT to_regclass('jobledger.jobs_rebuild')") is None
        await conn.execute("DROP VIEW public.job_labels")
    finally:
        await conn.close()
    assert await verify_all(ledger.pool) == []


async def _bad_stream(db: str, job_id: UUID) -> None:
    """Append an event that cannot apply (a version that skips one) to a stream."""
    conn = await connect(db)
    try:
        await conn.execute(
            "INSERT INTO jobledger.events (job_id, version, type, data)"
            " VALUES ($1, 3, 'job.pinned', '{\"pinned\": true}')",
            job_id,
        )
    finally:
        await conn.close()


async def _mend_stream(db: str, job_id: UUID) -> None:
    """Take the bad event out again (past the append-only trigger), for the teardown check."""
    conn = await connect(db)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "DELETE FROM jobledger.events WHERE job_id = $1 AND version = 3", job_id
            )
    finally:
        await conn.close()


@pytest.mark.parametrize(("processes", "which"), [(1, -1), (3, -1), (3, 0)])
async def test_a_jobs_rebuild_of_a_stream_that_does_not_replay_changes_nothing(
    ledger: JobLedger, db: str, processes: int, which: int
) -> None:
    jobs = await ledger.submit_many([{"operator": "noop"}] * 40)
    bad = jobs[which].id  # with several processes: in a child's part, or in this one's
    await _bad_stream(db, bad)
    conn = await connect(db)
    try:
        table = await _jobs_oid(conn)
        with pytest.raises(ValueError, match=f"job {bad}: its events do not replay"):
            await rebuild_jobs(ledger.pool, dsn=db, processes=processes)
        assert await _jobs_oid(conn) == table
        assert await conn.fetchval("SELECT to_regclass('jobledger.jobs_rebuild')") is None
        assert await conn.fetchval("SELECT count(*) FROM jobledger.jobs") == 40
    finally:
        await conn.close()
        await _mend_stream(db, bad)
    assert await rebuild_jobs(ledger.pool, dsn=db, processes=processes) == 40
    assert await verify_all(ledger.pool) == []


async def test_a_jobs_rebuild_whose_other_process_fails_changes_nothing(
    ledger: JobLedger, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from projections import rebuild

    await ledger.submit_many([{"operator": "noop"}] * 40)
    conn = await connect(db)
    try:
        table = await _jobs_oid(conn)
        # A child that dies after reporting some progress, as a killed one would.
        monkeypatch.setattr(
            rebuild, "_PART", "import sys; print('+3', flush=True); sys.exit('lost it')"
        )
        with pytest.raises(RuntimeError, match="a process of the jobs rebuild failed: lost it"):
            await rebuild_jobs(ledger.pool, dsn=db, processes=3)
        assert await _jobs_oid(conn) == table
        assert await conn.fetchval("SELECT to_regclass('jobledger.jobs_rebuild')") is None
        # Orders bigger than a pipe holds, to a child that exits unread: the
        # write breaks, and what is reported is still the child's failure.
        monkeypatch.setattr(rebuild.upcasting, "registered", lambda: [("t", "m", "f" * 200_000)])
        with pytest.raises(RuntimeError, match="a process of the jobs rebuild failed: lost it"):
            await rebuild_jobs(ledger.pool, dsn=db, processes=2)
        monkeypatch.undo()
        # A server the other connections cannot reach: refused before anything is made.
        with pytest.raises(DatabaseUnavailable):
            await rebuild_jobs(ledger.pool, dsn=db + "_nowhere", processes=2)
        assert await _jobs_oid(conn) == table
        assert await conn.fetchval("SELECT to_regclass('jobledger.jobs_rebuild')") is None
    finally:
        await conn.close()
    assert await verify_all(ledger.pool) == []


async def test_a_cancelled_jobs_rebuild_stops_its_processes_and_changes_nothing(
    ledger: JobLedger, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from projections import rebuild

    await ledger.submit_many([{"operator": "noop"}] * 40)
    monkeypatch.setattr(rebuild, "_PART", "import time; time.sleep(60)")  # a child that hangs
    watcher = await connect(db)
    try:
        table = await _jobs_oid(watcher)
        with anyio.fail_after(20):  # the child is killed, not waited for
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(rebuild_jobs, ledger.pool, dsn=db, processes=2))
                while not await watcher.fetchval(  # noqa: ASYNC110 (polls the server)
                    "SELECT to_regclass('jobledger.jobs_rebuild') IS NOT NULL"
                ):
                    await anyio.sleep(0.02)
                await anyio.sleep(0.3)
                tg.cancel_scope.cancel()
        assert await _jobs_oid(watcher) == table
        assert await watcher.fetchval("SELECT to_regclass('jobledger.jobs_rebuild')") is None
    finally:
        await watcher.close()
    assert await ledger.count() == 40
    assert await verify_all(ledger.pool) == []


@pytest.mark.parametrize("processes", [1, 2])
async def test_a_jobs_rebuild_whose_index_cannot_be_built_changes_nothing(
    ledger: JobLedger, db: str, processes: int
) -> None:
    import asyncpg

    await ledger.submit_many([{"operator": "noop", "label": "same"}] * 4)
    conn = await connect(db)
    try:
        # A unique index of the user's that the damaged table satisfies and
        # the rows folded from the log do not: its build fails.
        await conn.execute("UPDATE jobledger.jobs SET label = id::text")
        await conn.execute("CREATE UNIQUE INDEX one_label ON jobledger.jobs (label)")
        table = await _jobs_oid(conn)
        with pytest.raises(asyncpg.UniqueViolationError):
            await rebuild_jobs(ledger.pool, dsn=db, processes=processes)
        assert await _jobs_oid(conn) == table
        assert await conn.fetchval("SELECT to_regclass('jobledger.jobs_rebuild')") is None
        assert await conn.fetchval("SELECT count(DISTINCT label) FROM jobledger.jobs") == 4
        await conn.execute("DROP INDEX jobledger.one_label")
    finally:
        await conn.close()
    assert await rebuild_jobs(ledger.pool, dsn=db, processes=processes) == 4
    assert await verify_all(ledger.pool) == []


async def test_a_parallel_rebuild_runs_from_a_directory_with_its_own_projections_package(
    ledger: JobLedger, db: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service's own `projections` package in the working directory is not what the
    children import: they import the package this process runs."""
    (tmp_path / "projections").mkdir()
    (tmp_path / "projections" / "__init__.py").write_text("raise ImportError('not jobledger')\n")
    monkeypatch.chdir(tmp_path)
    await ledger.submit_many([{"operator": "noop"}] * 6)
    assert await rebuild_jobs(ledger.pool, dsn=db, processes=2) == 6
    assert await verify_all(ledger.pool) == []


async def test_a_jobs_rebuild_clears_a_killed_rebuilds_table(ledger: JobLedger, db: str) -> None:
    await ledger.submit_many([{"operator": "noop"}] * 3)
    conn = await connect(db)
    try:  # what a rebuild in several processes leaves when it is killed
        await conn.execute(
            "CREATE TABLE jobledger.jobs_rebuild (LIKE jobledger.jobs INCLUDING ALL)"
        )
        await conn.execute("INSERT INTO jobledger.jobs_rebuild SELECT * FROM jobledger.jobs")
    finally:
        await conn.close()
    assert await rebuild_jobs(ledger.pool) == 3
    assert await ledger.count() == 3
    assert await verify_all(ledger.pool) == []


async def test_a_jobs_rebuild_refuses_bad_process_counts(ledger: JobLedger, db: str) -> None:
    with pytest.raises(ValueError, match="needs dsn="):
        await rebuild_jobs(ledger.pool, processes=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="processes must be a positive integer"):
            await rebuild_jobs(ledger.pool, dsn=db, processes=bad)  # type: ignore[arg-type]


async def test_a_log_from_another_cluster_is_refused(ledger: JobLedger, db: str) -> None:
    job = await ledger.submit("noop")
    change = ledger.make_change(await ledger.get(job.id), ev.Pinned(pinned=True))
    conn = await connect(db)
    try:
        # As if restored from another cluster whose ids were far ahead of ours.
        await conn.execute(
            "WITH moved AS (UPDATE jobledger.jobs SET version = 2, pinned = true,"
            " updated_at = $3 WHERE id = $1)"
            " INSERT INTO jobledger.events (job_id, version, type, data, meta, recorded_at, tx_id)"
            " VALUES ($1, 2, 'job.pinned', $2, '{}', $3,"
            " (pg_current_xact_id()::text::bigint + 1000000)::text::xid8)",
            job.id,
            msgspec.Raw(msgspec.json.encode(change.recorded.event)),
            change.recorded.recorded_at,
        )
    finally:
        await conn.close()
    with pytest.raises(LogFromAnotherCluster, match="pg_resetwal"):
        await check_log_cluster(ledger.pool)
    with pytest.raises(LogFromAnotherCluster):
        await ProjectionRunner(ledger).run()


# -- the report fold, exactly ----------------------------------------------------

T0 = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)


def rec(job: int, version: int, event: ev.Event, seconds: float) -> ev.Recorded:
    return ev.Recorded(
        job_id=UUID(int=job),
        version=version,
        event=event,
        recorded_at=T0 + timedelta(seconds=seconds),
    )


def test_fold_counts_and_percentiles() -> None:
    events = []
    for j in range(100):  # job j waits j ms and runs 10*j ms
        events += [
            rec(j, 1, ev.Submitted(operator="train", label="t", queue="gpu"), 0),
            rec(j, 2, ev.Started(), j / 1000),
            rec(
                j,
                3,
                ev.Completed() if j % 4 else ev.Failed(error=ev.ErrorInfo(type="E")),
                j / 1000 + j / 100,
            ),
        ]
    jobs: dict = {}
    deltas = reports.fold(events, jobs)
    d = deltas[("operator", "train", T0)]
    assert d.counts["submitted"] == 100 and d.counts["completed"] == 75 and d.counts["failed"] == 25
    assert deltas[("queue", "gpu", T0)].counts == d.counts
    for p, want in ((50, 500), (95, 950), (99, 990)):
        assert reports.percentile(d.run_hist, p) == pytest.approx(want, rel=0.05)
        assert reports.percentile(d.wait_hist, p) == pytest.approx(want / 10, rel=0.05)


def test_rollups() -> None:
    at = datetime(2026, 11, 19, 15, 42, tzinfo=UTC)  # a Thursday
    assert reports.roll(at, "hour") == datetime(2026, 11, 19, 15, tzinfo=UTC)
    assert reports.roll(at, "day") == datetime(2026, 11, 19, tzinfo=UTC)
    assert reports.roll(at, "week") == datetime(2026, 11, 16, tzinfo=UTC)
    with pytest.raises(ValueError, match="bucket must be"):
        reports.roll(at, "month")
