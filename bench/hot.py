"""Progress updates against the ``jobs`` table's fillfactor (migration 009).

A long job's frequent events (progress, labels, pins, artifacts) change no
indexed column, so they can be heap-only (HOT) updates if the new row version
fits on its page. Each round makes N running jobs report progress ten times,
once with the table as migrated (fillfactor 80) and once packed full
(fillfactor 100), each in a fresh database, and prints the update rate, the
share of HOT updates and the table's size, as medians.

    python -m bench.hot [--jobs 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio

from bench.app import ledger_at
from bench.server import bench_database, quiet
from engine import events as ev


async def run(jobs: int, fillfactor: int | None) -> dict[str, float]:
    async with bench_database("hot") as dsn:
        ledger = ledger_at(dsn, max_connections=2)
        async with ledger:
            if fillfactor is not None:
                await ledger.pool.execute(
                    f"ALTER TABLE jobledger.jobs SET (fillfactor = {int(fillfactor)})"
                )
            for start in range(0, jobs, 1000):
                await ledger.submit_many([{"operator": "noop"}] * min(1000, jobs - start))
            ids = [r[0] for r in await ledger.pool.fetch("SELECT id FROM jobledger.jobs")]
            chunks = [ids[i : i + 1000] for i in range(0, len(ids), 1000)]
            for chunk in chunks:
                await ledger.transition_many(chunk, lambda _: ev.Started(worker="bench"))
            t = time.perf_counter()
            for step in range(10):
                for chunk in chunks:
                    await ledger.transition_many(
                        chunk, lambda _, f=step / 10: ev.Progressed(fraction=f)
                    )
            rate = 10 * len(ids) / (time.perf_counter() - t)
            # Both pool connections hand their counts to the shared statistics.
            async with ledger.pool.acquire() as a, ledger.pool.acquire() as b:
                for conn in (a, b):
                    await conn.execute("SELECT pg_stat_force_next_flush()")
                await a.execute("SELECT pg_stat_clear_snapshot()")
                upd, hot, size = await a.fetchrow(
                    "SELECT n_tup_upd, n_tup_hot_upd, pg_relation_size(relid)"
                    " FROM pg_stat_user_tables WHERE relid = 'jobledger.jobs'::regclass"
                )
    return {"rate": rate, "hot": hot / max(upd, 1), "mib": size / 2**20}


async def main_async(args: argparse.Namespace) -> None:
    results: dict[str, list[dict[str, float]]] = {"80 (migrated)": [], "100 (packed)": []}
    for _ in range(args.rounds):
        results["80 (migrated)"].append(await run(args.jobs, None))
        results["100 (packed)"].append(await run(args.jobs, 100))
    print(f"{args.jobs:,} running jobs, 10 progress updates each; medians of {args.rounds}")
    print(f"{'fillfactor':<16}{'updates/s':>12}{'HOT':>8}{'table MiB':>12}")
    med = {}
    for name, rs in results.items():
        med[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        m = med[name]
        print(f"{name:<16}{m['rate']:>12,.0f}{m['hot']:>8.0%}{m['mib']:>12.1f}")
    a, b = med["80 (migrated)"], med["100 (packed)"]
    print(f"ratio 80 / 100: updates/s {a['rate'] / b['rate']:.2f}, size {a['mib'] / b['mib']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    quiet()
    anyio.run(main_async, p.parse_args())


if __name__ == "__main__":
    main()
