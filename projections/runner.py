"""The projection runner: async projections that never skip or double-apply an event.

A projection declares the event types it handles and a
``handle(conn, events)`` that writes its tables. The runner feeds it the log
in the gap-free order of :func:`engine.store.read_log`, batch by batch. Each
batch runs in **one transaction** that

1. takes the projection's transaction-level advisory lock (so one batch of a
   projection runs at a time, across every process running it: start as many
   runners as you like, for availability);
2. locks and reads the projection's checkpoint row;
3. reads the next events after the checkpoint, below the fence;
4. calls ``handle`` with those the projection cares about;
5. moves the checkpoint to the last event read.

A crash anywhere before the commit rolls back both the projection's writes
and the checkpoint: the batch is applied again from the same place, once. The
runner catches up from its checkpoint, then tails the log: it wakes on any
NOTIFY on channel ``jobledger`` and polls every ``poll_interval`` seconds
(events such as progress do not notify).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Protocol

import anyio
import structlog

from engine import events as ev
from engine.sqlfiles import Q

log = structlog.get_logger("jobledger.projections")


class Projection(Protocol):
    """What the runner needs of a projection."""

    name: str
    event_types: frozenset[str] | None

    async def handle(self, conn: Any, events: list[ev.Recorded]) -> None:
        """Apply events to the projection's tables, in the caller's transaction."""

    async def clear(self, conn: Any) -> None:
        """Empty the projection's tables, in the caller's transaction (rebuild)."""


def default_projections() -> list[Projection]:
    """The projections jobledger ships."""
    from projections.reports import ReportProjection

    return [ReportProjection()]


async def step(conn: Any, projection: Projection, *, batch_size: int = 1000) -> int:
    """Apply one batch; return how many events were read (0: caught up, or busy elsewhere)."""
    from engine.store import Checkpoint, read_log

    async with conn.transaction():
        if not await conn.fetchval(Q.projection_lock, projection.name):
            return 0
        await conn.execute(Q.checkpoint_ensure, projection.name)
        row = await conn.fetchrow(Q.checkpoint_get, projection.name)
        events = await read_log(conn, Checkpoint(row["tx_id"], row["position"]), batch_size)
        if not events:
            return 0
        types = projection.event_types
        handled = [e for e in events if types is None or e.type in types]
        if handled:
            await projection.handle(conn, handled)
        last = Checkpoint.after(events[-1])
        await conn.execute(
            Q.checkpoint_set, projection.name, str(last.tx_id), last.position, len(handled)
        )
    return len(events)


async def catch_up(pool: Any, projection: Projection, *, batch_size: int = 1000) -> int:
    """Apply batches until the projection has read everything below the fence."""
    total = 0
    async with pool.acquire() as conn:
        while n := await step(conn, projection, batch_size=batch_size):
            total += n
    return total


class ProjectionRunner:
    """A service running named projections: catch up, then tail the log."""

    def __init__(
        self,
        ledger: Any,
        projections: Iterable[Projection] | None = None,
        *,
        batch_size: int = 1000,
        poll_interval: float = 0.5,
    ) -> None:
        self.ledger = ledger
        self.projections = list(projections) if projections is not None else default_projections()
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._wake = anyio.Event()
        self.applied: dict[str, int] = {p.name: 0 for p in self.projections}

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every projection until cancelled."""
        from engine.store import check_log_cluster

        await check_log_cluster(self.ledger.pool)
        listener = await self.ledger.listener()
        with (
            listener.subscribe(lambda _: self._wake.set()) if listener else contextlib.nullcontext()
        ):
            async with anyio.create_task_group() as tg:
                for p in self.projections:
                    tg.start_soon(self._run_one, p)
                task_status.started()

    async def _run_one(self, projection: Projection) -> None:
        from engine.postgres import DB_ERRORS

        log.info("projection_started", projection=projection.name)
        delay = 0.1
        while True:
            try:
                async with self.ledger.pool.acquire() as conn:
                    while n := await step(conn, projection, batch_size=self.batch_size):
                        self.applied[projection.name] += n
                delay = 0.1
            except DB_ERRORS as exc:
                log.warning("projection_failed", projection=projection.name, error=str(exc))
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            with anyio.move_on_after(self.poll_interval):
                await self._wake.wait()
            self._wake = anyio.Event()
