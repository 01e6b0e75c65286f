"""Job statuses and the allowed transitions: the state machine, as data.

::

              submit(delay)          due                claim
     (new) ──► scheduled ───────────────────────────────────┐
       │                                                    ▼
       └────────────────────────► queued ──────────────► running ──► completed
                                    ▲                      │  │
                  retry (backoff) / rerun / rescue          │  └────► failed
                                    └──────────────────────┘
     cancel: queued/scheduled ──► cancelled;  running ──► cancelling ──► cancelled

The table below says, for each event type, from which statuses it may be
appended. The status it leads to is the reducer's answer
(:func:`projections.job_state.apply`); this module only decides whether the
move is allowed. A caller may bypass it with ``force=True``, which is recorded
in the event's meta.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """The status of a job."""

    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = Status


def check_status(value: object) -> str:
    """``value`` as a status name; ``ValueError`` naming the statuses when it is none."""
    if value not in Status.__members__.values():
        raise ValueError(
            f"unknown status {value!r}; statuses: {', '.join(s.value for s in Status)}"
        )
    return str(value)


TERMINAL: frozenset[Status] = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})
"""Statuses a job stays in until someone retries or reruns it."""

READY: frozenset[Status] = frozenset({S.QUEUED, S.SCHEDULED})
"""Statuses a worker may claim from (scheduled ones once their ``run_at`` has passed)."""

ACTIVE: frozenset[Status] = frozenset({S.RUNNING, S.CANCELLING})
"""Statuses in which a worker holds the job."""

ALL: frozenset[Status] = frozenset(Status)

ALLOWED_FROM: dict[str, frozenset[Status]] = {
    "job.started": READY,
    "job.progress": ACTIVE,
    "job.artifact_added": ACTIVE,
    # A handler can finish in the moment between a cancel request and its
    # cancellation; its outcome is kept rather than thrown away.
    "job.completed": ACTIVE,
    "job.failed": ACTIVE,
    "job.abandoned": ACTIVE,
    "job.cancel_requested": frozenset({S.RUNNING}),
    # From running: the handler itself gave up (raise Cancel) or its worker
    # ended it; a cancel *request* goes through cancelling.
    "job.cancelled": READY | ACTIVE,
    "job.retried": frozenset({S.FAILED, S.CANCELLED}),
    "job.rerun": TERMINAL,
    "job.labelled": ALL,
    "job.pinned": ALL,
    "job.tagged": ALL,
    "job.context_updated": ALL,
    # A job held by a worker must be cancelled before it can be deleted.
    "job.deleted": ALL - ACTIVE,
}
"""Event type -> the statuses it may be appended in. ``job.submitted`` starts a stream."""


def allowed(status: Status | str, event_type: str) -> bool:
    """Whether an event of ``event_type`` may be appended to a job in ``status``."""
    return Status(status) in ALLOWED_FROM.get(event_type, frozenset())


STATUS_MAP: dict[str, dict[str, Status]] = {
    "fiftyone": {
        "scheduled": S.SCHEDULED,
        "queued": S.QUEUED,
        "running": S.RUNNING,
        "completed": S.COMPLETED,
        "failed": S.FAILED,
    },
    "supervisely": {
        "queued": S.QUEUED,
        "consumed": S.QUEUED,
        "started": S.RUNNING,
        "deployed": S.RUNNING,
        "terminating": S.CANCELLING,
        "stopped": S.CANCELLED,
        "finished": S.COMPLETED,
        "error": S.FAILED,
    },
    "clearml": {
        "created": S.SCHEDULED,
        "queued": S.QUEUED,
        "in_progress": S.RUNNING,
        "stopped": S.CANCELLED,
        "published": S.COMPLETED,
        "publishing": S.COMPLETED,
        "closed": S.COMPLETED,
        "completed": S.COMPLETED,
        "failed": S.FAILED,
        "unknown": S.FAILED,
    },
    "tensorbay": {
        "QUEUING": S.QUEUED,
        "PROCESSING": S.RUNNING,
        "SUCCESS": S.COMPLETED,
        "FAILED": S.FAILED,
        "ABORTED": S.CANCELLED,
    },
}
"""How other platforms' status names map onto jobledger's (documented in the README)."""
