"""Worker processes for benchmarks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil


@contextlib.contextmanager
def worker_processes(
    dsn: str, n: int, *, concurrency: int, burst: bool = False, extra: tuple[str, ...] = ()
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``n`` jobledger worker processes for bench.app, stopped on exit."""
    env = {**os.environ, "JOBLEDGER_DSN": dsn, "JOBLEDGER_LOG_LEVEL": "warning"}
    args = [
        sys.executable,
        "-m",
        "engine.cli",
        "--app",
        "bench.app:ledger",
        "worker",
        "--concurrency",
        str(concurrency),
        "--heartbeat",
        "1",
        "--poll",
        "0.5",
        *extra,
    ]
    if burst:
        args.append("--burst")
    procs = [subprocess.Popen(args, env=env) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def postgres_cpu_seconds() -> float:
    """CPU seconds of every postgres process on this machine (the server side)."""
    total = 0.0
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] and proc.info["name"].startswith("postgres"):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = proc.cpu_times()
                total += t.user + t.system
    return total


def wait_until(predicate, timeout: float) -> None:
    """Poll ``predicate`` until true or fail."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark did not finish in time")
        time.sleep(0.05)
