"""The demo application: a few operators of a small ML data platform.

Run a worker for it with ``jobledger --app examples.demo_app:ledger worker``,
or see everything at once with ``jobledger demo``.
"""

from __future__ import annotations

import random

import anyio
import msgspec

from engine import JobContext, JobLedger

ledger = JobLedger(actor="demo")


class ImportInputs(msgspec.Struct, forbid_unknown_fields=True):
    """Which dataset to import, and how big it is."""

    dataset: str
    rows: int = 50_000
    chunks: int = 20


class ImportResult(msgspec.Struct):
    """What the import produced."""

    rows: int
    bad_rows: int


@ledger.operator("dataset.import", queue="data", max_attempts=3, timeout=120)
async def import_dataset(ctx: JobContext, inputs: ImportInputs) -> ImportResult:
    """Import a dataset chunk by chunk, reporting progress and a quality metric."""
    bad = 0
    rng = random.Random(inputs.dataset)
    per_chunk = inputs.rows // inputs.chunks
    for chunk in range(inputs.chunks):
        await anyio.sleep(0.15)
        bad += rng.randint(0, 5)
        await ctx.progress(
            fraction=(chunk + 1) / inputs.chunks,
            message=f"chunk {chunk + 1}/{inputs.chunks}",
            iteration=chunk,
            metrics={"rows": (chunk + 1) * per_chunk, "bad_ratio": bad / ((chunk + 1) * per_chunk)},
        )
    await ctx.add_artifact(
        "table", f"s3://lake/{inputs.dataset}.parquet", type="parquet", size=inputs.rows * 120
    )
    return ImportResult(rows=inputs.rows, bad_rows=bad)


class FlakyInputs(msgspec.Struct):
    """How many attempts fail before one succeeds."""

    failures: int = 2


@ledger.operator("flaky.export", queue="data", max_attempts=5, retry_backoff=0.2)
async def flaky_export(ctx: JobContext, inputs: FlakyInputs) -> dict:
    """Export to a service that is briefly unavailable: fails, then succeeds."""
    await anyio.sleep(0.2)
    if ctx.job.attempt <= inputs.failures:
        raise ConnectionError(f"export service unavailable (attempt {ctx.job.attempt})")
    return {"exported": True, "attempts": ctx.job.attempt}


class TrainInputs(msgspec.Struct):
    """A training run: epochs, and seconds per epoch."""

    epochs: int = 10
    epoch_seconds: float = 0.3


@ledger.operator("model.train", queue="gpu", timeout=3)
async def train(ctx: JobContext, inputs: TrainInputs) -> dict:
    """Train a model, reporting loss per epoch (the demo gives it too little time)."""
    loss = 2.0
    for epoch in range(inputs.epochs):
        await anyio.sleep(inputs.epoch_seconds)
        loss *= 0.8
        await ctx.progress(
            fraction=(epoch + 1) / inputs.epochs,
            message=f"epoch {epoch + 1}",
            iteration=epoch,
            metrics={"loss": loss},
        )
    return {"loss": loss}
