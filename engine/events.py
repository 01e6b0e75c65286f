"""The event vocabulary: one frozen, tagged msgspec Struct per event type.

This is a leaf module: it imports nothing from jobledger, so the read side
(:mod:`projections`) can depend on it alone.

Rules that keep old logs readable forever:

* the tag (``job.started``) is the stored ``type``; renaming a class never
  changes stored data. The stored payload (``data``) leaves the tag out: the
  row's ``type`` column holds it (:func:`engine.store.encode_payload`; rows
  written before 2026-12-03 carry it in ``data`` too, which readers ignore).
  A Struct encoded whole, as in an exported stream, keeps its tag;
* events evolve only by adding fields with defaults; readers ignore unknown
  fields;
* a change that cannot be expressed that way bumps ``SCHEMA_VERSION`` and adds
  an upcaster in :mod:`projections.upcasting` that rewrites old payloads.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar
from uuid import UUID

import msgspec

SCHEMA_VERSION = 1
"""Version of the payload shapes written by this code (stored in ``meta.schema``)."""


class ErrorInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """What went wrong: an exception type, its message and the traceback."""

    type: str
    message: str = ""
    traceback: str | None = None


class Artifact(msgspec.Struct, frozen=True, omit_defaults=True):
    """An output a job produced: where it is and how to check it."""

    key: str
    uri: str
    type: str | None = None
    size: int | None = None
    hash: str | None = None


def checked_artifact(artifact: Artifact) -> Artifact:
    """``artifact`` if it can be published: a key, a URI, and a size (if any) of
    zero or more; else ``ValueError`` naming what is missing. Checked where
    artifacts are written, not where the log is read, so no stored event stops
    a replay."""
    if not artifact.key:
        raise ValueError("an artifact needs a non-empty key")
    if not artifact.uri:
        raise ValueError(f"artifact {artifact.key!r} needs a non-empty uri")
    if artifact.size is not None and artifact.size < 0:
        raise ValueError(
            f"artifact {artifact.key!r}: size must not be negative, got {artifact.size}"
        )
    return artifact


RETRY_BACKOFF = 1.0
"""The default first retry delay, in seconds (:class:`engine.operators.RetryPolicy`)."""
RETRY_BACKOFF_MAX = 300.0
"""The default cap on retry delays, in seconds."""


def as_default(value: Any, default: Any) -> Any:
    """``default`` itself when ``value`` is a float equal to it, else ``value``.

    An event leaves out a field whose value *is* its default (msgspec omits
    defaults by identity, and two equal floats are two objects): passing the
    default object keeps 36 bytes of ``retry_backoff`` and
    ``retry_backoff_max`` out of every stored ``job.submitted`` whose
    operator keeps the defaults. Decoding gives the same value either way.
    """
    return default if type(value) is float and value == default else value


class Event(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", gc=False
):
    """Base of every event. ``type(event).tag`` is its stable stored name.

    Events hold JSON values only and are not tracked by the cyclic garbage
    collector (``gc=False``; see :class:`projections.job_state.Job`).
    """

    tag: ClassVar[str]


class Submitted(Event, tag="job.submitted"):
    """A job was submitted. Carries everything the job starts with."""

    operator: str
    label: str
    queue: str = "default"
    description: str | None = None
    inputs: Any = None
    priority: int = 0
    run_at: datetime | None = None
    max_attempts: int = 1
    restart_policy: str = "on_error"
    retry_backoff: float = RETRY_BACKOFF
    retry_backoff_max: float = RETRY_BACKOFF_MAX
    timeout: float | None = None
    tags: tuple[str, ...] = ()
    context: dict[str, Any] = {}
    parent_id: UUID | None = None
    owner: str | None = None
    idempotency_key: str | None = None


class Started(Event, tag="job.started"):
    """An attempt started on a worker (or an external executor)."""

    worker: str | None = None
    run_link: str | None = None


class Progressed(Event, tag="job.progress"):
    """The running attempt reported progress; unset fields keep their value."""

    fraction: float | None = None
    message: str | None = None
    iteration: int | None = None
    metrics: dict[str, float] = {}


class Completed(Event, tag="job.completed"):
    """The attempt succeeded, with the operator's result."""

    result: Any = None


class Failed(Event, tag="job.failed"):
    """The attempt failed. With ``retry_at`` the job is scheduled to try again."""

    error: ErrorInfo
    retry_at: datetime | None = None


class Abandoned(Event, tag="job.abandoned"):
    """The worker running the job stopped heartbeating; the job was rescued."""

    worker: str | None = None
    retry_at: datetime | None = None


class CancelRequested(Event, tag="job.cancel_requested"):
    """Cancellation of a running job was requested; its worker will stop it."""


class Cancelled(Event, tag="job.cancelled"):
    """The job was cancelled."""


class Retried(Event, tag="job.retried"):
    """A failed or cancelled job was sent back to the queue as a new run."""

    run_at: datetime | None = None


class Rerun(Event, tag="job.rerun"):
    """A finished job was sent back to the queue as a new run."""

    run_at: datetime | None = None


class Labelled(Event, tag="job.labelled"):
    """The job's label (and optionally its description) changed."""

    label: str
    description: str | None = None


class Pinned(Event, tag="job.pinned"):
    """The job was pinned or unpinned."""

    pinned: bool


class Tagged(Event, tag="job.tagged"):
    """Tags were added and/or removed."""

    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()


class ContextUpdated(Event, tag="job.context_updated"):
    """Context keys were set and/or removed."""

    set: dict[str, Any] = {}
    unset: tuple[str, ...] = ()


class ArtifactAdded(Event, tag="job.artifact_added"):
    """The running job published an artifact (replacing one with the same key)."""

    artifact: Artifact


class Deleted(Event, tag="job.deleted"):
    """The job was deleted: a tombstone. Its history stays in the log."""


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (
        Submitted,
        Started,
        Progressed,
        Completed,
        Failed,
        Abandoned,
        CancelRequested,
        Cancelled,
        Retried,
        Rerun,
        Labelled,
        Pinned,
        Tagged,
        ContextUpdated,
        ArtifactAdded,
        Deleted,
    )
}
"""Every event class by its stored tag."""

for _tag, _cls in EVENT_TYPES.items():
    _cls.tag = _tag  # type: ignore[misc]

AnyEvent = (
    Submitted
    | Started
    | Progressed
    | Completed
    | Failed
    | Abandoned
    | CancelRequested
    | Cancelled
    | Retried
    | Rerun
    | Labelled
    | Pinned
    | Tagged
    | ContextUpdated
    | ArtifactAdded
    | Deleted
)
"""The tagged union of every event, for decoding a payload that carries its type."""


class Meta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """Who and why: stored beside each event in ``meta``."""

    actor: str | None = None
    reason: str | None = None
    message: str | None = None
    worker: str | None = None
    forced: bool = False
    correlation_id: str | None = None
    schema: int = SCHEMA_VERSION


class Recorded(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An event in its stream: the envelope the reducer folds.

    ``position`` and ``tx_id`` are ``None`` until the event is stored.
    """

    job_id: UUID
    version: int
    event: AnyEvent
    recorded_at: datetime
    meta: Meta = Meta()
    position: int | None = None
    tx_id: int | None = None

    @property
    def type(self) -> str:
        """The event's stored type tag."""
        return self.event.tag
