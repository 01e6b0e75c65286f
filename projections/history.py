"""A job's runs and progress history, derived from its replayed states.

Both are read off the sequence of states that the reducer produces while it
folds the job's events (:func:`steps`), so they never define job state a
second way: a run starts where the reducer's ``run`` counter changes, an
attempt where ``attempt`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import msgspec

from engine import events as ev
from projections.job_state import Job, MetricStat, apply


def steps(events: Iterable[ev.Recorded]) -> Iterator[tuple[ev.Recorded, Job]]:
    """Each event with the state right after it."""
    state: Job | None = None
    for rec in events:
        state = apply(state, rec)
        yield rec, state


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt of a run: where and when it ran, and how it ended."""

    number: int
    worker: str | None
    started_at: datetime
    ended_at: datetime | None = None
    outcome: str | None = None  # completed / failed / cancelled / abandoned / retrying
    error: ev.ErrorInfo | None = None


class Run(msgspec.Struct, frozen=True, kw_only=True):
    """One pass of the job from queued to a terminal status."""

    number: int
    queued_at: datetime
    attempts: list[Attempt]
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outcome: str | None = None  # the terminal status, or None while unfinished
    result: Any = None
    error: ev.ErrorInfo | None = None
    trigger: str = "submitted"  # submitted / retried / rerun


def runs(events: Iterable[ev.Recorded]) -> list[Run]:
    """The job's runs, each with its attempts, in order."""
    out: list[dict[str, Any]] = []
    attempts: list[dict[str, Any]] = []
    prev: Job | None = None
    for rec, state in steps(events):
        if prev is None or state.run != prev.run:
            attempts = []
            out.append(
                {
                    "number": state.run,
                    "queued_at": rec.recorded_at,
                    "attempts": attempts,
                    "trigger": "submitted" if prev is None else rec.type.removeprefix("job."),
                }
            )
        run = out[-1]
        if prev is not None and state.attempt != prev.attempt and state.run == prev.run:
            attempts.append(
                {"number": state.attempt, "worker": state.worker, "started_at": rec.recorded_at}
            )
            run.setdefault("started_at", rec.recorded_at)
        left_running = (
            prev is not None
            and prev.status in ("running", "cancelling")
            and state.status not in ("running", "cancelling")
        )
        if left_running and attempts:
            outcome = {
                ev.Abandoned: "abandoned",
                ev.Failed: "failed" if state.status == "failed" else "retrying",
            }.get(type(rec.event), state.status)
            attempts[-1].update(ended_at=rec.recorded_at, outcome=outcome, error=state.error)
        if state.terminal and (prev is None or not prev.terminal or prev.run != state.run):
            run.update(
                finished_at=state.finished_at,
                outcome=state.status,
                result=state.result,
                error=state.error,
            )
        prev = state
    result = []
    for r in out:
        r["attempts"] = [Attempt(**a) for a in r["attempts"]]
        result.append(Run(**r))
    return result


class ProgressPoint(msgspec.Struct, frozen=True, kw_only=True):
    """One progress report, with the run and attempt it belongs to."""

    at: datetime
    run: int
    attempt: int
    fraction: float | None = None
    message: str | None = None
    iteration: int | None = None
    metrics: dict[str, float] = {}
    metric_stats: dict[str, MetricStat] = {}


def progress(events: Iterable[ev.Recorded]) -> list[ProgressPoint]:
    """Every progress report in order, as reported and as accumulated."""
    out: list[ProgressPoint] = []
    for rec, state in steps(events):
        e = rec.event
        if isinstance(e, ev.Progressed):
            p = state.progress
            out.append(
                ProgressPoint(
                    at=rec.recorded_at,
                    run=state.run,
                    attempt=state.attempt,
                    fraction=p.fraction if p else e.fraction,
                    message=p.message if p else e.message,
                    iteration=p.iteration if p else e.iteration,
                    metrics=dict(e.metrics),
                    metric_stats=dict(p.metrics) if p else {},
                )
            )
    return out
