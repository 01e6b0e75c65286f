"""Concurrent writers on one job: one winner per version, no lost event."""

from __future__ import annotations

import anyio

from engine import JobLedger
from tests.operators import register_basic

register_operators = register_basic

WRITERS = 20


async def test_concurrent_conditional_transitions_have_one_winner(ledger: JobLedger) -> None:
    job = await ledger.submit("noop")
    results = []

    async def claim(i: int) -> None:
        results.append(await ledger.mark_running(job.id, worker=f"w{i}", expect_status="queued"))

    async with anyio.create_task_group() as tg:
        for i in range(WRITERS):
            tg.start_soon(claim, i)
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and len(results) == WRITERS
    history = await ledger.history(job.id)
    assert [r.type for r in history] == ["job.submitted", "job.started"]
    assert history[1].meta.worker == winners[0].worker


async def test_concurrent_unconditional_transitions_all_land(ledger: JobLedger, db: str) -> None:
    job = await ledger.submit("noop")
    # Separate ledgers = separate pools, as separate processes would have.
    async with JobLedger(db) as other:

        async def tag(i: int) -> None:
            target = ledger if i % 2 else other
            await target.add_tags(job.id, [f"t{i}"])

        async with anyio.create_task_group() as tg:
            for i in range(WRITERS):
                tg.start_soon(tag, i)
    history = await ledger.history(job.id)
    assert [r.version for r in history] == list(range(1, WRITERS + 2))  # no gap, no duplicate
    final = await ledger.get(job.id)
    assert sorted(final.tags) == sorted(f"t{i}" for i in range(WRITERS))
    assert final.version == WRITERS + 1
