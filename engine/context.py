"""JobContext: what a handler gets to talk to the ledger while it runs."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import structlog

from engine import events as ev
from engine import store
from engine.completer import Completer, Hold
from engine.ledger import progress_event
from projections.job_state import Job


class JobContext:
    """Passed to every handler: the job, progress, artifacts, a logger, cancellation.

    Progress is coalesced: reports closer together than ``progress_interval``
    seconds are merged (latest values win; metrics keep the latest value of
    each name) and written together, so a tight loop cannot flood the log.
    Whatever is pending is written before the job's outcome.
    """

    def __init__(self, hold: Hold, completer: Completer, *, progress_interval: float = 0.5) -> None:
        self._hold = hold
        self._completer = completer
        self._interval = progress_interval
        self._pending: ev.Progressed | None = None
        self._last_write = 0.0
        self._logger: Any = None

    @property
    def logger(self) -> Any:
        """A structlog logger bound with the job's id, operator, attempt and run."""
        if self._logger is None:
            job = self._hold.state
            self._logger = structlog.get_logger("jobledger.job").bind(
                job_id=str(job.id), operator=job.operator, attempt=job.attempt, run=job.run
            )
        return self._logger

    @property
    def job(self) -> Job:
        """The job as this attempt last saw it."""
        return self._hold.state

    @property
    def worker(self) -> str:
        """The id of the worker running this attempt."""
        return self._hold.worker

    @property
    def cancelled(self) -> bool:
        """Whether cancellation was requested (the handler is being cancelled)."""
        return self._hold.cancel_reason is not None

    async def progress(
        self,
        fraction: float | None = None,
        message: str | None = None,
        iteration: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Report progress: a fraction in 0..1, a message, an iteration, named metrics.

        Raises :class:`PayloadTooLarge` when the report (merged with what is
        pending) is too large to store, ``ValueError`` when a value has the
        wrong type; the pending report is then kept as it was.
        """
        new = progress_event(fraction, message, iteration, metrics)
        old = self._pending
        if old is not None:
            new = ev.Progressed(
                fraction=new.fraction if new.fraction is not None else old.fraction,
                message=new.message if new.message is not None else old.message,
                iteration=new.iteration if new.iteration is not None else old.iteration,
                metrics={**old.metrics, **new.metrics},
            )
        store.check_event(new)  # raised here, to the handler, even when coalesced
        self._pending = new
        if time.monotonic() - self._last_write >= self._interval:
            await self.flush()

    async def flush(self) -> None:
        """Write pending progress now."""
        async with self._hold.lock:
            event, self._pending = self._pending, None
            if event is None:
                return
            self._last_write = time.monotonic()
            await self._completer.write(self._hold, event)

    @property
    def has_pending(self) -> bool:
        """Whether progress is waiting to be written."""
        return self._pending is not None

    async def add_artifact(
        self,
        key: str,
        uri: str,
        type: str | None = None,
        size: int | None = None,
        hash: str | None = None,
    ) -> None:
        """Publish an output of this job (replacing one with the same key)."""
        artifact = ev.checked_artifact(
            ev.Artifact(key=key, uri=uri, type=type, size=size, hash=hash)
        )
        async with self._hold.lock:
            await self._completer.write(self._hold, ev.ArtifactAdded(artifact=artifact))

    def __repr__(self) -> str:
        job = self._hold.state
        return f"<JobContext {job.operator} {job.id} attempt {job.attempt}>"

    def bind(self, **values: Any) -> None:
        """Add fields to every log line of this job."""
        self.logger = self.logger.bind(**values)
