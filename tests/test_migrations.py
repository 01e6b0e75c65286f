"""Migrations: ordered, recorded, safe to run concurrently, never edited."""

from __future__ import annotations

import anyio
import pytest

from engine.postgres import MigrationError, connect, migrate
from engine.sqlfiles import migrations, parse_queries, queries, resolve_includes
from engine.store import JSON_COLUMNS
from projections.job_state import JOB_FIELDS


async def test_migrating_twice_concurrently_applies_nothing_twice(db: str) -> None:
    conns = [await connect(db) for _ in range(3)]
    applied: list[list[int]] = []
    try:
        async with anyio.create_task_group() as tg:
            for c in conns:

                async def run(c=c) -> None:
                    applied.append(await migrate(c))

                tg.start_soon(run)
        assert applied == [[], [], []]  # the template already has them all
        rows = await conns[0].fetch("SELECT version FROM jobledger.migrations ORDER BY version")
        assert [r[0] for r in rows] == [m.version for m in migrations()]
    finally:
        for c in conns:
            await c.close()


async def test_fresh_database_concurrent_migrators(server, db: str) -> None:
    """Two processes migrating an empty database at once: each migration once."""
    admin = await connect(server.admin_dsn)
    name = db.rsplit("/", 1)[1] + "_fresh"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = server.dsn(name)
        conns = [await connect(dsn) for _ in range(2)]
        results: list[list[int]] = []
        async with anyio.create_task_group() as tg:
            for c in conns:

                async def run(c=c) -> None:
                    results.append(await migrate(c))

                tg.start_soon(run)
        assert sorted(results, key=len) == [[], [m.version for m in migrations()]]
        for c in conns:
            await c.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def test_an_edited_migration_is_refused(db: str) -> None:
    conn = await connect(db)
    try:
        await conn.execute("UPDATE jobledger.migrations SET checksum = 'x' WHERE version = 2")
        with pytest.raises(MigrationError, match="002_jobs changed after it was applied"):
            await migrate(conn)
        await conn.execute("INSERT INTO jobledger.migrations VALUES (999, 'future', 'x')")
        with pytest.raises(MigrationError, match=r"\[999\]"):
            await migrate(conn)
    finally:
        await conn.close()


async def test_jobs_columns_are_the_reducer_fields(db: str) -> None:
    conn = await connect(db)
    try:
        cols = await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'jobledger' AND table_name = 'jobs' ORDER BY ordinal_position"
        )
    finally:
        await conn.close()
    assert tuple(c[0] for c in cols) == JOB_FIELDS
    # store._encode_writes compares jsonb values by their encoding and every
    # other column by ==; a jsonb column it does not know would merge 1 and 1.0.
    assert {c[0] for c in cols if c[1] == "jsonb"} == JSON_COLUMNS


def test_every_named_query_parses() -> None:
    q = queries()
    assert {"append_events", "create_streams", "load_job", "read_stream"} <= set(q)
    with pytest.raises(ValueError, match="defined twice"):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")
    with pytest.raises(ValueError, match="no '-- name:' header"):
        parse_queries("SELECT 1;")


def test_a_query_takes_in_a_fragment_by_name() -> None:
    found = parse_queries("-- name: _cols\na, b\n-- name: q\nSELECT\n  -- include: _cols\nFROM t;")
    assert resolve_includes(found) == {"q": "SELECT\na, b\nFROM t;"}
    with pytest.raises(ValueError, match="include: _nope: no fragment of that name"):
        resolve_includes(parse_queries("-- name: q\nSELECT\n-- include: _nope\n;"))
    with pytest.raises(ValueError, match="include: cols: no fragment"):
        resolve_includes(parse_queries("-- name: cols\na\n-- name: q\n-- include: cols\n"))
    with pytest.raises(ValueError, match="fragments do not nest"):
        resolve_includes(
            parse_queries("-- name: _a\nx\n-- name: _b\n-- include: _a\n-- name: q\n-- include: _b")
        )
    # The write statements share theirs; none is left unresolved anywhere.
    assert not any("-- include:" in body for body in queries().values())
    assert not any(name.startswith("_") for name in queries())


def test_the_public_surface_resolves() -> None:
    import engine

    assert sorted(engine.__all__) == sorted(engine._WHERE)
    for name in engine.__all__:
        assert getattr(engine, name) is not None
