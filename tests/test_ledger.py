"""The JobLedger API against a real database: submit, transitions, reads, audit."""

from __future__ import annotations

import asyncio
import copy
import pickle
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import msgspec
import pytest

from engine import (
    ErrorInfo,
    InvalidInputs,
    InvalidTransition,
    JobFailed,
    JobLedger,
    JobNotFound,
    JobSpec,
    PayloadTooLarge,
    UnknownOperator,
    WaitTimeout,
    store,
)
from engine import events as ev
from engine.ledger import new_job_id, new_job_ids
from engine.postgres import connect
from engine.sqlfiles import Q
from engine.store import LIMITS
from projections.job_state import apply
from tests.operators import ImportInputs, register_basic

register_operators = register_basic


async def test_submit_returns_the_stored_job(ledger: JobLedger) -> None:
    job = await ledger.submit(
        "dataset.import",
        {"dataset": "cats"},
        description="nightly import",
        priority=5,
        tags=["nightly", "cats"],
        context={"dataset": "cats", "workspace": "ml"},
        owner="ana",
        actor="ana",
        reason="schedule",
    )
    assert job.status == "queued"
    assert job.label == "dataset.import"  # defaults to the operator
    assert job.queue == "imports"  # the operator's default
    assert job.max_attempts == 3 and job.timeout == 60
    assert job.inputs == {"dataset": "cats", "rows": 100}  # validated, defaults filled
    assert job.version == 1 and job.attempt == 0 and job.run == 1
    assert job.description == "nightly import" and job.owner == "ana"
    assert job.status_reason == "schedule" and job.tags == ["nightly", "cats"]
    stored = await ledger.get(job.id)
    assert stored == job
    [rec] = await ledger.history(job.id)
    assert rec.type == "job.submitted" and rec.meta.actor == "ana" and rec.meta.reason == "schedule"
    assert rec.recorded_at == job.created_at


@pytest.mark.parametrize(
    "field", ["description", "owner", "parent_id", "idempotency_key", "reason", "message"]
)
async def test_each_rarely_set_field_of_a_submission_is_kept_alone(
    ledger: JobLedger, field: str
) -> None:
    # the reducer sets these six only when one of them is given: each alone
    parent = await ledger.submit("noop")
    value = {"parent_id": parent.id, "description": "d", "owner": "o"}.get(field, "x")
    where = {"reason": "status_reason", "message": "status_message"}.get(field, field)
    if field == "message":  # a submission has no message argument: fold the event itself
        rec = ev.Recorded(
            job_id=new_job_id(),
            version=1,
            event=ev.Submitted(operator="noop", label="noop"),
            recorded_at=datetime.now(UTC),
            meta=ev.Meta(message="x"),
        )
        job = apply(None, rec)
    elif field == "reason":
        job = await ledger.submit("noop", reason="x")
    else:
        job = await ledger.submit("noop", **{field: value})
    assert getattr(job, where) == value
    for other in ("description", "owner", "parent_id", "idempotency_key"):
        if other != field:
            assert getattr(job, other) is None
    if field != "message":
        assert await ledger.get(job.id) == job


async def test_submit_accepts_the_input_struct(ledger: JobLedger) -> None:
    job = await ledger.submit("dataset.import", ImportInputs(dataset="dogs", rows=7))
    assert job.inputs == {"dataset": "dogs", "rows": 7}


@pytest.mark.parametrize(
    ("inputs", "path", "detail"),
    [
        ({"dataset": 3}, "$.dataset", "Expected `str`, got `int`"),
        ({"dataset": "x", "rows": "many"}, "$.rows", "Expected `int`, got `str`"),
        ({}, None, "missing required field `dataset`"),
        ({"dataset": "x", "colour": "red"}, None, "unknown field `colour`"),
        ([1, 2], None, "Expected `object`, got `array`"),
    ],
)
async def test_bad_inputs_name_the_field_and_store_nothing(
    ledger: JobLedger, inputs: object, path: str | None, detail: str
) -> None:
    with pytest.raises(InvalidInputs) as err:
        await ledger.submit("dataset.import", inputs)
    assert err.value.path == path
    assert detail in str(err.value)
    assert "dataset.import" in str(err.value)
    assert await ledger.count() == 0


async def test_unknown_operator(ledger: JobLedger) -> None:
    with pytest.raises(UnknownOperator, match="'nope'"):
        await ledger.submit("nope")


async def test_operator_published_elsewhere_can_be_submitted(ledger: JobLedger, db: str) -> None:
    # A second process (here: a second ledger with no operators) submits to
    # an operator that only the first one registered.
    async with JobLedger(db) as client:
        assert client.registry == {}
        job = await client.submit("dataset.import", {"dataset": "remote"})
        assert job.queue == "imports" and job.max_attempts == 3
        names = [o.name for o in await client.operators()]
        assert names == ["dataset.import", "noop"]
        [imp] = [o for o in await client.operators() if o.name == "dataset.import"]
        assert imp.input_schema["$defs"]["ImportInputs"]["required"] == ["dataset"]


async def noop_handler(ctx: object) -> None:
    """A handler for registration checks."""


async def test_bad_arguments_name_what_is_wrong_and_store_nothing(ledger: JobLedger) -> None:
    parent = await ledger.submit("noop")
    gone = await ledger.submit("noop")
    await ledger.delete(gone.id)
    nowhere = "00000000-0000-0000-0000-000000000000"
    cases = [
        (lambda: ledger.submit_many([{"operator": "noop"}, 1]), TypeError, "item 1: expected"),
        (lambda: ledger.submit("noop", priority="high"), ValueError, "priority must be an integer"),
        (lambda: ledger.submit("noop", priority=2.5), ValueError, "priority must be an integer"),
        (lambda: ledger.submit("noop", parent_id=nowhere), ValueError, f"job {nowhere} does not"),
        (
            lambda: ledger.submit_many(
                [{"operator": "noop"}, {"operator": "noop", "parent_id": gone.id}]
            ),
            ValueError,
            "was deleted",
        ),
        (lambda: ledger.add_tags(parent.id, []), ValueError, "at least one tag"),
        (lambda: ledger.remove_tags(parent.id, ()), ValueError, "at least one tag"),
        (lambda: ledger.update_context(parent.id, {"a": object()}), ValueError, "must be JSON"),
        (
            lambda: ledger.wait(parent.id, until="done", timeout=1),
            ValueError,
            "unknown status 'done'",
        ),
        (
            lambda: ledger.add_artifact(parent.id, ev.Artifact(key="model", uri="")),
            ValueError,
            "artifact 'model' needs a non-empty uri",
        ),
        (
            lambda: ledger.add_artifact(parent.id, ev.Artifact(key="m", uri="s3://m", size=-1)),
            ValueError,
            "size must not be negative, got -1",
        ),
        (lambda: ledger.operator("elsewhere", queue="")(noop_handler), ValueError, "non-empty"),
    ]
    for call, kind, text in cases:
        with pytest.raises(kind, match=text):
            await call()
    assert "elsewhere" not in ledger.registry
    assert await ledger.count(include_deleted=True) == 2
    assert (await ledger.get(parent.id)).version == 1
    child = await ledger.submit("noop", parent_id=parent.id, priority=2)
    assert child.parent_id == parent.id and child.priority == 2


async def test_non_json_and_oversized_payloads(ledger: JobLedger, monkeypatch) -> None:
    with pytest.raises(InvalidInputs, match="inputs must be JSON values"):
        await ledger.submit("noop", {"when": object()})
    with pytest.raises(InvalidInputs, match="context must be JSON values"):
        await ledger.submit("noop", context={"s": {1, 2}.__iter__()})
    monkeypatch.setattr(LIMITS, "max_event_bytes", 2000)
    with pytest.raises(PayloadTooLarge, match="over the limit of 2000 bytes"):
        await ledger.submit("noop", {"blob": "x" * 5000})
    big = [{"operator": "noop"}, {"operator": "noop", "inputs": {"blob": "x" * 5000}}]
    with pytest.raises(PayloadTooLarge, match=r"job\.submitted event of item 1 of 2 \(job "):
        await ledger.submit_many(big)
    assert await ledger.count() == 0


async def test_bad_submit_arguments(ledger: JobLedger) -> None:
    with pytest.raises(ValueError, match="either run_at or delay"):
        await ledger.submit("noop", delay=1, run_at=datetime.now(UTC))
    with pytest.raises(ValueError, match="timezone-aware"):
        await ledger.submit("noop", run_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="max_attempts"):
        await ledger.submit("noop", max_attempts=0)
    with pytest.raises(ValueError, match="restart_policy"):
        await ledger.submit("noop", restart_policy="always")
    assert await ledger.count() == 0


async def test_delay_schedules_the_job(ledger: JobLedger) -> None:
    job = await ledger.submit("noop", delay=3600)
    assert job.status == "scheduled"
    assert job.run_at == job.created_at + timedelta(seconds=3600)


async def test_idempotency_key_returns_the_first_job(ledger: JobLedger) -> None:
    first = await ledger.submit("noop", idempotency_key="import-2026-11-22")
    again = await ledger.submit("noop", idempotency_key="import-2026-11-22", label="other")
    assert again == first
    jobs = await ledger.submit_many(
        [
            {"operator": "noop", "idempotency_key": "import-2026-11-22"},
            {"operator": "noop", "idempotency_key": "k2"},
            {"operator": "noop", "idempotency_key": "k2"},
        ]
    )
    assert jobs[0] == first and jobs[1].id == jobs[2].id
    assert await ledger.count() == 2


async def test_submit_many_keeps_order_and_is_all_or_nothing(ledger: JobLedger) -> None:
    jobs = await ledger.submit_many(
        [{"operator": "dataset.import", "inputs": {"dataset": f"d{i}"}} for i in range(50)]
    )
    assert [j.inputs["dataset"] for j in jobs] == [f"d{i}" for i in range(50)]
    with pytest.raises(InvalidInputs, match=r"\$\.dataset"):
        await ledger.submit_many(
            [
                {"operator": "dataset.import", "inputs": {"dataset": "ok"}},
                {"operator": "dataset.import", "inputs": {"dataset": 1}},
            ]
        )
    with pytest.raises(InvalidInputs, match="item 0"):
        await ledger.submit_many([{"operator": "noop", "priority": "high"}])
    # a misspelt key is refused, not dropped with its value
    with pytest.raises(ValueError, match="item 1: unknown key 'priorty'; a job spec takes"):
        await ledger.submit_many([{"operator": "noop"}, {"operator": "noop", "priorty": 5}])
    with pytest.raises(ValueError, match=r"unknown keys 'actor', 'reason'.*of submit_many"):
        await ledger.submit_many([{"operator": "noop", "actor": "ana", "reason": "r"}])
    assert await ledger.count() == 50

    class Rank:  # an integer that is not an int, as numpy's are
        def __init__(self, n: int) -> None:
            self.n = n

        def __index__(self) -> int:
            return self.n

    # plain dicts convert in one call; one that call refuses goes item by item
    ranked = await ledger.submit_many(
        [{"operator": "noop", "priority": 1}, {"operator": "noop", "priority": Rank(7)}]
    )
    assert [j.priority for j in ranked] == [1, 7]
    assert [(await ledger.get(j.id)).priority for j in ranked] == [1, 7]


async def test_a_job_spec_is_checked_like_a_mapping(ledger: JobLedger) -> None:
    # Building a msgspec Struct checks no types: a JobSpec with a list for its
    # context once wrote a job.submitted event that no replay could decode.
    cases = [
        (JobSpec(operator="noop", context=[("a", 1)]), r"\$\.context"),
        (JobSpec(operator="noop", tags="gpu"), r"\$\.tags"),
        (JobSpec(operator="noop", run_at="tomorrow"), r"\$\.run_at"),
        (JobSpec(operator="noop", max_attempts="3"), r"\$\.max_attempts"),
        (JobSpec(operator="noop", label=5), r"\$\.label"),
        (JobSpec(operator="noop", parent_id="x"), r"\$\.parent_id"),
    ]
    for spec, where in cases:
        with pytest.raises(InvalidInputs, match=rf"item 1: .* - at `{where}`"):
            await ledger.submit_many([JobSpec(operator="noop"), spec])
    with pytest.raises(InvalidInputs, match=r"\$\.run_at"):
        await ledger.submit("noop", run_at="tomorrow")  # type: ignore[arg-type]
    assert await ledger.count() == 0
    # what converts does: an RFC 3339 time, a tuple of tags
    [job] = await ledger.submit_many(
        [JobSpec(operator="noop", run_at="2030-01-01T00:00:00Z", tags=("a", "b"))]
    )
    assert job.run_at == datetime(2030, 1, 1, tzinfo=UTC) and job.tags == ["a", "b"]


async def test_no_write_stores_an_event_its_readers_cannot_decode(ledger: JobLedger) -> None:
    # Wrong types from a caller (no annotation is checked at run time) are
    # refused before the write, naming the field; a stored one would stop
    # every replay of the stream (the teardown verify would report it).
    job = await ledger.submit("noop")
    cases = [
        (lambda: ledger.add_tags(job.id, [1, 2]), r"job\.tagged event .* at `\$\.add\[0\]`"),
        (lambda: ledger.cancel(job.id, reason=5), r"meta of the job\.cancelled .* `\$\.reason`"),
        (lambda: ledger.submit("noop", actor=3), r"meta of the job\.submitted .* `\$\.actor`"),
        (lambda: ledger.submit_many([{"operator": "noop"}] * 2, reason=["x"]), r"`\$\.reason`"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            await call()
    assert await ledger.count() == 1
    assert [r.type for r in await ledger.history(job.id)] == ["job.submitted"]
    # a handler's progress and outcomes are checked one by one, before they join
    # the completer's batch with other jobs' events
    with pytest.raises(ValueError, match=r"job\.progress event: .* `\$\.message`"):
        store.check_event(ev.Progressed(message=3))  # type: ignore[arg-type]
    store.check_event(ev.Progressed(message="ok"))


async def test_submit_many_stores_each_jobs_own_values(ledger: JobLedger) -> None:
    # A batch's rows go to the server as one template and, per job, the columns
    # that differ from it (store._encode_streams): every field a submit can set
    # varies here, and JSON values that Python calls equal (1, 1.0, True) must
    # each be stored as given.
    parent = await ledger.submit("noop")
    now = datetime.now(UTC)
    specs = [
        {"operator": "noop", "inputs": {"n": 1}},
        {"operator": "noop", "inputs": {"n": 1.0}},
        {"operator": "noop", "inputs": {"n": True}, "context": {"n": 1.0}},
        {
            "operator": "dataset.import",
            "inputs": {"dataset": "cats"},
            "label": "cats",
            "description": "d",
            "queue": "q2",
            "priority": 7,
            "run_at": now + timedelta(hours=1),
            "max_attempts": 5,
            "timeout": 9.5,
            "restart_policy": "never",
            "retry_backoff": 2.5,
            "tags": ["a", "b"],
            "context": {"n": 1},
            "parent_id": parent.id,
            "owner": "ana",
            "idempotency_key": "k-cats",
        },
        {"operator": "noop", "inputs": {"n": 1}},
    ]
    jobs = await ledger.submit_many(specs, actor="ana")
    stored = [await ledger.get(j.id) for j in jobs]
    assert stored == jobs
    inputs = [j.inputs["n"] for j in stored if j.operator == "noop"]
    assert [(v, type(v)) for v in inputs] == [(1, int), (1.0, float), (True, bool), (1, int)]
    assert [type(j.context.get("n")) for j in stored] == [
        type(None),
        type(None),
        float,
        int,
        type(None),
    ]
    cats = stored[3]
    assert (cats.status, cats.queue, cats.priority, cats.tags) == ("scheduled", "q2", 7, ["a", "b"])
    assert (cats.parent_id, cats.owner, cats.idempotency_key) == (parent.id, "ana", "k-cats")
    assert (cats.max_attempts, cats.timeout, cats.restart_policy) == (5, 9.5, "never")
    for job in stored:
        [rec] = await ledger.history(job.id)
        assert rec.meta.actor == "ana" and rec.recorded_at == job.created_at
    # Alone in a batch, values equal to Python but not to JSON are no column
    # the batch shares.
    values = [1, 1.0, True]
    alike = await ledger.submit_many(
        [{"operator": "noop", "inputs": {"n": v}, "context": {"n": v}} for v in values]
    )
    for job, v in zip(alike, values, strict=True):
        got = await ledger.get(job.id)
        assert type(got.inputs["n"]) is type(v) and type(got.context["n"]) is type(v)
        [rec] = await ledger.history(job.id)
        assert type(rec.event.inputs["n"]) is type(v)


async def test_a_submitted_event_leaves_out_the_default_retry(ledger: JobLedger, db: str) -> None:
    # the operator's defaults are the event's own (equal floats made the same
    # object), so they are not stored; any other value is, and both read back
    @ledger.operator("patient", retry_backoff=2.5, retry_backoff_max=300.0)
    async def patient(ctx) -> None:
        return None

    plain, custom = await ledger.submit_many([{"operator": "noop"}, {"operator": "patient"}])
    conn = await connect(db)
    try:
        rows = await conn.fetch(
            "SELECT job_id, data::text AS data FROM jobledger.events WHERE job_id = ANY($1)",
            [plain.id, custom.id],
        )
    finally:
        await conn.close()
    stored = {r["job_id"]: msgspec.json.decode(r["data"]) for r in rows}
    assert "retry_backoff" not in stored[plain.id] and "retry_backoff_max" not in stored[plain.id]
    assert stored[custom.id]["retry_backoff"] == 2.5
    assert "retry_backoff_max" not in stored[custom.id]
    for job, backoff in ((plain, 1.0), (custom, 2.5)):
        got = await ledger.get(job.id)
        [rec] = await ledger.history(job.id)
        assert got.retry_backoff == job.retry_backoff == rec.event.retry_backoff == backoff
        assert got.retry_backoff_max == rec.event.retry_backoff_max == 300.0


async def test_create_keeps_each_events_own_meta_and_time(ledger: JobLedger, db: str) -> None:
    # store.create takes any batch of first events, not only one submission's:
    # times and metas that differ are sent one per job.
    at = datetime.now(UTC)
    changes = []
    for i, actor in enumerate(["ana", "bo", "ana"]):
        rec = ev.Recorded(
            job_id=new_job_id(),
            version=1,
            event=ev.Submitted(operator="noop", label=f"j{i}"),
            recorded_at=at + timedelta(seconds=i),
            meta=ev.Meta(actor=actor),
        )
        changes.append(store.Change(apply(None, rec), rec))
    conn = await connect(db)
    try:
        assert await store.create(conn, changes) == [c.state.id for c in changes]
        with pytest.raises(ValueError, match=r"job\.submitted at version 1, got job\.started"):
            started = changes[0].recorded
            bad = msgspec.structs.replace(started, version=2, event=ev.Started(worker="w"))
            await store.create(conn, [store.Change(changes[0].state, bad)])
    finally:
        await conn.close()
    for c in changes:
        [rec] = await ledger.history(c.state.id)
        assert (rec.meta.actor, rec.recorded_at) == (c.recorded.meta.actor, c.recorded.recorded_at)
        assert await ledger.get(c.state.id) == c.state


async def test_get_unknown_and_malformed_ids(ledger: JobLedger) -> None:
    with pytest.raises(JobNotFound, match="does not exist"):
        await ledger.get(uuid4())
    with pytest.raises(ValueError, match="not a job id"):
        await ledger.get("not-a-uuid")
    with pytest.raises(JobNotFound):
        await ledger.cancel(uuid4())
    with pytest.raises(JobNotFound):
        await ledger.history(uuid4())


async def test_external_executor_drives_a_job(ledger: JobLedger) -> None:
    job = await ledger.submit("dataset.import", {"dataset": "cats"})
    job = await ledger.mark_running(
        job.id, worker="gpu-7", run_link="https://runs/42", actor="exec"
    )
    assert job.status == "running" and job.attempt == 1 and job.worker == "gpu-7"
    assert job.run_link == "https://runs/42" and job.started_at is not None
    for i, loss in enumerate([0.9, 0.4, 0.6]):
        job = await ledger.report_progress(
            job.id, fraction=(i + 1) / 4, message=f"epoch {i}", iteration=i, metrics={"loss": loss}
        )
    assert job.progress.fraction == 0.75 and job.progress.iteration == 2
    stat = job.progress.metrics["loss"]
    assert (stat.last, stat.min, stat.max) == (0.6, 0.4, 0.9)
    job = await ledger.mark_completed(job.id, {"imported": 10})
    assert job.status == "completed" and job.result == {"imported": 10}
    assert job.finished_at >= job.started_at
    points = await ledger.progress_history(job.id)
    assert [p.message for p in points] == ["epoch 0", "epoch 1", "epoch 2"]
    assert points[-1].metric_stats["loss"].min == 0.4
    types = [r.type for r in await ledger.history(job.id)]
    assert types == ["job.submitted", "job.started", *["job.progress"] * 3, "job.completed"]


async def test_result_is_checked_against_the_result_type(ledger: JobLedger) -> None:
    job = await ledger.submit("dataset.import", {"dataset": "cats"})
    await ledger.mark_running(job.id)
    with pytest.raises(TypeError, match="invalid result"):
        await ledger.mark_completed(job.id, {"imported": "lots"})
    assert (await ledger.get(job.id)).status == "running"


async def test_failure_with_retry_then_final_failure(ledger: JobLedger) -> None:
    job = await ledger.submit("dataset.import", {"dataset": "cats"}, max_attempts=2)
    await ledger.mark_running(job.id)
    try:
        raise ValueError("bad row 17")
    except ValueError as exc:
        job = await ledger.mark_failed(job.id, exc, retry=True, retry_delay=0)
    assert job.status == "queued" and job.error.type == "ValueError"
    assert "bad row 17" in job.error.traceback
    await ledger.mark_running(job.id)
    job = await ledger.mark_failed(job.id, "still bad", retry=True)
    assert job.status == "failed" and job.attempt == 2  # attempts exhausted
    with pytest.raises(JobFailed, match="ended failed: error: still bad"):
        await ledger.wait(job.id, raise_for_status=True, timeout=1)
    [run] = await ledger.runs(job.id)
    assert [a.outcome for a in run.attempts] == ["retrying", "failed"]
    assert run.outcome == "failed"


async def test_invalid_transition_names_both_statuses(ledger: JobLedger) -> None:
    job = await ledger.submit("noop")
    with pytest.raises(InvalidTransition) as err:
        await ledger.mark_completed(job.id)
    assert err.value.from_status == "queued" and err.value.to_status == "completed"
    assert "'queued' to 'completed'" in str(err.value)
    assert (await ledger.get(job.id)).version == 1  # nothing was written


async def test_force_bypasses_the_lifecycle_and_is_recorded(ledger: JobLedger) -> None:
    job = await ledger.submit("noop")
    job = await ledger.mark_completed(job.id, force=True, actor="admin", reason="done by hand")
    assert job.status == "completed" and job.status_reason == "done by hand"
    rec = (await ledger.history(job.id))[-1]
    assert rec.meta.forced is True and rec.meta.actor == "admin"
    ok = await ledger.set_label(job.id, "renamed", force=True)
    assert (await ledger.history(ok.id))[-1].meta.forced is False  # allowed anyway


async def test_expect_status_is_a_conditional_transition(ledger: JobLedger) -> None:
    job = await ledger.submit("noop")
    assert await ledger.mark_running(job.id, expect_status="scheduled") is None
    assert (await ledger.get(job.id)).version == 1
    moved = await ledger.mark_running(job.id, expect_status=["queued", "scheduled"])
    assert moved.status == "running"


async def test_cancel_queued_and_running(ledger: JobLedger) -> None:
    queued = await ledger.submit("noop")
    assert (await ledger.cancel(queued.id, reason="not needed")).status == "cancelled"
    running = await ledger.submit("noop")
    await ledger.mark_running(running.id)
    job = await ledger.cancel(running.id, actor="ops", message="stop it")
    assert job.status == "cancelling" and job.status_message == "stop it"
    assert (await ledger.cancel(running.id)).version == job.version  # idempotent
    with pytest.raises(InvalidTransition):
        await ledger.cancel(queued.id)  # already cancelled


async def test_retry_and_rerun_start_new_runs(ledger: JobLedger) -> None:
    job = await ledger.submit("noop")
    await ledger.mark_running(job.id)
    await ledger.mark_failed(job.id, "boom")
    job = await ledger.retry(job.id, actor="ops")
    assert job.status == "queued" and job.run == 2 and job.attempt == 0 and job.error is None
    await ledger.mark_running(job.id)
    await ledger.mark_completed(job.id, "ok")
    with pytest.raises(InvalidTransition):
        await ledger.retry(job.id)  # only failed/cancelled jobs are retried
    job = await ledger.rerun(job.id, delay=60)
    assert job.status == "scheduled" and job.run == 3 and job.result is None
    runs = await ledger.runs(job.id)
    assert [(r.number, r.outcome, r.trigger) for r in runs] == [
        (1, "failed", "submitted"),
        (2, "completed", "retried"),
        (3, None, "rerun"),
    ]


async def test_metadata_transitions(ledger: JobLedger) -> None:
    job = await ledger.submit("noop", tags=["a"], context={"dataset": "cats"})
    await ledger.set_label(job.id, "Cats import", description="all the cats")
    await ledger.set_pinned(job.id)
    await ledger.add_tags(job.id, ["b", "c", "a"])
    await ledger.remove_tags(job.id, "b")
    await ledger.update_context(job.id, {"split": "train"}, remove=["dataset"])
    job = await ledger.get(job.id)
    assert (job.label, job.description, job.pinned) == ("Cats import", "all the cats", True)
    assert job.tags == ["a", "c"] and job.context == {"split": "train"}
    assert job.version == 6 and job.status == "queued"


async def test_delete_is_a_tombstone(ledger: JobLedger) -> None:
    job = await ledger.submit("noop")
    await ledger.delete(job.id, actor="ops", reason="cleanup")
    with pytest.raises(JobNotFound, match="was deleted"):
        await ledger.get(job.id)
    assert (await ledger.get(job.id, include_deleted=True)).deleted
    assert [r.type for r in await ledger.history(job.id)] == ["job.submitted", "job.deleted"]
    assert await ledger.count() == 0 and await ledger.count(include_deleted=True) == 1
    running = await ledger.submit("noop")
    await ledger.mark_running(running.id)
    with pytest.raises(InvalidTransition, match="'running'"):
        await ledger.delete(running.id)


async def test_delete_where_by_context(ledger: JobLedger) -> None:
    cats = await ledger.submit_many(
        [{"operator": "noop", "context": {"dataset": "cats"}} for _ in range(7)]
    )
    await ledger.submit_many([{"operator": "noop", "context": {"dataset": "dogs"}}] * 3)
    await ledger.mark_running(cats[0].id)  # held by a worker: skipped
    assert await ledger.delete_where(context={"dataset": "cats"}, actor="ops") == 6
    assert await ledger.count(context={"dataset": "cats"}) == 1
    assert await ledger.count(context={"dataset": "dogs"}) == 3
    with pytest.raises(ValueError, match="at least one filter"):
        await ledger.delete_where()


async def test_wait_times_out_with_the_current_status(ledger: JobLedger) -> None:
    job = await ledger.submit("noop")
    with pytest.raises(WaitTimeout, match="still 'queued'"):
        await ledger.wait(job.id, timeout=0.2)


async def test_wait_wakes_when_the_job_finishes(ledger: JobLedger) -> None:
    import anyio

    job = await ledger.submit("noop")
    await ledger.mark_running(job.id)

    async def finish() -> None:
        await anyio.sleep(0.2)
        await ledger.mark_completed(job.id)

    async with anyio.create_task_group() as tg:
        tg.start_soon(finish)
        with anyio.fail_after(5):
            done = await ledger.wait(job.id, raise_for_status=True, poll_interval=30)
    assert done.status == "completed"
    assert (await ledger.wait(job.id, until="completed")).status == "completed"


async def test_error_info_from_mapping(ledger: JobLedger) -> None:
    job = await ledger.submit("noop")
    await ledger.mark_running(job.id)
    job = await ledger.mark_failed(job.id, {"type": "OOM", "message": "killed"})
    assert job.error == ErrorInfo(type="OOM", message="killed")
    assert msgspec.json.encode(job)  # a Job always encodes


async def test_progress_updates_are_mostly_heap_only(ledger: JobLedger, db: str) -> None:
    """Pages of jobs keep room (migration 009) so that updates which change no
    indexed column write no index entries: most progress reports are HOT."""
    jobs = await ledger.submit_many([{"operator": "noop"}] * 300)
    ids = [j.id for j in jobs]
    await ledger.transition_many(ids, lambda _: ev.Started(worker="w"))
    conn = await connect(db)
    try:
        for step in range(5):
            states = [store.decode_job(r[0]) for r in await conn.fetch(Q.load_jobs, ids)]
            changes = [ledger.make_change(s, ev.Progressed(fraction=step / 5)) for s in states]
            assert len(await store.append(conn, changes)) == 300
        # This connection's counts reach the shared statistics at its next
        # transaction's end; nothing else made a HOT update of jobs here.
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        hot = await conn.fetchval(
            "SELECT n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'jobledger.jobs'::regclass"
        )
    finally:
        await conn.close()
    assert hot >= 0.5 * 5 * 300


def test_job_ids_are_ordinary_uuid7s_in_submission_order() -> None:
    # one at a time, then batches: 10,000 in one call overflow the 4,096 a
    # millisecond's counter holds, and each call goes on from the last id
    ids = [new_job_id() for _ in range(5000)] + new_job_ids(10_000) + new_job_ids(3)
    ids += [new_job_id(), *new_job_ids(1), *new_job_ids(0)]
    assert len(ids) == 15_005
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    millis = [u.int >> 80 for u in ids[5000:15_000]]
    assert millis[-1] - millis[0] >= 2  # the overflow borrowed the following milliseconds
    for u in ids[:50]:
        same = UUID(str(u))
        assert u == same and hash(u) == hash(same) and u.int == same.int
        assert u.version == 7 and u.variant == "specified in RFC 4122"
        assert pickle.loads(pickle.dumps(u)) == u and copy.deepcopy(u) == u
        assert msgspec.json.decode(msgspec.json.encode(u), type=UUID) == u


async def test_a_write_notifies_once_and_only_when_it_stored_something(
    ledger: JobLedger, db: str
) -> None:
    [job] = await ledger.submit_many([{"operator": "noop"}])
    stale = await ledger.get(job.id)
    await ledger.set_label(job.id, "moved on")  # the stale state is one version behind
    listener = await connect(db)
    heard: list[str] = []
    await listener.add_listener("jobledger", lambda *args: heard.append(args[3]))
    try:
        late = ledger.make_change(stale, ev.Pinned(pinned=True))
        assert await store.append(ledger.pool, [late], notify='{"ready":["late"]}') == set()
        fresh = ledger.make_change(await ledger.get(job.id), ev.Pinned(pinned=True))
        payload = '{"ready":["fresh"]}'
        assert await store.append(ledger.pool, [fresh], notify=payload) == {job.id}
        await asyncio.sleep(0.3)
        assert heard == [payload]  # none for the write that stored nothing
    finally:
        await listener.close()


async def test_one_string_is_one_value_wherever_several_are_taken(ledger: JobLedger) -> None:
    """A name given where a list is taken is that one name, never its letters."""
    job = await ledger.submit("noop", tags="gpu")
    assert job.tags == ["gpu"]
    assert (await ledger.add_tags(job.id, "cats")).tags == ["gpu", "cats"]
    assert (await ledger.remove_tags(job.id, "gpu")).tags == ["cats"]
    assert [j.id for j in await ledger.list(status="queued", order_by="created_at")] == [job.id]
    assert await ledger.count(status="queued", operator="noop", queue="default") == 1
    assert await ledger.wait(job.id, until="queued", timeout=1) == await ledger.get(job.id)
