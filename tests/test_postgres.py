"""Server resolution, the settings of jobledger's connections, and the errors a user sees
when the server is not there."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest

from engine import DatabaseUnavailable, JobLedger, Worker
from engine.postgres import RECV_BYTES, connect, describe_dsn, retry_dropped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_unreachable_dsn_is_one_clear_line() -> None:
    port = _free_port()
    with pytest.raises(DatabaseUnavailable) as err:
        async with JobLedger(f"postgresql://postgres@127.0.0.1:{port}/jobs"):
            pass
    text = str(err.value)
    assert f"127.0.0.1:{port} (database jobs)" in text
    assert "\n" not in text


def test_describe_dsn_never_shows_the_password() -> None:
    remote = describe_dsn("postgresql://u:secret@db.internal:6543/app")
    assert remote == "db.internal:6543 (database app)"
    local = describe_dsn("postgresql://postgres:@/jobledger?host=/tmp/x")
    assert local == "/tmp/x (database jobledger)"


async def test_startup_statements_survive_a_dropped_connection(db: str) -> None:
    """A connection killed under the first statements of a ledger and a worker
    (migrate, publish operators, register) is retried, not fatal."""
    async with JobLedger(db) as admin:
        kills = 0

        async def kill_the_others() -> None:
            nonlocal kills
            for _ in range(200):
                kills += await admin.pool.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = 'victim'"
                )
                await anyio.sleep(0.005)

        other = JobLedger(db, application_name="victim")

        @other.operator("noop")
        async def noop(ctx: object) -> None:
            return None

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_the_others)
            async with other:
                await Worker(other, burst=True).run()
            tg.cancel_scope.cancel()
        assert kills > 0
        assert [o.name for o in await admin.operators()] == ["noop"]
        assert len(await admin.pool.fetch("SELECT 1 FROM jobledger.workers")) == 1


def _with_query(dsn: str, extra: str) -> str:
    parts = urlsplit(dsn)
    return parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra).geturl()


async def test_the_dsn_sets_durability_for_every_connection(db: str) -> None:
    """The README's lower-durability opt-in is a server setting in the DSN:
    jobledger's own connection settings must pass it through, not replace it."""
    plain = await asyncpg.connect(db)
    try:
        server_default = await plain.fetchval("SHOW synchronous_commit")
    finally:
        await plain.close()
    async with JobLedger(db) as default:
        assert await default.pool.fetchval("SHOW synchronous_commit") == server_default
    relaxed = JobLedger(_with_query(db, "synchronous_commit=off"), min_connections=2)
    seen: list[str] = []

    @relaxed.operator("noop")
    async def noop(ctx: object) -> None:
        seen.append(await relaxed.pool.fetchval("SHOW synchronous_commit"))

    async with relaxed:
        async with relaxed.pool.acquire() as a, relaxed.pool.acquire() as b:
            assert [await c.fetchval("SHOW synchronous_commit") for c in (a, b)] == ["off"] * 2
        assert await relaxed.pool.fetchval("SHOW application_name") == "jobledger"
        job = await relaxed.submit("noop")
        await Worker(relaxed, burst=True).run()
        assert (await relaxed.get(job.id)).status == "completed"
    assert seen == ["off"]


def _recv_size(conn: asyncpg.Connection) -> int | None:
    return getattr(conn._transport, "max_size", None)  # type: ignore[attr-defined]


async def test_every_connection_reads_replies_whole_in_heap_sized_chunks(db: str) -> None:
    """The pool's connections and :func:`connect`'s (the listener's, the rebuild's
    parts') read at most RECV_BYTES a call (asyncio's 256 KiB buffer is mapped
    afresh per reply), and a reply many times that size arrives whole, in order."""
    plain = await asyncpg.connect(db)
    try:
        default = _recv_size(plain)
    finally:
        await plain.close()
    assert default is not None and default > RECV_BYTES  # else there is nothing to bound
    async with JobLedger(db) as ledger:
        async with ledger.pool.acquire() as conn:
            assert _recv_size(conn) == RECV_BYTES
            text = await conn.fetchval("SELECT repeat('0123456789', 100000)")
            assert text == "0123456789" * 100_000  # 1 MB: 16 reads or more
            rows = await conn.fetch("SELECT g, md5(g::text) FROM generate_series(1, 20000) AS g")
            assert [r[0] for r in rows] == list(range(1, 20_001))
    own = await connect(db)
    try:
        assert _recv_size(own) == RECV_BYTES
    finally:
        await own.close()


async def test_retry_dropped_gives_up_after_its_window() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionResetError("dropped")
        return "ok"

    assert await retry_dropped(flaky, what="test") == "ok" and calls == 3

    async def down() -> None:
        raise ConnectionRefusedError("down")

    with pytest.raises(ConnectionRefusedError):
        await retry_dropped(down, what="test", within=0.3)
