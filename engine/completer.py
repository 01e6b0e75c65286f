"""Writes by the worker that holds a job: fenced, and batched.

A worker that claimed a job holds one *attempt* of it: a :class:`Hold` names
the worker, the run and the attempt. Every write it makes for the job
(progress, artifacts, the outcome) is version-guarded like any other. When the
guard trips, the worker reloads the job and asks one question: **is this still
my attempt?** — same worker, same run, same attempt, status running or
cancelling. If so (someone only requested cancellation, or changed a label),
it re-applies its event to the new state. If not, the job was rescued,
forced or deleted under it: the write is refused, logged as
``job_write_refused``, and the handler is cancelled. This is the fence that
keeps a worker that was paused or partitioned, and then came back, from
completing a job that another worker now owns.

A write whose reply was lost (the connection dropped after the commit) is
recognised by its correlation id: the holder reads the event at the version it
tried to write, and if that event is its own, the write landed.

Outcomes of many jobs are written together: :class:`Completer` collects them
for a few milliseconds (or until ``max_batch``) and appends them in one
statement, as River's batch completer does. Each caller still gets its own
answer (the new state, or ``None`` when fenced).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from engine import events as ev
from engine import lifecycle, store
from engine.ledger import utcnow
from engine.postgres import DB_ERRORS
from engine.sqlfiles import Q
from engine.store import Change
from projections.job_state import Job

if TYPE_CHECKING:
    from engine.ledger import JobLedger

log = structlog.get_logger("jobledger.worker")


@dataclass(eq=False)
class Hold:
    """A worker's hold on one attempt of a job, and the latest state it knows."""

    state: Job
    worker: str
    # asyncio's lock: on the asyncio backend it behaves as anyio's fast_acquire
    # lock and costs a sixth of it to create, once per job.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    scope: anyio.CancelScope | None = None
    cancel_reason: str | None = None  # "requested", "shutdown" or "lost"
    started: float = field(default_factory=time.monotonic)
    finishing: bool = False  # the handler is done; the outcome is being written
    write_deadline: float = math.inf  # loop time by which the outcome must be written
    write_overdue: bool = False  # the write missed it and was let go (Worker._watch_writes)

    def __post_init__(self) -> None:
        self.run = self.state.run
        self.attempt = self.state.attempt

    def owns(self, job: Job) -> bool:
        """Whether ``job`` is still this hold's attempt."""
        return (
            job.status in lifecycle.ACTIVE
            and not job.deleted
            and job.worker == self.worker
            and job.run == self.run
            and job.attempt == self.attempt
        )

    def cancel(self, reason: str) -> None:
        """Cancel the handler (the first reason given wins)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.scope is not None:
            self.scope.cancel()


@dataclass(eq=False)
class _Pending:
    hold: Hold
    event: ev.Event
    reason: str | None
    message: str | None
    done: anyio.Event  # shared by the items of one batch, set once all are resolved
    finished: bool = False
    result: Job | None = None
    error: BaseException | None = None


class Completer:
    """A service that writes held jobs' events in batches, fenced by ownership."""

    def __init__(
        self,
        ledger: JobLedger,
        worker: str,
        *,
        flush_interval: float = 0.002,
        max_batch: int = 500,
        retry_for: float = 300.0,
    ) -> None:
        self.ledger = ledger
        self.worker = worker
        self._actor = f"worker:{worker}"
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.retry_for = retry_for
        self._queue: list[_Pending] = []
        self._batch_done = anyio.Event()  # the event of the items queued since the last take
        self._wake = anyio.Event()
        self._serial = itertools.count()
        self._cid_prefix = secrets.token_hex(8)
        self.refused = 0

    async def write(
        self,
        hold: Hold,
        event: ev.Event,
        *,
        reason: str | None = None,
        message: str | None = None,
    ) -> Job | None:
        """Append ``event`` for ``hold``; the new state, or ``None`` when fenced off.

        An event over the size limit raises :class:`PayloadTooLarge` here,
        before it joins a batch, and nothing is written; so does one that the
        log's readers could not decode (``ValueError``).
        """
        store.check_event(event)
        item = _Pending(hold, event, reason, message, self._batch_done)
        self._queue.append(item)
        self._wake.set()
        while not item.finished:  # an item left over from a full batch moves to the next
            await item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Flush batches until cancelled (then flush what is left, shielded)."""
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                await anyio.sleep(self.flush_interval)
                while self._queue:
                    await self._flush_safely(self._take())
        finally:
            with anyio.CancelScope(shield=True):
                while self._queue:
                    await self._flush_safely(self._take())

    def _take(self) -> list[_Pending]:
        """The next batch to write; items queued from now on wait on a new event."""
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        self._batch_done = anyio.Event()
        for item in self._queue:  # left for the next batch
            item.done = self._batch_done
        return batch

    async def _flush_safely(self, batch: list[_Pending]) -> None:
        """Flush, then wake the batch's callers; an unexpected error fails those
        callers whose write was not resolved, never the service."""
        resolved: set[_Pending] = set()
        try:
            await self._flush(batch, resolved)
        except Exception as exc:  # the service must outlive any one batch
            log.error("completer_batch_failed", error=repr(exc), jobs=len(batch))
            for item in batch:
                if item not in resolved:
                    item.error = exc
        finally:
            for item in batch:
                item.finished = True
            for done in {id(item.done): item.done for item in batch}.values():
                done.set()

    async def _flush(self, batch: list[_Pending], resolved: set[_Pending]) -> None:
        by_job: dict[Any, list[_Pending]] = {}
        for item in batch:
            by_job.setdefault(item.hold.state.id, []).append(item)
        # One event per job per statement; a job's further events go after.
        first = [items[0] for items in by_job.values()]
        rest = [i for items in by_job.values() for i in items[1:]]
        await self._write_many(first, resolved)
        for item in rest:
            await self._write_many([item], resolved)

    async def _write_many(self, items: list[_Pending], resolved: set[_Pending]) -> None:
        pending: list[tuple[_Pending, Change, str]] = []
        # One statement, one moment and one correlation id: the batch's events
        # share their time and meta (each job's write is still told apart by
        # its version), so the write sends them once (see store._encode_writes).
        cid, at = self._next_cid(), utcnow()
        for item in items:
            try:
                change, cid = self._change(item, cid, at)
            except Exception as exc:  # a lifecycle or encoding error belongs to that caller
                item.error = exc
                resolved.add(item)
                continue
            pending.append((item, change, cid))
        if not pending:
            return
        try:
            stored = await store.append(
                self.ledger.pool,
                [c for _, c, _ in pending],
                notify=store.notification((i.hold.state, c.state) for i, c, _ in pending),
            )
        except DB_ERRORS as exc:
            log.warning(
                "job_write_interrupted", error=str(exc) or type(exc).__name__, jobs=len(pending)
            )
            stored = {}
        for item, change, cid in pending:
            if change.state.id in stored:
                item.hold.state = change.state
                item.result = change.state
            else:
                await self._resolve(item, change, cid)
            resolved.add(item)

    def _next_cid(self) -> str:
        """A correlation id unique per write: a random prefix per completer and a serial."""
        return f"{self._cid_prefix}/{next(self._serial)}"

    def _change(
        self, item: _Pending, cid: str | None = None, at: datetime | None = None
    ) -> tuple[Change, str]:
        cid = cid or self._next_cid()
        change = self.ledger.make_change(
            item.hold.state,
            item.event,
            actor=self._actor,
            reason=item.reason,
            message=item.message,
            worker=self.worker,
            at=at,
            correlation_id=cid,
        )
        return change, cid

    async def _resolve(self, item: _Pending, change: Change, cid: str) -> None:
        """The batch write did not land for this job: find out why, then retry or refuse."""
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        while True:
            try:
                if await self._landed(change, cid):
                    item.hold.state = change.state
                    item.result = change.state
                    break
                current = await store.load(self.ledger.pool, change.state.id)
                if not item.hold.owns(current):
                    self.refused += 1
                    log.warning(
                        "job_write_refused",
                        job_id=str(current.id),
                        event_type=item.event.tag,
                        status=current.status,
                        held_attempt=item.hold.attempt,
                        current_attempt=current.attempt,
                        current_worker=current.worker,
                    )
                    item.hold.cancel("lost")
                    break
                item.hold.state = current
                change, cid = self._change(item)
                stored = await store.append(
                    self.ledger.pool,
                    [change],
                    notify=store.notification([(current, change.state)]),
                )
                if stored:
                    item.hold.state = change.state
                    item.result = change.state
                    break
            except DB_ERRORS as exc:
                if time.monotonic() > deadline:
                    item.error = exc
                    break
                log.warning(
                    "job_write_retry",
                    job_id=str(change.state.id),
                    error=str(exc) or type(exc).__name__,
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except Exception as exc:  # e.g. the event no longer applies: that caller's error
                item.error = exc
                break

    async def _landed(self, change: Change, cid: str) -> bool:
        row = await self.ledger.pool.fetchrow(
            Q.event_at_version, change.state.id, change.state.version
        )
        if row is None:
            return False
        meta = msgspec.json.decode(row["meta"])
        return meta.get("correlation_id") == cid
