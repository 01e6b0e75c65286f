"""The application the fault tests run in worker processes: ``--app tests.worker_app:ledger``."""

from __future__ import annotations

import anyio
import msgspec

from engine import JobContext, JobLedger

ledger = JobLedger(actor="worker-app", application_name="jobledger-worker")


class SleepInputs(msgspec.Struct):
    """How long to sleep."""

    seconds: float = 0.0


@ledger.operator("sleep", max_attempts=3, retry_backoff=0.1)
async def sleep(ctx: JobContext, inputs: SleepInputs) -> dict:
    """Sleep, then return which worker finished."""
    await anyio.sleep(inputs.seconds)
    return {"worker": ctx.worker}


@ledger.operator("noop", max_attempts=3, retry_backoff=0.1)
async def noop(ctx: JobContext) -> None:
    """Do nothing."""
