"""Property tests: any sequence of API calls keeps the jobs table equal to the log's replay."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import InvalidTransition, JobLedger, JobNotFound
from engine import events as ev
from projections.job_state import Job, apply, replay
from projections.replay import verify_jobs
from tests.operators import register_basic

register_operators = register_basic

name = st.text(alphabet="abcxyz", min_size=1, max_size=4)
OPS = st.sampled_from(
    [
        "mark_running",
        "progress",
        "complete",
        "fail",
        "fail_retry",
        "cancel",
        "retry",
        "rerun",
        "label",
        "pin",
        "tag",
        "untag",
        "context",
        "delete",
    ]
)
calls = st.lists(st.tuples(OPS, st.booleans(), name, st.floats(0, 1)), max_size=12)


async def _call(ledger: JobLedger, job_id, op: str, force: bool, word: str, x: float) -> None:
    how = {"force": force, "actor": word, "reason": f"because {word}"}
    match op:
        case "mark_running":
            await ledger.mark_running(job_id, worker=word, **how)
        case "progress":
            await ledger.report_progress(job_id, fraction=x, metrics={word: x}, **how)
        case "complete":
            await ledger.mark_completed(job_id, {"imported": len(word)}, **how)
        case "fail":
            await ledger.mark_failed(job_id, word, **how)
        case "fail_retry":
            await ledger.mark_failed(job_id, word, retry=True, retry_delay=x, **how)
        case "cancel":
            await ledger.cancel(job_id, **how)
        case "retry":
            await ledger.retry(job_id, **how)
        case "rerun":
            await ledger.rerun(job_id, delay=x, **how)
        case "label":
            await ledger.set_label(job_id, word, **how)
        case "pin":
            await ledger.set_pinned(job_id, x > 0.5, **how)
        case "tag":
            await ledger.add_tags(job_id, [word], **how)
        case "untag":
            await ledger.remove_tags(job_id, [word], **how)
        case "context":
            await ledger.update_context(job_id, {word: x}, remove=["a"], **how)
        case "delete":
            await ledger.delete(job_id, **how)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=calls)
async def test_any_call_sequence_keeps_table_equal_to_replay(
    ledger: JobLedger, script: list[tuple[str, bool, str, float]]
) -> None:
    job = await ledger.submit("dataset.import", {"dataset": "p"}, max_attempts=3)
    for op, force, word, x in script:
        try:
            await _call(ledger, job.id, op, force, word, x)
        except InvalidTransition:
            assert not force
        except JobNotFound:
            pass  # deleted earlier in the script
    history = await ledger.history(job.id)
    stored = await ledger.get(job.id, include_deleted=True)
    assert replay(history) == stored
    assert [r.version for r in history] == list(range(1, len(history) + 1))
    assert await verify_jobs(ledger.pool) == []


# -- the pure reducer ----------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)
events = st.sampled_from(
    [
        ev.Started(worker="w"),
        ev.Progressed(fraction=0.5, metrics={"m": 1.0}),
        ev.Progressed(metrics={"m": -2.0, "n": 3.5}),
        ev.Completed(result={"ok": True}),
        ev.Failed(error=ev.ErrorInfo(type="E", message="m")),
        ev.Abandoned(worker="w"),
        ev.CancelRequested(),
        ev.Cancelled(),
        ev.Retried(),
        ev.Rerun(),
        ev.Labelled(label="l"),
        ev.Pinned(pinned=True),
        ev.Tagged(add=("a", "b"), remove=("c",)),
        ev.ContextUpdated(set={"k": [1, 2]}, unset=("x",)),
        ev.ArtifactAdded(artifact=ev.Artifact(key="k", uri="s3://b/k", size=3)),
        ev.Deleted(),
    ]
)


def _records(seq: list[ev.Event]) -> list[ev.Recorded]:
    from datetime import timedelta
    from uuid import UUID

    jid = UUID(int=1)
    first = ev.Submitted(operator="op", label="op", tags=("c",), context={"x": 1})
    return [
        ev.Recorded(job_id=jid, version=i + 1, event=e, recorded_at=T0 + timedelta(seconds=i))
        for i, e in enumerate([first, *seq])
    ]


@given(st.lists(events, max_size=30), st.integers(0, 30))
def test_folding_in_two_halves_equals_folding_once(seq: list[ev.Event], cut: int) -> None:
    recs = _records(seq)
    whole = replay(recs)
    assert replay(recs[cut:], replay(recs[:cut])) == whole


@given(st.lists(events, max_size=30))
def test_every_state_survives_the_table_round_trip(seq: list[ev.Event]) -> None:
    state: Job | None = None
    for rec in _records(seq):
        state = apply(state, rec)
        assert msgspec.json.decode(msgspec.json.encode(state), type=Job) == state
        assert state.version == rec.version and state.updated_at == rec.recorded_at


maybe_text = st.none() | name
submitted_events = st.builds(
    ev.Submitted,
    operator=name,
    label=name,
    queue=name,
    description=maybe_text,
    inputs=st.none() | st.dictionaries(name, st.integers()),
    priority=st.integers(-5, 5),
    run_at=st.none() | st.sampled_from([T0, datetime(2027, 1, 1, tzinfo=UTC)]),
    max_attempts=st.integers(1, 5),
    restart_policy=st.sampled_from(["never", "on_error"]),
    retry_backoff=st.floats(0, 10),
    retry_backoff_max=st.floats(10, 100),
    timeout=st.none() | st.floats(1, 100),
    tags=st.lists(name, max_size=3).map(tuple),
    context=st.dictionaries(name, st.integers(), max_size=2),
    parent_id=st.none() | st.uuids(),
    owner=maybe_text,
    idempotency_key=maybe_text,
)


@given(submitted_events, maybe_text, maybe_text)
def test_a_submitted_job_is_its_event(e: ev.Submitted, reason, message) -> None:
    """Every field of a new job comes from its event and envelope (the reducer builds it
    in two steps from a base job, so no field may be left at the base's value)."""
    from uuid import uuid4

    meta = ev.Meta(reason=reason, message=message)
    rec = ev.Recorded(job_id=uuid4(), version=1, event=e, recorded_at=T0, meta=meta)
    job, again = apply(None, rec), apply(None, rec)
    due = e.run_at or T0
    expected = {
        "id": rec.job_id, "version": 1, "operator": e.operator, "label": e.label,
        "description": e.description, "queue": e.queue,
        "status": "scheduled" if due > T0 else "queued", "priority": e.priority,
        "inputs": e.inputs, "context": e.context, "tags": list(dict.fromkeys(e.tags)),
        "pinned": False, "owner": e.owner, "parent_id": e.parent_id, "attempt": 0,
        "max_attempts": e.max_attempts, "restart_policy": e.restart_policy,
        "retry_backoff": e.retry_backoff, "retry_backoff_max": e.retry_backoff_max, "run": 1,
        "run_at": due, "timeout": e.timeout, "progress": None, "result": None, "error": None,
        "artifacts": [], "worker": None, "run_link": None, "status_reason": reason,
        "status_message": message, "idempotency_key": e.idempotency_key, "created_at": T0,
        "started_at": None, "finished_at": None, "updated_at": T0, "status_changed_at": T0,
        "deleted_at": None,
    }  # fmt: skip
    assert msgspec.structs.asdict(job) == expected
    # the containers are the job's own: not shared with another job or the event
    for field in ("context", "tags", "artifacts"):
        assert getattr(job, field) is not getattr(again, field)
    assert job.context is not e.context


def test_each_submission_takes_its_own_time() -> None:
    """The reducer keeps the last submission time's starting row (one replace a
    job, not two): a job submitted at another moment, or at an equal moment
    held by another object, still starts at its own."""
    from datetime import timedelta
    from uuid import uuid4

    e = ev.Submitted(operator="op", label="op")
    times = [T0, T0, T0 + timedelta(seconds=1), T0 + timedelta(0), T0]
    for at in times:
        rec = ev.Recorded(job_id=uuid4(), version=1, event=e, recorded_at=at, meta=ev.Meta())
        job = apply(None, rec)
        assert (job.created_at, job.updated_at, job.status_changed_at, job.run_at) == (at,) * 4
        assert job.id == rec.job_id and job.status == "queued"


@given(st.lists(events, max_size=30))
def test_a_status_change_is_stamped_with_its_event(seq: list[ev.Event]) -> None:
    """Whenever an event changes the status, the job records when, why and with what
    message (its meta's); every transition, inlined or through _status, must."""
    from datetime import timedelta
    from uuid import UUID

    state: Job | None = None
    first = ev.Submitted(operator="op", label="op")
    for i, e in enumerate([first, *seq]):
        rec = ev.Recorded(
            job_id=UUID(int=1),
            version=i + 1,
            event=e,
            recorded_at=T0 + timedelta(seconds=i),
            meta=ev.Meta(reason=f"r{i}", message=f"m{i}"),
        )
        new = apply(state, rec)
        if state is None or new.status != state.status:
            stamp = (new.status_changed_at, new.status_reason, new.status_message)
            assert stamp == (rec.recorded_at, f"r{i}", f"m{i}"), (e, new.status)
        state = new
