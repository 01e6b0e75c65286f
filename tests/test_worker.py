"""Workers in process: every outcome path, cancellation, fencing, burst, shutdown."""

from __future__ import annotations

from contextlib import asynccontextmanager
from datetime import timedelta

import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from engine import Cancel, JobContext, JobLedger, PayloadTooLarge, RetryAfter, Worker
from engine.rescuer import rescue
from engine.store import LIMITS
from projections.job_state import Job

FAST = {"heartbeat_interval": 0.1, "poll_interval": 0.2, "progress_interval": 0.05}


class Steps(msgspec.Struct):
    """Inputs of the test operators."""

    n: int = 1
    fail_until: int = 0
    seconds: float = 0.0


gate = {}  # job label -> anyio.Event the handler waits on (fencing test)


def register_operators(ledger: JobLedger) -> None:
    @ledger.operator("flaky", max_attempts=3, retry_backoff=0.01)
    async def flaky(ctx: JobContext, inputs: Steps) -> dict:
        if ctx.job.attempt <= inputs.fail_until:
            raise ConnectionError(f"attempt {ctx.job.attempt} failed")
        return {"attempt": ctx.job.attempt}

    @ledger.operator("sleepy", timeout=0.3)
    async def sleepy(ctx: JobContext, inputs: Steps) -> None:
        await anyio.sleep(inputs.seconds)

    @ledger.operator("asks_retry", max_attempts=2)
    async def asks_retry(ctx: JobContext) -> str:
        if ctx.job.attempt == 1:
            raise RetryAfter(0.2, "rate limited")
        return "ok"

    @ledger.operator("gives_up")
    async def gives_up(ctx: JobContext) -> None:
        raise Cancel("nothing to do")

    @ledger.operator("chatty")
    async def chatty(ctx: JobContext, inputs: Steps) -> int:
        for i in range(inputs.n):
            await ctx.progress(
                fraction=(i + 1) / inputs.n, iteration=i, metrics={"loss": 1 / (i + 1)}
            )
        await ctx.add_artifact("model", "s3://m/1", type="onnx", size=10, hash="sha256:ab")
        return inputs.n

    @ledger.operator("sized")
    async def sized(ctx: JobContext, inputs: Steps) -> str:
        # n: 1 returns a big result, 2 raises a big error, 3 reports big progress.
        if inputs.n == 1:
            return "x" * 5000
        if inputs.n == 2:
            raise ValueError("y" * 5000)
        if inputs.n == 3:
            await ctx.progress(message="written")  # the next one is coalesced, not written yet
            try:
                await ctx.progress(message="z" * 5000)
            except PayloadTooLarge as exc:
                return f"refused: {exc.size} bytes"
        return "small"

    @ledger.operator("gated", max_attempts=2, retry_backoff=0.01)
    async def gated(ctx: JobContext) -> str:
        await gate[ctx.job.label].wait()
        return ctx.worker


async def until(condition, timeout: float) -> None:
    """Poll a worker's in-process state until ``condition()`` holds (fail after ``timeout``)."""
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - the state has no event to wait on
            await anyio.sleep(0.01)


@asynccontextmanager
async def running(ledger: JobLedger, **options):
    worker = Worker(ledger, **{**FAST, **options})
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        yield worker
        worker.stop()


async def test_failures_retry_with_backoff_then_succeed(ledger: JobLedger) -> None:
    async with running(ledger):
        job = await ledger.submit("flaky", {"fail_until": 2})
        done = await ledger.wait(job.id, timeout=10, raise_for_status=True)
    assert done.result == {"attempt": 3} and done.attempt == 3
    [run] = await ledger.runs(job.id)
    assert [a.outcome for a in run.attempts] == ["retrying", "retrying", "completed"]
    assert [a.error.message for a in run.attempts[:2]] == ["attempt 1 failed", "attempt 2 failed"]
    assert "ConnectionError" in run.attempts[0].error.traceback
    # Backoff, not immediate: each retry is due at least half its cap (0.01 s,
    # doubling an attempt) after its attempt started. Not after the failure's
    # recorded_at: the completer may write an outcome later than its backoff.
    history = await ledger.history(job.id)
    started = [r.recorded_at for r in history if r.type == "job.started"]
    failed = [r.event.retry_at for r in history if r.type == "job.failed"]
    assert len(failed) == 2
    for attempt, (start, due) in enumerate(zip(started, failed, strict=False), start=1):
        assert due - start >= timedelta(seconds=0.01 * 2 ** (attempt - 1) / 2)


async def test_an_outcome_too_large_to_store_fails_only_its_own_job(
    ledger: JobLedger, monkeypatch
) -> None:
    # The completer writes outcomes in batches; an event over the limit is
    # refused to its own caller before it joins one, so the other jobs of the
    # batch are written, and the job whose outcome was refused fails.
    monkeypatch.setattr(LIMITS, "max_event_bytes", 4000)
    jobs = await ledger.submit_many(
        [{"operator": "sized", "inputs": {"n": n}} for n in (1, 2, 3, 4, 4, 4)]
    )
    async with running(ledger, concurrency=6):
        done = [await ledger.wait(j.id, timeout=10) for j in jobs]
    big_result, big_error, big_progress, *small = done
    assert big_result.status == "failed" and big_result.error.type == "PayloadTooLarge"
    assert "job.completed event is" in big_result.error.message
    assert big_result.status_reason == "outcome too large to store"
    assert big_error.status == "failed" and big_error.error.type == "PayloadTooLarge"
    assert "the handler's ValueError: yyy" in big_error.error.message
    assert big_progress.status == "completed"
    assert big_progress.result.startswith("refused: ")
    assert big_progress.progress.message == "written"
    assert [j.status for j in small] == ["completed"] * 3
    assert all(j.result == "small" for j in small)


async def test_attempts_exhausted_fail_the_job(ledger: JobLedger) -> None:
    async with running(ledger):
        job = await ledger.submit("flaky", {"fail_until": 5})
        done = await ledger.wait(job.id, timeout=10)
    assert done.status == "failed" and done.attempt == 3 and done.error.type == "ConnectionError"


async def test_restart_policy_never(ledger: JobLedger) -> None:
    async with running(ledger):
        job = await ledger.submit("flaky", {"fail_until": 1}, restart_policy="never")
        done = await ledger.wait(job.id, timeout=10)
    assert done.status == "failed" and done.attempt == 1


async def test_timeout(ledger: JobLedger) -> None:
    async with running(ledger):
        job = await ledger.submit("sleepy", {"seconds": 5})
        done = await ledger.wait(job.id, timeout=10)
    assert done.status == "failed" and done.error.type == "timeout"
    assert "0.3s" in done.error.message


async def test_retry_after_and_cancel_signals(ledger: JobLedger) -> None:
    async with running(ledger):
        a = await ledger.submit("asks_retry")
        b = await ledger.submit("gives_up")
        a_done = await ledger.wait(a.id, timeout=10)
        b_done = await ledger.wait(b.id, timeout=10)
    assert a_done.status == "completed" and a_done.attempt == 2
    # The handler asks for 0.2 s at once: the retry is due 0.2 s after it
    # raised, so at least that after its attempt started (the failure's own
    # recorded_at is when the completer wrote it, which may be later).
    history = await ledger.history(a.id)
    started = next(r for r in history if r.type == "job.started")
    failed = next(r for r in history if r.type == "job.failed")
    delay = (failed.event.retry_at - started.recorded_at).total_seconds()
    assert 0.2 <= delay < 0.3 and failed.event.error.type == "RetryAfter"
    assert b_done.status == "cancelled" and b_done.status_reason == "nothing to do"


async def test_inputs_that_no_longer_decode_fail_without_retry(ledger: JobLedger, db: str) -> None:
    async with JobLedger(db) as client:  # a process without the operator: no validation
        job = await client.submit("flaky", {"fail_until": "many"}, max_attempts=3)
    async with running(ledger):
        done = await ledger.wait(job.id, timeout=10)
    assert done.status == "failed" and done.attempt == 1
    assert done.error.type == "InvalidInputs" and "$.fail_until" in done.error.message


@pytest.mark.parametrize("listen", [True, False])
async def test_cancel_a_running_job(db: str, listen: bool) -> None:
    ledger = JobLedger(db, listen=listen)
    register_operators(ledger)
    async with ledger, running(ledger) as worker:
        job = await ledger.submit("sleepy", {"seconds": 0.25}, timeout=30)
        job = await ledger.submit("sleepy", {"seconds": 20}, timeout=30)
        await ledger.wait(job.id, until="running", timeout=5)
        await ledger.cancel(job.id, actor="ana", reason="wrong input")
        done = await ledger.wait(job.id, timeout=5)
        # The worker forgets the job when its task ends, just after the commit.
        await until(lambda: job.id not in worker.holds, timeout=2)
        types = [r.type for r in await ledger.history(job.id)]
    assert done.status == "cancelled"
    assert types[-2:] == ["job.cancel_requested", "job.cancelled"]


async def test_progress_is_coalesced_and_kept(ledger: JobLedger) -> None:
    async with running(ledger, progress_interval=0.5):
        job = await ledger.submit("chatty", {"n": 2000})
        done = await ledger.wait(job.id, timeout=10, raise_for_status=True)
    history = await ledger.history(job.id)
    progress = [r for r in history if r.type == "job.progress"]
    assert 1 <= len(progress) <= 10  # 2000 reports, a handful of events
    assert done.progress.fraction == 1.0 and done.progress.iteration == 1999
    assert done.progress.metrics["loss"].last == pytest.approx(1 / 2000)
    assert done.result == 2000
    [artifact] = done.artifacts
    assert (artifact.key, artifact.type, artifact.hash) == ("model", "onnx", "sha256:ab")


async def test_priority_and_schedule_are_honoured(ledger: JobLedger) -> None:
    low = await ledger.submit("flaky", priority=0)
    high = await ledger.submit("flaky", priority=10)
    later = await ledger.submit("flaky", priority=99, delay=0.8)
    async with running(ledger, concurrency=1):
        for j in (low, high, later):
            await ledger.wait(j.id, timeout=10)
    started = {
        j.id: next(r.recorded_at for r in await ledger.history(j.id) if r.type == "job.started")
        for j in (low, high, later)
    }
    assert started[high.id] < started[low.id]
    assert started[later.id] >= later.run_at


async def test_burst_with_limit_and_filters(ledger: JobLedger) -> None:
    cats = await ledger.submit_many([{"operator": "flaky", "context": {"d": "cats"}}] * 5)
    dogs = await ledger.submit_many([{"operator": "flaky", "context": {"d": "dogs"}}] * 3)
    worker = Worker(ledger, burst=True, limit=3, context={"d": "cats"}, **FAST)
    with anyio.fail_after(10):
        await worker.run()
    assert await ledger.count(status="completed") == 3
    assert await ledger.count(status="completed", context={"d": "dogs"}) == 0
    with anyio.fail_after(10):
        await Worker(ledger, burst=True, **FAST).run()
    assert await ledger.count(status="completed") == len(cats) + len(dogs)


async def test_execute_runs_one_job_in_process(ledger: JobLedger) -> None:
    job = await ledger.submit("flaky", {"fail_until": 0})
    done = await ledger.execute(job.id)
    assert done.status == "completed" and done.result == {"attempt": 1}
    with pytest.raises(ValueError, match="is completed, not queued"):
        await ledger.execute(job.id)


async def test_a_rescued_job_cannot_be_completed_by_its_old_worker(
    ledger: JobLedger, db: str
) -> None:
    """Fencing: A stalls, its job is rescued and completed by B; A's late write is refused."""
    gate["fenced"] = anyio.Event()
    job = await ledger.submit("gated", label="fenced")
    async with running(ledger, concurrency=1, register=True) as a:
        await ledger.wait(job.id, until="running", timeout=5)
        # A stops heartbeating (as if paused): silence it, let the beat already
        # due (at most one interval away) go by, then age its heartbeat and
        # rescue. Aged first, that last beat could land between the two.
        a.heartbeat_interval = 3600
        # Nor does it take new work: once its refused write frees its slot
        # it would race B for the requeued attempt (and sometimes win).
        a.concurrency = 0
        await anyio.sleep(FAST["heartbeat_interval"] * 3)
        async with ledger.pool.acquire() as conn:
            await conn.execute(
                "UPDATE jobledger.workers SET last_heartbeat = now() - interval '1 hour'"
                " WHERE id = $1",
                a.id,
            )
        assert await rescue(ledger, rescue_after=60) == 1
        rescued = await ledger.get(job.id)
        assert rescued.status in ("queued", "scheduled") and rescued.error.type == "abandoned"
        # B runs the new attempt to completion (the gate is open for it).
        gate["fenced"].set()
        b = Worker(ledger, concurrency=1, **FAST)
        async with anyio.create_task_group() as tg:
            await tg.start(b.run)
            done = await ledger.wait(job.id, timeout=5)
            b.stop()
        # A's handler has returned by now as well; its completion was refused.
        await until(lambda: not a.holds, timeout=5)
        assert a.completer.refused == 1
        assert a.failed_writes == 0  # refused cleanly, not an error
    assert done.status == "completed" and done.result == b.id
    history = await ledger.history(job.id)
    assert [r.type for r in history].count("job.completed") == 1
    assert [r.type for r in history] == [
        "job.submitted",
        "job.started",
        "job.abandoned",
        "job.started",
        "job.completed",
    ]


@pytest.mark.parametrize("concurrency", [10, 1])
async def test_shutdown_interrupts_and_requeues_after_grace(
    ledger: JobLedger, concurrency: int
) -> None:
    """stop() lets the running job go on for the grace period, then records it as
    interrupted and requeued; a full worker (concurrency 1) starts the grace
    period at once too, it does not wait for a slot to free."""
    job = await ledger.submit("sleepy", {"seconds": 30}, timeout=60)
    worker = Worker(ledger, concurrency=concurrency, shutdown_grace=0.2, **FAST)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await ledger.wait(job.id, until="running", timeout=5)
            worker.stop()
    after = await ledger.get(job.id)
    assert after.status == "queued" and after.error.type == "interrupted"
    rows = await ledger.pool.fetch(
        "SELECT stopped_at FROM jobledger.workers WHERE id = $1", worker.id
    )
    assert rows[0]["stopped_at"] is not None


async def test_workers_publish_operators(ledger: JobLedger, db: str) -> None:
    async with JobLedger(db) as other:
        names = {o.name for o in await other.operators()}
    assert {"flaky", "sleepy", "chatty", "gated"} <= names


async def test_a_claim_whose_reply_was_lost_is_adopted(ledger: JobLedger) -> None:
    """The log says the worker holds a job it does not know about: it adopts and runs it."""
    async with running(ledger, concurrency=1) as worker:
        job = await ledger.submit("flaky", delay=3600)  # not claimable by the loop
        # As if the worker's claim committed but the reply never arrived:
        await ledger.mark_running(job.id, worker=worker.id)
        done = await ledger.wait(job.id, timeout=10, raise_for_status=True)
    assert done.attempt == 1 and done.worker == worker.id
    assert [r.type for r in await ledger.history(job.id)][-2:] == ["job.started", "job.completed"]


async def test_a_cancelled_worker_abandons_its_jobs_promptly(ledger: JobLedger) -> None:
    """Cancelling the task that runs a worker (not stop()) cancels running
    handlers at once, records nothing for them, and leaves them to the rescuer."""
    jobs = [await ledger.submit("sleepy", {"seconds": 30}, timeout=60) for _ in range(3)]
    worker = Worker(ledger, shutdown_grace=30, **FAST)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            for job in jobs:
                await ledger.wait(job.id, until="running", timeout=5)
            tg.cancel_scope.cancel()
    assert worker.holds == {} and worker.contexts == {}
    assert {(await ledger.get(j.id)).status for j in jobs} == {"running"}
    assert await rescue(ledger, rescue_after=0) == 3  # the worker row says it stopped
    assert {(await ledger.get(j.id)).status for j in jobs} == {"failed"}  # one attempt each


@asynccontextmanager
async def gated_job_running(ledger: JobLedger, label: str, **options):
    """A worker (with ``options``) running one ``gated`` job, until the block exits."""
    gate[label] = anyio.Event()
    job = await ledger.submit("gated", label=label)
    async with running(ledger, **options) as worker:
        await ledger.wait(job.id, until="running", timeout=5)
        yield worker, job


@asynccontextmanager
async def outcome_write_held(ledger: JobLedger, job: Job):
    """Let a running ``gated`` job's handler return while its outcome write
    waits on a lock of the job's row, held until the block exits."""
    async with ledger.pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("SELECT 1 FROM jobledger.jobs WHERE id = $1 FOR UPDATE", job.id)
        gate[job.label].set()
        yield


async def test_an_outcome_write_past_its_deadline_lets_the_job_go(ledger: JobLedger) -> None:
    """A final write that cannot land within final_write_timeout is reported and
    the job let go; the completer keeps the write and lands it later."""
    with capture_logs() as logs:
        async with gated_job_running(ledger, "slow write", final_write_timeout=0.3) as (
            worker,
            job,
        ):
            async with outcome_write_held(ledger, job):
                # the write overruns and the job is let go
                await until(lambda: worker.failed_writes and not worker.holds, timeout=5)
                assert (await ledger.get(job.id)).status == "running"
            # the lock is gone: the completer lands the write it kept
            done = await ledger.wait(job.id, timeout=10, raise_for_status=True)
    assert done.result == worker.id
    timed_out = [e["job_id"] for e in logs if e["event"] == "job_outcome_write_timed_out"]
    assert timed_out == [str(job.id)]


async def test_an_outcome_write_within_its_deadline_is_left_alone(ledger: JobLedger) -> None:
    """The one timer that times out outcome writes checks every tenth of the
    timeout: a write held up for several of its checks, but landing within its
    deadline, is not let go; and the timer is gone once the worker stops."""
    with capture_logs() as logs:
        async with gated_job_running(ledger, "held write", final_write_timeout=2.0) as (
            worker,
            job,
        ):
            async with outcome_write_held(ledger, job):
                await anyio.sleep(0.5)  # two checks of the timer go by
            done = await ledger.wait(job.id, timeout=10, raise_for_status=True)
            # The waiter may wake (on the commit's NOTIFY) before the job's task
            # has taken its write's reply and released the hold.
            await until(lambda: worker.holds == {}, timeout=5)
    assert done.result == worker.id and worker.failed_writes == 0
    assert not [e for e in logs if e["event"] == "job_outcome_write_timed_out"]
    assert worker._write_watch is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency must be at least 1, got 0"),
        ({"final_write_timeout": 0}, "final_write_timeout must be positive, got 0"),
        ({"final_write_timeout": -1.5}, "final_write_timeout must be positive, got -1.5"),
        ({"operators": ["nope"]}, "operators not registered in this process: nope"),
        ({"limit": 0}, "limit must be at least 1, got 0"),
        ({"poll_interval": 0}, "poll_interval must be positive, got 0"),
        ({"heartbeat_interval": float("nan")}, "heartbeat_interval must be positive, got nan"),
        ({"rescue_after": -1}, "rescue_after must be positive, got -1"),
        ({"rescue_interval": 0}, "rescue_interval must be positive, got 0"),
        ({"shutdown_grace": -0.5}, "shutdown_grace must be zero or more, got -0.5"),
        ({"progress_interval": -1}, "progress_interval must be zero or more, got -1"),
    ],
)
async def test_bad_worker_options_are_refused_by_name(
    ledger: JobLedger, options: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Worker(ledger, **options)


async def test_one_queue_or_operator_may_be_given_as_a_string(ledger: JobLedger) -> None:
    """``queues="default"`` is the queue default, not the queues d, e, f, a, u, l, t."""
    job = await ledger.submit("gives_up", queue="default")
    worker = Worker(ledger, queues="default", operators="gives_up", burst=True, **FAST)
    assert (worker.queues, worker.operators) == (["default"], ["gives_up"])
    with anyio.fail_after(10):
        await worker.run()
    assert (await ledger.get(job.id)).status == "cancelled"


async def test_a_job_task_that_raises_fails_the_worker(ledger: JobLedger) -> None:
    """_run_job records every failure of a job; an exception that escapes it
    anyway is a bug, and the worker fails loudly instead of losing it."""
    await ledger.submit("flaky")
    worker = Worker(ledger, **FAST)

    async def broken(hold) -> None:
        raise RuntimeError("a bug in the worker")

    worker._run_job = broken  # type: ignore[method-assign]
    with anyio.fail_after(10), pytest.raises(ExceptionGroup) as err:
        await worker.run()
    assert err.group_contains(RuntimeError, match="a bug in the worker")
    assert worker.holds == {}


async def test_a_returned_handler_frees_its_slot_while_its_outcome_is_written(
    ledger: JobLedger,
) -> None:
    """Concurrency 1: the next job starts while the first one's outcome write waits
    (here on a row lock); with two outcomes waiting, no third job is claimed."""
    for label in ("a", "b", "c"):
        gate[label] = anyio.Event()
    a = await ledger.submit("gated", label="a")
    async with running(ledger, concurrency=1) as worker:
        await until(lambda: a.id in worker.holds, 5)
        async with outcome_write_held(ledger, a):
            b = await ledger.submit("gated", label="b")
            await until(lambda: b.id in worker.holds, 5)
            assert (await ledger.get(a.id)).status == "running"  # its outcome still waits
            c = await ledger.submit("gated", label="c")
            gate["b"].set()
            await until(lambda: worker._writing == 2, 5)
            await anyio.sleep(0.5)  # room for a claim, were one allowed
            assert c.id not in worker.holds
            assert (await ledger.get(c.id)).status == "queued"
        gate["c"].set()
        await until(lambda: worker.claimed == 3 and not worker.holds, 10)
        assert worker._writing == 0
    for job in (a, b, c):
        assert (await ledger.get(job.id)).status == "completed"
