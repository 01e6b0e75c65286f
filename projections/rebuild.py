"""Rebuilding projections from the log.

Both rebuilds write the new contents inside **one transaction**. PostgreSQL's
MVCC keeps every reader on the old rows until it commits, so queries keep
answering from the old tables during a rebuild, and switch to the new ones at
once: the "build new tables and swap" of the design.

* An async projection: its lock is taken (running batches finish first and
  later ones wait), its tables are emptied, its checkpoint reset, and the whole
  log is fed to it below the fence. The runner then continues from there.
* The ``jobs`` table: ``LOCK TABLE ... IN EXCLUSIVE MODE`` holds writers
  (readers are not blocked), every stream is folded through the reducer into
  a fresh unindexed table, which is then indexed and takes the place of
  ``jobs`` (readers wait only for that swap). Writers resume when it commits.
  Folded in several processes, the fresh table is loaded and indexed by
  other connections and committed before the swap; the swap is still one
  commit of the rebuild's transaction.

A long rebuild is a long transaction: it holds the gap-free fence back, so
other projections lag (never lose events) while it runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import msgspec

from engine.sqlfiles import Q
from projections import upcasting
from projections.job_state import JOB_FIELDS
from projections.replay import fold_log
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


# A state as the row COPY wants: the Struct's fields are the table's columns, in
# order (JOB_FIELDS is Job.__struct_fields__; tests/test_migrations.py checks
# the table against it). 80 ns a row against 400 for an attrgetter of 37.
_row = msgspec.structs.astuple
_FETCH = 10_000  # events read per round trip
_COPY_ROWS = 20_000  # rows per COPY


async def rebuild_jobs(
    pool: Any,
    *,
    progress: Progress | None = None,
    dsn: str | None = None,
    processes: int | None = 1,
) -> int:
    """Rebuild the ``jobs`` table by folding every stream through the reducer.

    The rows are folded into a fresh, unindexed ``jobs_rebuild`` and copied
    into it in batches; its indexes (read from the catalog), storage options,
    owner and grants are then built in one pass each, and it takes the place of
    ``jobs`` (drop and rename) in the same transaction. Writers wait from the
    start; readers keep reading the old rows and wait only for the swap. If
    something depends on ``jobs`` (a view, say) so that it cannot be dropped,
    or the swap deadlocks with a transaction that read ``jobs`` and then
    tried to write it, the rows are replaced from ``jobs_rebuild`` instead.
    Python's cyclic garbage collector is paused while the log is folded, and
    the connection moves timestamps as integers (see
    :func:`_timestamps_as_integers`). Returns the events folded.

    ``processes`` > 1 folds the log in that many processes at once (this one
    and child processes, each on its own connection to ``dsn``, which it then
    needs), each a range of job ids with about the same work, all reading the
    log in this rebuild's snapshot, and builds the indexes on as many
    connections. ``None`` chooses: one process per CPU, at most four, and one
    per 100,000 events (one without ``dsn``). Those connections load and
    index ``jobs_rebuild`` in transactions of their own, so that table is
    committed before the swap (and dropped if the rebuild fails or is
    cancelled); the lock, the swap and what readers see are as above. A
    stream whose events do not apply fails the rebuild with a
    :class:`StreamDoesNotReplay` (a ``ValueError``) naming the job, in any
    number of processes.
    """
    staged = False
    try:
        async with (
            pool.acquire() as conn,
            _timestamps_as_integers(conn),
            conn.transaction(),
        ):
            await conn.execute(Q.lock_jobs_for_rebuild)
            ddl = await _copy_ddl(conn)  # before the fold: an index it cannot copy fails fast
            total = await _event_count(conn)
            parts = await _parts(conn, _processes(processes, dsn, total), total)
            counted = _Counter(total, progress)
            if len(parts) == 1:
                await conn.execute(Q.jobs_rebuild_create)
                await _load(conn, None, counted.add)
                counted.finish()
                for build, _ in ddl:
                    await conn.execute(build)
            else:
                assert dsn is not None
                staged = True
                snapshot = await conn.fetchval(Q.export_snapshot)
                await _load_in_parts(dsn, snapshot, parts, ddl, counted.add)
                counted.finish()
            await _swap(conn, ddl)
        staged = False  # swapped in (renamed) or copied back (dropped)
    finally:
        if staged:
            with anyio.CancelScope(shield=True):
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute(Q.jobs_rebuild_drop)
    return counted.done


async def _load_in_parts(
    dsn: str,
    snapshot: str,
    parts: list[Bounds | None],
    ddl: list[tuple[str, str | None]],
    add: Callable[[int], None],
) -> None:
    """Fold ``parts`` at once and index the table: the first part here, the others in
    child processes, then the index builds on as many connections.

    Everything here is committed on connections of its own (to ``dsn``, not
    the pool's, which may have no more to lend): the children must see the
    table, and ``CREATE INDEX`` cannot run while the rebuild's transaction
    holds a write lock on it. The rebuild's own transaction touches the table
    only to analyze and swap it.
    """
    from engine.postgres import connect

    conns: list[Any] = []
    try:
        for _ in parts:
            conns.append(await connect(dsn))
        await conns[0].execute(Q.jobs_rebuild_create)
        # Constraints, options, owner and grants change the table (an exclusive
        # lock): one at a time. Index builds share the table: all at once.
        builds = [b for b, _ in ddl if b.startswith("CREATE ")]

        async def builder(conn: Any) -> None:
            while builds:
                await conn.execute(builds.pop(0))

        try:
            async with anyio.create_task_group() as tg:
                for bounds in parts[1:]:
                    tg.start_soon(_run_part, dsn, snapshot, bounds, add)
                await _load_part(conns[0], snapshot, parts[0], add)
            for build, _ in ddl:
                if build not in builds:
                    await conns[0].execute(build)
            async with anyio.create_task_group() as tg:
                for conn in conns:
                    tg.start_soon(builder, conn)
        except BaseExceptionGroup as group:  # the first failure, as one process raises it
            raise _first(group) from None
    finally:
        with anyio.CancelScope(shield=True):
            for conn in conns:
                if conn.is_in_transaction():  # interrupted: its work is not wanted
                    conn.terminate()
                else:
                    await conn.close(timeout=10)


def _first(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


class _Counter:
    """Events folded so far, by every process, reported to ``progress``."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self._progress = total, 0, progress

    def add(self, events: int) -> None:
        self.done += events
        if self._progress:
            self._progress(self.done, self.total)

    def finish(self) -> None:
        if self._progress:
            self._progress(self.done, self.total)


_EVENTS_PER_PROCESS = 100_000  # below this a child's start (~0.4 s) costs what it saves
_MAX_PROCESSES = 4


def _processes(processes: int | None, dsn: str | None, total: int) -> int:
    unloadable = upcasting.loadable()
    if processes is None:
        if dsn is None or unloadable:
            return 1
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(cpus or 1, _MAX_PROCESSES, total // _EVENTS_PER_PROCESS))
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be a positive integer or None, got {processes!r}")
    if processes > 1 and dsn is None:
        raise ValueError("a rebuild in several processes needs dsn= (each process connects)")
    if processes > 1 and unloadable:
        raise ValueError(
            f"the upcaster {unloadable} cannot be loaded in another process:"
            " define it at a module's top level, or rebuild in one process"
        )
    return processes


Bounds = tuple[UUID, UUID | None]  # job ids from [0] (included) to [1] (excluded; None: the end)
_FIRST_ID = UUID(int=0)


async def _parts(conn: Any, processes: int, total: int) -> list[Bounds | None]:
    """The ranges of job ids the processes fold: ``[None]`` (everything) for one."""
    if processes == 1 or total == 0:
        return [None]
    sample = min(100.0, 100.0 * 50_000 / total)  # ~50,000 events: quantiles to ~1%
    cuts = await conn.fetchval(Q.jobs_rebuild_parts, processes, sample)
    cuts = sorted({c for c in cuts or () if c is not None})
    if not cuts:
        return [None]
    starts = [_FIRST_ID, *cuts]
    return [(lo, hi) for lo, hi in zip(starts, [*cuts, None], strict=True)]


async def _load(conn: Any, bounds: Bounds | None, add: Callable[[int], None]) -> int:
    """Fold the streams in ``bounds`` (all of them for ``None``) into ``jobs_rebuild``.

    The cursor and the COPY share the connection: the folded rows wait in a
    list for their COPY between batches. Returns the events read.
    """
    if bounds is None:
        args: tuple[Any, ...] = (Q.stream_all_events,)
    elif bounds[1] is None:
        args = (Q.stream_events_from, bounds[0])
    else:
        args = (Q.stream_events_between, *bounds)
    done = 0
    rows: list[tuple[Any, ...]] = []
    with _collector_paused():
        async with contextlib.aclosing(fold_log(conn, _FETCH, *args)) as batches:
            async for events, finished in batches:
                for job_id, state, error in finished:
                    if error is not None:
                        raise _does_not_replay(job_id, error) from error
                    rows.append(_row(state))
                done += events
                if len(rows) >= _COPY_ROWS:
                    await _copy(conn, rows)
                if events:
                    add(events)
        await _copy(conn, rows)
    return done


class StreamDoesNotReplay(ValueError):
    """A job's events do not fold through the reducer; the rebuild changed nothing."""


def _does_not_replay(job_id: UUID, error: Exception) -> StreamDoesNotReplay:
    return StreamDoesNotReplay(
        f"job {job_id}: its events do not replay ({type(error).__name__}: {error});"
        " the jobs table was left as it was"
    )


# -- the other processes of a rebuild ------------------------------------------

_SNAPSHOT = re.compile(r"^[0-9A-F]+(-[0-9A-F]+)+$")
# The child imports this very package first (a `projections` of the caller's,
# in its working directory, must not stand in for it).
_ROOT = str(Path(__file__).resolve().parent.parent)
_PART = (
    f"import sys; sys.path.insert(0, {_ROOT!r});"
    " from projections.rebuild import part_main; part_main()"
)


async def _run_part(
    dsn: str | None, snapshot: str, bounds: Bounds | None, add: Callable[[int], None]
) -> None:
    """Fold one part of the log in a child process; relay its progress; raise its failure.

    The child gets its orders on stdin (the DSN is not put on a command line)
    and reports on stdout: ``+N`` per batch of N events, then ``done N``, or
    ``error MESSAGE`` for a stream that does not replay. It is killed if this
    rebuild fails or is cancelled first.
    """
    assert bounds is not None
    orders = json.dumps(
        {
            "dsn": dsn,
            "snapshot": snapshot,
            "from": str(bounds[0]),
            "to": bounds[1] and str(bounds[1]),
            "upcasters": upcasting.registered(),
            "path": [str(p) for p in sys.path],  # where the upcasters' modules were found
        }
    ).encode()
    proc = await anyio.open_process(
        [sys.executable, "-c", _PART],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    errors = bytearray()
    failure: str | None = None
    try:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            await proc.stdin.send(orders)
            await proc.stdin.aclose()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # it ended before reading them: its exit status and stderr say why

        async def drain_stderr() -> None:
            async for chunk in proc.stderr:  # type: ignore[union-attr]
                errors.extend(chunk[: max(0, 20_000 - len(errors))])

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain_stderr)
            pending = b""
            async for chunk in proc.stdout:
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if line.startswith(b"+"):
                        add(int(line[1:]))
                    elif line.startswith(b"error "):
                        failure = json.loads(line[6:])
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.wait()
    if failure is not None:
        raise StreamDoesNotReplay(failure)
    if code != 0:
        tail = errors.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {code}"]
        raise RuntimeError(f"a process of the jobs rebuild failed: {tail[0]}")


def part_main() -> None:
    """A child process's part of a rebuild (see :func:`_run_part`)."""
    orders = json.loads(sys.stdin.buffer.read())
    sys.path[:] = [_ROOT, *orders["path"], *(p for p in sys.path if p not in orders["path"])]
    out = sys.stdout

    def add(events: int) -> None:
        out.write(f"+{events}\n")
        out.flush()

    try:
        done = anyio.run(_part, orders, add)
    except StreamDoesNotReplay as exc:
        out.write(f"error {json.dumps(str(exc))}\n")
        out.flush()
        sys.exit(2)
    out.write(f"done {done}\n")


async def _part(orders: dict[str, Any], add: Callable[[int], None]) -> int:
    from engine.postgres import connect

    upcasting.load(orders["upcasters"])  # the parent's, so the log decodes the same here
    bounds = (UUID(orders["from"]), orders["to"] and UUID(orders["to"]))
    conn = await connect(orders["dsn"])
    try:
        return await _load_part(conn, orders["snapshot"], bounds, add)
    finally:
        await conn.close()


async def _load_part(
    conn: Any, snapshot: str, bounds: Bounds | None, add: Callable[[int], None]
) -> int:
    """Load one part into ``jobs_rebuild`` and commit, reading the log in ``snapshot``."""
    if not _SNAPSHOT.match(snapshot):
        raise ValueError(f"not a snapshot id: {snapshot!r}")
    async with _timestamps_as_integers(conn), conn.transaction(isolation="repeatable_read"):
        await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
        return await _load(conn, bounds, add)


_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)  # PostgreSQL's timestamp zero
_INFINITY, _NEG_INFINITY = 2**63 - 1, -(2**63)
_timedelta = dt.timedelta


_REMEMBERED = 65_536  # distinct timestamps a codec remembers before it starts over


def _timestamp_encoder() -> Callable[[dt.datetime], tuple[int]]:
    """A datetime -> ``(microseconds since 2000-01-01 UTC,)``, remembering its results.

    A log's timestamps repeat: a new job's ``created_at``, ``updated_at`` and
    ``status_changed_at`` are its event's time, and the jobs of one batch
    (a ``submit_many``, a claim, an outcome write) share that time. Equal
    datetimes (the same instant) encode alike, so each distinct one is
    computed once (up to :data:`_REMEMBERED` of them, then afresh): 0.9 us
    less client time a row of the COPY than remembering only the last
    object. Naive datetimes are read as local time, as asyncpg does.
    """
    known: dict[dt.datetime, tuple[int]] = {}

    def encode(value: dt.datetime) -> tuple[int]:
        out = known.get(value)
        if out is None:
            try:
                delta = value - _EPOCH
            except TypeError:
                delta = value.astimezone(dt.UTC) - _EPOCH
            out = (delta.days * 86_400_000_000 + delta.seconds * 1_000_000 + delta.microseconds,)
            if len(known) >= _REMEMBERED:
                known.clear()
            known[value] = out
        return out

    return encode


def _timestamp_decode(value: tuple[int]) -> dt.datetime:
    """``(microseconds,)`` -> an aware UTC datetime; infinities as asyncpg gives them."""
    try:
        return _EPOCH + _timedelta(0, 0, value[0])
    except OverflowError:
        if value[0] == _INFINITY:
            return dt.datetime.max
        if value[0] == _NEG_INFINITY:
            return dt.datetime.min
        raise


def _timestamp_decoder() -> Callable[[tuple[int]], dt.datetime]:
    """:func:`_timestamp_decode`, remembering its results (see :func:`_timestamp_encoder`):
    the events of one batch then share one datetime, which is immutable."""
    known: dict[int, dt.datetime] = {}

    def decode(value: tuple[int]) -> dt.datetime:
        out = known.get(value[0])
        if out is None:
            out = _timestamp_decode(value)
            if len(known) >= _REMEMBERED:
                known.clear()
            known[value[0]] = out
        return out

    return decode


@contextlib.asynccontextmanager
async def _timestamps_as_integers(conn: Any) -> AsyncIterator[None]:
    """Move ``timestamptz`` values as integers on ``conn`` for the rebuild's duration.

    asyncpg's own encoder spent about 0.7 us per timestamp (a time-zone
    conversion and a subtraction, with infinity checks), two thirds of the
    COPY's client time; this one is plain arithmetic on the same datetimes,
    done once per distinct value each way. The codec is set outside the rebuild's
    transaction and put back after it; a connection whose codec cannot be put
    back is closed rather than returned to the pool as it is.
    """
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=_timestamp_encoder(),
        decoder=_timestamp_decoder(),
        format="tuple",
    )
    try:
        yield
    finally:
        try:
            await conn.reset_type_codec("timestamptz", schema="pg_catalog")
        except BaseException:
            conn.terminate()
            raise


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while the log is folded.

    The fold makes millions of short-lived objects and no reference cycles;
    the collections they trigger were about a tenth of a rebuild's time.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def _copy(conn: Any, rows: list[tuple[Any, ...]]) -> None:
    if rows:
        await conn.copy_records_to_table(
            "jobs_rebuild", schema_name="jobledger", records=rows, columns=list(JOB_FIELDS)
        )
        rows.clear()


async def _copy_ddl(conn: Any) -> list[tuple[str, str | None]]:
    """The statements that make ``jobs_rebuild`` a copy of ``jobs`` (see the query)."""
    ddl = [(r["build"], r["rename"]) for r in await conn.fetch(Q.jobs_rebuild_ddl)]
    for build, _ in ddl:
        if " ON jobledger.jobs USING " in build:  # a definition the rewrite did not match
            raise RuntimeError(f"cannot copy this index of jobledger.jobs: {build}")
    return ddl


async def _swap(conn: Any, ddl: list[tuple[str, str | None]]) -> None:
    """Analyze the indexed ``jobs_rebuild`` and put it in the place of ``jobs``."""
    import asyncpg

    await conn.execute(Q.jobs_rebuild_analyze)
    try:
        async with conn.transaction():  # a savepoint: a refused DROP leaves jobs as it was
            await conn.execute(Q.jobs_rebuild_swap)
            for _, rename in ddl:
                if rename is not None:
                    await conn.execute(rename)
    except (asyncpg.DependentObjectsStillExistError, asyncpg.DeadlockDetectedError):
        # Something depends on jobs, or a transaction that read jobs now waits
        # to write it (behind this rebuild's lock, while the swap waited for
        # its read): replacing the rows in place needs neither the drop nor
        # the exclusive lock, so the folded rows are kept either way.
        await conn.execute(Q.jobs_rebuild_copy_back)
