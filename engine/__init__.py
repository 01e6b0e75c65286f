"""jobledger: an asyncio job engine whose every job transition is an immutable event.

The public surface is re-exported here; everything else is implementation.
"""

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
    "RetryAfter",
    "Run",
    "Status",
    "UnknownOperator",
    "WaitTimeout",
    "Worker",
]
