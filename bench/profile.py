"""Where a job's time goes: ``python -m bench.profile``.

Walks batches of no-op jobs through the statements a worker drain runs —
``submit_many`` (create_streams), the claim (claim_jobs, then append_events
with ``job.started``) and the outcome (append_events with ``job.completed``)
— and for each stage prints, per job, the Python time spent building the
change (decode, reducer, msgspec encoding), the server's execution time
(``EXPLAIN ANALYZE``, median over the batches) and the round trip including
the commit. Then the client CPU of ``submit_many`` through the public API,
split at the statement: the Python before it (checks, reducer, encoding), the
asyncpg call (parameters, the round trip, the event loop), and after it
(building the result, freeing the batch), each measured in the real call,
where the server has just run on the other core, and once more with the
statement skipped, where the caches stay warm. Runs against ``BENCH_DSN`` or
a fresh embedded server.

    python -m bench.profile [--batch 100] [--batches 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import anyio
import msgspec

from bench.server import bench_database, quiet
from bench.systems import Jobledger
from engine import events as ev
from engine import store
from engine.ledger import _Defaults, _spec, _submission, new_job_ids, utcnow
from engine.sqlfiles import Q


async def explain_ms(conn: Any, query: str, *params: Any) -> float:
    """Server execution time of ``query`` (ms), inside a rolled-back transaction."""
    tr = conn.transaction()
    await tr.start()
    try:
        plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", *params)
    finally:
        await tr.rollback()
    return msgspec.json.decode(plan)[0]["Execution Time"]


async def main_async(args: argparse.Namespace) -> None:
    size = args.batch
    stats: dict[str, dict[str, list[float]]] = {}

    def note(stage: str, key: str, seconds_or_ms: float) -> None:
        stats.setdefault(stage, {}).setdefault(key, []).append(seconds_or_ms / size)

    async def timed(stage: str, key: str, query: str, *params: Any) -> Any:
        t = time.perf_counter()
        out = await conn.fetch(query, *params)
        note(stage, key, (time.perf_counter() - t) * 1000)
        return out

    async with bench_database("profile") as dsn, Jobledger(dsn) as system:
        ledger = system.ledger
        conn = system.conn
        from engine.postgres import init_connection

        await init_connection(conn)
        for _ in range(args.batches):
            # submit_many
            t = time.perf_counter()
            at = utcnow()
            op, meta = await ledger._operator_defaults("noop"), ev.Meta(actor=ledger.actor)
            defaults = _Defaults.of(op)
            changes = [
                _submission(_spec(i, {"operator": "noop"}), defaults, at, meta, job_id)
                for i, job_id in enumerate(new_job_ids(size))
            ]
            params = (*store._encode_writes(changes), None)
            note("submit_many", "python", (time.perf_counter() - t) * 1000)
            note("submit_many", "server", await explain_ms(conn, Q.create_streams_plain, *params))
            await timed(
                "submit_many",
                "round trip + commit",
                Q.create_streams_plain,
                *params,
            )
            # claim: lock the batch, append job.started
            async with conn.transaction():
                now = utcnow()
                claim = (["default"], ["noop"], size, now, None)
                note("claim", "server (select)", await explain_ms(conn, Q.claim_jobs, *claim))
                found = await timed("claim", "round trip (select)", Q.claim_jobs, *claim)
                t = time.perf_counter()
                states = [store.decode_job(r[0]) for r in found]
                started = [
                    ledger.make_change(
                        s, ev.Started(worker="w"), actor="worker:w", worker="w", at=now
                    )
                    for s in states
                ]
                params = (*store._encode_writes(started), None)
                note("claim", "python", (time.perf_counter() - t) * 1000)
                note("claim", "server (append)", await explain_ms(conn, Q.append_events, *params))
                t = time.perf_counter()
                await conn.fetch(Q.append_events, *params)
            note("claim", "round trip (append) + commit", (time.perf_counter() - t) * 1000)
            # outcome: append job.completed
            t = time.perf_counter()
            done = [
                ledger.make_change(
                    c.state, ev.Completed(), actor="worker:w", worker="w", correlation_id=f"p/{i}"
                )
                for i, c in enumerate(started)
            ]
            params = (*store._encode_writes(done), None)
            note("complete", "python", (time.perf_counter() - t) * 1000)
            note("complete", "server", await explain_ms(conn, Q.append_events, *params))
            await timed("complete", "round trip + commit", Q.append_events, *params)

        await client_split(ledger, size, args.batches, stats)

    print(f"| stage (batches of {size}) | part | ms per job (median of {args.batches}) |")
    print("|---|---|---:|")
    for stage, parts in stats.items():
        for part, values in parts.items():
            print(f"| {stage} | {part} | {statistics.median(values):.4f} |")


async def client_split(ledger: Any, size: int, batches: int, stats: dict) -> None:
    """Client CPU (``time.process_time``) of ``ledger.submit_many`` per job, split at
    its one statement, into ``stats["submit_many (API)"]``."""
    pool = ledger.pool
    real = pool.fetchval
    marks: dict[str, float] = {}

    async def timed_fetchval(query: str, *params: Any) -> Any:
        marks["sent"] = time.process_time()
        out = await real(query, *params)
        marks["back"] = time.process_time()
        return out

    async def skipped(query: str, *params: Any) -> int:
        marks["sent"] = marks["back"] = time.process_time()
        return 1  # what the statement returns: it notified once

    specs = [{"operator": "noop"}] * size
    parts: dict[str, list[float]] = {}
    for label, fetchval in (("", timed_fetchval), (", statement skipped", skipped)):
        pool.fetchval = fetchval
        try:
            for i in range(batches + 5):
                t = time.process_time()
                await ledger.submit_many(specs)
                end = time.process_time()
                if i < 5:  # warm-up
                    continue
                split = [(f"client CPU before the statement{label}", marks["sent"] - t)]
                if fetchval is timed_fetchval:
                    split.append(("client CPU in the asyncpg call", marks["back"] - marks["sent"]))
                split.append((f"client CPU after it{label}", end - marks["back"]))
                split.append((f"client CPU in all{label}", end - t))
                for part, seconds in split:
                    parts.setdefault(part, []).append(seconds * 1000 / size)
        finally:
            del pool.fetchval  # the pool's own method again
    stats["submit_many (API)"] = parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--batches", type=int, default=30)
    quiet()
    anyio.run(main_async, p.parse_args())


if __name__ == "__main__":
    main()
