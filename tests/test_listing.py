"""list / count / iter_jobs: filters, ordering, offset and cursor paging."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from engine import JobLedger
from tests.operators import register_basic

register_operators = register_basic


@pytest.fixture
async def jobs(ledger: JobLedger):
    specs = []
    for i in range(30):
        specs.append(
            {
                "operator": "dataset.import" if i % 3 else "noop",
                "inputs": {"dataset": f"d{i % 5}"} if i % 3 else None,
                "label": f"job {i:02d}" + (" 100% cats_x" if i == 7 else ""),
                "description": "weekly refresh" if i % 10 == 0 else None,
                "priority": i % 4,
                "tags": ["even"] if i % 2 == 0 else ["odd", "gpu"],
                "context": {"dataset": f"d{i % 5}", "split": "train" if i < 15 else "test"},
                "owner": "ana" if i < 10 else "bo",
            }
        )
    created = await ledger.submit_many(specs)
    for j in created[:6]:
        await ledger.mark_running(j.id)
    await ledger.mark_completed(created[0].id)
    await ledger.set_pinned(created[1].id)
    return created


async def test_filters(ledger: JobLedger, jobs) -> None:
    assert await ledger.count() == 30
    assert await ledger.count(status="running") == 5
    assert await ledger.count(status=["running", "completed"]) == 6
    assert await ledger.count(operator="noop") == 10
    assert await ledger.count(operator="noop", status="queued") == 8
    assert await ledger.count(queue="imports") == 20
    assert await ledger.count(tags=["odd"]) == 15
    assert await ledger.count(tags=["odd", "-gpu"]) == 0
    assert await ledger.count(tags=["-even"]) == 15
    assert await ledger.count(context={"dataset": "d1"}) == 6
    assert await ledger.count(context={"dataset": ["d1", "d2"], "split": "train"}) == 6
    assert await ledger.count(owner="ana") == 10
    assert await ledger.count(pinned=True) == 1
    assert await ledger.count(search="WEEKLY") == 3
    assert await ledger.count(search="100%") == 1  # % is literal, not a wildcard
    assert await ledger.count(search="s_x") == 1
    assert await ledger.count(search="0_") == 0
    assert await ledger.count(ids=[jobs[0].id, jobs[1].id]) == 2
    assert await ledger.count(started_after=jobs[0].created_at) == 6
    assert await ledger.count(finished_before=datetime.now(UTC) + timedelta(1)) == 1
    assert await ledger.count(created_after=datetime.now(UTC) + timedelta(1)) == 0


async def test_parent_filter(ledger: JobLedger, jobs) -> None:
    child = await ledger.submit("noop", parent_id=jobs[3].id)
    assert [j.id for j in await ledger.list(parent_id=jobs[3].id)] == [child.id]


async def test_ordering_and_offset(ledger: JobLedger, jobs) -> None:
    newest = await ledger.list(limit=3)
    assert [j.id for j in newest] == [j.id for j in reversed(jobs)][:3]
    by_prio = await ledger.list(order_by=["-priority", "label"], limit=30)
    assert [(j.priority, j.label) for j in by_prio] == sorted(
        ((j.priority, j.label) for j in jobs), key=lambda t: (-t[0], t[1])
    )
    second = await ledger.list(order_by="label", limit=5, offset=5)
    assert [j.label[:6] for j in second] == [f"job {i:02d}" for i in range(5, 10)]


async def test_creation_order_is_id_order(ledger: JobLedger, jobs) -> None:
    """created_at and id both order by the id (a UUIDv7, migration 012); the id
    ends every order, in its own direction when given, and nothing after it counts."""
    from engine.filters import parse_order

    assert parse_order(None) == parse_order("-created_at") == parse_order("-id") == [("id", True)]
    assert parse_order("created_at") == [("id", False)]
    assert parse_order(["-priority", "id", "label"]) == [("priority", True), ("id", False)]
    assert parse_order(["status", "-label"]) == [("status", False), ("label", True), ("id", True)]
    later = await ledger.submit_many([{"operator": "noop"}] * 3)
    everyone = [*jobs, *later]
    assert [j.id for j in await ledger.list(limit=100)] == [j.id for j in reversed(everyone)]
    oldest = await ledger.list(order_by="created_at", limit=100)
    assert [j.id for j in oldest] == sorted(j.id for j in everyone) == [j.id for j in everyone]
    # one process's ids follow its clock: the created_at of id order never goes back
    assert [j.created_at for j in oldest] == sorted(j.created_at for j in oldest)
    by_status = await ledger.list(order_by=["status", "-created_at"], limit=100)
    assert [(j.status, j.id) for j in by_status] == sorted(
        ((j.status, j.id) for j in by_status), key=lambda t: (t[0], -t[1].int)
    )


@pytest.mark.parametrize(
    "order", ["-created_at", "label", ["-priority", "label"], "finished_at", ["status", "id"]]
)
async def test_cursor_paging_visits_every_job_once(ledger: JobLedger, jobs, order) -> None:
    seen = []
    cursor = None
    while True:
        page = await ledger.page(order_by=order, limit=7, cursor=cursor)
        seen += page.jobs
        if page.cursor is None:
            break
        cursor = page.cursor
    assert sorted(j.id for j in seen) == sorted(j.id for j in jobs)
    assert [j.id for j in seen] == [j.id for j in await ledger.list(order_by=order, limit=100)]
    streamed = [j.id async for j in ledger.iter_jobs(order_by=order, page_size=4)]
    assert streamed == [j.id for j in seen]


async def test_bad_filters_are_clear_errors(ledger: JobLedger, jobs) -> None:
    with pytest.raises(ValueError, match=r"unknown job filter 'colour'; valid filters: .*status"):
        await ledger.list(colour="red")
    with pytest.raises(ValueError, match="cannot order jobs by 'inputs'"):
        await ledger.list(order_by="-inputs")
    with pytest.raises(ValueError, match="unknown status 'done'"):
        await ledger.count(status="done")
    with pytest.raises(ValueError, match="timezone-aware"):
        await ledger.count(created_after=datetime(2020, 1, 1))
    with pytest.raises(ValueError, match="invalid cursor"):
        await ledger.page(cursor="garbage!")
    page = await ledger.page(order_by="label", limit=2)
    with pytest.raises(ValueError, match="made for order"):
        await ledger.page(order_by="-label", cursor=page.cursor)
    with pytest.raises(ValueError, match="limit"):
        await ledger.list(limit=0)
    # Injection attempts are values, never SQL.
    assert await ledger.count(operator="noop' OR '1'='1") == 0
    assert await ledger.count(context={"x') OR true --": 1}) == 0


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({"tags": ["gpu"]}, "jobs_tags"),
        ({"context": {"dataset": ["d1", "d2"]}}, "jobs_context"),
    ],
)
async def test_tag_and_context_filters_can_use_their_partial_indexes(
    ledger: JobLedger, jobs, filters: dict, index: str
) -> None:
    """jobs_tags and jobs_context index only non-empty values; the filters say so, or the
    planner could not use them."""
    from engine.filters import compile_filters

    c = compile_filters(filters)
    async with ledger.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = await conn.fetch(
            f"EXPLAIN SELECT count(*) FROM jobledger.jobs WHERE {c.where}", *c.params
        )
    assert index in "\n".join(r[0] for r in plan)
    assert await ledger.count(**filters) == len(await ledger.list(**filters, limit=1000)) > 0


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({}, "jobs_pkey"),
        ({"status": "queued"}, "jobs_status_id"),
        ({"status": "queued", "operator": "noop"}, "jobs_operator_status_id"),
        ({"queue": "default"}, "jobs_queue_id"),
        ({"owner": "ana"}, "jobs_owner_id"),
    ],
)
@pytest.mark.parametrize("newest_first", [True, False])
async def test_listing_pages_are_index_range_scans(
    ledger: JobLedger, jobs, filters: dict, index: str, newest_first: bool
) -> None:
    """The listing indexes are ascending and keyed by the id, the creation order
    (migrations 010 and 012), and serve both orders, with and without a
    cursor: a page is a range scan, never a sort of the matches."""
    from engine.filters import page_query, parse_order

    order = "-created_at" if newest_first else "created_at"
    keys = parse_order(order)
    first = await ledger.page(order_by=order, limit=2, **filters)
    assert first.cursor is not None
    for cursor in (None, first.cursor):
        sql, params = page_query(filters, keys, limit=3, cursor=cursor)
        async with ledger.pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")
            await conn.execute("SET LOCAL enable_bitmapscan = off")
            await conn.execute("SET LOCAL enable_sort = off")
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", *params))
        assert index in plan, plan
        assert "Sort" not in plan, plan
        assert ("Backward" in plan) == newest_first, plan
