"""Replay, time travel and verification: the log is the truth, here is the proof.

* :func:`state_at` folds a job's events up to a position or a time.
* :func:`diff` lists the fields that differ between two states.
* :func:`verify_jobs` replays every stream through the reducer and compares
  the result with the ``jobs`` table, row by row and field by field.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from engine import events as ev
from projections.codec import decode_job, folded_from_row
from projections.job_state import JOB_FIELDS, Job, NotApplicable, apply

BATCH = 5_000


def state_at(events: Iterable[ev.Recorded], at: int | datetime | None = None) -> Job | None:
    """The job as it was after the last event at or before ``at`` (a log position or a time)."""
    state: Job | None = None
    for rec in events:
        if at is not None:
            if isinstance(at, datetime):
                if rec.recorded_at > at:
                    break
            elif rec.position is not None and rec.position > at:
                break
        state = apply(state, rec)
    return state


def diff(before: Job | None, after: Job | None) -> dict[str, tuple[Any, Any]]:
    """``{field: (before, after)}`` for every field that differs."""
    out: dict[str, tuple[Any, Any]] = {}
    for name in JOB_FIELDS:
        a = getattr(before, name) if before is not None else None
        b = getattr(after, name) if after is not None else None
        if a != b:
            out[name] = (a, b)
    return out


class Difference(msgspec.Struct, frozen=True):
    """One disagreement between the log and a projection."""

    projection: str
    key: str
    problem: str
    fields: dict[str, tuple[Any, Any]] = {}

    def __str__(self) -> str:
        detail = "; ".join(f"{k}: log={v[0]!r} table={v[1]!r}" for k, v in self.fields.items())
        return f"{self.projection} {self.key}: {self.problem}" + (f" ({detail})" if detail else "")


Folded = tuple[UUID, Job | None, Exception | None]
"""A stream folded: the job's id, its state, and the error that stopped its replay."""


async def fold_log(
    conn: Any, batch_size: int = BATCH, query: str | None = None, *args: Any
) -> AsyncIterator[tuple[int, list[Folded]]]:
    """Fold every stream of the log through the reducer, a fetched batch at a time.

    Yields, per batch, how many events it read and the streams it finished, in
    job id order (a stream may continue into the next batch; the last one comes
    with a count of 0). A stream whose events do not apply keeps the error and
    is not folded further. Each batch is folded in one synchronous loop (an
    async step per event cost ~9% of a rebuild's time). Must run inside a transaction
    on ``conn`` (it reads through a cursor); the caller may use ``conn`` between
    batches. Verify and the ``jobs`` rebuild both fold the log here. ``query``
    (with ``args``) reads only some streams, whole and in the same order: a
    part of a rebuild in several processes.
    """
    from engine.sqlfiles import Q

    current: UUID | None = None
    state: Job | None = None
    error: Exception | None = None
    cursor = await conn.cursor(query or Q.stream_all_events, *args)
    while batch := await cursor.fetch(batch_size):
        finished: list[Folded] = []
        for row in batch:
            if row["job_id"] != current:
                if current is not None:
                    finished.append((current, state, error))
                current, state, error = row["job_id"], None, None
            if error is None:
                try:
                    state = apply(state, folded_from_row(row))
                except (NotApplicable, msgspec.ValidationError, ValueError) as exc:
                    error = exc
        yield len(batch), finished
    if current is not None:
        yield 0, [(current, state, error)]


async def replay_all(conn: Any) -> AsyncIterator[tuple[UUID, Job | None, str | None]]:
    """Fold every stream; yield ``(job_id, state, error)`` per job, in job id order.

    Must run inside a transaction on ``conn`` (it reads through a cursor).
    """
    async for _, finished in fold_log(conn):
        for job_id, state, error in finished:
            yield job_id, state, None if error is None else str(error)


async def verify_jobs(pool: Any, *, limit: int = 1000) -> list[Difference]:
    """Replay the whole log and compare it with the ``jobs`` table; return every difference
    (up to ``limit``). Both sides are read in one repeatable-read snapshot, so
    writers running meanwhile cannot cause false differences."""
    from engine.sqlfiles import Q

    table: dict[UUID, Job] = {}
    diffs: list[Difference] = []
    async with pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
        async for row in conn.cursor(Q.stream_all_jobs, prefetch=BATCH):
            table[row["id"]] = decode_job(row["doc"])
        async for job_id, replayed, error in replay_all(conn):
            stored = table.pop(job_id, None)
            if error is not None:
                diffs.append(
                    Difference("jobs", str(job_id), f"the stream does not replay: {error}")
                )
            elif stored is None:
                diffs.append(
                    Difference("jobs", str(job_id), "the log has the job, the table has no row")
                )
            elif stored != replayed:
                diffs.append(
                    Difference("jobs", str(job_id), "fields differ", diff(replayed, stored))
                )
            if len(diffs) >= limit:
                return diffs
    for job_id in table:
        diffs.append(Difference("jobs", str(job_id), "the table has a row with no events"))
    return diffs[:limit]


def summarize(diffs: Sequence[Difference]) -> str:
    """A readable report of differences."""
    return "\n".join(str(d) for d in diffs) if diffs else "no differences"


async def verify_all(pool: Any, *, limit: int = 1000) -> list[Difference]:
    """Verify every projection against the log: the ``jobs`` table and the reports."""
    from projections import reports

    diffs = await verify_jobs(pool, limit=limit)
    for key, problem, fields in await reports.verify(pool):
        diffs.append(Difference(reports.NAME, key, problem, fields))
    return diffs[:limit]
