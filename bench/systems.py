"""The systems the side-by-side benchmark compares, behind one small interface.

Each system is an async context manager over one fresh database that can
submit one job, submit a batch, enqueue jobs due at a moment, say how many
no-op jobs are done and when the last finished, and name the command of one
of its worker processes. ``raw`` is PostgreSQL itself: single-row and
100-row INSERTs into a one-table queue, the ceiling for submits.

Every peer is driven through its public API as its documentation shows it;
the settings each uses are in :data:`SETTINGS` and printed with the results.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

SETTINGS = {
    "jobledger": "worker --concurrency {concurrency} (claims in batches sized to free slots)",
    "pgqueuer": "QueueManager.run(batch_size={batch_size}), unlimited concurrency (its default)",
    "procrastinate": "run_worker_async(concurrency={concurrency})",
}


class System:
    """One system under test over one database (``dsn``)."""

    name = ""
    migrated = False  # whether the database needs jobledger's schema

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def __aenter__(self) -> System:
        self.conn = await asyncpg.connect(self.dsn)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def submit_one(self) -> None:
        raise NotImplementedError

    async def submit_batch(self, size: int) -> None:
        raise NotImplementedError

    async def enqueue_due(self, n: int, due: datetime, operator: str = "noop") -> None:
        raise NotImplementedError

    async def submit_stamp(self) -> None:
        """Submit one ``stamp`` job, due now (pickup latency)."""
        raise NotImplementedError

    async def done(self) -> tuple[int, datetime | None, datetime | None]:
        """How many jobs completed, when the first started and when the last completed."""
        raise NotImplementedError

    def worker_command(self, concurrency: int, batch_size: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench.peer_worker",
            self.name,
            self.dsn,
            "--concurrency",
            str(concurrency),
            "--batch-size",
            str(batch_size),
        ]


class Raw(System):
    """Plain PostgreSQL: a one-table queue, no library (submit ceiling)."""

    name = "raw"

    async def __aenter__(self) -> Raw:
        await super().__aenter__()
        await self.conn.execute(
            "CREATE TABLE raw_queue (id bigserial PRIMARY KEY, entrypoint text NOT NULL,"
            " priority int NOT NULL, payload bytea, created timestamptz NOT NULL DEFAULT now())"
        )
        return self

    async def submit_one(self) -> None:
        await self.conn.execute(
            "INSERT INTO raw_queue (entrypoint, priority, payload) VALUES ($1, $2, $3)",
            "noop",
            0,
            None,
        )

    async def submit_batch(self, size: int) -> None:
        await self.conn.execute(
            "INSERT INTO raw_queue (entrypoint, priority, payload)"
            " SELECT * FROM unnest($1::text[], $2::int[], $3::bytea[])",
            ["noop"] * size,
            [0] * size,
            [None] * size,
        )


class Jobledger(System):
    """jobledger through its public API (``JobLedger``), workers via ``jobledger worker``."""

    name = "jobledger"
    migrated = True

    async def __aenter__(self) -> Jobledger:
        from bench.app import ledger_at

        await super().__aenter__()
        self.ledger = ledger_at(self.dsn, max_connections=2, actor="bench")
        await self.ledger.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ledger.__aexit__(None, None, None)
        await super().__aexit__(*exc)

    async def submit_one(self) -> None:
        await self.ledger.submit("noop")

    async def submit_batch(self, size: int) -> None:
        await self.ledger.submit_many([{"operator": "noop"}] * size)

    async def enqueue_due(self, n: int, due: datetime, operator: str = "noop") -> None:
        for start in range(0, n, 1000):
            await self.ledger.submit_many(
                [{"operator": operator, "run_at": due}] * min(1000, n - start)
            )

    async def submit_stamp(self) -> None:
        await self.ledger.submit("stamp")

    async def done(self) -> tuple[int, datetime | None, datetime | None]:
        row = await self.conn.fetchrow(
            "SELECT count(*), min(started_at), max(finished_at)"
            " FROM jobledger.jobs WHERE status = 'completed'"
        )
        return row[0], row[1], row[2]

    def worker_command(self, concurrency: int, batch_size: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "engine.cli",
            "--dsn",
            self.dsn,
            "--app",
            "bench.app:ledger",
            "worker",
            "--concurrency",
            str(concurrency),
        ]


class Pgqueuer(System):
    """pgqueuer: ``Queries.enqueue`` (scalar and list forms), ``QueueManager`` workers."""

    name = "pgqueuer"

    async def __aenter__(self) -> Pgqueuer:
        from pgqueuer import AsyncpgDriver, Queries

        await super().__aenter__()
        self.queries = Queries(AsyncpgDriver(self.conn))
        await self.queries.install()
        return self

    async def submit_one(self) -> None:
        await self.queries.enqueue("noop", None, 0)

    async def submit_batch(self, size: int) -> None:
        await self.queries.enqueue(["noop"] * size, [None] * size, [0] * size)

    async def enqueue_due(self, n: int, due: datetime, operator: str = "noop") -> None:
        for start in range(0, n, 1000):
            size = min(1000, n - start)
            after = max(timedelta(0), due - datetime.now(UTC))
            await self.queries.enqueue([operator] * size, [None] * size, [0] * size, [after] * size)

    async def submit_stamp(self) -> None:
        await self.queries.enqueue("stamp", None, 0)

    async def done(self) -> tuple[int, datetime | None, datetime | None]:
        row = await self.conn.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'successful'),"
            " min(created) FILTER (WHERE status = 'picked'),"
            " max(created) FILTER (WHERE status = 'successful') FROM pgqueuer_log"
        )
        return row[0], row[1], row[2]


class Procrastinate(System):
    """procrastinate: ``defer_async`` / ``batch_defer_async``, ``run_worker_async`` workers."""

    name = "procrastinate"

    async def __aenter__(self) -> Procrastinate:
        import procrastinate

        await super().__aenter__()
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=self.dsn))

        @self.app.task(name="noop")
        async def noop() -> None:
            return None

        @self.app.task(name="stamp")
        async def stamp() -> None:
            return None

        self.tasks: dict[str, Any] = {"noop": noop, "stamp": stamp}
        self._opened = self.app.open_async()
        await self._opened.__aenter__()
        await self.app.schema_manager.apply_schema_async()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._opened.__aexit__(None, None, None)
        await super().__aexit__(*exc)

    async def submit_one(self) -> None:
        await self.tasks["noop"].defer_async()

    async def submit_batch(self, size: int) -> None:
        await self.tasks["noop"].batch_defer_async(*([{}] * size))

    async def enqueue_due(self, n: int, due: datetime, operator: str = "noop") -> None:
        task = self.tasks[operator].configure(schedule_at=due)
        for start in range(0, n, 1000):
            await task.batch_defer_async(*([{}] * min(1000, n - start)))

    async def submit_stamp(self) -> None:
        await self.tasks["stamp"].defer_async()

    async def done(self) -> tuple[int, datetime | None, datetime | None]:
        row = await self.conn.fetchrow(
            "SELECT count(*) FILTER (WHERE type = 'succeeded'),"
            " min(at) FILTER (WHERE type = 'started'),"
            " max(at) FILTER (WHERE type = 'succeeded') FROM procrastinate_events"
        )
        return row[0], row[1], row[2]


SYSTEMS: dict[str, type[System]] = {s.name: s for s in (Jobledger, Pgqueuer, Procrastinate, Raw)}
