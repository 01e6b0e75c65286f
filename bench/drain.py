"""End-to-end throughput and pickup latency of jobledger workers.

Drain: N no-op jobs are submitted (``submit_many``) with a ``run_at`` a few
seconds ahead; worker processes start and idle; when the jobs come due they
are drained. Throughput is N over the time from the first ``job.started`` to
the last ``job.completed``, read from the log itself, so process start-up is
not counted. Each job costs three events (submitted, started, completed) and
the ``jobs`` row kept in step.

Latency: one idle worker (concurrency 1); jobs are submitted one at a time and
the handler returns the wall-clock time it started. Latency is handler start
minus the moment ``submit`` returned (the commit), so it is a slight
underestimate by at most one round trip.

    python -m bench.drain [--jobs 20000] [--rounds 3] [--latency-samples 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio

from bench.server import bench_database
from bench.workers import cpu_seconds, postgres_cpu_seconds, worker_processes
from engine import JobLedger

LEAD = 4.0  # seconds between submitting and the jobs coming due


async def drain(n: int, processes: int, concurrency: int) -> dict[str, float]:
    """Drain ``n`` no-op jobs with ``processes`` workers; jobs/s and CPU per job."""
    async with bench_database("drain") as dsn:
        ledger = JobLedger(dsn)
        async with ledger:
            with worker_processes(dsn, processes, concurrency=concurrency) as procs:
                from bench.app import ledger as app

                for op in app.registry.values():
                    if op.name not in ledger.registry:
                        ledger.register(op)
                due = time.time() + LEAD
                from datetime import UTC, datetime

                run_at = datetime.fromtimestamp(due, UTC)
                for start in range(0, n, 1000):
                    await ledger.submit_many(
                        [{"operator": "noop", "run_at": run_at}] * min(1000, n - start)
                    )
                await anyio.sleep(max(0.0, due - time.time()) - 0.2)
                cpu0 = cpu_seconds([p.pid for p in procs])
                pg0 = postgres_cpu_seconds()
                with anyio.fail_after(600):
                    while await ledger.count(status="completed") < n:  # noqa: ASYNC110
                        await anyio.sleep(0.1)
                cpu1 = cpu_seconds([p.pid for p in procs])
                pg1 = postgres_cpu_seconds()
                row = await ledger.pool.fetchrow(
                    "SELECT min(recorded_at) FILTER (WHERE type = 'job.started') AS first,"
                    " max(recorded_at) FILTER (WHERE type = 'job.completed') AS last,"
                    " count(*) FILTER (WHERE type = 'job.completed') AS completed"
                    " FROM jobledger.events"
                )
    seconds = (row["last"] - row["first"]).total_seconds()
    assert row["completed"] == n, row
    return {
        "jobs_per_s": n / seconds,
        "client_cpu_ms_per_job": (cpu1 - cpu0) * 1000 / n,
        "server_cpu_ms_per_job": (pg1 - pg0) * 1000 / n,
    }


async def latency(samples: int) -> list[float]:
    """Pickup latencies (ms) of ``samples`` jobs submitted one at a time to an idle worker."""
    out: list[float] = []
    async with bench_database("latency") as dsn:
        async with JobLedger(dsn) as ledger:
            from bench.app import ledger as app

            for op in app.registry.values():
                ledger.register(op)
            with worker_processes(dsn, 1, concurrency=1):
                await anyio.sleep(2.0)  # let the worker start and LISTEN
                for i in range(samples + 10):
                    job = await ledger.submit("stamp")
                    committed = time.time()
                    done = await ledger.wait(job.id, timeout=30)
                    if i >= 10:  # warm-up
                        out.append((done.result - committed) * 1000)
                    await anyio.sleep(0.02)
    return out


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


async def main_async(args: argparse.Namespace) -> None:
    results: dict[str, list[dict[str, float]]] = {"1": [], "2": []}
    for _ in range(args.rounds):
        for procs in ("1", "2"):
            results[procs].append(await drain(args.jobs, int(procs), args.concurrency))
    for procs, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"drain {args.jobs} no-op jobs, {procs} worker process(es) x {args.concurrency}: "
            f"{med['jobs_per_s']:,.0f} jobs/s (median of {args.rounds}); "
            f"CPU/job client {med['client_cpu_ms_per_job']:.3f} ms, "
            f"server {med['server_cpu_ms_per_job']:.3f} ms"
        )
    lat = await latency(args.latency_samples)
    print(
        f"pickup latency, commit -> handler start ({len(lat)} samples): "
        f"p50 {pct(lat, 50):.2f} ms, p95 {pct(lat, 95):.2f} ms, p99 {pct(lat, 99):.2f} ms"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--latency-samples", type=int, default=200)
    anyio.run(main_async, p.parse_args())


if __name__ == "__main__":
    main()
