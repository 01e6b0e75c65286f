"""Retention: pruning the streams of finished jobs, the one audited way.

The log is append-only (:mod:`sql/001`); :func:`prune` is the only path the
immutability trigger admits (:mod:`sql/006`). In one transaction it

1. locks the candidate jobs (finished before a time, optionally of one
   operator), so no transition can race it;
2. checks the report projection has already applied every event of those
   streams (it catches the projection up first), then folds the streams'
   contributions into ``report_baseline``: reports stay whole, and rebuild and
   verify still add up;
3. records the prune (who, why, what) in ``jobledger.prunes`` and names it to
   the trigger in the transaction-local setting ``jobledger.prune_id``;
4. deletes the events, the ``jobs`` rows and the report's working rows.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from engine.sqlfiles import Q
from projections import reports
from projections.codec import recorded_from_row
from projections.runner import catch_up

if TYPE_CHECKING:
    from engine.ledger import JobLedger


class PruneResult(msgspec.Struct, frozen=True):
    """What a prune removed (or, dry, would remove)."""

    jobs: int
    events: int
    prune_id: int | None = None
    dry_run: bool = False


class ProjectionBehind(RuntimeError):
    """The report projection has not applied every event of the streams to prune."""


async def prune(
    ledger: JobLedger,
    *,
    finished_before: datetime,
    operator: str | None = None,
    actor: str | None = None,
    reason: str | None = None,
    dry_run: bool = False,
) -> PruneResult:
    """Remove the streams of jobs that finished before ``finished_before``."""
    if finished_before.tzinfo is None:
        raise ValueError("finished_before must be a timezone-aware datetime")
    from engine.store import Checkpoint

    projection = reports.ReportProjection()
    if not dry_run:
        await catch_up(ledger.pool, projection)
    async with ledger.pool.acquire() as conn, conn.transaction():
        ids = [r["id"] for r in await conn.fetch(Q.prune_candidates, finished_before, operator)]
        if not ids:
            return PruneResult(0, 0, dry_run=dry_run)
        events = [recorded_from_row(r) for r in await conn.fetch(Q.prune_events_of, ids)]
        if dry_run:
            return PruneResult(len(ids), len(events), dry_run=True)
        row = await conn.fetchrow(Q.checkpoint_read, reports.NAME)
        done = Checkpoint(row["tx_id"], row["position"]) if row else Checkpoint()
        behind = [e for e in events if Checkpoint.after(e) > done]
        if behind:
            raise ProjectionBehind(
                f"the report projection has not applied {len(behind)} event(s) of these jobs yet "
                "(an open transaction may hold its fence back); try again shortly"
            )
        deltas = reports.fold((e for e in events if e.type in reports.EVENT_TYPES), {})
        if deltas:
            await conn.execute(
                Q.report_baseline_add,
                msgspec.Raw(msgspec.json.encode(reports.delta_rows(deltas))),
            )
        prune_id = await conn.fetchval(
            Q.prune_record, actor or ledger.actor or "unknown", reason, finished_before, operator
        )
        await conn.execute(Q.prune_authorise, str(prune_id))
        counts = await conn.fetchrow(Q.prune_delete, ids)
        await conn.execute(Q.prune_finish, prune_id, counts["jobs"], counts["events"])
    return PruneResult(counts["jobs"], counts["events"], prune_id=prune_id)
