"""The report projection: throughput, failures, wait and run times.

Per dimension (``operator`` and ``queue``), key and hour it counts submitted,
started, completed, failed (for good), retried (attempts that failed and were
scheduled again, and manual retries/reruns), cancelled and rescued jobs, and
keeps two histograms: **wait time** (from when a job was due to when an
attempt started) and **run time** (from an attempt's start to its end).

Histograms are logarithmic with ratio :data:`RATIO` between bucket bounds, so
any percentile is exact to within ±2.5% without storing or scanning events;
merging buckets (hours into days, keys into totals) is adding counts.

:func:`fold` is the pure heart: events in, bucket deltas and working state
out. The live projection, verify, rebuild and prune all use it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import msgspec

from engine import events as ev

NAME = "reports"
RATIO = 1.05
COUNTERS = ("submitted", "started", "completed", "failed", "retried", "cancelled", "rescued")
DIMENSIONS = ("operator", "queue")
EVENT_TYPES = frozenset(
    {
        "job.submitted",
        "job.started",
        "job.completed",
        "job.failed",
        "job.abandoned",
        "job.cancelled",
        "job.retried",
        "job.rerun",
    }
)


def hist_index(ms: float) -> int:
    """The histogram bucket of a duration in milliseconds."""
    if ms < 1.0:
        return 0
    return int(math.log(ms) / math.log(RATIO)) + 1


def hist_value(index: int) -> float:
    """A representative duration (ms) of a bucket: its geometric middle."""
    if index == 0:
        return 0.5
    return RATIO ** (index - 1) * math.sqrt(RATIO)


def percentile(hist: Mapping[int, int], p: float) -> float | None:
    """The p-th percentile (ms) of a histogram, or ``None`` when it is empty."""
    total = sum(hist.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(p / 100 * total))
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= rank:
            return hist_value(index)
    return hist_value(max(hist))  # pragma: no cover


@dataclass
class Delta:
    """What a batch adds to one (dimension, key, hour)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    run_hist: dict[int, int] = field(default_factory=dict)
    wait_hist: dict[int, int] = field(default_factory=dict)

    def add(self, other: Delta) -> None:
        """Add another delta into this one."""
        for k, v in other.counts.items():
            self.counts[k] += v
        for mine, theirs in ((self.run_hist, other.run_hist), (self.wait_hist, other.wait_hist)):
            for i, n in theirs.items():
                mine[i] = mine.get(i, 0) + n


class ReportJob(msgspec.Struct):
    """The report's working state of one job."""

    job_id: UUID
    operator: str
    queue: str
    due_at: datetime | None = None
    started_at: datetime | None = None


Key = tuple[str, str, datetime]


def hour(at: datetime) -> datetime:
    """The UTC hour an instant falls in."""
    at = at.astimezone(UTC)
    return at.replace(minute=0, second=0, microsecond=0)


def fold(
    events: Iterable[ev.Recorded],
    jobs: dict[UUID, ReportJob],
    deltas: dict[Key, Delta] | None = None,
) -> dict[Key, Delta]:
    """Fold events into bucket deltas, updating the working state ``jobs`` in place."""
    deltas = {} if deltas is None else deltas

    for rec in events:
        e = rec.event
        if isinstance(e, ev.Submitted):
            jobs[rec.job_id] = ReportJob(
                rec.job_id, e.operator, e.queue, due_at=e.run_at or rec.recorded_at
            )
        job = jobs.get(rec.job_id)
        if job is None:
            continue  # a stream pruned before this projection saw its start
        bucket = hour(rec.recorded_at)
        touched = [deltas.setdefault((d, getattr(job, d), bucket), Delta()) for d in DIMENSIONS]

        def count(name: str, touched: list[Delta] = touched) -> None:
            for d in touched:
                d.counts[name] += 1

        def observe(which: str, ms: float, touched: list[Delta] = touched) -> None:
            i = hist_index(max(0.0, ms))
            for d in touched:
                h = d.run_hist if which == "run" else d.wait_hist
                h[i] = h.get(i, 0) + 1

        def attempt_ended(job: ReportJob = job, rec: ev.Recorded = rec) -> None:
            if job.started_at is not None:
                observe("run", (rec.recorded_at - job.started_at) / timedelta(milliseconds=1))
                job.started_at = None

        match e:
            case ev.Submitted():
                count("submitted")
            case ev.Started():
                count("started")
                if job.due_at is not None:
                    observe("wait", (rec.recorded_at - job.due_at) / timedelta(milliseconds=1))
                job.started_at = rec.recorded_at
            case ev.Completed():
                count("completed")
                attempt_ended()
            case ev.Failed() | ev.Abandoned():
                if isinstance(e, ev.Abandoned):
                    count("rescued")
                count("retried" if e.retry_at is not None else "failed")
                attempt_ended()
                if e.retry_at is not None:
                    job.due_at = e.retry_at
            case ev.Cancelled():
                count("cancelled")
                attempt_ended()
            case ev.Retried() | ev.Rerun():
                count("retried")
                job.due_at = e.run_at or rec.recorded_at
    return deltas


def delta_rows(deltas: Mapping[Key, Delta]) -> list[dict[str, Any]]:
    """Deltas as rows for ``report_add``."""
    return [
        {
            "dimension": dim,
            "key": key,
            "bucket": bucket,
            **d.counts,
            "run_hist": {str(i): n for i, n in d.run_hist.items()},
            "wait_hist": {str(i): n for i, n in d.wait_hist.items()},
        }
        for (dim, key, bucket), d in deltas.items()
    ]


def delta_from_row(row: Mapping[str, Any]) -> Delta:
    """A stored report row as a :class:`Delta`."""
    return Delta(
        counts={c: int(row[c]) for c in COUNTERS},
        run_hist={int(i): int(n) for i, n in (row["run_hist"] or {}).items()},
        wait_hist={int(i): int(n) for i, n in (row["wait_hist"] or {}).items()},
    )


class ReportProjection:
    """The report projection, as the runner drives it."""

    name = NAME
    event_types = EVENT_TYPES

    async def handle(self, conn: Any, events: list[ev.Recorded]) -> None:
        """Apply a batch of events, in the runner's transaction."""
        from engine.sqlfiles import Q

        ids = list({r.job_id for r in events})
        jobs = {
            r["job_id"]: ReportJob(
                r["job_id"], r["operator"], r["queue"], r["due_at"], r["started_at"]
            )
            for r in await conn.fetch(Q.report_jobs_get, ids)
        }
        deltas = fold(events, jobs)
        if deltas:
            await conn.execute(Q.report_add, msgspec.Raw(msgspec.json.encode(delta_rows(deltas))))
        if jobs:
            await conn.execute(
                Q.report_jobs_put, msgspec.Raw(msgspec.json.encode(list(jobs.values())))
            )

    async def rebuild_from(self, conn: Any, batches: AsyncIterator[list[ev.Recorded]]) -> int:
        """Rebuild fast path: fold the log as it streams by, write each table once.

        Called by :func:`projections.rebuild.rebuild_projection` after
        :meth:`clear` (which left the baseline in ``report_buckets``).
        """
        from engine.sqlfiles import Q

        jobs: dict[UUID, ReportJob] = {}
        deltas: dict[Key, Delta] = {}
        handled = 0
        async for batch in batches:
            mine = [e for e in batch if e.type in EVENT_TYPES]
            handled += len(mine)
            fold(mine, jobs, deltas)
        rows = delta_rows(deltas)
        for start in range(0, len(rows), 5000):
            chunk = msgspec.json.encode(rows[start : start + 5000])
            await conn.execute(Q.report_add, msgspec.Raw(chunk))
        await conn.copy_records_to_table(
            "report_jobs",
            schema_name="jobledger",
            records=[
                (j.job_id, j.operator, j.queue, j.due_at, j.started_at) for j in jobs.values()
            ],
            columns=["job_id", "operator", "queue", "due_at", "started_at"],
        )
        return handled

    async def clear(self, conn: Any) -> None:
        """Empty the projection's tables (the rebuild's transaction)."""
        from engine.sqlfiles import Q

        await conn.execute(Q.report_clear)


class ReportRow(msgspec.Struct, frozen=True, kw_only=True):
    """One row of a report: a key in a time bucket."""

    bucket: datetime
    key: str
    submitted: int
    started: int
    completed: int
    failed: int
    retried: int
    cancelled: int
    rescued: int
    failure_rate: float | None
    wait_p50_ms: float | None
    wait_p95_ms: float | None
    wait_p99_ms: float | None
    run_p50_ms: float | None
    run_p95_ms: float | None
    run_p99_ms: float | None


def roll(at: datetime, bucket: str) -> datetime:
    """The start of the hour, day or ISO week ``at`` falls in."""
    if bucket == "hour":
        return hour(at)
    day = hour(at).replace(hour=0)
    if bucket == "day":
        return day
    if bucket == "week":
        return day - timedelta(days=day.weekday())
    raise ValueError(f"bucket must be 'hour', 'day' or 'week', got {bucket!r}")


async def report(
    pool: Any,
    *,
    since: datetime,
    until: datetime,
    by: str = "operator",
    bucket: str = "hour",
) -> list[ReportRow]:
    """Rows per key and time bucket in ``[since, until)``."""
    from engine.sqlfiles import Q

    if by not in DIMENSIONS:
        raise ValueError(f"by must be 'operator' or 'queue', got {by!r}")
    roll(since, bucket)  # validates bucket
    rows = await pool.fetch(Q.report_rows, by, hour(since), until)
    merged: dict[tuple[datetime, str], Delta] = {}
    for r in rows:
        merged.setdefault((roll(r["bucket"], bucket), r["key"]), Delta()).add(delta_from_row(r))
    out = []
    for (b, key), d in sorted(merged.items()):
        ended = d.counts["completed"] + d.counts["failed"]
        out.append(
            ReportRow(
                bucket=b,
                key=key,
                **d.counts,
                failure_rate=d.counts["failed"] / ended if ended else None,
                wait_p50_ms=percentile(d.wait_hist, 50),
                wait_p95_ms=percentile(d.wait_hist, 95),
                wait_p99_ms=percentile(d.wait_hist, 99),
                run_p50_ms=percentile(d.run_hist, 50),
                run_p95_ms=percentile(d.run_hist, 95),
                run_p99_ms=percentile(d.run_hist, 99),
            )
        )
    return out


async def verify(pool: Any) -> list[tuple[str, str, dict[str, tuple[Any, Any]]]]:
    """Compare the stored report with baseline + a replay of the log up to its checkpoint.

    Returns ``(key, problem, fields)`` for every difference.
    """
    from engine.sqlfiles import Q
    from engine.store import Checkpoint, read_log

    out: list[tuple[str, str, dict[str, tuple[Any, Any]]]] = []
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(Q.checkpoint_read, NAME)
        upto = Checkpoint(row["tx_id"], row["position"]) if row else Checkpoint()
        expected: dict[Key, Delta] = {}
        for r in await conn.fetch(Q.report_all_baseline):
            expected.setdefault((r["dimension"], r["key"], r["bucket"]), Delta()).add(
                delta_from_row(r)
            )
        jobs: dict[UUID, ReportJob] = {}
        at = Checkpoint()
        while upto > Checkpoint() and (batch := await read_log(conn, at, 5000)):
            mine = [e for e in batch if Checkpoint.after(e) <= upto]
            fold((e for e in mine if e.type in EVENT_TYPES), jobs, expected)
            if len(mine) < len(batch):
                break
            at = Checkpoint.after(batch[-1])
        stored = {
            (r["dimension"], r["key"], r["bucket"]): delta_from_row(r)
            for r in await conn.fetch(Q.report_all_buckets)
        }
        stored_jobs = {
            r["job_id"]: ReportJob(
                r["job_id"], r["operator"], r["queue"], r["due_at"], r["started_at"]
            )
            for r in await conn.fetch(Q.report_all_jobs)
        }
    empty = Delta()
    for key in sorted(set(expected) | set(stored), key=str):
        want, have = expected.get(key, empty), stored.get(key, empty)
        if want != have:
            fields = {
                name: (
                    getattr(want, name) if name != "counts" else want.counts,
                    getattr(have, name) if name != "counts" else have.counts,
                )
                for name in ("counts", "run_hist", "wait_hist")
                if getattr(want, name) != getattr(have, name)
            }
            out.append(("/".join(map(str, key)), "report row differs from the log", fields))
    for job_id in sorted(set(jobs) | set(stored_jobs), key=str):
        if jobs.get(job_id) != stored_jobs.get(job_id):
            out.append(
                (
                    str(job_id),
                    "report working row differs from the log",
                    {"row": (jobs.get(job_id), stored_jobs.get(job_id))},
                )
            )
    return out
