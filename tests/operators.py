"""Operators shared by the tests (and by the worker processes the tests start)."""

from __future__ import annotations

import msgspec

from engine import JobLedger


class ImportInputs(msgspec.Struct, forbid_unknown_fields=True):
    """Inputs of the test dataset import."""

    dataset: str
    rows: int = 100


class ImportResult(msgspec.Struct):
    """Result of the test dataset import."""

    imported: int


def register_basic(ledger: JobLedger) -> None:
    """Register ``dataset.import`` (typed) and ``noop`` (untyped) on ``ledger``."""

    @ledger.operator("dataset.import", queue="imports", max_attempts=3, timeout=60)
    async def import_dataset(ctx, inputs: ImportInputs) -> ImportResult:
        """Import a dataset."""
        return ImportResult(imported=inputs.rows)

    @ledger.operator("noop")
    async def noop(ctx) -> None:
        """Do nothing."""


app = JobLedger()
"""An application ledger for ``jobledger --app tests.operators:app`` (DSN from the environment)."""
register_basic(app)
