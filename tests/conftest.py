"""Test harness: a real PostgreSQL, a migrated template, one fresh database per test.

The server is ``JOBLEDGER_TEST_DSN`` when set, else a Docker container via
testcontainers when a Docker engine answers, else the embedded server (in a
temporary home). Migrations are applied once to a template database; each test
gets ``CREATE DATABASE ... TEMPLATE`` of it.

**The invariant.** Every test database is verified when the test ends: the
whole log is replayed through the reducer and compared with the ``jobs`` table
(and every other projection). Any difference fails the test. The only way for
a test to get a database is the ``db`` fixture, which does this.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
import pytest

from engine import JobLedger
from engine.postgres import connect, embedded_dsn, migrate
from projections.replay import summarize, verify_all


@dataclass(frozen=True)
class Server:
    """A PostgreSQL server for the session: how to reach it, and what it is."""

    admin_dsn: str
    kind: str

    def dsn(self, database: str) -> str:
        """The DSN of ``database`` on this server."""
        return urlsplit(self.admin_dsn)._replace(path=f"/{database}").geturl()


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:  # any failure means "no usable Docker engine"
        return False


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The session's PostgreSQL server."""
    dsn = os.environ.get("JOBLEDGER_TEST_DSN")
    if dsn:
        yield Server(dsn, "dsn")
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield Server(pg.get_connection_url(), "docker")
        return
    home = tmp_path_factory.mktemp("jl")
    yield Server(Server(embedded_dsn(home), "").dsn("postgres"), "embedded")


_counter = itertools.count()
_SESSION = uuid.uuid4().hex[:8]


async def _quoted(conn: asyncpg.Connection, name: str) -> str:
    return await conn.fetchval("SELECT quote_ident($1)", name)


@pytest.fixture(scope="session")
async def template(server: Server) -> AsyncIterator[str]:
    """A database with every migration applied, used as the template of each test's."""
    name = f"jl_tpl_{_SESSION}"
    admin = await connect(server.admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {await _quoted(admin, name)}")
        conn = await connect(server.dsn(name))
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield name
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {await _quoted(admin, name)} WITH (FORCE)")
        await admin.close()


async def verify_database(dsn: str) -> None:
    """Fail the test if replaying the log does not reproduce every projection."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=_init)
    try:
        diffs = await verify_all(pool)
    finally:
        await pool.close()
    if diffs:
        pytest.fail(f"replaying the log does not reproduce the projections:\n{summarize(diffs)}")


async def _init(conn: asyncpg.Connection) -> None:
    from engine.postgres import init_connection

    await init_connection(conn)


@pytest.fixture
async def db(server: Server, template: str) -> AsyncIterator[str]:
    """A fresh migrated database for one test (its DSN), verified against its log at the end."""
    name = f"jl_{_SESSION}_{next(_counter)}"
    admin = await connect(server.admin_dsn)
    try:
        new, tpl = await _quoted(admin, name), await _quoted(admin, template)
        await admin.execute(f"CREATE DATABASE {new} TEMPLATE {tpl}")
    finally:
        await admin.close()
    dsn = server.dsn(name)
    try:
        yield dsn
        await verify_database(dsn)
    finally:
        admin = await connect(server.admin_dsn)
        try:
            with contextlib.suppress(asyncpg.PostgresError):
                await admin.execute(
                    f"DROP DATABASE IF EXISTS {await _quoted(admin, name)} WITH (FORCE)"
                )
        finally:
            await admin.close()


@pytest.fixture
async def ledger(db: str, request: pytest.FixtureRequest) -> AsyncIterator[JobLedger]:
    """An open JobLedger on the test's database.

    A test module may define ``register_operators(ledger)``; it is called
    before the ledger opens, as an application would at import time.
    """
    led = JobLedger(db, actor="tests")
    register = getattr(request.module, "register_operators", None)
    if register is not None:
        register(led)
    async with led:
        yield led
