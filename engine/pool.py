"""The connection pool: asyncpg connections lent to one caller at a time.

Why not ``asyncpg.Pool``
------------------------

jobledger makes one statement per API call (a submit, a ``get``, a
transition) and a worker makes one transaction per claim and one statement per
batch of outcomes, so whatever a pool costs per loan is paid on every call.
asyncpg's pool costs about 50 us of client CPU per loan on our machines,
against ~130 us for the whole of a single ``submit`` on a held connection
(``python -m bench.pool`` measures it): it returns every connection through
``asyncio.shield`` (a task, and two more turns of the event loop, per
release), re-arms an inactivity timer per release, wraps each loan in a
proxy object, and runs its reset coroutines. This pool does none of that. A
loan of an idle connection is a list pop and a push, with no task, timer or
await of its own.

How it lends
------------

* Idle connections are lent last-in first-out. When none is idle and fewer
  than ``max_size`` exist, a new one is opened (``min_size`` are opened by
  :meth:`Pool.start`); otherwise the caller waits, first come first served,
  and a returned connection goes straight to the longest waiter.
* A connection that comes back **closed** (the server or the network dropped
  it) is forgotten, and its place goes to the next waiter, who opens a new
  one. Connection failures reach the caller as asyncpg raises them (see
  :data:`engine.postgres.DB_ERRORS`), so the retry paths that catch those
  keep working.
* A connection that comes back **inside a transaction** (a manual ``BEGIN``
  never ended, or a rollback interrupted by cancellation) is terminated, not
  rolled back: rolling back needs an await that a cancelled caller cannot
  make, and a new connection costs little beside a leaked transaction that
  would hold locks and the projections' fence back. So is one on which
  asyncpg still counts a ``conn.transaction()`` block as open when the
  server's transaction is over (a block whose ``BEGIN`` was cancelled): its
  next transaction block would be refused as a nested one.
* A connection whose query was **cancelled** comes back as it is: asyncpg
  makes its next operation wait until the server has confirmed the
  cancellation.
* Nothing else is reset. jobledger leaves no session state on pooled
  connections (transaction-scoped advisory locks, ``set_config(..., true)``,
  LISTEN on a connection of its own); code that borrows ``ledger.pool`` must
  do the same. A connection is the borrower's only inside its
  ``async with pool.acquire()`` block (there is no proxy to stop a stale
  reference from using it after).

:meth:`Pool.close` waits until every lent connection is back, then closes all
of them gracefully, as asyncpg's pool does; given a ``timeout``, it then
terminates whatever is still lent (``JobLedger`` closes with 10 s).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any

import anyio
import asyncpg
import structlog

log = structlog.get_logger("jobledger")

Connect = Callable[[], Awaitable[asyncpg.Connection]]


class PoolClosed(asyncpg.InterfaceError):
    """The pool is closing or closed: no connection can be lent."""


class Pool:
    """A pool of at most ``max_size`` connections, each made by ``connect()``.

    ``connect`` opens one connection, ready to use (codecs installed). Use
    :meth:`acquire` for a transaction or several statements, and the
    one-statement shortcuts (:meth:`fetch`, :meth:`fetchrow`, :meth:`fetchval`,
    :meth:`execute`, :meth:`executemany`) otherwise.
    """

    def __init__(self, connect: Connect, *, min_size: int = 1, max_size: int = 10) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        if not 0 <= min_size <= max_size:
            raise ValueError(f"min_size must be between 0 and max_size, got {min_size}")
        self._connect = connect
        self.min_size = min_size
        self.max_size = max_size
        self._idle: list[asyncpg.Connection] = []
        # Each waiter gets a connection, or None: "a place is free, open one".
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._size = 0  # connections open or being opened, lent or idle
        self._lent: set[asyncpg.Connection] = set()  # so that a hard stop reaches them
        self._closing = False
        self._closed = False
        self._all_back: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> Pool:
        """Open ``min_size`` connections; raise the first failure (and open none)."""
        self._size += self.min_size
        results = await asyncio.gather(
            *(self._connect() for _ in range(self.min_size)), return_exceptions=True
        )
        opened = [r for r in results if isinstance(r, asyncpg.Connection)]
        failures = [r for r in results if not isinstance(r, asyncpg.Connection)]
        if failures:
            self._size -= self.min_size
            for conn in opened:
                conn.terminate()
            raise failures[0]
        self._idle.extend(opened)
        return self

    async def close(self, *, timeout: float | None = None) -> None:
        """Wait for every lent connection to come back, then close them all.

        With ``timeout``, connections still lent after that many seconds are
        terminated (and the pool with them), and ``pool_close_timed_out``
        names how many: a loan that never ends must not keep a process from
        exiting.
        """
        if self._closed:
            return
        self._closing = True
        try:
            for fut in self._waiters:
                if not fut.done():
                    fut.set_exception(PoolClosed("the connection pool is closing"))
            self._waiters.clear()
            with anyio.move_on_after(math.inf if timeout is None else timeout) as waiting:
                while self._lent:
                    self._all_back = asyncio.Event()
                    await self._all_back.wait()
            if waiting.cancelled_caught:
                log.warning("pool_close_timed_out", lent=len(self._lent), timeout=timeout)
                self.terminate()
                return
            idle, self._idle = self._idle, []
            await asyncio.gather(*(self._close_one(c) for c in idle))
        except BaseException:
            self.terminate()
            raise
        finally:
            self._closed = True

    def terminate(self) -> None:
        """Close every connection at once, lent ones too, without a goodbye to the server."""
        self._closing = self._closed = True
        idle, self._idle = self._idle, []
        for conn in [*idle, *self._lent]:
            conn.terminate()
        self._size -= len(idle)

    async def _close_one(self, conn: asyncpg.Connection) -> None:
        self._size -= 1
        try:
            await conn.close(timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            conn.terminate()

    # -- lending ---------------------------------------------------------------

    def acquire(self) -> Lease:
        """A connection for ``async with pool.acquire() as conn:`` (or ``await``, then
        :meth:`release`)."""
        return Lease(self)

    async def release(self, conn: asyncpg.Connection) -> None:
        """Give back a connection taken with ``conn = await pool.acquire()``."""
        self._give_back(conn)

    def _take_idle(self) -> asyncpg.Connection | None:
        if self._closing:
            return None  # _take raises PoolClosed
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.is_closed():
                self._lent.add(conn)
                return conn
            self._size -= 1
        return None

    async def _take(self) -> asyncpg.Connection:
        if self._closing:
            raise PoolClosed("the connection pool is closed")
        conn = self._take_idle()
        if conn is not None:
            return conn
        if self._size < self.max_size:
            self._size += 1
            return await self._open()
        fut: asyncio.Future[asyncpg.Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            got = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Handed a connection (or a place) just as we were cancelled: pass it on.
                handed = fut.result()
                if handed is None:
                    self._size -= 1
                    self._place_freed()
                else:
                    self._give_back(handed)
            raise
        if got is None:  # a place was freed for us (its size already counted)
            return await self._open()
        return got

    async def _open(self) -> asyncpg.Connection:
        """Open a connection whose place is already counted in ``_size``."""
        try:
            conn = await self._connect()
        except BaseException:
            self._size -= 1
            self._place_freed()
            raise
        if self._closing:
            self._size -= 1
            conn.terminate()
            raise PoolClosed("the connection pool closed while a connection was opening")
        self._lent.add(conn)
        return conn

    def _give_back(self, conn: asyncpg.Connection) -> None:
        self._lent.discard(conn)
        closed = conn.is_closed()  # a closed connection has no transaction state to ask
        left_in_transaction = not closed and (conn.is_in_transaction() or _open_block(conn))
        if closed or left_in_transaction or self._closed:
            if not closed:
                if left_in_transaction:
                    log.warning("pool_connection_left_in_transaction", action="terminated")
                conn.terminate()
            self._size -= 1
            self._place_freed()
        elif (fut := self._next_waiter()) is not None:
            self._lent.add(conn)
            fut.set_result(conn)
        else:
            self._idle.append(conn)
        if not self._lent and self._all_back is not None:
            self._all_back.set()

    def _place_freed(self) -> None:
        """A connection went away: the longest waiter may open a new one."""
        if (fut := self._next_waiter()) is not None:
            self._size += 1
            fut.set_result(None)

    def _next_waiter(self) -> asyncio.Future[asyncpg.Connection | None] | None:
        """The longest waiter still waiting (cancelled ones are dropped on the way)."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                return fut
        return None

    # -- one statement ---------------------------------------------------------

    async def _one(self, method: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
        """Run one connection method on a lent connection, and give it back."""
        conn = self._take_idle() or await self._take()
        try:
            return await method(conn, *args, **kw)
        finally:
            self._give_back(conn)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """Run ``query`` on a lent connection; all its rows."""
        return await self._one(asyncpg.Connection.fetch, query, *args, timeout=timeout)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        """Run ``query`` on a lent connection; its first row or ``None``."""
        return await self._one(asyncpg.Connection.fetchrow, query, *args, timeout=timeout)

    async def fetchval(
        self, query: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any:
        """Run ``query`` on a lent connection; one value of its first row, or ``None``."""
        return await self._one(
            asyncpg.Connection.fetchval, query, *args, column=column, timeout=timeout
        )

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        """Run ``query`` on a lent connection; its status tag."""
        return await self._one(asyncpg.Connection.execute, query, *args, timeout=timeout)

    async def executemany(self, query: str, args: Any, *, timeout: float | None = None) -> None:
        """Run ``query`` once per argument tuple, on one lent connection."""
        await self._one(asyncpg.Connection.executemany, query, args, timeout=timeout)

    # -- introspection ---------------------------------------------------------

    def get_size(self) -> int:
        """Connections open or opening, lent or idle."""
        return self._size

    def get_idle_size(self) -> int:
        """Connections idle in the pool."""
        return len(self._idle)


class Lease:
    """One loan of a connection: ``async with pool.acquire() as conn``."""

    __slots__ = ("_conn", "_pool")

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        pool = self._pool
        self._conn = pool._take_idle() or await pool._take()
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._give_back(conn)

    def __await__(self) -> Generator[Any, None, asyncpg.Connection]:
        return self._pool._take().__await__()


def _open_block(conn: asyncpg.Connection) -> bool:
    """Whether asyncpg still counts a ``conn.transaction()`` block as open on ``conn``.

    It can outlive the server's transaction (a block whose ``BEGIN`` was
    cancelled, a ``ROLLBACK`` run past it); the server is then idle, but the
    next ``conn.transaction(isolation=...)`` on the connection would be taken
    for a nested block and refused. asyncpg keeps the mark in a private
    attribute, read here with a default so that a release without it is
    judged by the server's state alone.
    """
    return getattr(conn, "_top_xact", None) is not None
