"""Fault tests with real worker processes against real PostgreSQL.

Workers run as ``jobledger --app tests.worker_app:ledger worker`` in their own
processes; the test kills, pauses and disconnects them and checks that every
job ends exactly once, by counting events in the log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from engine import JobLedger
from tests import worker_app

pytestmark = pytest.mark.slow


def register_operators(ledger: JobLedger) -> None:
    for op in worker_app.ledger.registry.values():
        ledger.register(op)


class WorkerProcess:
    """A worker process and its log file."""

    def __init__(self, db: str, log: Path, *args: str) -> None:
        self.log = log
        env = {**os.environ, "JOBLEDGER_DSN": db, "JOBLEDGER_LOG_LEVEL": "info"}
        self.out = open(log, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine.cli",
                "--app",
                "tests.worker_app:ledger",
                "worker",
                "--heartbeat",
                "0.3",
                "--rescue-after",
                "2",
                "--poll",
                "0.3",
                "--grace",
                "5",
                *args,
            ],
            env=env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


@contextmanager
def workers(db: str, tmp_path: Path, n: int, *args: str) -> Iterator[list[WorkerProcess]]:
    procs = [WorkerProcess(db, tmp_path / f"worker{i}.log", *args) for i in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


def pid_of(worker_id: str | None) -> int:
    assert worker_id is not None
    return int(worker_id.split(":")[1])


async def wait_for(predicate, timeout: float, what: str | Callable[[], str]) -> None:
    """Poll ``predicate`` (another process's state) until true, or fail after ``timeout``."""
    with anyio.move_on_after(timeout):
        while not await predicate():  # noqa: ASYNC110 - the state lives in another process
            await anyio.sleep(0.2)
        return
    pytest.fail(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")


async def completed_once(ledger: JobLedger) -> dict[str, int]:
    row = await ledger.pool.fetchrow(
        """
        SELECT count(*) FILTER (WHERE type = 'job.completed') AS completed,
               count(DISTINCT job_id) FILTER (WHERE type = 'job.completed') AS jobs,
               count(*) FILTER (WHERE type = 'job.started') AS started
        FROM jobledger.events
        """
    )
    return dict(row)


async def test_kill_9_mid_job_is_rescued_and_completed_once(ledger, db, tmp_path) -> None:
    with workers(db, tmp_path, 1) as [a]:
        job = await ledger.submit("sleep", {"seconds": 1.5})
        running = await ledger.wait(job.id, until="running", timeout=30)
        assert pid_of(running.worker) == a.pid
        a.proc.kill()
        a.proc.wait()
        with workers(db, tmp_path, 1) as [b]:
            done = await ledger.wait(job.id, timeout=40, raise_for_status=True)
            assert pid_of(done.worker) == b.pid
            assert "job_rescued" in b.text()
    types = [r.type for r in await ledger.history(job.id)]
    assert types == [
        "job.submitted",
        "job.started",
        "job.abandoned",
        "job.started",
        "job.completed",
    ]


async def test_a_paused_worker_cannot_complete_its_rescued_job(ledger, db, tmp_path) -> None:
    with workers(db, tmp_path, 1) as [a]:
        job = await ledger.submit("sleep", {"seconds": 3})
        running = await ledger.wait(job.id, until="running", timeout=30)
        assert pid_of(running.worker) == a.pid
        os.kill(a.pid, signal.SIGSTOP)  # a GC pause, a frozen VM, a partition...
        with workers(db, tmp_path, 1) as [b]:
            done = await ledger.wait(job.id, timeout=40, raise_for_status=True)
            assert pid_of(done.worker) == b.pid
            os.kill(a.pid, signal.SIGCONT)  # A wakes up, its handler returns, it writes
            await wait_for(
                lambda: anyio.to_thread.run_sync(lambda: "job_write_refused" in a.text()),
                30,
                lambda: f"the paused worker's write to be refused; its log:\n{a.text()}",
            )
    history = await ledger.history(job.id)
    assert [r.type for r in history].count("job.completed") == 1
    final = await ledger.get(job.id)
    assert final.result == {"worker": done.worker}


async def test_dropped_connections_lose_and_duplicate_nothing(ledger, db, tmp_path) -> None:
    n = 400
    await ledger.submit_many([{"operator": "sleep", "inputs": {"seconds": 0.02}}] * n)
    with workers(db, tmp_path, 2, "--concurrency", "4") as procs:
        for _ in range(4):
            await anyio.sleep(0.5)
            await ledger.pool.execute(
                """
                SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                WHERE datname = current_database() AND application_name = 'jobledger-worker'
                """
            )

        async def all_done() -> bool:
            return await ledger.count(status="completed") == n

        await wait_for(all_done, 90, f"{n} jobs to complete")
        assert all(p.proc.poll() is None for p in procs)  # the workers survived
        for p in procs:
            assert "Traceback" not in p.text()
    counts = await completed_once(ledger)
    assert counts["completed"] == n and counts["jobs"] == n


async def test_two_workers_drain_2000_jobs_exactly_once(ledger, db, tmp_path) -> None:
    n = 2000
    for _ in range(n // 500):
        await ledger.submit_many([{"operator": "noop"}] * 500)
    with workers(db, tmp_path, 2, "--concurrency", "8") as procs:

        async def all_done() -> bool:
            return await ledger.count(status="completed") == n

        await wait_for(all_done, 120, f"{n} jobs to complete")
        per_worker = await ledger.pool.fetch(
            "SELECT meta->>'worker' AS w, count(*) FROM jobledger.events"
            " WHERE type = 'job.completed' GROUP BY 1"
        )
    counts = await completed_once(ledger)
    assert counts == {"completed": n, "jobs": n, "started": n}
    assert {pid_of(r["w"]) for r in per_worker} == {p.pid for p in procs}


async def test_sigterm_lets_running_jobs_finish(ledger, db, tmp_path) -> None:
    with workers(db, tmp_path, 1) as [a]:
        job = await ledger.submit("sleep", {"seconds": 1.0})
        await ledger.wait(job.id, until="running", timeout=30)
        a.proc.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(a.proc.wait, 20)
        assert code == 0
        assert "worker_shutdown_requested" in a.text()
    done = await ledger.get(job.id)
    assert done.status == "completed"
    workers_rows = await ledger.pool.fetch("SELECT stopped_at FROM jobledger.workers")
    assert all(r["stopped_at"] is not None for r in workers_rows)


async def test_the_listener_survives_a_connection_killed_while_it_is_set_up(
    ledger: JobLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LISTEN connection killed during its setup made asyncpg raise
    InternalClientError ("another operation is in progress"), which the
    listener did not count as a dropped connection: it died, and everything
    waiting for it to start (a worker's run) waited forever."""
    import asyncpg

    import engine.notifications as notifications

    real_connect = notifications.connect
    calls = 0

    async def connect_killed_once(*args: object, **kwargs: object) -> asyncpg.Connection:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncpg.exceptions.InternalClientError(
                "cannot switch to state 11; another operation (2) is in progress"
            )
        return await real_connect(*args, **kwargs)

    monkeypatch.setattr(notifications, "connect", connect_killed_once)
    with anyio.fail_after(10):
        listener = await ledger.listener()
        assert listener is not None
        while not listener.connected:  # noqa: ASYNC110 - a flag, set by its task
            await anyio.sleep(0.05)
        woken = anyio.Event()
        with listener.subscribe(lambda notice: woken.set()):
            await ledger.submit("noop")
            await woken.wait()
    assert calls == 2


async def test_a_listener_that_cannot_start_raises_instead_of_hanging(
    ledger: JobLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.notifications as notifications

    async def broken_run(self: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the listener")

    monkeypatch.setattr(notifications.Listener, "run", broken_run)
    with anyio.fail_after(10), pytest.raises(ExceptionGroup) as err:
        await ledger.listener()
    assert err.group_contains(RuntimeError, match="a bug in the listener")
    assert ledger._listener is None and ledger._listener_task is None
