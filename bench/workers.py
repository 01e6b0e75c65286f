"""Worker processes for benchmarks, and the CPU they (and PostgreSQL) use."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from bench.systems import System


@contextlib.contextmanager
def workers(system: System, n: int, args: argparse.Namespace, **popen: Any) -> Iterator[list]:
    """``n`` worker processes of ``system``, terminated (SIGTERM) on exit.

    ``args`` gives ``concurrency`` and pgqueuer's ``batch_size``; ``popen``
    goes to :class:`subprocess.Popen` (e.g. ``stdout=subprocess.PIPE``).
    """
    env = {**os.environ, "JOBLEDGER_LOG_LEVEL": "warning"}
    cmd = system.worker_command(args.concurrency, args.batch_size)
    procs = [subprocess.Popen(cmd, env=env, **popen) for _ in range(n)]
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
                p.wait()


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
