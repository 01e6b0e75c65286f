"""The job reducer: the single definition of a job's state.

``apply(state, recorded) -> state`` is a pure fold: no I/O, no clock, no
logging. Every timestamp comes from the event envelope. The live write path
(:mod:`engine.ledger`, :mod:`engine.worker`) computes the new ``jobs`` row with
this function before appending the event, and replay folds the log with the
same function, so the table and a replay cannot disagree. The test suite checks
that at the teardown of every test.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec
from msgspec.structs import replace

from engine import events as ev

Status = str  # one of engine.lifecycle.Status; kept as text so this module stays a leaf


class MetricStat(msgspec.Struct, frozen=True):
    """The last, smallest and largest value reported for one metric."""

    last: float
    min: float
    max: float


class Progress(msgspec.Struct, frozen=True, omit_defaults=True):
    """The latest progress of the running (or last) attempt."""

    fraction: float | None = None
    message: str | None = None
    iteration: int | None = None
    metrics: dict[str, MetricStat] = {}
    reported_at: datetime | None = None


class Job(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """A job as its events made it: one row of the ``jobs`` table.

    ``attempt`` counts the attempts started in the current run; ``run`` counts
    runs (a manual retry or a rerun starts a new one). ``version`` is the
    number of events applied.

    Only fields that may be ``None`` have a default (``None``), so encoding
    leaves them out: the ``jobs`` table reads a missing key as NULL.

    A job holds only JSON values and structs of them, never a reference back
    to itself, so it is not tracked by Python's cyclic garbage collector
    (``gc=False``, like the events and their envelope): the collections that
    building a batch of jobs triggered cost 5% of its Python. Freeing is by
    reference count as ever; a job stored into its own ``context`` would
    never be freed.
    """

    id: UUID
    version: int
    operator: str
    label: str
    description: str | None = None
    queue: str
    status: Status
    priority: int
    inputs: Any = None
    context: dict[str, Any]
    tags: list[str]
    pinned: bool
    owner: str | None = None
    parent_id: UUID | None = None
    attempt: int
    max_attempts: int
    restart_policy: str
    retry_backoff: float
    retry_backoff_max: float
    run: int
    run_at: datetime | None = None
    timeout: float | None = None
    progress: Progress | None = None
    result: Any = None
    error: ev.ErrorInfo | None = None
    artifacts: list[ev.Artifact]
    worker: str | None = None
    run_link: str | None = None
    status_reason: str | None = None
    status_message: str | None = None
    idempotency_key: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    status_changed_at: datetime
    deleted_at: datetime | None = None

    @property
    def terminal(self) -> bool:
        """Whether the job is completed, failed or cancelled."""
        return self.status in ("completed", "failed", "cancelled")

    @property
    def deleted(self) -> bool:
        """Whether the job carries a tombstone."""
        return self.deleted_at is not None


JOB_FIELDS: tuple[str, ...] = Job.__struct_fields__
"""The columns of the ``jobs`` table, in order."""


class NotApplicable(ValueError):
    """The event cannot be applied to this state (a broken stream, not a lifecycle rule)."""


def _status(state: Job, status: Status, rec: ev.Recorded, **changes: Any) -> Job:
    """Move to ``status``, stamping the status change with the event's who/why."""
    return replace(
        state,
        status=status,
        status_changed_at=rec.recorded_at,
        status_reason=rec.meta.reason,
        status_message=rec.meta.message,
        **changes,
    )


def _merge_metrics(old: dict[str, MetricStat], new: dict[str, float]) -> dict[str, MetricStat]:
    merged = dict(old)
    for name, value in new.items():
        v = float(value)
        prev = merged.get(name)
        merged[name] = (
            MetricStat(v, v, v)
            if prev is None
            else MetricStat(v, min(prev.min, v), max(prev.max, v))
        )
    return merged


def _new_run(state: Job, rec: ev.Recorded, run_at: datetime | None) -> Job:
    due = run_at or rec.recorded_at
    return _status(
        state,
        "scheduled" if due > rec.recorded_at else "queued",
        rec,
        run=state.run + 1,
        attempt=0,
        run_at=due,
        result=None,
        error=None,
        progress=None,
        worker=None,
        run_link=None,
        started_at=None,
        finished_at=None,
    )


def _unique(tags: Iterable[str]) -> list[str]:
    """The tags in order, each once."""
    out = list(tags)
    if len(out) > 1 and len(set(out)) != len(out):
        out = list(dict.fromkeys(out))
    return out


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_NEW_JOB = Job(
    id=UUID(int=0),
    version=1,
    operator="",
    label="",
    queue="",
    status="queued",
    priority=0,
    context={},
    tags=[],
    pinned=False,
    attempt=0,
    max_attempts=1,
    restart_policy="on_error",
    retry_backoff=1.0,
    retry_backoff_max=300.0,
    run=1,
    artifacts=[],
    created_at=_EPOCH,
    updated_at=_EPOCH,
    status_changed_at=_EPOCH,
)
"""What every submitted job starts from: at version 1 (:func:`apply` checks
the event's), not pinned, in its first run with no attempt yet, and without
progress, result, error, worker, start, finish or tombstone.
:func:`_submitted` sets every other field from the event."""


_last_base: tuple[datetime, Job]


def _base_at(at: datetime) -> Job:
    """:data:`_NEW_JOB` submitted at ``at``: queued, due, created and changed then.

    The jobs of one submission share their envelope's time, so
    :func:`_submitted` keeps the last one made (by identity: the same
    object) and each job costs one ``replace`` instead of two (0.2 us a
    job); a replay, where every job has its own time, pays 0.1 us more. A
    pure function of ``at``; the cache only saves work."""
    global _last_base
    base = replace(
        _NEW_JOB, status="queued", run_at=at, created_at=at, updated_at=at, status_changed_at=at
    )
    _last_base = (at, base)
    return base


_base_at(_EPOCH)  # the kept row is a true base from the start, even for _EPOCH itself


def _submitted(rec: ev.Recorded, e: ev.Submitted) -> Job:
    # Calls of at most 15 keywords each, not one Job(...) of 29: CPython
    # passes more than 15 keywords through a dict it builds first (2.8 us a
    # job against 1.2). The times come with the base (_base_at); every other
    # field not of _NEW_JOB is set here, the ones most jobs leave unset
    # (None, as in _NEW_JOB) only when one is set. The containers (context,
    # tags, artifacts) are new for each job.
    at = rec.recorded_at
    last = _last_base
    job = replace(
        last[1] if last[0] is at else _base_at(at),
        id=rec.job_id,
        operator=e.operator,
        label=e.label,
        queue=e.queue,
        priority=e.priority,
        inputs=e.inputs,
        context=dict(e.context),
        tags=_unique(e.tags),
        max_attempts=e.max_attempts,
        restart_policy=e.restart_policy,
        retry_backoff=e.retry_backoff,
        retry_backoff_max=e.retry_backoff_max,
        timeout=e.timeout,
        artifacts=[],
    )
    if e.run_at is not None:
        job = replace(job, run_at=e.run_at, status="scheduled" if e.run_at > at else "queued")
    m = rec.meta
    if (
        e.description is not None
        or e.owner is not None
        or e.parent_id is not None
        or e.idempotency_key is not None
        or m.reason is not None
        or m.message is not None
    ):
        job = replace(
            job,
            description=e.description,
            owner=e.owner,
            parent_id=e.parent_id,
            idempotency_key=e.idempotency_key,
            status_reason=m.reason,
            status_message=m.message,
        )
    return job


def _failed(state: Job, rec: ev.Recorded, error: ev.ErrorInfo, retry_at: datetime | None) -> Job:
    if retry_at is not None:
        return _status(
            state,
            "scheduled" if retry_at > rec.recorded_at else "queued",
            rec,
            error=error,
            run_at=retry_at,
            worker=None,
            finished_at=None,
        )
    return _status(state, "failed", rec, error=error, finished_at=rec.recorded_at)


def _transition(state: Job, rec: ev.Recorded) -> Job:
    e = rec.event
    at = rec.recorded_at
    match e:
        # The two transitions of every job call replace() with their keywords,
        # as _status would, without its **changes: a ** call builds a dict
        # (about 1 us of the 2.5 either cost; tests/test_properties.py folds
        # every event type).
        case ev.Started():
            return replace(
                state,
                status="running",
                status_changed_at=at,
                status_reason=rec.meta.reason,
                status_message=rec.meta.message,
                attempt=state.attempt + 1,
                started_at=at,
                finished_at=None,
                worker=e.worker,
                run_link=e.run_link,
                progress=None,
            )
        case ev.Progressed():
            old = state.progress or Progress()
            return replace(
                state,
                progress=Progress(
                    fraction=e.fraction if e.fraction is not None else old.fraction,
                    message=e.message if e.message is not None else old.message,
                    iteration=e.iteration if e.iteration is not None else old.iteration,
                    metrics=_merge_metrics(old.metrics, e.metrics),
                    reported_at=at,
                ),
            )
        case ev.Completed():
            return replace(
                state,
                status="completed",
                status_changed_at=at,
                status_reason=rec.meta.reason,
                status_message=rec.meta.message,
                result=e.result,
                error=None,
                finished_at=at,
            )
        case ev.Failed():
            return _failed(state, rec, e.error, e.retry_at)
        case ev.Abandoned():
            who = e.worker or state.worker or "unknown"
            error = ev.ErrorInfo(type="abandoned", message=f"worker {who} stopped heartbeating")
            return _failed(state, rec, error, e.retry_at)
        case ev.CancelRequested():
            return _status(state, "cancelling", rec)
        case ev.Cancelled():
            return _status(state, "cancelled", rec, finished_at=at)
        case ev.Retried() | ev.Rerun():
            return _new_run(state, rec, e.run_at)
        case ev.Labelled():
            return replace(
                state,
                label=e.label,
                description=e.description if e.description is not None else state.description,
            )
        case ev.Pinned():
            return replace(state, pinned=e.pinned)
        case ev.Tagged():
            drop = set(e.remove)
            tags = [t for t in state.tags if t not in drop]
            tags += [t for t in dict.fromkeys(e.add) if t not in tags]
            return replace(state, tags=tags)
        case ev.ContextUpdated():
            context = {k: v for k, v in state.context.items() if k not in e.unset}
            context.update(e.set)
            return replace(state, context=context)
        case ev.ArtifactAdded():
            kept = [a for a in state.artifacts if a.key != e.artifact.key]
            return replace(state, artifacts=[*kept, e.artifact])
        case ev.Deleted():
            return replace(state, deleted_at=at)
        case ev.Submitted():
            raise NotApplicable(f"job {rec.job_id}: job.submitted at version {rec.version}")
    raise NotApplicable(f"job {rec.job_id}: unknown event {type(e).__name__}")


def apply(state: Job | None, rec: ev.Recorded) -> Job:
    """Fold one recorded event into a job's state and return the new state.

    ``state`` is ``None`` before the first event, which must be ``job.submitted``.
    Raises :class:`NotApplicable` when the stream is broken (a version out of
    sequence, an event before submission); lifecycle rules are not checked here.
    """
    if state is None:
        if not isinstance(rec.event, ev.Submitted) or rec.version != 1:
            raise NotApplicable(
                f"job {rec.job_id}: stream must start with job.submitted at version 1, "
                f"got {rec.type} at version {rec.version}"
            )
        return _submitted(rec, rec.event)
    if rec.version != state.version + 1:
        raise NotApplicable(
            f"job {rec.job_id}: event version {rec.version} does not follow {state.version}"
        )
    new = _transition(state, rec)
    return replace(new, version=rec.version, updated_at=rec.recorded_at)


def replay(events: Iterable[ev.Recorded], state: Job | None = None) -> Job | None:
    """Fold a job's events in order, from ``state`` (default: nothing)."""
    for rec in events:
        state = apply(state, rec)
    return state
