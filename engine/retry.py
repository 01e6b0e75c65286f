"""Retry policy: whether a failed attempt is tried again, and when.

A run gets up to ``max_attempts`` attempts when its ``restart_policy`` is
``"on_error"`` (``"never"`` never retries). The wait before attempt ``n + 1``
is exponential with "equal jitter": uniform in ``[cap / 2, cap]`` where
``cap = min(retry_backoff_max, retry_backoff * 2 ** (n - 1))``. Jitter spreads
out a herd of jobs that failed together; the lower half-bound keeps the wait
from collapsing to nothing. The chosen time is recorded in the event
(``retry_at``), so replay never needs a random number.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from projections.job_state import Job


def may_retry(job: Job) -> bool:
    """Whether the job's policy allows another attempt in this run."""
    return job.restart_policy == "on_error" and job.attempt < job.max_attempts


def backoff_delay(job: Job, rng: random.Random | None = None) -> float:
    """Seconds to wait before the next attempt (see the module docstring)."""
    cap = min(job.retry_backoff_max, job.retry_backoff * 2 ** max(0, job.attempt - 1))
    return (rng or random).uniform(cap / 2, cap)


def retry_at(job: Job, now: datetime, *, delay: float | None = None) -> datetime | None:
    """When the failed attempt is retried, or ``None`` when the job fails for good.

    ``delay`` overrides the backoff (a handler's ``RetryAfter``), not the policy.
    """
    if not may_retry(job):
        return None
    return now + timedelta(seconds=backoff_delay(job) if delay is None else max(0.0, delay))
