"""Rebuild throughput and listing latency at scale.

Data is made the way users make it: ``submit_many`` in batches, then bulk
transitions (``transition_many``) starting and completing a share of the jobs.
Then:

* rebuild of the ``jobs`` projection (in the processes it chooses, and in one,
  alternating) and of the report projection from the whole log (events/s);
* ``list`` with a status + operator filter, ``count`` with the same filter,
  and ``list`` with a context filter, over all the jobs (p50/p95 ms).

    python -m bench.projections [--jobs 1000000] [--finished 100000] [--queries 200]
        [--rounds 3] [--processes N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import anyio

from bench.server import bench_database, quiet
from bench.stats import pct
from engine import JobLedger
from engine import events as ev
from projections.rebuild import rebuild_jobs, rebuild_projection
from projections.reports import ReportProjection

OPERATORS = [f"op{i}" for i in range(10)]


async def generate(ledger: JobLedger, jobs: int, finished: int) -> None:
    t = time.perf_counter()
    rng = random.Random(7)
    for start in range(0, jobs, 1000):
        await ledger.submit_many(
            [
                {
                    "operator": rng.choice(OPERATORS),
                    "inputs": {"n": i},
                    "context": {"dataset": f"ds{i % 1000}"},
                    "tags": ["bench"],
                }
                for i in range(start, min(jobs, start + 1000))
            ]
        )
    print(f"submitted {jobs:,} jobs in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    ids = [
        r[0] for r in await ledger.pool.fetch("SELECT id FROM jobledger.jobs LIMIT $1", finished)
    ]
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        await ledger.transition_many(chunk, lambda _: ev.Started(worker="bench"))
        await ledger.transition_many(chunk, lambda _: ev.Completed(result=None))
    print(f"started and completed {len(ids):,} jobs in {time.perf_counter() - t:.1f}s")


async def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


async def main_async(args: argparse.Namespace) -> None:
    async with bench_database("projections") as dsn:
        ledger = JobLedger(dsn, max_connections=4)
        for name in OPERATORS:

            async def handler(ctx) -> None:
                return None

            ledger.operator(name)(handler)
        async with ledger:
            await generate(ledger, args.jobs, args.finished)
            await ledger.pool.execute("VACUUM ANALYZE jobledger.jobs")
            await ledger.pool.execute("VACUUM ANALYZE jobledger.events")
            events = await ledger.pool.fetchval("SELECT count(*) FROM jobledger.events")

            serial: list[float] = []
            parallel: list[float] = []
            for _ in range(args.rounds):  # alternating, one process and then several
                for processes, rates in ((1, serial), (args.processes, parallel)):
                    t = time.perf_counter()
                    await rebuild_jobs(ledger.pool, dsn=dsn, processes=processes)
                    rates.append(events / (time.perf_counter() - t))
            t = time.perf_counter()
            await rebuild_projection(ledger.pool, ReportProjection())
            report_rate = events / (time.perf_counter() - t)
            await ledger.pool.execute("VACUUM ANALYZE jobledger.jobs")

            rng = random.Random(1)
            lst = await timed(
                lambda: ledger.list(status="queued", operator=rng.choice(OPERATORS), limit=50),
                args.queries,
            )
            cnt = await timed(
                lambda: ledger.count(status="completed", operator=rng.choice(OPERATORS)),
                args.queries,
            )
            ctx = await timed(
                lambda: ledger.list(context={"dataset": f"ds{rng.randrange(1000)}"}, limit=50),
                args.queries,
            )
    print(f"log: {events:,} events, {args.jobs:,} jobs")
    print(
        f"rebuild jobs projection:   {statistics.median(parallel):,.0f} events/s"
        f" ({_processes(args.processes, events)}; rounds {_rates(parallel)})"
    )
    ratio = statistics.median(parallel) / statistics.median(serial)
    print(
        f"  in one process:          {statistics.median(serial):,.0f} events/s"
        f" (rounds {_rates(serial)}; {ratio:.2f}x)"
    )
    print(f"rebuild report projection: {report_rate:,.0f} events/s")
    for name, xs in (
        ("list status+operator, limit 50", lst),
        ("count status+operator", cnt),
        ("list context filter, limit 50", ctx),
    ):
        print(
            f"{name:<32} p50 {pct(xs, 50):7.2f} ms   p95 {pct(xs, 95):7.2f} ms"
            f"   (median of {len(xs)}: {statistics.median(xs):.2f})"
        )


def _rates(xs: list[float]) -> str:
    return ", ".join(f"{x:,.0f}" for x in xs)


def _processes(processes: int | None, events: int) -> str:
    from projections.rebuild import _processes as choose

    return f"{choose(processes, 'dsn', events)} processes"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=1_000_000)
    p.add_argument("--finished", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3, help="jobs rebuilds, each way (alternating)")
    p.add_argument(
        "--processes", type=int, default=None, help="for the rebuild (default: it chooses)"
    )
    quiet()
    anyio.run(main_async, p.parse_args())


if __name__ == "__main__":
    main()
