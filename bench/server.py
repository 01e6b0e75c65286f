"""The server a benchmark runs against: ``BENCH_DSN``, else a fresh embedded one."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import structlog

from engine.postgres import connect, embedded_dsn, migrate


def quiet() -> None:
    """Log warnings only: a benchmark's output is its results."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


@contextlib.asynccontextmanager
async def bench_database(label: str, *, migrated: bool = True) -> AsyncIterator[str]:
    """A fresh database for one benchmark (with jobledger's schema unless
    ``migrated=False``, for the peers); dropped afterwards."""
    admin_dsn = os.environ.get("BENCH_DSN")
    if not admin_dsn:
        home = os.environ.get("BENCH_HOME") or tempfile.mkdtemp(prefix="jlbench-")
        admin_dsn = urlsplit(embedded_dsn(home))._replace(path="/postgres").geturl()
    name = f"bench_{label}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = urlsplit(admin_dsn)._replace(path=f"/{name}").geturl()
    try:
        if migrated:
            conn = await connect(dsn)
            await migrate(conn)
            await conn.close()
        yield dsn
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
