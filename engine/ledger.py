"""JobLedger: the public async API.

::

    ledger = JobLedger()                      # no I/O: safe at import time

    @ledger.operator("dataset.import", queue="imports", max_attempts=3)
    async def import_dataset(ctx, inputs: ImportInputs) -> ImportResult: ...

    async with ledger:                        # connects and migrates
        job = await ledger.submit("dataset.import", {"dataset": "cats"})
        job = await ledger.wait(job.id, timeout=60, raise_for_status=True)
        for rec in await ledger.history(job.id):
            print(rec.recorded_at, rec.type, rec.meta.actor, rec.meta.reason)

Every method that changes a job appends one event and rewrites the job's row
in the same statement (:mod:`engine.store`). Transitions are checked against
:mod:`engine.lifecycle`; ``force=True`` bypasses the check and the event's
meta records that it did. ``expect_status=`` makes a transition conditional:
when the job is not in that status, nothing changes and the method returns
``None``. Concurrent writers never lose an event: a writer that finds the job
moved under it reloads, re-checks and re-applies.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import os
import random
import socket
import time
import traceback as tb
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from operator import index as as_index
from typing import Any, NamedTuple
from uuid import UUID

import anyio
import msgspec
import structlog
from asyncpg.pgproto.pgproto import UUID as _WireUUID

from engine import events as ev
from engine import filters as flt
from engine import lifecycle, store
from engine.errors import (
    ConcurrencyConflict,
    InvalidInputs,
    InvalidTransition,
    JobFailed,
    JobNotFound,
    UnknownOperator,
    WaitTimeout,
)
from engine.notifications import Listener, Notice
from engine.operators import (
    Handler,
    Operator,
    OperatorInfo,
    RetryPolicy,
    info,
    json_values,
    operator_from_handler,
    to_json_value,
)
from engine.pool import Pool
from engine.postgres import create_pool, migrate, resolve_dsn, retry_dropped
from engine.retry import retry_at
from engine.sqlfiles import Q
from engine.store import Change
from projections import history as hist
from projections.job_state import Job, apply

log = structlog.get_logger("jobledger")

MAX_CONFLICT_RETRIES = 100
POOL_CLOSE_TIMEOUT = 10.0
"""Seconds a closing ledger waits for lent connections before terminating them."""
BULK_BATCH = 500
StatusArg = str | Iterable[str] | None


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC). Every event time comes from here."""
    return datetime.now(UTC)


_last_id = [0, 0]  # (milliseconds, counter) of the last id made by this process
_random_bits = random.getrandbits
_MS_MASK, _VERSION_7, _VARIANT = (1 << 48) - 1, 0x7 << 76, 0b10 << 62


def new_job_id() -> UUID:
    """A time-ordered UUIDv7 (RFC 9562), monotonic within this process.

    New rows land at the right edge of the indexes, and jobs submitted in the
    same millisecond (a batch) still sort in submission order: the 12-bit
    ``rand_a`` field holds a counter that restarts at a random value each
    millisecond (the RFC's "method 1").

    The value is asyncpg's ``UUID``, the type asyncpg itself returns for
    ``uuid`` columns: a subclass of :class:`uuid.UUID` (equal to, and hashing
    like, the same id as a ``uuid.UUID``) that is built from its 16 bytes in C
    (0.5 us against 2 for ``UUID(int=...)``) and that asyncpg sends without
    converting it first.
    """
    [job_id] = new_job_ids(1)
    return job_id


def new_job_ids(n: int) -> list[UUID]:
    """``n`` ids as :func:`new_job_id` makes them, in increasing order, reading the
    clock once: a batch's ids cost 0.27 us each instead of 0.5."""
    ms = time.time_ns() // 1_000_000
    last_ms, counter = _last_id
    if ms <= last_ms:  # the same millisecond (or the clock went back): count on
        ms = last_ms
    else:
        counter = _random_bits(10) - 1  # the first id of a millisecond counts from here
    # version 7 in bits 76-79, variant 0b10 in bits 62-63, 62 random bits below
    fixed = (ms & _MS_MASK) << 80 | _VERSION_7 | _VARIANT
    wire, bits = _WireUUID, _random_bits
    ids = []
    for _ in range(n):
        counter += 1
        if counter > 0xFFF:  # 4096 ids in one millisecond: borrow the next one
            ms += 1
            fixed = (ms & _MS_MASK) << 80 | _VERSION_7 | _VARIANT
            counter = _random_bits(10)
        ids.append(wire((fixed | counter << 64 | bits(62)).to_bytes(16, "big")))
    _last_id[0], _last_id[1] = ms, counter
    return ids


def as_job_id(job_id: UUID | str) -> UUID:
    """A job id from a UUID or its text; ``ValueError`` names a malformed one."""
    if isinstance(job_id, UUID):
        return job_id
    try:
        return UUID(str(job_id))
    except ValueError:
        raise ValueError(f"{job_id!r} is not a job id") from None


def _statuses(value: StatusArg) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset(lifecycle.check_status(v) for v in flt.as_list(value))


def error_info(error: BaseException | ev.ErrorInfo | str | Mapping[str, Any]) -> ev.ErrorInfo:
    """An error as stored: from an exception (with its traceback), a string or a mapping."""
    if isinstance(error, ev.ErrorInfo):
        return error
    if isinstance(error, BaseException):
        return ev.ErrorInfo(
            type=type(error).__qualname__,
            message=str(error),
            traceback="".join(tb.format_exception(error)) or None,
        )
    if isinstance(error, str):
        return ev.ErrorInfo(type="error", message=error)
    return msgspec.convert(dict(error), ev.ErrorInfo)


class JobSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One job to submit: the arguments of :meth:`JobLedger.submit` as a value.

    ``delay`` (seconds) and ``run_at`` (an aware datetime) both postpone the
    job; give at most one. Fields left ``None`` take the operator's defaults.
    """

    operator: str
    inputs: Any = None
    label: str | None = None
    description: str | None = None
    queue: str | None = None
    priority: int = 0
    run_at: datetime | None = None
    delay: float | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    restart_policy: str | None = None
    retry_backoff: float | None = None
    tags: list[str] = []
    context: dict[str, Any] = {}
    parent_id: UUID | None = None
    owner: str | None = None
    idempotency_key: str | None = None


class _CheckedSpec(JobSpec, gc=False):
    """A :class:`JobSpec` as :func:`_spec` checked it, for the one call that submits it.

    It holds only the caller's values and is never referenced by them, so the
    cyclic collector need not track it, and its tags are a tuple (``()`` when
    none is given, a shared constant): a list and a tracked spec for every job
    of a batch made the collector run a full collection every ~170 batches of
    100, 0.8 us a job."""

    tags: tuple[str, ...] = ()


class Page(msgspec.Struct, frozen=True):
    """One page of a listing and the cursor of the next (``None`` on the last page)."""

    jobs: list[Job]
    cursor: str | None


class JobLedger:
    """The job ledger: submit, move, query, wait for and audit jobs.

    Construction does no I/O, so an application module can hold
    ``ledger = JobLedger()`` and register operators at import time. Use
    ``async with ledger:`` (or :meth:`open`) to connect; it migrates the
    database unless ``migrate=False``.

    ``dsn`` (else ``JOBLEDGER_DSN``) names a PostgreSQL server; without one an
    embedded server is started in ``home`` (else ``JOBLEDGER_HOME``, default
    ``./.jobledger``). ``actor`` is the default actor recorded on events this
    process writes. ``listen=False`` turns LISTEN/NOTIFY off (for PgBouncer in
    transaction mode): waits and workers then poll. ``application_name``
    labels this process's connections in ``pg_stat_activity``.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        home: str | os.PathLike[str] | None = None,
        migrate: bool = True,
        actor: str | None = None,
        listen: bool = True,
        min_connections: int = 1,
        max_connections: int = 10,
        statement_cache_size: int = 100,
        application_name: str = "jobledger",
    ) -> None:
        self._dsn_arg = dsn
        self._home = home
        self._migrate = migrate
        self.actor = actor
        self.listen = listen
        self._pool_size = (min_connections, max_connections)
        self._statement_cache_size = statement_cache_size
        self.application_name = application_name
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.dsn: str | None = None
        self._registry: dict[str, Operator] = {}
        self._remote: dict[str, OperatorInfo] = {}
        self._pool: Pool | None = None
        self._stack: AsyncExitStack | None = None
        self._listener: Listener | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._listener_lock = anyio.Lock()

    # -- connecting ------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, dsn: str | None = None, *, migrate: bool = True, **kwargs: Any
    ) -> AsyncIterator[JobLedger]:
        """Construct and connect: ``async with JobLedger.open() as ledger: ...``."""
        async with cls(dsn, migrate=migrate, **kwargs) as ledger:
            yield ledger

    async def __aenter__(self) -> JobLedger:
        if self._stack is not None:
            raise RuntimeError("this JobLedger is already open")
        stack = AsyncExitStack()
        try:
            self.dsn = await resolve_dsn(self._dsn_arg, self._home)
            self._pool = await create_pool(
                self.dsn,
                min_size=self._pool_size[0],
                max_size=self._pool_size[1],
                statement_cache_size=self._statement_cache_size,
                server_settings={"application_name": self.application_name, "TimeZone": "UTC"},
            )
            stack.push_async_callback(self._close_pool)
            if self._migrate:
                await retry_dropped(self._migrate_now, what="migrate")
            await retry_dropped(self._publish_operators, what="publish_operators")
            stack.push_async_callback(self._stop_listener)
        except BaseException:
            await stack.aclose()
            self._pool = None
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with anyio.CancelScope(shield=True):
                await pool.close(timeout=POOL_CLOSE_TIMEOUT)

    @property
    def pool(self) -> Pool:
        """The connection pool (only while the ledger is open); see :mod:`engine.pool`."""
        if self._pool is None:
            raise RuntimeError("the JobLedger is not open: use `async with ledger:`")
        return self._pool

    async def listener(self) -> Listener | None:
        """The process's LISTEN connection, started on first use (``None`` when ``listen=False``).

        The ledger owns the listener's task and stops it on exit. It is one
        task rather than a task group because applications (lifespans, test
        fixtures) often enter and exit the ledger from different tasks, which a
        task group does not allow.
        """
        if not self.listen:
            return None
        async with self._listener_lock:
            if self._listener is None:
                if self._pool is None or self.dsn is None:
                    raise RuntimeError("the JobLedger is not open: use `async with ledger:`")
                listener = Listener(
                    self.dsn, server_settings={"application_name": self.application_name}
                )
                ready = anyio.Event()

                async def serve() -> None:
                    try:
                        async with anyio.create_task_group() as tg:
                            await tg.start(listener.run)
                            ready.set()
                    finally:
                        ready.set()  # also when the listener fails to start: see below

                task = asyncio.get_running_loop().create_task(serve())
                self._listener_task = task
                await ready.wait()
                if task.done():  # it ended before it listened: raise why, never wait on
                    self._listener_task = None
                    task.result()
                    raise RuntimeError("the listener stopped before it started")
                self._listener = listener
        return self._listener

    async def _stop_listener(self) -> None:
        task, self._listener_task, self._listener = self._listener_task, None, None
        if task is not None:
            task.cancel()
            with anyio.CancelScope(shield=True), contextlib.suppress(asyncio.CancelledError):
                await task

    # -- operators -------------------------------------------------------------

    def operator(
        self,
        name: str,
        *,
        queue: str = "default",
        max_attempts: int = 1,
        timeout: float | None = None,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 300.0,
        restart_policy: str = "on_error",
    ) -> Callable[[Handler], Handler]:
        """Register the decorated async function as the handler of operator ``name``.

        Inputs and result types come from the handler's annotations; see
        :mod:`engine.operators`. ``max_attempts``, ``timeout`` (seconds),
        ``retry_backoff`` (seconds, doubled each attempt up to
        ``retry_backoff_max``) and ``restart_policy`` (``"never"`` or
        ``"on_error"``) are defaults each job may override.
        """

        def register(handler: Handler) -> Handler:
            self.register(
                operator_from_handler(
                    name,
                    handler,
                    queue=queue,
                    max_attempts=max_attempts,
                    timeout=timeout,
                    retry_backoff=retry_backoff,
                    retry_backoff_max=retry_backoff_max,
                    restart_policy=restart_policy,
                )
            )
            return handler

        return register

    def register(self, op: Operator) -> None:
        """Register a built :class:`Operator` (``ValueError`` if the name is taken)."""
        if op.name in self._registry:
            raise ValueError(f"operator {op.name!r} is already registered")
        self._registry[op.name] = op

    @property
    def registry(self) -> Mapping[str, Operator]:
        """The operators registered in this process."""
        return self._registry

    async def _migrate_now(self) -> None:
        async with self.pool.acquire() as conn:
            await migrate(conn)

    async def _publish_operators(self) -> None:
        if not self._registry:
            return
        rows = [info(op, self.name) for op in self._registry.values()]
        await self.pool.execute(Q.publish_operators, msgspec.Raw(msgspec.json.encode(rows)))

    async def operators(self) -> list[OperatorInfo]:
        """Every operator published by any process, with its queue and JSON Schemas."""
        rows = await self.pool.fetch(Q.list_operators)
        found = [msgspec.convert(dict(r), OperatorInfo) for r in rows]
        self._remote = {o.name: o for o in found}
        return found

    async def _operator_defaults(self, name: str) -> Operator | OperatorInfo:
        op = self._registry.get(name)
        if op is not None:
            return op
        if name not in self._remote:
            await self.operators()
        try:
            return self._remote[name]
        except KeyError:
            raise UnknownOperator(name) from None

    # -- submitting ------------------------------------------------------------

    async def submit(
        self,
        operator: str,
        inputs: Any = None,
        *,
        label: str | None = None,
        description: str | None = None,
        queue: str | None = None,
        priority: int = 0,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        restart_policy: str | None = None,
        retry_backoff: float | None = None,
        tags: Iterable[str] = (),
        context: Mapping[str, Any] | None = None,
        parent_id: UUID | str | None = None,
        owner: str | None = None,
        idempotency_key: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
    ) -> Job:
        """Submit one job and return it as stored.

        ``inputs`` (a dict or the operator's input Struct) are validated
        against the operator's input type when it is registered in this
        process; :class:`InvalidInputs` names the bad field. An operator known
        to no process raises :class:`UnknownOperator`. A second submit with the
        same ``idempotency_key`` returns the first job and writes nothing.
        """
        spec = _spec(
            None,
            {
                "operator": operator,
                "inputs": inputs,
                "label": label,
                "description": description,
                "queue": queue,
                "priority": priority,
                "run_at": run_at,
                "delay": delay.total_seconds() if isinstance(delay, timedelta) else delay,
                "max_attempts": max_attempts,
                "timeout": timeout,
                "restart_policy": restart_policy,
                "retry_backoff": retry_backoff,
                "tags": flt.as_list(tags),
                "context": dict(context or {}),
                "parent_id": as_job_id(parent_id) if parent_id is not None else None,
                "owner": owner,
                "idempotency_key": idempotency_key,
            },
        )
        [job] = await self._submit_checked([spec], actor, reason)
        return job

    async def submit_many(
        self,
        specs: Iterable[JobSpec | Mapping[str, Any]],
        *,
        actor: str | None = None,
        reason: str | None = None,
    ) -> list[Job]:
        """Submit many jobs in one round trip; returns them in the order given.

        Each item is a :class:`JobSpec` or a mapping with the keyword arguments
        of :meth:`submit`. Every item is validated before anything is written
        (a ``JobSpec``'s fields too: building one checks nothing): one bad item
        fails the whole call and stores nothing.
        """
        return await self._submit_checked(_specs(specs), actor, reason)

    async def _submit_checked(
        self, items: builtins.list[JobSpec], actor: str | None, reason: str | None
    ) -> builtins.list[Job]:
        """Submit specs that :func:`_spec` made (see :meth:`submit_many`)."""
        if not items:
            return []
        at = utcnow()
        meta = ev.Meta(actor=actor or self.actor, reason=reason)
        defaults: dict[str, _Defaults] = {}
        changes = []
        # in order: the first bad item is the one reported
        for spec, job_id in zip(items, new_job_ids(len(items)), strict=True):
            d = defaults.get(spec.operator)
            if d is None:
                op = self._registry.get(spec.operator) or await self._operator_defaults(
                    spec.operator
                )
                d = defaults[spec.operator] = _Defaults.of(op)
            changes.append(_submission(spec, d, at, meta, job_id))
        if any(s.parent_id is not None for s in items):
            await self._check_parents(items)
        stored = await store.create(
            self.pool, changes, notify=store.notification((None, c.state) for c in changes)
        )
        if len(stored) == len(changes):
            return [c.state for c in changes]
        missing = [c.state.idempotency_key for c in changes if c.state.id not in stored]
        existing = await store.by_idempotency_keys(self.pool, [k for k in missing if k])
        out = []
        for c in changes:
            if c.state.id in stored:
                out.append(c.state)
            else:
                key = c.state.idempotency_key
                if key is None or key not in existing:  # pragma: no cover - defensive
                    raise ConcurrencyConflict(c.state.id, 0)
                out.append(existing[key])
        return out

    async def _check_parents(self, items: Sequence[JobSpec]) -> None:
        """Every ``parent_id`` of a batch names a job that exists (one query, only
        when a parent is given): a child of nothing is bad input, stored nowhere."""
        parents = {s.parent_id for s in items if s.parent_id is not None}
        if not parents:
            return
        found = await store.load_many(self.pool, sorted(parents))
        for pid in sorted(parents):
            if pid not in found:
                raise ValueError(f"parent_id: job {pid} does not exist")
            if found[pid].deleted:
                raise ValueError(f"parent_id: job {pid} was deleted")

    # -- reading ---------------------------------------------------------------

    async def get(self, job_id: UUID | str, *, include_deleted: bool = False) -> Job:
        """One job with every field; :class:`JobNotFound` if there is none (or it was deleted)."""
        job = await store.load(self.pool, as_job_id(job_id))
        if job.deleted and not include_deleted:
            raise JobNotFound(job.id, deleted=True)
        return job

    async def page(
        self,
        *,
        order_by: str | Sequence[str] | None = None,
        limit: int = 100,
        offset: int = 0,
        cursor: str | None = None,
        **filters: Any,
    ) -> Page:
        """One page of jobs matching ``filters`` (see :mod:`engine.filters`) and the next cursor."""
        if not 1 <= limit <= 10_000:
            raise ValueError(f"limit must be between 1 and 10000, got {limit}")
        if offset < 0:
            raise ValueError(f"offset must not be negative, got {offset}")
        keys = flt.parse_order(order_by)
        sql, params = flt.page_query(filters, keys, limit=limit + 1, offset=offset, cursor=cursor)
        rows = await self.pool.fetch(sql, *params)
        jobs = [store.decode_job(r[0]) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(jobs, flt.encode_cursor(keys, jobs[-1]) if more and jobs else None)

    async def list(
        self,
        *,
        order_by: str | Sequence[str] | None = None,
        limit: int = 100,
        offset: int = 0,
        cursor: str | None = None,
        **filters: Any,
    ) -> builtins.list[Job]:
        """Jobs matching ``filters``, ordered (default ``-created_at``), one page of them.

        Filters are described in :mod:`engine.filters`; e.g.
        ``list(status=["queued", "running"], operator="train", tags=["gpu", "-old"],
        context={"dataset": "cats"}, created_after=t, order_by="-priority")``.
        """
        page = await self.page(
            order_by=order_by, limit=limit, offset=offset, cursor=cursor, **filters
        )
        return page.jobs

    async def count(self, **filters: Any) -> int:
        """How many jobs match ``filters``."""
        c = flt.compile_filters(filters)
        return int(
            await self.pool.fetchval(
                f"SELECT count(*) FROM jobledger.jobs WHERE {c.where}", *c.params
            )
        )

    async def iter_jobs(
        self, *, order_by: str | Sequence[str] | None = None, page_size: int = 500, **filters: Any
    ) -> AsyncIterator[Job]:
        """Every job matching ``filters``, fetched page by page with a cursor."""
        cursor: str | None = None
        while True:
            page = await self.page(order_by=order_by, limit=page_size, cursor=cursor, **filters)
            for job in page.jobs:
                yield job
            if page.cursor is None:
                return
            cursor = page.cursor

    async def history(self, job_id: UUID | str) -> builtins.list[ev.Recorded]:
        """The job's events in order, each with its meta (actor, reason, ...) and time.

        Deleted jobs keep their history. :class:`JobNotFound` if the job never existed.
        """
        events = await store.read_stream(self.pool, as_job_id(job_id))
        if not events:
            raise JobNotFound(job_id)
        return events

    async def progress_history(self, job_id: UUID | str) -> builtins.list[hist.ProgressPoint]:
        """Every progress report of the job, with its run and attempt."""
        return hist.progress(await self.history(job_id))

    async def runs(self, job_id: UUID | str) -> builtins.list[hist.Run]:
        """The job's runs (a new one per retry or rerun), each with its attempts and outcome."""
        return hist.runs(await self.history(job_id))

    async def wait(
        self,
        job_id: UUID | str,
        *,
        until: StatusArg = None,
        timeout: float | None = None,
        raise_for_status: bool = False,
        poll_interval: float = 1.0,
    ) -> Job:
        """Wait until the job is in one of ``until`` (default: any terminal status).

        Wakes on NOTIFY when the ledger listens, and polls every
        ``poll_interval`` seconds as a fallback. Raises :class:`WaitTimeout`
        after ``timeout`` seconds, and :class:`JobFailed` when
        ``raise_for_status`` is set and the job ended other than completed.
        """
        jid = as_job_id(job_id)
        targets = _statuses(until) or frozenset(lifecycle.TERMINAL)
        listener = await self.listener()
        wake = anyio.Event()
        key = str(jid)

        def on_notice(notice: Notice) -> None:
            ids = notice.done_ids()
            if ids is None or key in ids:
                wake.set()

        job = await self.get(jid, include_deleted=True)
        try:
            with (
                anyio.fail_after(timeout),
                listener.subscribe(on_notice) if listener else contextlib.nullcontext(),
            ):
                interval = 0.05
                while job.status not in targets:
                    with anyio.move_on_after(
                        interval
                        if listener is None or not (targets <= lifecycle.TERMINAL)
                        else poll_interval
                    ):
                        await wake.wait()
                    wake = anyio.Event()
                    interval = min(interval * 2, poll_interval)
                    job = await self.get(jid, include_deleted=True)
        except TimeoutError:
            raise WaitTimeout(jid, job.status, timeout or 0.0) from None
        if raise_for_status and job.status != "completed" and job.terminal:
            raise JobFailed(job)
        return job

    async def state_at(self, job_id: UUID | str, at: int | datetime | None = None) -> Job | None:
        """The job as it was after the last event at or before ``at`` (a log position or an
        aware datetime); ``None`` if it did not exist yet."""
        from projections.replay import state_at

        if isinstance(at, datetime) and at.tzinfo is None:
            raise ValueError("at must be a timezone-aware datetime")
        return state_at(await self.history(job_id), at)

    async def report(
        self,
        *,
        since: datetime,
        until: datetime | None = None,
        by: str = "operator",
        bucket: str = "hour",
        catch_up: bool = True,
    ) -> builtins.list[Any]:
        """Report rows (counts, failure rate, wait/run percentiles) per ``by`` and ``bucket``
        (``"hour"``, ``"day"``, ``"week"``) in ``[since, until)``, from the report projection.

        The projection is first caught up with the log (the events below the
        fence that it has not applied yet, as ``jobledger projections run``
        would apply them), so the report is current even where no runner
        runs; with a runner it is a batch at most. ``catch_up=False`` reads
        the projection as it is, for a caller that accepts its lag.
        """
        from engine.store import check_log_cluster
        from projections import runner
        from projections.reports import ReportProjection, report

        if catch_up:
            await check_log_cluster(self.pool)
            await runner.catch_up(self.pool, ReportProjection())
        return await report(self.pool, since=since, until=until or utcnow(), by=by, bucket=bucket)

    async def prune(
        self,
        *,
        finished_before: datetime,
        operator: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
        dry_run: bool = False,
    ) -> Any:
        """Remove the streams of jobs finished before a time, the one audited way
        (see :mod:`engine.retention`); reports keep their counts."""
        from engine.retention import prune

        return await prune(
            self,
            finished_before=finished_before,
            operator=operator,
            actor=actor,
            reason=reason,
            dry_run=dry_run,
        )

    # -- running -----------------------------------------------------------------

    async def run_worker(self, *, handle_signals: bool = True, **options: Any) -> None:
        """Run a :class:`engine.worker.Worker` until it stops (burst) or a signal arrives.

        ``options`` are the Worker's (queues, concurrency, burst, limit, ...).
        The first SIGINT/SIGTERM stops claiming and gives running handlers the
        grace period; a second one cancels them at once.
        """
        from engine.worker import Worker

        worker = Worker(self, **options)
        async with anyio.create_task_group() as tg:
            if handle_signals:
                tg.start_soon(_stop_on_signals, worker)
            await worker.run()
            tg.cancel_scope.cancel()

    async def execute(self, job_id: UUID | str, **options: Any) -> Job:
        """Run one queued job in this process now (its operator must be registered here).

        Returns the job's state afterwards. The job is claimed like a worker
        would claim it, so no worker can run it at the same time.
        """
        from engine.worker import Worker

        job = await self.get(job_id)
        if job.operator not in self._registry:
            raise UnknownOperator(job.operator)
        worker = Worker(self, operators=[job.operator], register=False, **options)
        return await worker.execute(job.id)

    # -- transitions -----------------------------------------------------------

    def make_change(
        self,
        state: Job,
        event: ev.Event,
        *,
        actor: str | None = None,
        reason: str | None = None,
        message: str | None = None,
        force: bool = False,
        worker: str | None = None,
        at: datetime | None = None,
        correlation_id: str | None = None,
    ) -> Change:
        """The change ``event`` makes to ``state``, checked against the lifecycle.

        Raises :class:`InvalidTransition` unless the lifecycle allows the event
        in the job's status or ``force`` is set; a forced bypass is recorded as
        ``meta.forced``. ``correlation_id`` marks the event so that a writer
        whose connection dropped can tell whether its write landed.
        """
        ok = lifecycle.allowed(state.status, event.tag)
        rec = ev.Recorded(
            job_id=state.id,
            version=state.version + 1,
            event=event,  # type: ignore[arg-type]
            recorded_at=at or utcnow(),
            meta=ev.Meta(
                actor=actor or self.actor,
                reason=reason,
                message=message,
                worker=worker,
                forced=force and not ok,
                correlation_id=correlation_id,
            ),
        )
        new = apply(state, rec)
        if not ok and not force:
            raise InvalidTransition(state.id, state.status, new.status, event.tag)
        return Change(new, rec)

    async def transition(
        self,
        job_id: UUID | str,
        build: Callable[[Job], ev.Event | None],
        *,
        actor: str | None = None,
        reason: str | None = None,
        message: str | None = None,
        expect_status: StatusArg = None,
        force: bool = False,
        worker: str | None = None,
    ) -> Job | None:
        """Append ``build(job)`` to the job's stream; the building block of every transition.

        ``build`` sees the job's current state and returns the event to append
        (or ``None``: nothing to do, the current state is returned). On a
        concurrent write the job is reloaded and ``build`` called again, so
        the event always applies to the state it was built from.
        """
        jid = as_job_id(job_id)
        expect = _statuses(expect_status)
        for _ in range(MAX_CONFLICT_RETRIES):
            state = await self.get(jid)
            if expect is not None and state.status not in expect:
                return None
            event = build(state)
            if event is None:
                return state
            change = self.make_change(
                state,
                event,
                actor=actor,
                reason=reason,
                message=message,
                force=force,
                worker=worker,
            )
            stored = await store.append(
                self.pool, [change], notify=store.notification([(state, change.state)])
            )
            if stored:
                return change.state
        raise ConcurrencyConflict(jid, state.version)

    async def mark_running(
        self,
        job_id: UUID | str,
        *,
        worker: str | None = None,
        run_link: str | None = None,
        **how: Any,
    ) -> Job | None:
        """An external executor started the job (``queued``/``scheduled`` -> ``running``)."""
        return await self.transition(
            job_id, lambda _: ev.Started(worker=worker, run_link=run_link), worker=worker, **how
        )

    async def report_progress(
        self,
        job_id: UUID | str,
        *,
        fraction: float | None = None,
        message: str | None = None,
        iteration: int | None = None,
        metrics: Mapping[str, float] | None = None,
        **how: Any,
    ) -> Job | None:
        """Record progress of a running job: fraction (0..1), message, iteration, metrics."""
        event = progress_event(fraction, message, iteration, metrics)
        return await self.transition(job_id, lambda _: event, **how)

    async def mark_completed(
        self, job_id: UUID | str, result: Any = None, **how: Any
    ) -> Job | None:
        """The job succeeded with ``result`` (checked against the operator's result type)."""

        def build(job: Job) -> ev.Event:
            op = self._registry.get(job.operator)
            value = (
                op.encode_result(result)
                if op
                else to_json_value(job.operator, result, what="result")
            )
            return ev.Completed(result=value)

        return await self.transition(job_id, build, **how)

    async def mark_failed(
        self,
        job_id: UUID | str,
        error: BaseException | ev.ErrorInfo | str | Mapping[str, Any] = "failed",
        *,
        retry: bool = False,
        retry_delay: float | None = None,
        **how: Any,
    ) -> Job | None:
        """The attempt failed with ``error``.

        With ``retry=True`` the job is scheduled again (after ``retry_delay``
        seconds, default: the job's exponential backoff with jitter) when its
        restart policy and attempts allow; otherwise it is ``failed``.
        """
        info_ = error_info(error)

        def build(job: Job) -> ev.Event:
            when = retry_at(job, utcnow(), delay=retry_delay) if retry else None
            return ev.Failed(error=info_, retry_at=when)

        return await self.transition(job_id, build, **how)

    async def cancel(self, job_id: UUID | str, **how: Any) -> Job | None:
        """Cancel the job: a queued or scheduled one at once; a running one goes to
        ``cancelling`` and its worker cancels the handler. Cancelling a job that is
        already ``cancelling`` changes nothing."""

        def build(job: Job) -> ev.Event | None:
            if job.status == "cancelling":
                return None
            if job.status == "running":
                return ev.CancelRequested()
            return ev.Cancelled()

        return await self.transition(job_id, build, **how)

    async def retry(
        self, job_id: UUID | str, *, delay: float | None = None, **how: Any
    ) -> Job | None:
        """Send a failed (or cancelled) job back to the queue as a new run."""
        return await self.transition(job_id, lambda _: ev.Retried(run_at=_after(delay)), **how)

    async def rerun(
        self, job_id: UUID | str, *, delay: float | None = None, **how: Any
    ) -> Job | None:
        """Run a finished job again as a new run of the same job; its history stays."""
        return await self.transition(job_id, lambda _: ev.Rerun(run_at=_after(delay)), **how)

    async def set_label(
        self, job_id: UUID | str, label: str, *, description: str | None = None, **how: Any
    ) -> Job | None:
        """Change the job's label (and description, when given)."""
        if not label:
            raise ValueError("a label must not be empty")
        return await self.transition(
            job_id, lambda _: ev.Labelled(label=label, description=description), **how
        )

    async def set_pinned(self, job_id: UUID | str, pinned: bool = True, **how: Any) -> Job | None:
        """Pin (or unpin) the job."""
        return await self.transition(job_id, lambda _: ev.Pinned(pinned=bool(pinned)), **how)

    async def add_tags(
        self, job_id: UUID | str, tags: Iterable[str] | str, **how: Any
    ) -> Job | None:
        """Add tags to the job."""
        add = _tags(tags)
        return await self.transition(job_id, lambda _: ev.Tagged(add=add), **how)

    async def remove_tags(
        self, job_id: UUID | str, tags: Iterable[str] | str, **how: Any
    ) -> Job | None:
        """Remove tags from the job."""
        remove = _tags(tags)
        return await self.transition(job_id, lambda _: ev.Tagged(remove=remove), **how)

    async def update_context(
        self,
        job_id: UUID | str,
        values: Mapping[str, Any] | None = None,
        *,
        remove: Iterable[str] = (),
        **how: Any,
    ) -> Job | None:
        """Set context keys (``values``) and remove others (``remove``)."""
        values = json_values(dict(values or {}), what="context")
        event = ev.ContextUpdated(set=values, unset=tuple(remove))
        return await self.transition(job_id, lambda _: event, **how)

    async def add_artifact(
        self, job_id: UUID | str, artifact: ev.Artifact, **how: Any
    ) -> Job | None:
        """Publish an artifact of the running job (replacing one with the same key)."""
        event = ev.ArtifactAdded(artifact=ev.checked_artifact(artifact))
        return await self.transition(job_id, lambda _: event, **how)

    async def delete(self, job_id: UUID | str, **how: Any) -> Job | None:
        """Delete the job: a tombstone event. Its history stays; a running job must be
        cancelled first."""
        return await self.transition(job_id, lambda _: ev.Deleted(), **how)

    async def delete_where(
        self,
        *,
        actor: str | None = None,
        reason: str | None = None,
        force: bool = False,
        **filters: Any,
    ) -> int:
        """Delete every job matching ``filters`` (e.g. ``context={"dataset": "cats"}``).

        Jobs held by a worker are skipped unless ``force``. Returns how many
        were deleted; each gets its own tombstone event.
        """
        if not filters:
            raise ValueError("delete_where needs at least one filter")
        if not force:
            statuses = _statuses(filters.get("status")) or frozenset(lifecycle.Status)
            filters["status"] = sorted(statuses - lifecycle.ACTIVE)
            if not filters["status"]:
                return 0
        deleted = 0
        c = flt.compile_filters(filters)
        ids = [
            r[0]
            for r in await self.pool.fetch(
                f"SELECT id FROM jobledger.jobs WHERE {c.where}", *c.params
            )
        ]
        for start in range(0, len(ids), BULK_BATCH):
            deleted += await self.transition_many(
                ids[start : start + BULK_BATCH],
                lambda _: ev.Deleted(),
                actor=actor,
                reason=reason,
                force=force,
            )
        return deleted

    async def transition_many(
        self,
        ids: Sequence[UUID],
        build: Callable[[Job], ev.Event | None],
        **how: Any,
    ) -> int:
        """Apply ``build`` to many jobs, one statement per round; return how many moved.

        Like :meth:`transition` for each job (same lifecycle checks and audit
        fields in ``how``), but one statement for the whole batch. Jobs the
        lifecycle refuses, deleted jobs and jobs for which ``build`` returns
        ``None`` are skipped; jobs moved concurrently are reloaded and retried.
        """
        done = 0
        pending = list(ids)
        for _ in range(MAX_CONFLICT_RETRIES):
            if not pending:
                break
            states = await store.load_many(self.pool, pending)
            changes = []
            for s in states.values():
                event = None if s.deleted else build(s)
                if event is None:
                    continue
                try:
                    changes.append(self.make_change(s, event, **how))
                except InvalidTransition:
                    continue
            stored = await store.append(
                self.pool,
                changes,
                notify=store.notification((states[c.state.id], c.state) for c in changes),
            )
            done += len(stored)
            pending = [c.state.id for c in changes if c.state.id not in stored]
        return done


async def _stop_on_signals(worker: Any) -> None:
    import signal

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if worker._stopping.is_set():
                log.warning("worker_shutdown_forced", signal=signal.Signals(signum).name)
                worker.shutdown_grace = 0
                for hold in list(worker.holds.values()):
                    hold.cancel("shutdown")
            else:
                log.info("worker_shutdown_requested", signal=signal.Signals(signum).name)
                worker.stop()


class _Defaults(NamedTuple):
    """What a submission takes from its operator: read once per operator and call."""

    inputs: Callable[[Any], Any]  # checks the inputs, returns them as JSON values
    typed: bool  # whether the inputs have a type (else no inputs, None, is None)
    queue: str
    timeout: float | None
    max_attempts: int
    backoff: float
    backoff_max: float
    policy: str

    @classmethod
    def of(cls, op: Operator | OperatorInfo) -> _Defaults:
        """The defaults of a registered operator, or of one only published.

        The backoffs are the event's own default objects when equal to them,
        so that a ``job.submitted`` leaves them out (:func:`engine.events.as_default`)."""
        if isinstance(op, Operator):
            inputs, typed = op.validate_inputs, op.inputs_type is not None
            r, attempts = op.retry, op.retry.max_attempts
        else:  # known from its published info: its max_attempts, the default retry
            inputs, typed = functools.partial(to_json_value, op.name), False
            r, attempts = _PUBLISHED_RETRY, op.max_attempts
        return cls(
            inputs,
            typed,
            op.queue,
            op.timeout,
            attempts,
            ev.as_default(r.backoff, ev.RETRY_BACKOFF),
            ev.as_default(r.backoff_max, ev.RETRY_BACKOFF_MAX),
            r.restart_policy,
        )


_PUBLISHED_RETRY = RetryPolicy()
"""The retry of an operator known only from its published info, which carries
its ``max_attempts`` but not its backoff: the defaults."""


def _submission(spec: JobSpec, d: _Defaults, at: datetime, meta: ev.Meta, job_id: UUID) -> Change:
    """The change that submits ``spec`` (checked by :func:`_spec`) as job ``job_id``:
    its ``job.submitted`` event and the reducer's row.

    Raises ``ValueError`` (or :class:`InvalidInputs`) naming the bad value.
    """
    inputs = d.inputs(spec.inputs) if spec.inputs is not None or d.typed else None
    run_at, delay = spec.run_at, spec.delay
    if run_at is not None:
        if delay is not None:
            raise ValueError("give either run_at or delay, not both")
        if run_at.tzinfo is None:
            raise ValueError("run_at must be a timezone-aware datetime")
    elif delay is not None:
        if delay < 0:
            raise ValueError(f"delay must not be negative, got {delay}")
        run_at = at + timedelta(seconds=delay)
    max_attempts, timeout, policy = spec.max_attempts, spec.timeout, spec.restart_policy
    if max_attempts is not None and max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if policy is not None and policy != "never" and policy != "on_error":
        raise ValueError(f"restart_policy must be 'never' or 'on_error', got {policy!r}")
    # At most 15 keywords: CPython passes more through a dict it builds first
    # (1 us a job); the fields most jobs leave unset follow only when set.
    event = ev.Submitted(
        operator=spec.operator,
        label=spec.label or spec.operator,
        queue=spec.queue or d.queue,
        inputs=inputs,
        priority=spec.priority,
        run_at=run_at,
        max_attempts=max_attempts or d.max_attempts,
        restart_policy=policy or d.policy,
        retry_backoff=spec.retry_backoff if spec.retry_backoff is not None else d.backoff,
        retry_backoff_max=d.backoff_max,
        timeout=timeout if timeout is not None else d.timeout,
        tags=tuple(spec.tags),
        context=to_json_value(spec.operator, spec.context, what="context") if spec.context else {},
    )
    if (
        spec.description is not None
        or spec.parent_id is not None
        or spec.owner is not None
        or spec.idempotency_key is not None
    ):
        event = msgspec.structs.replace(
            event,
            description=spec.description,
            parent_id=spec.parent_id,
            owner=spec.owner,
            idempotency_key=spec.idempotency_key,
        )
    rec = ev.Recorded(job_id=job_id, version=1, event=event, recorded_at=at, meta=meta)
    return Change(apply(None, rec), rec)


def _specs(values: Iterable[JobSpec | Mapping[str, Any]]) -> builtins.list[JobSpec]:
    """The checked specs of ``submit_many``'s items, each as :func:`_spec` makes it.

    A list of plain dicts converts in one call (0.1 us a job less); when that
    fails, item by item does it again, to name the bad item (and to take a
    numpy integer as a priority, which the one call refuses)."""
    items = values if isinstance(values, builtins.list) else builtins.list(values)
    if all(type(v) is dict for v in items):
        with contextlib.suppress(msgspec.ValidationError):
            return msgspec.convert(items, builtins.list[_CheckedSpec])
    return [_spec(i, v) for i, v in enumerate(items)]


def _spec(index: int | None, value: JobSpec | Mapping[str, Any]) -> JobSpec:
    """A checked :class:`JobSpec` from one (``msgspec`` checks no types when a Struct
    is built) or from a mapping of :meth:`JobLedger.submit`'s arguments: the
    field a value does not fit is named, and an unknown key is refused.
    ``index`` is the item's place in ``submit_many`` (``None`` for ``submit``)."""
    if type(value) is dict:
        pass
    elif isinstance(value, JobSpec):
        value = msgspec.structs.asdict(value)
    elif not isinstance(value, Mapping):
        raise TypeError(
            f"submit_many item {index}: expected a JobSpec or a mapping of submit's arguments,"
            f" got {type(value).__name__}"
        )
    else:
        value = dict(value)
    priority = value.get("priority")
    if priority is not None and type(priority) is not int:  # numpy's integers and the like
        try:
            if isinstance(priority, bool):
                raise TypeError
            value = {**value, "priority": as_index(priority)}
        except TypeError:
            if index is None:  # submit's argument; an item's is named by the conversion
                raise ValueError(f"priority must be an integer, got {priority!r}") from None
    try:
        return msgspec.convert(value, _CheckedSpec)
    except msgspec.ValidationError as exc:
        where = f"item {index}: " if index is not None else ""
        unknown = sorted(str(k) for k in value if k not in JobSpec.__struct_fields__)
        if unknown:  # a misspelt key would otherwise drop its value unseen
            raise ValueError(
                f"submit_many {where}unknown key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; a job spec takes "
                f"{', '.join(JobSpec.__struct_fields__)} (actor and reason are arguments "
                "of submit_many itself)"
            ) from exc
        raise InvalidInputs(str(value.get("operator", "?")), f"{where}{exc}") from exc


def _tags(tags: Iterable[str] | str) -> tuple[str, ...]:
    """Tags to add or remove: one string is one tag; none at all is a mistake."""
    out = tuple(flt.as_list(tags))
    if not out:
        raise ValueError("give at least one tag")
    return out


def _after(delay: float | None) -> datetime | None:
    if delay is None:
        return None
    if delay < 0:
        raise ValueError(f"delay must not be negative, got {delay}")
    return utcnow() + timedelta(seconds=delay)


def progress_event(
    fraction: float | None,
    message: str | None,
    iteration: int | None,
    metrics: Mapping[str, float] | None,
) -> ev.Progressed:
    """A checked progress event (fraction in 0..1, numeric metrics)."""
    if fraction is not None and not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"progress fraction must be between 0 and 1, got {fraction}")
    clean: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        try:
            clean[str(name)] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {name!r} must be a number, got {value!r}") from None
    return ev.Progressed(
        fraction=None if fraction is None else float(fraction),
        message=message,
        iteration=iteration,
        metrics=clean,
    )
