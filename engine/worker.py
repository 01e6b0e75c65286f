"""The worker: claims jobs, runs their handlers, records what happened.

A :class:`Worker` is a service with one anyio task group holding:

* the **claim loop**: claims ready jobs in batches sized to its free slots
  (``SELECT ... FOR UPDATE SKIP LOCKED`` on the ``jobs_ready`` index, then
  ``job.started`` appended for each in the same transaction, computed by the
  reducer). It sleeps until a
  NOTIFY says its queues got work, the next scheduled job is due, or
  ``poll_interval`` passes (``listen=False`` on the ledger turns NOTIFY off,
  e.g. behind PgBouncer in transaction mode);
* one **task per running job**, bounded by ``concurrency``, each inside its own
  cancel scope (whose deadline is the job's timeout). Job tasks are plain
  asyncio tasks, kept by one supervisor task of the group (see
  :meth:`Worker._supervise`). A job's slot is freed when its handler returns:
  its outcome is then written by the completer while the next claim runs
  (the job stays held until the write lands, and at most ``2 * concurrency``
  jobs are held at once);
* the **heartbeat**: updates the worker's row, learns which of its jobs were
  asked to cancel (the path that works without NOTIFY), and flushes coalesced
  progress;
* the **rescuer** (:mod:`engine.rescuer`), one pass per ``rescue_interval``;
* the **completer** (:mod:`engine.completer`): every write for a held job goes
  through it, batched and fenced.

Outcomes: a handler's return value (checked against the operator's result
type) completes the job; an exception fails the attempt and schedules a retry
when the policy allows (exponential backoff with jitter); ``RetryAfter(delay)``
retries after that delay; ``Cancel(reason)`` cancels the job; exceeding the
job's ``timeout`` fails the attempt with error type ``timeout``; inputs that
no longer decode fail the job with ``InvalidInputs`` and no retry.

Cancellation: ``ledger.cancel()`` of a running job moves it to ``cancelling``
and notifies; the worker cancels that handler's scope and records
``job.cancelled``.

Shutdown is two-phase: :meth:`Worker.stop` stops claiming and lets running
handlers finish for ``shutdown_grace`` seconds; then they are cancelled and
recorded as interrupted (``job.failed``, error type ``interrupted``, requeued
at once). Nothing cancels a job's final writes; they have their own timeout
(``final_write_timeout``, checked by one timer for all of them every tenth
of it, at most every second), after which the slot is freed and the overrun
logged (``job_outcome_write_timed_out``) while the completer keeps the write.
Cancelling the task that runs the worker (rather than :meth:`Worker.stop`)
cancels running handlers at once and records nothing for them: the rescuer
requeues them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import structlog

from engine import events as ev
from engine import lifecycle, store
from engine.completer import Completer, Hold
from engine.context import JobContext
from engine.errors import Cancel, InvalidInputs, JobNotFound, PayloadTooLarge, RetryAfter
from engine.filters import as_list
from engine.ledger import as_job_id, error_info, utcnow
from engine.notifications import Notice
from engine.postgres import DB_ERRORS, retry_dropped
from engine.rescuer import rescue
from engine.retry import retry_at
from engine.sqlfiles import Q

if TYPE_CHECKING:
    from engine.ledger import JobLedger
    from projections.job_state import Job

log = structlog.get_logger("jobledger.worker")


class Worker:
    """Runs the handlers of a ledger's registered operators.

    ``queues``: the queues to claim from (default: the queues of the registered
    operators). ``operators``: restrict to these operators. Either may be one
    name (a string) or several. ``concurrency``:
    handlers running at once (a job whose outcome is being written no longer
    counts; at most twice as many jobs are held). ``burst``: exit when no claimable job is left
    (``limit``: after at most that many jobs). ``context``: only jobs whose
    context contains these key/values (burst filters).

    Times are in seconds: ``poll_interval`` (between claims when nothing is
    ready and no notification comes), ``heartbeat_interval``, ``rescue_after``
    (a worker silent this long is dead; ``rescue_interval`` between rescue
    passes, by default the larger of ``heartbeat_interval`` and a quarter of
    ``rescue_after``), ``final_write_timeout`` (an outcome write
    that takes longer is let go) must be positive; ``shutdown_grace`` and
    ``progress_interval`` (progress reports coalesced over it) zero or more.
    A value out of range raises ``ValueError`` naming it.
    """

    def __init__(
        self,
        ledger: JobLedger,
        *,
        queues: Iterable[str] | None = None,
        operators: Iterable[str] | None = None,
        concurrency: int = 10,
        burst: bool = False,
        limit: int | None = None,
        context: Mapping[str, Any] | None = None,
        poll_interval: float = 1.0,
        heartbeat_interval: float = 2.0,
        rescue_after: float = 30.0,
        rescue_interval: float | None = None,
        shutdown_grace: float = 30.0,
        final_write_timeout: float = 30.0,
        progress_interval: float = 0.5,
        register: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        positive = [
            ("poll_interval", poll_interval),
            ("heartbeat_interval", heartbeat_interval),
            ("rescue_after", rescue_after),
            ("final_write_timeout", final_write_timeout),
        ]
        if rescue_interval is not None:
            positive.append(("rescue_interval", rescue_interval))
        for name, value in positive:
            if not value > 0:  # NaN too
                raise ValueError(f"{name} must be positive, got {value}")
        for name, value in (
            ("shutdown_grace", shutdown_grace),
            ("progress_interval", progress_interval),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must be zero or more, got {value}")
        registry = ledger.registry
        names = as_list(operators) if operators is not None else list(registry)
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise ValueError(f"operators not registered in this process: {', '.join(unknown)}")
        if not names:
            raise ValueError("the worker has no operators: register some with @ledger.operator")
        self.ledger = ledger
        self.operators = sorted(names)
        self.queues = sorted(set(as_list(queues)) if queues else {registry[n].queue for n in names})
        self.concurrency = concurrency
        self.burst = burst
        self.limit = limit
        self.context = dict(context) if context else None
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.rescue_after = rescue_after
        self.rescue_interval = rescue_interval or max(heartbeat_interval, rescue_after / 4)
        self.shutdown_grace = shutdown_grace
        self.final_write_timeout = final_write_timeout
        self.progress_interval = progress_interval
        self.register = register
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.completer = Completer(ledger, self.id)
        self.holds: dict[UUID, Hold] = {}
        self.contexts: dict[UUID, JobContext] = {}
        self.claimed = 0
        self.failed_writes = 0
        self._supervising = False  # job tasks may be started (adoption checks it)
        self._writing = 0  # held jobs whose handler returned, their outcome being written
        self._write_watch: asyncio.TimerHandle | None = None  # see _watch_writes
        self._scope_type: type[anyio.CancelScope] = anyio.CancelScope
        self._tasks: dict[asyncio.Task[None], Hold] = {}
        self._crash: BaseException | None = None
        self._crashed = anyio.Event()
        self._stopping = anyio.Event()
        self._wake = anyio.Event()
        self._slot_freed = anyio.Event()
        self.log = log.bind(worker=self.id)

    @property
    def running(self) -> int:
        """Handlers running now: what ``concurrency`` bounds (held jobs whose
        outcome is being written are not counted)."""
        return len(self.holds) - self._writing

    # -- lifecycle -----------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; running handlers get ``shutdown_grace`` seconds to finish."""
        if not self._stopping.is_set():
            self.log.info("worker_stopping", running=len(self.holds))
        self._stopping.set()
        self._wake.set()  # an idle claim loop
        self._slot_freed.set()  # a claim loop waiting for a slot (the worker is full)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until :meth:`stop` (or, in burst mode, until no claimable job is left)."""
        if self.register:
            await retry_dropped(
                lambda: self.ledger.pool.execute(
                    Q.register_worker,
                    self.id,
                    socket.gethostname(),
                    os.getpid(),
                    self.queues,
                    self.operators,
                    self.concurrency,
                ),
                what="register_worker",
            )
        # The running backend's own scope class: anyio.CancelScope() looks the
        # backend up on every call (~5% of a no-op job's CPU); its class does not.
        self._scope_type = type(anyio.CancelScope())
        listener = await self.ledger.listener()
        self.log.info(
            "worker_started",
            queues=self.queues,
            operators=self.operators,
            concurrency=self.concurrency,
            notify=listener is not None,
        )
        try:
            async with anyio.create_task_group() as services:
                await services.start(self.completer.run)
                if self.register:
                    services.start_soon(self._heartbeat_loop)
                    services.start_soon(self._rescue_loop)
                with listener.subscribe(self._on_notice) if listener else contextlib.nullcontext():
                    task_status.started()
                    async with anyio.create_task_group() as jobs:
                        jobs.start_soon(self._supervise)
                        self._supervising = True
                        await self._claim_loop()
                        await self._drain()
                        await self._wait_jobs()
                        self._supervising = False
                        jobs.cancel_scope.cancel()  # the supervisor has nothing left to keep
                services.cancel_scope.cancel()
        finally:
            if self._write_watch is not None:
                self._write_watch.cancel()
                self._write_watch = None
            if self.register:
                with anyio.CancelScope(shield=True), contextlib.suppress(*DB_ERRORS):
                    with anyio.fail_after(5):
                        await self.ledger.pool.execute(Q.worker_stopped, self.id)
            self.log.info("worker_stopped", claimed=self.claimed, refused=self.completer.refused)

    async def _drain(self) -> None:
        """Phase two of shutdown: wait out the grace period, then cancel what still runs."""
        with anyio.move_on_after(self.shutdown_grace if self._stopping.is_set() else math.inf):
            while self.holds:
                self._slot_freed = anyio.Event()
                await self._slot_freed.wait()
        for hold in list(self.holds.values()):
            hold.cancel("shutdown")

    # -- claiming ------------------------------------------------------------

    async def _claim_loop(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            # A slot is a running handler: a job whose handler returned frees
            # its slot while the completer writes its outcome, as River's
            # producer does, so the next claim overlaps those writes and may
            # take every free slot. Held jobs (running or being written) stay
            # within twice the concurrency: a completer that falls behind
            # holds claims back.
            free = min(self.concurrency - self.running, 2 * self.concurrency - len(self.holds))
            if self.limit is not None:
                free = min(free, self.limit - self.claimed)
                if free <= 0 and self.claimed >= self.limit:
                    return
            if free <= 0:
                self._slot_freed = anyio.Event()
                await self._slot_freed.wait()
                continue
            self._wake = anyio.Event()
            try:
                holds = await self._claim(free)
                delay = 0.1
            except DB_ERRORS as exc:
                self.log.warning("claim_failed", error=str(exc) or type(exc).__name__)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._start(holds)
            if len(holds) == free:
                continue  # there may be more ready right now
            if self.burst and not holds:
                if not self.holds:
                    return
                self._slot_freed = anyio.Event()
                await self._slot_freed.wait()
                continue
            await self._idle()

    async def _idle(self) -> None:
        timeout = self.poll_interval
        with contextlib.suppress(*DB_ERRORS):
            due = await self.ledger.pool.fetchval(Q.next_due, self.queues, self.operators)
            if due is not None:
                timeout = min(timeout, max(0.0, (due - utcnow()).total_seconds()))
        with anyio.move_on_after(timeout):
            await self._wake.wait()

    async def _claim(self, n: int) -> list[Hold]:
        now = utcnow()
        async with self.ledger.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(Q.claim_jobs, self.queues, self.operators, n, now, self.context)
            if not rows:
                return []
            states = [store.decode_job(r[0]) for r in rows]
            changes = [
                self.ledger.make_change(
                    s, ev.Started(worker=self.id), actor=f"worker:{self.id}", worker=self.id, at=now
                )
                for s in states
            ]
            stored = await store.append(conn, changes)
        self.claimed += len(stored)
        return [Hold(c.state, self.id) for c in changes if c.state.id in stored]

    # -- running -------------------------------------------------------------

    def _start(self, holds: Iterable[Hold]) -> None:
        """Run each held job in a plain asyncio task, starting now.

        An anyio ``start_soon`` costs about four times asyncio's ``create_task``
        (its task handle and cancel scope). The handlers still run in their own
        anyio cancel scopes, cancelled through :meth:`Hold.cancel`; the tasks
        are kept by :meth:`_supervise`.
        """
        loop = asyncio.get_running_loop()
        for hold in holds:
            self.holds[hold.state.id] = hold
            task = loop.create_task(self._run_job(hold))
            self._tasks[task] = hold
            task.add_done_callback(self._job_task_done)

    def _job_task_done(self, task: asyncio.Task[None]) -> None:
        # The one place a job's slot is freed, however its task ended (even
        # cancelled before it started).
        self._release(self._tasks.pop(task))
        if not task.cancelled() and task.exception() is not None and self._crash is None:
            self._crash = task.exception()  # _run_job records every failure: a bug
            self._crashed.set()

    async def _supervise(self) -> None:
        """Keep the job tasks for the jobs task group, as if they were its own.

        If the group is cancelled (the worker is torn down, not stopped), jobs
        not yet writing their outcome are cancelled (nothing is recorded; the
        rescuer requeues them), outcome writes already under way finish
        shielded, and only then does the cancellation go on. A job task that
        raises (a bug: _run_job records every failure) fails the group.
        """
        try:
            await self._crashed.wait()
        finally:
            with anyio.CancelScope(shield=True):
                for task, hold in list(self._tasks.items()):
                    if not hold.finishing:
                        task.cancel()
                await self._wait_jobs()
        assert self._crash is not None
        raise self._crash

    async def _wait_jobs(self) -> None:
        """Until every job task has ended."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    def _release(self, hold: Hold) -> None:
        """Forget a finished job and free its slot."""
        if hold.finishing:
            self._writing -= 1
        if self.holds.get(hold.state.id) is hold:
            del self.holds[hold.state.id]
            self.contexts.pop(hold.state.id, None)
        self._slot_freed.set()

    async def _run_job(self, hold: Hold) -> None:
        job = hold.state
        ctx = JobContext(hold, self.completer, progress_interval=self.progress_interval)
        self.contexts[job.id] = ctx
        # Per-job logging binds a logger: skip it when info is filtered out.
        enabled = getattr(self.log, "is_enabled_for", None)
        verbose = enabled is None or enabled(logging.INFO)
        if verbose:
            ctx.logger.info("job_started", worker=self.id)
        try:
            outcome, reason = await self._call_handler(hold, ctx)
            if outcome is None:
                return
            hold.finishing = True
            self._writing += 1
            self._slot_freed.set()  # the handler's slot is free (see _claim_loop)
            # No cancel scope reaches here: the job's task is a root task that
            # nothing cancels once it is finishing (see _supervise) but the
            # one timer that times out every outcome write (_watch_writes).
            hold.write_deadline = asyncio.get_running_loop().time() + self.final_write_timeout
            if self._write_watch is None:
                self._arm_write_watch()
            try:
                if ctx.has_pending and hold.cancel_reason != "lost":
                    await ctx.flush()
                if hold.cancel_reason == "lost":
                    return
                async with hold.lock:
                    try:
                        new = await self.completer.write(hold, outcome, reason=reason)
                    except PayloadTooLarge as exc:  # refused before anything was written
                        outcome, reason = _too_large(hold.state, outcome, exc)
                        new = await self.completer.write(hold, outcome, reason=reason)
            except asyncio.CancelledError:
                if not hold.write_overdue:
                    raise
                self.failed_writes += 1
                ctx.logger.error(
                    "job_outcome_write_timed_out",
                    worker=self.id,
                    timeout=self.final_write_timeout,
                    note="the completer keeps the write; if it never lands, the rescuer "
                    "requeues the job",
                )
                return
            if new is not None and verbose:
                final = new.status in lifecycle.TERMINAL
                ctx.logger.info(
                    f"job_{new.status}" if final else "job_retry_scheduled",
                    worker=self.id,
                    duration_ms=round((time.monotonic() - hold.started) * 1000),
                    error=new.error.type if new.error and new.status != "completed" else None,
                    retry_at=None if final else new.run_at.isoformat(),
                )
        except Exception as exc:  # a failed outcome write must not take the worker down
            self.failed_writes += 1
            ctx.logger.error("job_outcome_not_recorded", worker=self.id, error=repr(exc))

    def _arm_write_watch(self) -> None:
        period = min(1.0, max(0.005, self.final_write_timeout / 10))
        self._write_watch = asyncio.get_running_loop().call_later(period, self._watch_writes)

    def _watch_writes(self) -> None:
        """Cancel the outcome writes past their deadline; re-arm while any remain.

        One timer, checking every tenth of ``final_write_timeout`` (at most a
        second, at least 5 ms), times out every job's outcome write: a timeout
        context per job cost ~3 us, about 6% of a no-op job's worker CPU. A
        write is let go between its deadline and one check later.
        """
        self._write_watch = None
        now = asyncio.get_running_loop().time()
        for task, hold in self._tasks.items():
            if hold.finishing and not hold.write_overdue and hold.write_deadline <= now:
                hold.write_overdue = True
                task.cancel()
        if self._writing:
            self._arm_write_watch()

    async def _call_handler(
        self, hold: Hold, ctx: JobContext
    ) -> tuple[ev.Event | None, str | None]:
        job = hold.state
        op = self.ledger.registry[job.operator]
        # One scope: the job's timeout is its deadline, and cancel requests,
        # shutdown and lost holds cancel it (hold.cancel names which).
        deadline = asyncio.get_running_loop().time() + job.timeout if job.timeout else math.inf
        with self._scope_type(deadline=deadline) as scope:
            hold.scope = scope
            if hold.cancel_reason is not None:
                scope.cancel()
            try:
                inputs = op.decode_inputs(job.inputs) if op.takes_inputs else None
                result = await (op.handler(ctx, inputs) if op.takes_inputs else op.handler(ctx))
                return ev.Completed(result=op.encode_result(result)), None
            except InvalidInputs as exc:
                return ev.Failed(error=error_info(exc)), "inputs do not decode"
            except RetryAfter as exc:
                when = retry_at(hold.state, utcnow(), delay=exc.delay)
                return ev.Failed(error=error_info(exc), retry_at=when), "handler asked to retry"
            except Cancel as exc:
                return ev.Cancelled(), exc.reason or "cancelled by its handler"
            except Exception as exc:  # the handler's failure is the job's outcome
                return ev.Failed(
                    error=error_info(exc), retry_at=retry_at(hold.state, utcnow())
                ), None
        if hold.cancel_reason is None:  # only the deadline cancels without a reason
            message = f"exceeded its timeout of {job.timeout:g}s"
            error = ev.ErrorInfo(type="timeout", message=message)
            return ev.Failed(error=error, retry_at=retry_at(hold.state, utcnow())), None
        # The scope was cancelled from outside: by a cancel request, shutdown or a lost hold.
        match hold.cancel_reason:
            case "requested":
                return ev.Cancelled(), None
            case "shutdown":
                error = ev.ErrorInfo(type="interrupted", message="the worker shut down")
                return ev.Failed(error=error, retry_at=utcnow()), "worker shutdown"
        return None, None

    # -- notifications, heartbeats, rescue -----------------------------------

    def _on_notice(self, notice: Notice) -> None:
        if notice.reconnected or set(notice.ready) & set(self.queues):
            self._wake.set()
        ids = notice.cancel_ids()
        if ids is None:
            self._wake.set()  # the heartbeat pass finds which of ours to cancel
            return
        for key in ids:
            hold = self.holds.get(UUID(key))
            if hold is not None:
                self.log.info("job_cancel_delivered", job_id=key, via="notify")
                hold.cancel("requested")

    async def _heartbeat_loop(self) -> None:
        unheld: set[UUID] = set()
        while True:
            try:
                rows = await self.ledger.pool.fetch(Q.heartbeat, self.id, self.running)
                seen: set[UUID] = set()
                for job_id, status in rows:
                    hold = self.holds.get(job_id)
                    if hold is None:
                        seen.add(job_id)
                    elif status == "cancelling" and hold.cancel_reason is None:
                        self.log.info("job_cancel_delivered", job_id=str(job_id), via="heartbeat")
                        hold.cancel("requested")
                # Held by us in the log but not in memory on two passes in a row:
                # a claim that committed but whose reply was lost. Adopt it.
                for job_id in seen & unheld:
                    await self._adopt(job_id)
                unheld = seen - unheld
            except DB_ERRORS as exc:
                self.log.warning("heartbeat_failed", error=str(exc) or type(exc).__name__)
            for ctx in list(self.contexts.values()):
                if ctx.has_pending:
                    with contextlib.suppress(*DB_ERRORS):
                        await ctx.flush()
            await anyio.sleep(self.heartbeat_interval)

    async def _adopt(self, job_id: UUID) -> None:
        if not self._supervising or job_id in self.holds or self._stopping.is_set():
            return
        try:
            state = await store.load(self.ledger.pool, job_id)
        except JobNotFound:
            return
        hold = Hold(state, self.id)
        if not hold.owns(state) or job_id in self.holds:
            return
        self.log.warning("job_adopted", job_id=str(job_id), attempt=state.attempt)
        self.holds[job_id] = hold
        if state.status == "cancelling":
            hold.cancel_reason = "requested"
        self._start([hold])

    async def _rescue_loop(self) -> None:
        while True:
            await anyio.sleep(self.rescue_interval)
            try:
                await rescue(self.ledger, rescue_after=self.rescue_after)
            except DB_ERRORS as exc:
                self.log.warning("rescue_failed", error=str(exc) or type(exc).__name__)

    # -- one job, in process ---------------------------------------------------

    async def execute(self, job_id: UUID | str) -> Job:
        """Claim one queued job and run it in this process now; return its final state."""
        jid = as_job_id(job_id)
        started = await self.ledger.transition(
            jid,
            lambda _: ev.Started(worker=self.id),
            expect_status=sorted(lifecycle.READY),
            actor=f"worker:{self.id}",
            worker=self.id,
        )
        if started is None:
            current = await self.ledger.get(jid)
            raise ValueError(f"job {jid} is {current.status}, not queued or scheduled")
        if started.operator not in self.ledger.registry:
            raise JobNotFound(jid)  # pragma: no cover - checked by the caller
        async with anyio.create_task_group() as tg:
            await tg.start(self.completer.run)
            tg.start_soon(self._supervise)
            self._start([Hold(started, self.id)])
            await self._wait_jobs()
            tg.cancel_scope.cancel()
        return await self.ledger.get(jid, include_deleted=True)


def _too_large(job: Job, outcome: ev.Event, exc: PayloadTooLarge) -> tuple[ev.Event, str]:
    """The failure recorded when a handler's outcome is too large to store: the
    result (or the error, whose type and the start of whose message are kept)
    is dropped and the job fails as if the handler had raised, retried as its
    policy says."""
    error = error_info(exc)
    if isinstance(outcome, ev.Failed):
        message = f"{exc}; the handler's {outcome.error.type}: {outcome.error.message[:500]}"
        error = ev.ErrorInfo(type=error.type, message=message)
    return ev.Failed(error=error, retry_at=retry_at(job, utcnow())), "outcome too large to store"
