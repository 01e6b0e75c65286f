"""A worker process of a peer queue, for the benchmarks: ``python -m bench.peer_worker``.

    python -m bench.peer_worker pgqueuer|procrastinate DSN [--concurrency N] [--batch-size N]

Two handlers: ``noop`` does nothing; ``stamp`` prints the wall-clock time it
started on stdout (pickup latency). Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time


def stamp() -> None:
    """Report the handler's start time to the benchmark driver."""
    sys.stdout.write(f"{time.time()!r}\n")
    sys.stdout.flush()


async def run_pgqueuer(dsn: str, batch_size: int) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries, QueueManager

    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job) -> None:
        return None

    @qm.entrypoint("stamp")
    async def stamp_job(job) -> None:
        stamp()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, qm.shutdown.set)
    await qm.run(batch_size=batch_size)


async def run_procrastinate(dsn: str, concurrency: int) -> None:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    @app.task(name="stamp")
    async def stamp_job() -> None:
        stamp()

    async with app.open_async():
        await app.run_worker_async(concurrency=concurrency, install_signal_handlers=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("system", choices=["pgqueuer", "procrastinate"])
    p.add_argument("dsn")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=10)
    a = p.parse_args()
    if a.system == "pgqueuer":
        asyncio.run(run_pgqueuer(a.dsn, a.batch_size))
    else:
        asyncio.run(run_procrastinate(a.dsn, a.concurrency))


if __name__ == "__main__":
    main()
