"""The server a benchmark runs against: ``BENCH_DSN``, else a fresh embedded one."""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import shutil
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


@functools.cache
def _embedded_admin_dsn() -> str:
    """The one embedded server of this benchmark process, so that every system
    runs on the same server as with ``BENCH_DSN``. It lives in ``BENCH_HOME``
    (kept), else in a temporary directory removed at exit."""
    home = os.environ.get("BENCH_HOME")
    if not home:
        home = tempfile.mkdtemp(prefix="jlbench-")
        # Registered before the server starts, so it runs after the server's
        # own exit handler has stopped it (atexit runs last-in, first-out).
        atexit.register(shutil.rmtree, home, True)
    return urlsplit(embedded_dsn(home))._replace(path="/postgres").geturl()


SYNCHRONOUS_COMMIT = ("on", "off", "local", "remote_write", "remote_apply")


def synchronous_commit() -> str:
    """``BENCH_SYNCHRONOUS_COMMIT``: the ``synchronous_commit`` of every benchmark
    database, ``on`` (PostgreSQL's default, the issue's goals) unless set."""
    value = os.environ.get("BENCH_SYNCHRONOUS_COMMIT", "on")
    if value not in SYNCHRONOUS_COMMIT:
        raise SystemExit(
            f"bench: BENCH_SYNCHRONOUS_COMMIT must be one of {', '.join(SYNCHRONOUS_COMMIT)},"
            f" got {value!r}"
        )
    return value


@contextlib.asynccontextmanager
async def bench_database(label: str, *, migrated: bool = True) -> AsyncIterator[str]:
    """A fresh database for one benchmark (with jobledger's schema unless
    ``migrated=False``, for the peers) on ``BENCH_DSN``'s server, else on the
    embedded one; dropped afterwards. Its ``synchronous_commit`` is set on the
    database (see :func:`synchronous_commit`), so it holds for every driver's
    connections alike."""
    commit_mode = synchronous_commit()
    admin_dsn = os.environ.get("BENCH_DSN") or _embedded_admin_dsn()
    name = f"bench_{label}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = urlsplit(admin_dsn)._replace(path=f"/{name}").geturl()
    try:
        await admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = {commit_mode}')
        if migrated:
            conn = await connect(dsn)
            await migrate(conn)
            await conn.close()
        yield dsn
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
