"""A worker's resident memory over a long drain: ``python -m bench.memory``.

Submits N no-op jobs (``submit_many``, due a few seconds ahead), starts one
worker process and samples its RSS every half second while it drains them.
Prints the RSS after the first tenth of the jobs (the warmed-up baseline),
at the half, at the end and the peak, and the ratio end / baseline: flat means
within 20%.

    python -m bench.memory [--jobs 200000] [--concurrency 100]
"""

from __future__ import annotations

import argparse
import subprocess
from datetime import UTC, datetime, timedelta

import anyio
import psutil

from bench.server import bench_database, quiet
from bench.systems import Jobledger
from bench.workers import workers


async def main_async(args: argparse.Namespace) -> None:
    n = args.jobs
    samples: list[tuple[int, int]] = []  # (completed, rss bytes)
    async with bench_database("memory") as dsn, Jobledger(dsn) as system:
        due = datetime.now(UTC) + timedelta(seconds=5 + n / 4000)
        await system.enqueue_due(n, due)
        with workers(system, 1, args, stdout=subprocess.DEVNULL) as (proc,):
            ps = psutil.Process(proc.pid)
            with anyio.fail_after(args.timeout):
                while (done := (await system.done())[0]) < n:
                    if datetime.now(UTC) >= due:
                        samples.append((done, ps.memory_info().rss))
                    await anyio.sleep(0.5)
            samples.append((n, ps.memory_info().rss))

    def at(fraction: float) -> int:
        return next(rss for done, rss in samples if done >= fraction * n)

    base, half, end = at(0.1), at(0.5), samples[-1][1]
    peak = max(rss for _, rss in samples)
    mib = 1024 * 1024
    print(
        f"worker RSS over a {n:,}-job drain: after 10% {base / mib:.1f} MiB, "
        f"50% {half / mib:.1f} MiB, end {end / mib:.1f} MiB, peak {peak / mib:.1f} MiB; "
        f"end / 10% = {end / base:.3f}, peak / 10% = {peak / base:.3f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=200_000)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=1800)
    quiet()
    anyio.run(main_async, p.parse_args())


if __name__ == "__main__":
    main()
