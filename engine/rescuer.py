"""Rescue of jobs whose worker died.

Workers heartbeat their row in ``jobledger.workers``. Every worker also runs a
rescue pass on an interval; an advisory lock lets only one pass run at a time
across the cluster. A pass finds running jobs held by workers silent for longer
than ``rescue_after`` seconds (or that stopped without finishing them) and, in
the same transaction that holds the lock:

* a ``running`` job gets ``job.abandoned``: scheduled again when its retry
  policy allows another attempt, else ``failed``;
* a ``cancelling`` job gets ``job.cancelled`` (it was being cancelled anyway).

Each is a version-guarded append computed by the reducer, like every write. If
the worker comes back afterwards, its writes for the job are refused by the
fence in :mod:`engine.completer`. Jobs started by external executors (whose
worker name is not a registered jobledger worker) are never rescued: their
executor owns them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from engine import events as ev
from engine import store
from engine.retry import retry_at
from engine.sqlfiles import Q

if TYPE_CHECKING:
    from engine.ledger import JobLedger

log = structlog.get_logger("jobledger.rescuer")

RESCUE_LOCK = 0x6A6C7263  # "jlrc"


async def rescue(ledger: JobLedger, *, rescue_after: float, limit: int = 500) -> int:
    """Run one rescue pass; return how many jobs were rescued (0 if another pass runs)."""
    from engine.ledger import utcnow

    async with ledger.pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval(Q.rescue_lock, RESCUE_LOCK):
            return 0
        rows = await conn.fetch(Q.abandoned_jobs, rescue_after, limit)
        if not rows:
            return 0
        now = utcnow()
        changes = []
        for row in rows:
            job = store.decode_job(row[0])
            if job.status == "cancelling":
                event: ev.Event = ev.Cancelled()
            else:
                event = ev.Abandoned(worker=job.worker, retry_at=retry_at(job, now))
            changes.append(
                (
                    job,
                    ledger.make_change(
                        job,
                        event,
                        actor="rescuer",
                        reason=f"worker {job.worker} stopped heartbeating",
                        at=now,
                    ),
                )
            )
        stored = await store.append(
            conn,
            [c for _, c in changes],
            notify=store.notification((old, c.state) for old, c in changes),
        )
    for old, change in changes:
        if change.state.id in stored:
            log.warning(
                "job_rescued",
                job_id=str(old.id),
                worker=old.worker,
                attempt=old.attempt,
                outcome=change.state.status,
            )
    return len(stored)
