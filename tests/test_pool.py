"""The connection pool (engine/pool.py): bounded, fair, never lends a broken connection twice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from engine.pool import Pool, PoolClosed
from engine.postgres import connect, create_pool


@contextlib.asynccontextmanager
async def opened(db: str, **size: int) -> AsyncIterator[Pool]:
    """A pool on ``db``, closed at the end within 5 s: a connection the pool lost
    track of (still counted as lent) fails the test instead of hanging it."""
    pool = await create_pool(db, **size)
    try:
        yield pool
    finally:
        await asyncio.wait_for(pool.close(), 5)


async def backend_pids(pool: Pool, n: int) -> set[int]:
    """The server pids of ``n`` connections lent at once."""
    leases = [pool.acquire() for _ in range(n)]
    conns = [await lease.__aenter__() for lease in leases]
    try:
        return {c.get_server_pid() for c in conns}
    finally:
        for lease in leases:
            await lease.__aexit__(None, None, None)


async def test_never_more_than_max_size_and_waiters_are_served_in_order(db: str) -> None:
    async with opened(db, min_size=1, max_size=2) as pool:
        held = [await pool.acquire() for _ in range(2)]
        assert pool.get_size() == 2
        served: list[int] = []

        async def borrower(i: int) -> None:
            async with pool.acquire() as conn:
                served.append(i)
                await conn.fetchval("SELECT 1")

        tasks = [asyncio.create_task(borrower(i)) for i in range(5)]
        await asyncio.sleep(0.05)
        assert served == []  # all five wait: both connections are lent
        for conn in held:
            await pool.release(conn)
        await asyncio.gather(*tasks)
        assert served == [0, 1, 2, 3, 4]
        assert pool.get_size() == 2
        assert pool.get_idle_size() == 2


async def test_a_killed_connection_is_replaced(db: str) -> None:
    admin = await connect(db)
    try:
        async with opened(db, min_size=2, max_size=2) as pool:
            before = await backend_pids(pool, 2)
            await admin.execute(
                "SELECT pg_terminate_backend(p) FROM unnest($1::int[]) AS p", before
            )
            await asyncio.sleep(0.2)  # the client notices the closed sockets
            assert await pool.fetchval("SELECT 41 + 1") == 42
            after = await backend_pids(pool, 2)
            assert after.isdisjoint(before)
            assert pool.get_size() == 2
    finally:
        await admin.close()


async def test_a_connection_left_in_a_transaction_is_not_lent_again(db: str) -> None:
    admin = await connect(db)
    try:
        async with opened(db, min_size=1, max_size=1) as pool:
            async with pool.acquire() as conn:
                leaked = conn.get_server_pid()
                await conn.execute("BEGIN")
                await conn.execute("SELECT txid_current()")
            async with pool.acquire() as conn:
                assert conn.get_server_pid() != leaked
                assert not conn.is_in_transaction()
        await asyncio.sleep(0.2)
        left = await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", leaked)
        assert left == 0  # terminated, not left idle in transaction
    finally:
        await admin.close()


async def test_a_connection_with_an_unfinished_transaction_block_is_not_lent_again(
    db: str,
) -> None:
    # asyncpg's transaction block outlived the server's transaction (here a
    # ROLLBACK past it; in a run, a block whose BEGIN was cancelled): the
    # server is idle, but the next `conn.transaction(...)` would be taken for
    # a nested one ("nested transaction has a different isolation level").
    async with opened(db, min_size=1, max_size=1) as pool:
        async with pool.acquire() as conn:
            stale = conn.get_server_pid()
            await conn.transaction().start()
            await conn.execute("ROLLBACK")
            assert not conn.is_in_transaction()
        async with pool.acquire() as conn:
            assert conn.get_server_pid() != stale
            async with conn.transaction(readonly=True, isolation="repeatable_read"):
                assert await conn.fetchval("SHOW transaction_isolation") == "repeatable read"


async def test_a_cancelled_waiter_takes_nothing_with_it(db: str) -> None:
    async with opened(db, min_size=1, max_size=1) as pool:
        conn = await pool.acquire()
        waiter = asyncio.create_task(pool.fetchval("SELECT 1"))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await pool.release(conn)
        assert pool.get_idle_size() == 1
        async with asyncio.timeout(2):
            assert await pool.fetchval("SELECT 2") == 2


async def test_a_connection_handed_to_a_waiter_being_cancelled_is_passed_on(db: str) -> None:
    """The connection is handed over, and the waiter is cancelled before it resumes."""
    async with opened(db, min_size=1, max_size=1) as pool:
        conn = await pool.acquire()
        first = asyncio.create_task(pool.fetchval("SELECT 'first'"))
        second = asyncio.create_task(pool.fetchval("SELECT 'second'"))
        await asyncio.sleep(0.05)
        await pool.release(conn)  # handed to `first`, which has not run yet
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        async with asyncio.timeout(2):
            assert await second == "second"
        assert pool.get_size() == 1


async def test_a_cancelled_query_leaves_the_connection_usable(db: str) -> None:
    async with opened(db, min_size=1, max_size=1) as pool:
        with pytest.raises(TimeoutError):
            await pool.fetchval("SELECT pg_sleep(10)", timeout=0.1)
        async with asyncio.timeout(5):
            assert await pool.fetchval("SELECT 3") == 3
        assert pool.get_size() == 1


async def test_close_waits_for_lent_connections_then_refuses_loans(db: str) -> None:
    pool = await create_pool(db, min_size=1, max_size=2)
    conn = await pool.acquire()
    closing = asyncio.create_task(pool.close())
    await asyncio.sleep(0.05)
    assert not closing.done()
    assert await conn.fetchval("SELECT 4") == 4  # still the borrower's to use
    await pool.release(conn)
    await asyncio.wait_for(closing, 5)
    assert conn.is_closed()
    with pytest.raises(PoolClosed):
        await pool.fetchval("SELECT 1")


async def test_a_failed_connect_gives_its_place_back(db: str) -> None:
    """The server refuses connections for a while: callers get the error, the pool keeps
    no phantom connection, and it opens real ones again once the server answers."""
    refusing = False

    async def flaky() -> asyncpg.Connection:
        if refusing:
            raise ConnectionRefusedError("the server is down (for this test)")
        return await connect(db)

    pool = await Pool(flaky, min_size=0, max_size=1).start()
    try:
        refusing = True
        with pytest.raises(ConnectionRefusedError):
            await pool.fetchval("SELECT 1")
        assert pool.get_size() == 0
        refusing = False
        conn = await pool.acquire()  # the one place: a waiter queues behind it
        waiter = asyncio.create_task(pool.fetchval("SELECT 'waited'"))
        await asyncio.sleep(0.05)
        refusing = True
        conn.terminate()  # comes back closed: its place goes to the waiter, who connects
        await pool.release(conn)
        with pytest.raises(ConnectionRefusedError):
            await waiter
        assert pool.get_size() == 0
        refusing = False
        async with asyncio.timeout(5):
            assert await pool.fetchval("SELECT 5") == 5
        assert pool.get_size() == 1
    finally:
        await asyncio.wait_for(pool.close(), 5)


async def test_a_bounded_close_terminates_a_loan_that_never_ends(db: str) -> None:
    pool = await create_pool(db, min_size=1, max_size=2)
    forgotten = await pool.acquire()  # never released
    async with asyncio.timeout(5):
        await pool.close(timeout=0.2)
    assert forgotten.is_closed()
    with pytest.raises(PoolClosed):
        await pool.fetchval("SELECT 1")
