"""jobledger: an asyncio job engine whose every job transition is an immutable event.

The public surface is named here (``__all__``) and loaded on first use, so
that importing the leaf vocabulary (``engine.events``, which the read side in
:mod:`projections` depends on) does not load the runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_SURFACE = {
    "engine.errors": (
        "Cancel",
        "ConcurrencyConflict",
        "ConfigurationError",
        "DatabaseUnavailable",
        "ImmutableLog",
        "InvalidInputs",
        "InvalidTransition",
        "JobFailed",
        "JobLedgerError",
        "JobNotFound",
        "PayloadTooLarge",
        "RetryAfter",
        "UnknownOperator",
        "WaitTimeout",
    ),
    "engine.context": ("JobContext",),
    "engine.events": ("Artifact", "ErrorInfo", "Meta", "Recorded"),
    "engine.ledger": ("JobLedger", "JobSpec", "Page"),
    "engine.lifecycle": ("Status",),
    "engine.operators": ("Operator", "OperatorInfo"),
    "engine.worker": ("Worker",),
    "projections.history": ("Attempt", "ProgressPoint", "Run"),
    "projections.job_state": ("Job", "MetricStat", "Progress"),
    "projections.reports": ("ReportRow",),
}
_WHERE = {name: module for module, names in _SURFACE.items() for name in names}

__all__ = [
    "Artifact",
    "Attempt",
    "Cancel",
    "ConcurrencyConflict",
    "ConfigurationError",
    "DatabaseUnavailable",
    "ErrorInfo",
    "ImmutableLog",
    "InvalidInputs",
    "InvalidTransition",
    "Job",
    "JobContext",
    "JobFailed",
    "JobLedger",
    "JobLedgerError",
    "JobNotFound",
    "JobSpec",
    "Meta",
    "MetricStat",
    "Operator",
    "OperatorInfo",
    "Page",
    "PayloadTooLarge",
    "Progress",
    "ProgressPoint",
    "Recorded",
    "ReportRow",
    "RetryAfter",
    "Run",
    "Status",
    "UnknownOperator",
    "WaitTimeout",
    "Worker",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from engine.context import JobContext
    from engine.errors import (
        Cancel,
        ConcurrencyConflict,
        ConfigurationError,
        DatabaseUnavailable,
        ImmutableLog,
        InvalidInputs,
        InvalidTransition,
        JobFailed,
        JobLedgerError,
        JobNotFound,
        PayloadTooLarge,
        RetryAfter,
        UnknownOperator,
        WaitTimeout,
    )
    from engine.events import Artifact, ErrorInfo, Meta, Recorded
    from engine.ledger import JobLedger, JobSpec, Page
    from engine.lifecycle import Status
    from engine.operators import Operator, OperatorInfo
    from engine.worker import Worker
    from projections.history import Attempt, ProgressPoint, Run
    from projections.job_state import Job, MetricStat, Progress
    from projections.reports import ReportRow
