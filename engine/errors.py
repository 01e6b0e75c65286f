"""The errors jobledger raises, split by what the caller should do next.

Each error carries structured fields and uses its docstring as the default
message. Driver errors are translated once, at the storage edge
(:mod:`engine.store`), by SQLSTATE and constraint name, never by message text.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID


class JobLedgerError(Exception):
    """A jobledger operation failed."""

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        self.fields = fields
        for key, value in fields.items():
            setattr(self, key, value)
        super().__init__(message or (self.__doc__ or type(self).__name__).strip())


class ConfigurationError(JobLedgerError):
    """jobledger is not configured correctly (server, DSN, home directory)."""


class DatabaseUnavailable(JobLedgerError):
    """The PostgreSQL server did not answer."""


class JobNotFound(JobLedgerError):
    """No job has this id (or it was deleted)."""

    def __init__(self, job_id: UUID | str, *, deleted: bool = False) -> None:
        what = "was deleted" if deleted else "does not exist"
        super().__init__(f"job {job_id} {what}", job_id=job_id, deleted=deleted)


class InvalidTransition(JobLedgerError):
    """The lifecycle does not allow this transition (``force=True`` overrides it, recorded)."""

    def __init__(self, job_id: UUID, from_status: str, to_status: str, event_type: str) -> None:
        super().__init__(
            f"job {job_id}: {event_type} would move it from {from_status!r} to {to_status!r}, "
            "which the lifecycle does not allow (force=True, or --force on the command line,"
            " overrides it and is recorded)",
            job_id=job_id,
            from_status=from_status,
            to_status=to_status,
            event_type=event_type,
        )


class ConcurrencyConflict(JobLedgerError):
    """Another writer moved the job first; reload and try again."""

    def __init__(self, job_id: UUID, expected_version: int) -> None:
        super().__init__(
            f"job {job_id} changed since version {expected_version}: another writer moved it first",
            job_id=job_id,
            expected_version=expected_version,
        )


class UnknownOperator(JobLedgerError):
    """No process has registered this operator."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"unknown operator {name!r}: register it in this process with @ledger.operator "
            "or start a worker that does",
            operator=name,
        )


class InvalidInputs(JobLedgerError):
    """The inputs do not match the operator's input type."""

    def __init__(self, operator: str, detail: str, *, path: str | None = None) -> None:
        where = f" at {path}" if path else ""
        super().__init__(
            f"invalid inputs for operator {operator!r}{where}: {detail}",
            operator=operator,
            detail=detail,
            path=path,
        )


class PayloadTooLarge(JobLedgerError):
    """An event payload is larger than the configured limit."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(
            f"{what} is {size} bytes encoded, over the limit of {limit} bytes",
            what=what,
            size=size,
            limit=limit,
        )


class JobFailed(JobLedgerError):
    """The job ended in a status other than completed."""

    def __init__(self, job: Any) -> None:
        err = job.error
        detail = f": {err.type}: {err.message}" if err is not None else ""
        super().__init__(
            f"job {job.id} ({job.operator}) ended {job.status}{detail}", job=job, status=job.status
        )


class WaitTimeout(JobLedgerError, TimeoutError):
    """The job did not reach the awaited status in time."""

    def __init__(self, job_id: UUID, status: str, timeout: float) -> None:
        super().__init__(
            f"job {job_id} is still {status!r} after {timeout:g}s",
            job_id=job_id,
            status=status,
            timeout=timeout,
        )


class ImmutableLog(JobLedgerError):
    """The event log is append-only; events cannot be changed or removed."""


# -- handler signals -------------------------------------------------------


class RetryAfter(Exception):
    """Raised by a handler: retry this job after ``delay`` seconds (counts as an attempt)."""

    def __init__(self, delay: float, message: str | None = None) -> None:
        self.delay = float(delay)
        super().__init__(message or f"retry requested in {delay:g}s")


class Cancel(Exception):
    """Raised by a handler: cancel this job now, with a reason."""

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason
        super().__init__(reason or "cancelled by its handler")
