"""What a connection pool costs per call: ``python -m bench.pool``.

One ledger submits jobs one at a time (one statement per call), its ``pool``
swapped between asyncpg's pool (as jobledger used it, without the reset
query), jobledger's own pool (:mod:`engine.pool`) and one connection held for
the whole run (no pool at all: the floor). The three alternate round by round
in one process against the same server; the table shows the medians of
submits per second and of the client's CPU per submit.

    python -m bench.pool [--rounds 4] [--submits 1500]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import anyio
import asyncpg

from bench.app import ledger_at
from bench.server import bench_database, quiet
from engine.postgres import init_connection


async def _no_reset(conn: asyncpg.Connection) -> None:
    """asyncpg's pool as jobledger configured it: no reset query on release."""


async def measure(rounds: int, submits: int) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {"asyncpg pool": [], "engine.pool": [], "held": []}
    async with bench_database("pool") as dsn:
        ledger = ledger_at(dsn, max_connections=2, actor="bench")
        async with ledger:
            ours = ledger._pool
            theirs = await asyncpg.create_pool(
                dsn, min_size=1, max_size=2, init=init_connection, reset=_no_reset
            )
            held = await ours.acquire()
            pools: dict[str, Any] = {"asyncpg pool": theirs, "engine.pool": ours, "held": held}
            try:
                for pool in pools.values():  # warm up: prepared statements on each
                    ledger._pool = pool
                    for _ in range(100):
                        await ledger.submit("noop")
                for _ in range(rounds):
                    for name, pool in pools.items():
                        ledger._pool = pool
                        cpu, t = time.process_time(), time.perf_counter()
                        for _ in range(submits):
                            await ledger.submit("noop")
                        seconds = time.perf_counter() - t
                        client = (time.process_time() - cpu) * 1e6 / submits
                        out[name].append((submits / seconds, client))
            finally:
                ledger._pool = ours
                await ours.release(held)
                await theirs.close()
    return out


def report(results: dict[str, list[tuple[float, float]]]) -> str:
    floor = statistics.median(r[0] for r in results["held"])
    lines = [f"{'pool':<16}{'submits/s':>12}{'client CPU us/submit':>24}{'vs held':>10}"]
    for name, runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        lines.append(f"{name:<16}{rate:>12,.0f}{cpu:>24.1f}{rate / floor:>10.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--submits", type=int, default=1500)
    a = p.parse_args()
    quiet()
    print(report(anyio.run(measure, a.rounds, a.submits)))
    print(f"medians of {a.rounds} rounds, alternating, one process, one server")


if __name__ == "__main__":
    main()
