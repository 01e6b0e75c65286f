"""Server resolution and the errors a user sees when the server is not there."""

from __future__ import annotations

import socket

import pytest

from engine import DatabaseUnavailable, JobLedger
from engine.postgres import describe_dsn


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
