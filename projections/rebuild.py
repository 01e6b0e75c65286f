"""Rebuilding projections from the log.

Both rebuilds write the new contents inside **one transaction**. PostgreSQL's
MVCC keeps every reader on the old rows until it commits, so queries keep
answering from the old tables during a rebuild, and switch to the new ones at
once. (This is the "build new tables and swap" of the design, done by the
database's own versioning rather than by renaming tables and their indexes.)

* An async projection: its lock is taken (running batches finish first and
  later ones wait), its tables are emptied, its checkpoint reset, and the whole
  log is fed to it below the fence. The runner then continues from there.
* The ``jobs`` table: ``LOCK TABLE ... IN EXCLUSIVE MODE`` holds writers
  (readers are not blocked), every stream is folded through the reducer, and
  the rows are replaced. Writers resume when it commits.

A long rebuild is a long transaction: it holds the gap-free fence back, so
other projections lag (never lose events) while it runs.
"""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Callable
from typing import Any

from engine.sqlfiles import Q
from projections.codec import recorded_from_row
from projections.job_state import JOB_FIELDS, Job, apply
from projections.runner import Projection

Progress = Callable[[int, int], None]  # (events done, events total)


async def _event_count(conn: Any) -> int:
    return int(await conn.fetchval(Q.event_count))


async def rebuild_projection(
    pool: Any, projection: Projection, *, batch_size: int = 5000, progress: Progress | None = None
) -> int:
    """Rebuild an async projection from the whole log; return the events read.

    A projection may offer ``async rebuild_from(conn, batches) -> handled``,
    given the log as an async iterator of event batches, to fold it all in
    memory and write its tables once; otherwise each batch goes to
    ``handle`` as the runner would feed it.
    """
    from engine.store import Checkpoint, read_log

    async with pool.acquire() as conn, conn.transaction():
        await conn.fetchval(Q.projection_lock_wait, projection.name)
        total = await _event_count(conn)
        await conn.execute(Q.checkpoint_ensure, projection.name)
        await conn.execute(Q.checkpoint_reset, projection.name)
        await projection.clear(conn)
        done = 0
        at = Checkpoint()
        whole = getattr(projection, "rebuild_from", None)
        if whole is not None:
            # The projection folds the log in memory as it streams by (one
            # batch at a time: the events are not kept) and writes once.
            async def batches() -> AsyncIterator[list[Any]]:
                nonlocal at, done
                while events := await read_log(conn, at, batch_size):
                    yield events
                    at = Checkpoint.after(events[-1])
                    done += len(events)
                    if progress:
                        progress(done, total)

            handled = await whole(conn, batches())
            await conn.execute(
                Q.checkpoint_set, projection.name, str(at.tx_id), at.position, handled
            )
            return done
        while events := await read_log(conn, at, batch_size):
            types = projection.event_types
            handled = [e for e in events if types is None or e.type in types]
            if handled:
                await projection.handle(conn, handled)
            at = Checkpoint.after(events[-1])
            done += len(events)
            await conn.execute(
                Q.checkpoint_set, projection.name, str(at.tx_id), at.position, len(handled)
            )
            if progress:
                progress(done, total)
    return done


_row = operator.attrgetter(*JOB_FIELDS)


async def rebuild_jobs(pool: Any, *, progress: Progress | None = None) -> int:
    """Rebuild the ``jobs`` table by folding every stream through the reducer."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(Q.lock_jobs_for_rebuild)
        total = await _event_count(conn)
        # Readers keep seeing the deleted rows until this transaction commits.
        await conn.execute(Q.jobs_delete_all)
        rows: list[tuple[Any, ...]] = []
        state: Job | None = None
        current = None
        done = 0

        async def flush() -> None:
            await conn.copy_records_to_table(
                "jobs", schema_name="jobledger", records=rows, columns=list(JOB_FIELDS)
            )
            rows.clear()

        async for row in conn.cursor(Q.stream_all_events, prefetch=10_000):
            if row["job_id"] != current:
                if state is not None:
                    rows.append(_row(state))
                    if len(rows) >= 10_000:
                        await flush()
                current, state = row["job_id"], None
            state = apply(state, recorded_from_row(row))
            done += 1
            if progress and done % 10_000 == 0:
                progress(done, total)
        if state is not None:
            rows.append(_row(state))
        await flush()
        if progress:
            progress(done, total)
    return done
