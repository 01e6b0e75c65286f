"""Submit throughput: ``submit`` and ``submit_many`` against raw asyncpg inserts of the same rows.

The raw baseline writes what jobledger writes per job (one ``jobs`` row and one
``events`` row) with pre-built values: no validation, no reducer, no msgspec.
Both run in the same process against the same server, alternating, and the
medians of the rounds are compared.

    python -m bench.submit [--rounds 3] [--single 1000] [--batches 20] [--batch-size 500]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from datetime import UTC, datetime

import anyio
import asyncpg
import msgspec

from bench.server import bench_database, quiet
from engine import JobLedger
from engine.postgres import init_connection

RAW_SINGLE = """
WITH j AS (
    INSERT INTO jobledger.jobs (id, version, operator, label, queue, status, priority, inputs,
        context, tags, pinned, attempt, max_attempts, restart_policy, retry_backoff,
        retry_backoff_max, run, run_at, artifacts, created_at, updated_at, status_changed_at)
    VALUES ($1, 1, 'noop', 'noop', 'default', 'queued', 0, $2, '{}', '{}', false, 0, 1,
        'on_error', 1, 300, 1, $3, '[]', $3, $3, $3)
)
INSERT INTO jobledger.events (job_id, version, type, data, meta, recorded_at)
VALUES ($1, 1, 'job.submitted', $4, '{}', $3)
"""

RAW_BATCH = """
WITH j AS (
    INSERT INTO jobledger.jobs (id, version, operator, label, queue, status, priority, inputs,
        context, tags, pinned, attempt, max_attempts, restart_policy, retry_backoff,
        retry_backoff_max, run, run_at, artifacts, created_at, updated_at, status_changed_at)
    SELECT id, 1, 'noop', 'noop', 'default', 'queued', 0, inputs, '{}', '{}', false, 0, 1,
        'on_error', 1, 300, 1, $3, '[]', $3, $3, $3
    FROM unnest($1::uuid[], $2::jsonb[]) AS u(id, inputs)
)
INSERT INTO jobledger.events (job_id, version, type, data, meta, recorded_at)
SELECT id, 1, 'job.submitted', data, '{}', $3 FROM unnest($1::uuid[], $4::jsonb[]) AS u(id, data)
"""

INPUTS = {"dataset": "bench", "rows": 1000}


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


async def jl_single(ledger: JobLedger, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        await ledger.submit("noop", INPUTS)
    return rate(n, time.perf_counter() - t)


async def jl_batches(ledger: JobLedger, batches: int, size: int) -> float:
    specs = [{"operator": "noop", "inputs": INPUTS}] * size
    t = time.perf_counter()
    for _ in range(batches):
        await ledger.submit_many(specs)
    return rate(batches * size, time.perf_counter() - t)


async def raw_single(conn: asyncpg.Connection, n: int) -> float:
    data = msgspec.Raw(msgspec.json.encode({"type": "job.submitted", "operator": "noop", **INPUTS}))
    inputs = msgspec.Raw(msgspec.json.encode(INPUTS))
    t = time.perf_counter()
    for _ in range(n):
        await conn.execute(RAW_SINGLE, uuid.uuid4(), inputs, datetime.now(UTC), data)
    return rate(n, time.perf_counter() - t)


async def raw_batches(conn: asyncpg.Connection, batches: int, size: int) -> float:
    data = msgspec.Raw(msgspec.json.encode({"type": "job.submitted", "operator": "noop", **INPUTS}))
    inputs = msgspec.Raw(msgspec.json.encode(INPUTS))
    t = time.perf_counter()
    for _ in range(batches):
        ids = [uuid.uuid4() for _ in range(size)]
        await conn.execute(RAW_BATCH, ids, [inputs] * size, datetime.now(UTC), [data] * size)
    return rate(batches * size, time.perf_counter() - t)


async def measure(rounds: int, single: int, batches: int, size: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {k: [] for k in ("submit", "raw1", "submit_many", "rawN")}
    async with bench_database("submit") as dsn:
        ledger = JobLedger(dsn, max_connections=2)

        @ledger.operator("noop")
        async def noop(ctx) -> None:
            return None

        async with ledger:
            conn = await asyncpg.connect(dsn)
            await init_connection(conn)
            await jl_single(ledger, 50)  # warm up both paths (prepared statements)
            await raw_single(conn, 50)
            for _ in range(rounds):
                results["submit"].append(await jl_single(ledger, single))
                results["raw1"].append(await raw_single(conn, single))
                results["submit_many"].append(await jl_batches(ledger, batches, size))
                results["rawN"].append(await raw_batches(conn, batches, size))
            await conn.close()
    return results


def report(results: dict[str, list[float]], size: int) -> str:
    med = {k: statistics.median(v) for k, v in results.items()}
    lines = [
        f"{'measure':<38}{'jobledger':>12}{'raw asyncpg':>14}{'ratio':>8}",
        f"{'submit one at a time (jobs/s)':<38}{med['submit']:>12,.0f}{med['raw1']:>14,.0f}"
        f"{med['submit'] / med['raw1']:>8.2f}",
        f"{f'submit_many, batches of {size} (jobs/s)':<38}{med['submit_many']:>12,.0f}"
        f"{med['rawN']:>14,.0f}{med['submit_many'] / med['rawN']:>8.2f}",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--single", type=int, default=1000)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=500)
    a = p.parse_args()
    quiet()
    results = anyio.run(measure, a.rounds, a.single, a.batches, a.batch_size)
    print(report(results, a.batch_size))
    print("medians of", a.rounds, "rounds, measured side by side")


if __name__ == "__main__":
    main()
