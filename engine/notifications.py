"""LISTEN/NOTIFY: one listening connection per process, shared by waiters and workers.

Writers send at most one NOTIFY per statement on channel ``jobledger`` (see
:func:`engine.store.notification`). The :class:`Listener` service holds a
dedicated connection, decodes each payload once and hands it to every
subscriber. Notifications are only a wake-up: subscribers always re-read the
database, so a lost notification (a dropped connection, a restart) costs
latency, never correctness. After a reconnect every subscriber is woken, since
notifications sent while disconnected are gone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import asyncpg
import msgspec
import structlog

from engine.errors import DatabaseUnavailable
from engine.postgres import DB_ERRORS, connect
from engine.store import CHANNEL

log = structlog.get_logger("jobledger.notifications")


class Notice(msgspec.Struct, frozen=True, omit_defaults=True):
    """A decoded notification. ``"*"`` means "too many to list: everyone check"."""

    ready: list[str] = []
    cancel: list[str] | str = []
    done: list[str] | str = []
    reconnected: bool = False

    def done_ids(self) -> set[str] | None:
        """The finished job ids, or ``None`` for "any job may have finished"."""
        return None if self.done == "*" or self.reconnected else set(self.done)

    def cancel_ids(self) -> set[str] | None:
        """The job ids whose cancellation was requested, or ``None`` for "check all"."""
        return None if self.cancel == "*" or self.reconnected else set(self.cancel)


RECONNECTED = Notice(reconnected=True)
_decode = msgspec.json.Decoder(Notice).decode
Subscriber = Callable[[Notice], None]


class Listener:
    """A service that LISTENs on ``jobledger`` and fans notices out to subscribers."""

    def __init__(self, dsn: str, *, health_interval: float = 5.0, **connect_kwargs: Any) -> None:
        self.dsn = dsn
        self.connect_kwargs = connect_kwargs
        self.health_interval = health_interval
        self.connected = False
        self._subscribers: list[Subscriber] = []

    @contextlib.contextmanager
    def subscribe(self, fn: Subscriber) -> Iterator[None]:
        """Call ``fn(notice)`` for every notice while the block runs."""
        self._subscribers.append(fn)
        try:
            yield
        finally:
            self._subscribers.remove(fn)

    def _dispatch(self, notice: Notice) -> None:
        for fn in list(self._subscribers):
            fn(notice)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            notice = _decode(payload)
        except msgspec.DecodeError:
            log.warning("notification_undecodable", payload=payload[:200])
            return
        self._dispatch(notice)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until cancelled, reconnecting with backoff when the connection drops."""
        started = False
        delay = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self.dsn, **self.connect_kwargs)
                await conn.add_listener(CHANNEL, self._on_notify)
                self.connected = True
                delay = 0.1
                if started:
                    log.info("listener_reconnected")
                    self._dispatch(RECONNECTED)
                else:
                    started = True
                    task_status.started()
                while not conn.is_closed():
                    await anyio.sleep(self.health_interval)
                    with anyio.fail_after(self.health_interval):
                        await conn.fetchval("SELECT 1")
            except (DatabaseUnavailable, asyncpg.PostgresError, *DB_ERRORS) as exc:
                # DB_ERRORS, the one list of "the connection failed", includes the
                # InternalClientError asyncpg raises for a connection killed while it
                # is being set up; missing it here let the listener die unseen.
                log.warning("listener_disconnected", error=str(exc) or type(exc).__name__)
            finally:
                self.connected = False
                if conn is not None:
                    conn.terminate()
            if not started:
                started = True
                task_status.started()
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)
