"""The application benchmark workers run: ``--app bench.app:ledger``."""

from __future__ import annotations

import time

from bench.peer_worker import stamp as print_stamp
from engine import JobContext, JobLedger

ledger = JobLedger(actor="bench", application_name="jobledger-bench")


@ledger.operator("noop")
async def noop(ctx: JobContext) -> None:
    """Do nothing (throughput)."""


@ledger.operator("stamp")
async def stamp(ctx: JobContext) -> float:
    """Print and return the wall-clock time the handler started (pickup latency)."""
    print_stamp()
    return time.time()


def ledger_at(dsn: str, **options: object) -> JobLedger:
    """A client ledger on ``dsn`` that knows this app's operators (not yet opened)."""
    client = JobLedger(dsn, **options)  # type: ignore[arg-type]
    for op in ledger.registry.values():
        client.register(op)
    return client
