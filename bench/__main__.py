"""jobledger against pgqueuer, procrastinate and raw PostgreSQL, side by side: ``python -m bench``.

Every measure runs each system in turn on the same server (``BENCH_DSN``, else
a fresh embedded PostgreSQL), each in a fresh database, round after round;
the table shows medians and ratios taken in this one run. Databases keep
PostgreSQL's default durability unless ``BENCH_SYNCHRONOUS_COMMIT=off`` (for
every system alike; the issue's goals are measured at ``on``).

* submit one job at a time from one client, and in batches of 100 (jobs/s);
  ``raw`` is single-row INSERT commits and 100-row INSERTs into a one-table queue;
  the systems are open together and take turns in blocks within each round;
* drain N no-op jobs with 1 and with 2 worker processes (jobs/s, from the first
  job started to the last completed, read from each system's own log), with
  CPU per job of the worker processes (client) and of PostgreSQL (server);
* pickup latency: an idle worker, one job submitted at a time; commit (submit
  returned) to handler start, p50/p99 ms; every system's worker runs at once
  and the systems take turns, sample by sample.

    python -m bench [--rounds 3] [--jobs 20000] [--systems jobledger,pgqueuer,procrastinate]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import anyio

from bench.server import bench_database, quiet, synchronous_commit
from bench.stats import pct
from bench.systems import SETTINGS, SYSTEMS, System
from bench.workers import cpu_seconds, postgres_cpu_seconds, workers

PEERS = ("jobledger", "pgqueuer", "procrastinate")
# Enqueue rates assumed when scheduling a drain's jobs ahead (jobs/s, low on purpose).
ENQUEUE_RATE = {"jobledger": 4000, "pgqueuer": 4000, "procrastinate": 800}


async def open_systems(stack: contextlib.AsyncExitStack, names: list[str]) -> dict[str, System]:
    """Each of ``names`` open on its own fresh database, all closed with ``stack``."""
    systems = {}
    for name in names:
        dsn = await stack.enter_async_context(bench_database(name, migrated=SYSTEMS[name].migrated))
        systems[name] = await stack.enter_async_context(SYSTEMS[name](dsn))
    return systems


async def submits(names: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """One round of single and batched submit rates, with client and server CPU per job.

    Every system is open at once, each on its own fresh database, and they take
    turns in blocks (``--blocks`` a round, the order reversed every other block),
    so that a drift of the machine (the disk's fsync time, a neighbour's load)
    falls on all of them alike rather than on whichever ran in its stretch of
    the round. A system's rate for the round is its jobs over its own time.
    """
    # per system and measure: jobs, seconds, client CPU and server CPU seconds
    totals = {n: {"submit": [0.0] * 4, "submit_many": [0.0] * 4} for n in names}
    async with contextlib.AsyncExitStack() as stack:
        systems = await open_systems(stack, names)
        for system in systems.values():
            for _ in range(50):  # warm up: connections, prepared statements, caches
                await system.submit_one()
            await system.submit_batch(args.batch)
        for block in range(args.blocks):
            order = names if block % 2 == 0 else names[::-1]
            for key, n, count in (
                ("submit", args.single, 1),
                ("submit_many", args.batches, args.batch),
            ):
                steps = n // args.blocks + (block < n % args.blocks)
                for name in order:
                    system = systems[name]
                    cpu, pg, t = time.process_time(), postgres_cpu_seconds(), time.perf_counter()
                    for _ in range(steps):
                        await (system.submit_one() if count == 1 else system.submit_batch(count))
                    seconds = time.perf_counter() - t
                    parts = (
                        steps * count,
                        seconds,
                        time.process_time() - cpu,
                        postgres_cpu_seconds() - pg,
                    )
                    tot = totals[name][key]
                    for i, value in enumerate(parts):
                        tot[i] += value
    out: dict[str, dict[str, float]] = {}
    for name, measures in totals.items():
        res = out[name] = {}
        for key, (jobs, seconds, client, server) in measures.items():
            res[key] = jobs / seconds
            res[f"{key}_client_cpu"] = client * 1000 / jobs
            res[f"{key}_server_cpu"] = server * 1000 / jobs
    return out


async def drain(name: str, processes: int, args: argparse.Namespace) -> dict[str, float]:
    """Drain ``args.jobs`` no-op jobs, all due at one moment, with ``processes`` workers."""
    n = args.jobs
    async with bench_database(name, migrated=SYSTEMS[name].migrated) as dsn:
        async with SYSTEMS[name](dsn) as system:
            lead = 4.0 + n / ENQUEUE_RATE[name]
            due = datetime.now(UTC) + timedelta(seconds=lead)
            await system.enqueue_due(n, due)
            if (due - datetime.now(UTC)).total_seconds() < 1.5:
                raise RuntimeError(f"{name}: enqueueing {n} jobs overran the lead of {lead:.0f}s")
            with workers(system, processes, args, stdout=subprocess.DEVNULL) as procs:
                pids = [p.pid for p in procs]
                await anyio.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds() - 0.3))
                cpu0, pg0 = cpu_seconds(pids), postgres_cpu_seconds()
                with anyio.fail_after(args.timeout):
                    while (state := await system.done())[0] < n:
                        if any(p.poll() is not None for p in procs):
                            raise RuntimeError(f"{name}: a worker process exited")
                        await anyio.sleep(0.25)
                cpu1, pg1 = cpu_seconds(pids), postgres_cpu_seconds()
    count, first, last = state
    seconds = (last - first).total_seconds()
    return {
        "jobs_per_s": count / seconds,
        "client_cpu": (cpu1 - cpu0) * 1000 / count,
        "server_cpu": (pg1 - pg0) * 1000 / count,
    }


async def latencies(names: list[str], args: argparse.Namespace) -> dict[str, list[float]]:
    """Pickup latencies (ms): one idle worker per system, one ``stamp`` job at a time.

    Every system's worker runs at once, each on its own database, and the
    systems take turns sample by sample (the order reversed every other
    sample), so a slow stretch of the machine falls on all of them alike.
    """
    out: dict[str, list[float]] = {n: [] for n in names}
    async with contextlib.AsyncExitStack() as stack:
        systems = await open_systems(stack, names)
        procs = {}
        for name, system in systems.items():
            (procs[name],) = stack.enter_context(workers(system, 1, args, stdout=subprocess.PIPE))
        await anyio.sleep(3.0)  # start-up and LISTEN
        for i in range(args.latency_samples + 10):
            for name in names if i % 2 == 0 else names[::-1]:
                await systems[name].submit_stamp()
                committed = time.time()
                with anyio.fail_after(30):
                    line = await anyio.to_thread.run_sync(procs[name].stdout.readline)
                if not line:
                    raise RuntimeError(f"{name}: the worker exited")
                if i >= 10:  # warm-up
                    out[name].append((float(line) - committed) * 1000)
                await anyio.sleep(0.02)
    return out


def med(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(results: dict, names: list[str], args: argparse.Namespace) -> str:
    """The results as a Markdown table, jobledger's column first, with ratios."""
    rows: list[tuple[str, dict[str, str]]] = []

    def row(label: str, values: dict[str, float], fmt: str = "{:,.0f}") -> None:
        cells = {k: fmt.format(v) for k, v in values.items()}
        jl, pq = values.get("jobledger"), values.get("pgqueuer")
        if jl is not None and pq:
            cells["ratio"] = f"{jl / pq:.2f}x"
        if jl is not None and values.get("raw"):
            cells["vs raw"] = f"{jl / values['raw']:.2f}x"
        rows.append((label, cells))

    sub = results["submit"]
    if sub:
        for key, label in (
            ("submit", "submit one job at a time, 1 client (jobs/s)"),
            ("submit_many", f"submit in batches of {args.batch} (jobs/s)"),
        ):
            row(label, {k: med(v, key) for k, v in sub.items()})
            rows.append(
                (
                    "  CPU per job, client / server (ms)",
                    {
                        k: f"{med(v, key + '_client_cpu'):.3f} / {med(v, key + '_server_cpu'):.3f}"
                        for k, v in sub.items()
                    },
                )
            )
    for procs in (1, 2):
        d = {k: v for k, v in results["drain"].get(procs, {}).items() if v}
        if not d:
            continue
        row(
            f"drain {args.jobs:,} no-op jobs, {procs} worker process{'es' if procs > 1 else ''}"
            " (jobs/s)",
            {k: med(v, "jobs_per_s") for k, v in d.items()},
        )
        rows.append(
            (
                "  CPU per job, client / server (ms)",
                {
                    k: f"{med(v, 'client_cpu'):.3f} / {med(v, 'server_cpu'):.3f}"
                    for k, v in d.items()
                },
            )
        )
    lat = results["latency"]
    if lat:
        p50 = {k: pct(v, 50) for k, v in lat.items()}
        p99 = {k: pct(v, 99) for k, v in lat.items()}
        cells = {k: f"{p50[k]:.2f} / {p99[k]:.2f}" for k in lat}
        if "jobledger" in p50 and "pgqueuer" in p50:
            cells["ratio"] = f"{p50['jobledger'] / p50['pgqueuer']:.2f}x (p50)"
        rows.append(("pickup latency, commit -> handler start, p50 / p99 (ms)", cells))
    cols = [*names, "ratio", "vs raw"]
    header = ["measure", *(c if c != "ratio" else "jobledger / pgqueuer" for c in cols)]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(cols) + "|"]
    for label, cells in rows:
        lines.append("| " + " | ".join([label, *(cells.get(c, "") for c in cols)]) + " |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    names = [n for n in args.systems.split(",") if n]
    synchronous_commit()  # a bad BENCH_SYNCHRONOUS_COMMIT fails before any round
    if not 1 <= args.blocks <= min(args.single, args.batches):
        raise SystemExit(
            f"bench: --blocks must be between 1 and --single and --batches, got {args.blocks}"
        )
    for n in names:
        if n not in PEERS:
            raise SystemExit(f"bench: unknown system {n!r}; choose from {', '.join(PEERS)}")
    results: dict = {"submit": {}, "drain": {1: {}, 2: {}}, "latency": {}}
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    for r in range(args.rounds):
        if "submit" in args.only:
            for name, res in (await submits([*names, "raw"], args)).items():
                results["submit"].setdefault(name, []).append(res)
                say(
                    f"round {r + 1} submit {name}: {res['submit']:,.0f} / {res['submit_many']:,.0f}"
                )
        if "drain" in args.only:
            for procs in (1, 2):
                for name in names:
                    res = await drain(name, procs, args)
                    results["drain"][procs].setdefault(name, []).append(res)
                    say(f"round {r + 1} drain x{procs} {name}: {res['jobs_per_s']:,.0f} jobs/s")
    if "latency" in args.only:
        results["latency"] = await latencies(names, args)
        for name, samples in results["latency"].items():
            say(f"latency {name}: p50 {pct(samples, 50):.2f} ms")
    print(table(results, [*names, "raw"], args))
    print()
    print(f"medians of {args.rounds} rounds; latency over {args.latency_samples} samples each.")
    mode = synchronous_commit()
    if mode != "on":
        print(
            f"synchronous_commit={mode} on every database (BENCH_SYNCHRONOUS_COMMIT): lower"
            " durability for every system alike, not the setting the goals are measured at."
        )
    for name in names:
        print(f"- {name}: {SETTINGS[name].format(**vars(args))}")


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--systems", default=",".join(PEERS))
    p.add_argument("--only", default="submit,drain,latency", help="measures to run")
    p.add_argument("--single", type=int, default=1000, help="single submits per round")
    p.add_argument("--batches", type=int, default=100, help="batches per round")
    p.add_argument("--batch", type=int, default=100, help="jobs per batch")
    p.add_argument(
        "--blocks", type=int, default=10, help="turns the systems take in each submit round"
    )
    p.add_argument("--jobs", type=int, default=20_000, help="jobs per drain")
    p.add_argument("--concurrency", type=int, default=100, help="worker concurrency")
    p.add_argument("--batch-size", type=int, default=10, help="pgqueuer's dequeue batch size")
    p.add_argument("--latency-samples", type=int, default=200)
    p.add_argument("--timeout", type=float, default=600, help="seconds a drain may take")
    quiet()
    anyio.run(main_async, p.parse_args())


if __name__ == "__main__":
    main()
