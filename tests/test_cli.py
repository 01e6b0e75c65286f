"""The jobledger command line, run as a real process against the test database."""

from __future__ import annotations

import json
import os
import sys

import anyio

from engine import JobLedger
from engine import events as ev
from tests.operators import register_basic

register_operators = register_basic


async def cli(db: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "JOBLEDGER_DSN": db, "JOBLEDGER_ACTOR": "cli-test", "COLUMNS": "200"}
    proc = await anyio.run_process(
        [sys.executable, "-m", "engine.cli", *args], env=env, check=False
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def test_submit_ls_show_and_transitions(ledger: JobLedger, db: str) -> None:
    code, out, err = await cli(
        db,
        "submit",
        "dataset.import",
        '{"dataset": "cats"}',
        "--tag",
        "nightly",
        "--context",
        "dataset=cats",
        "--priority",
        "3",
        "--json",
        "--reason",
        "cron",
    )
    assert code == 0, err
    job = json.loads(out)
    assert (
        job["status"] == "queued" and job["priority"] == 3 and job["context"] == {"dataset": "cats"}
    )
    code, out, _ = await cli(db, "ls", "--status", "queued", "--context", "dataset=cats")
    assert code == 0 and job["id"] in out and "1 of 1 jobs" in out
    code, out, _ = await cli(db, "ls", "--no-tag", "nightly", "--json")
    assert json.loads(out)["jobs"] == []
    assert (await cli(db, "label", job["id"], "Cats", "--reason", "clarity"))[0] == 0
    assert (await cli(db, "pin", job["id"]))[0] == 0
    code, out, _ = await cli(db, "cancel", job["id"], "--reason", "not today")
    assert code == 0 and "cancelled" in out
    code, out, _ = await cli(db, "show", job["id"])
    assert code == 0
    for text in (
        "job.submitted",
        "job.labelled",
        "job.pinned",
        "job.cancelled",
        "not today",
        "cli-test",
    ):
        assert text in out
    stored = await ledger.get(job["id"])
    assert stored.label == "Cats" and stored.pinned and stored.status == "cancelled"
    assert (await ledger.history(stored.id))[0].meta.actor == "cli-test"
    code, out, _ = await cli(db, "retry", job["id"])
    assert code == 0 and "queued" in out
    code, out, _ = await cli(db, "delete", "--context", "dataset=cats")
    assert code == 0 and "deleted 1 jobs" in out


async def test_ls_orders_by_a_descending_field_written_as_its_own_argument(
    ledger: JobLedger, db: str
) -> None:
    """``--order -field`` works as the help writes it, not only as ``--order=-field``."""
    await ledger.submit("noop", label="b")
    await ledger.submit("noop", label="a")  # newer: first in the default order
    for args in (
        ("--order", "-label"),
        ("--order=-label",),
        ("--order", "status", "--order", "-label"),
    ):
        code, out, err = await cli(db, "ls", *args, "--json")
        assert code == 0, err
        assert [j["label"] for j in json.loads(out)["jobs"]] == ["b", "a"], args
    code, _, err = await cli(db, "ls", "--order", "--json")
    assert code == 2 and "expected one argument" in err


async def test_show_says_when_an_event_changed_no_field(ledger: JobLedger, db: str) -> None:
    job = await ledger.submit("noop")
    await ledger.set_pinned(job.id)
    await ledger.set_pinned(job.id)  # recorded, though the job was pinned already
    code, out, err = await cli(db, "show", str(job.id))
    assert code == 0, err
    rows = [line for line in out.splitlines() if "job.pinned" in line]
    assert len(rows) == 2
    assert "pinned: false → true" in rows[0] and "(no field changed)" in rows[1]


async def test_text_with_brackets_is_shown_as_written(ledger: JobLedger, db: str) -> None:
    """Labels, reasons and messages are users' text: rich markup in them is not
    applied, and a stray closing tag does not stop the command."""
    label = "Import [draft] cats [/bold]"
    job = await ledger.submit("noop", label=label)
    await ledger.mark_running(job.id, worker="ext")
    await ledger.report_progress(job.id, fraction=0.5, message="chunk [red]3[/red] of 6")
    await ledger.mark_failed(
        job.id, ev.ErrorInfo(type="IOError", message="bucket [/] gone"), reason="why [/x]"
    )
    for args, texts in (
        (("ls",), [label]),
        (("show", str(job.id)), [label, "chunk [red]3[/red] of 6", "why [/x]"]),
        (("replay", str(job.id)), [label, "why [/x]"]),
        (("audit",), ["why [/x]"]),
        (("wait", str(job.id)), ["chunk [red]3[/red] of 6", "failed: IOError: bucket [/] gone"]),
    ):
        code, out, err = await cli(db, *args)
        assert "Traceback" not in err, (args, err)
        for text in texts:
            assert text in out, (args, text, out)
        assert code == (1 if args[0] == "wait" else 0), (args, err)


async def test_errors_are_one_line_with_exit_codes(ledger: JobLedger, db: str) -> None:
    job = await ledger.submit("noop")
    cases = [
        (("submit", "noop", "{bad"), 2, "not valid JSON"),
        (
            ("--app", "tests.operators:app", "submit", "dataset.import", '{"dataset": 1}'),
            2,
            "at $.dataset",
        ),
        (("--app", "tests.nope:app", "ls"), 2, "cannot import --app module 'tests.nope'"),
        (("submit", "nope"), 2, "unknown operator 'nope'"),
        (("ls", "--bogus"), 2, "unrecognized arguments"),
        (("ls", "--status", "done"), 2, "unknown status 'done'"),
        (("show", "00000000-0000-0000-0000-000000000000"), 1, "does not exist"),
        (("show", "xyz"), 2, "'xyz' is not a job id"),
        (
            ("rerun", str(job.id)),
            1,
            "from 'queued' to 'queued', which the lifecycle does not allow (force=True, or --force",
        ),
        (("replay", str(job.id), "--at", "yesterday"), 2, "not an ISO-8601 time: 'yesterday'"),
        (("cancel", str(job.id), "--expect-status", "running"), 1, "no change"),
        (("delete",), 2, "give a job id or at least one filter"),
    ]
    for args, want_code, want_text in cases:
        code, out, err = await cli(db, *args)
        assert code == want_code, (args, out, err)
        text = (err or out).strip()
        assert want_text in text, (args, text)
        assert "Traceback" not in err
        if want_code and err:
            assert len(err.strip().splitlines()) == 1, err


async def test_unreachable_server_is_one_line() -> None:
    code, _, err = await cli("postgresql://postgres@127.0.0.1:1/nowhere", "ls")
    assert code == 1
    assert err.strip() == err.strip().splitlines()[0]
    assert "cannot connect to PostgreSQL at 127.0.0.1:1 (database nowhere)" in err


async def test_projection_report_replay_audit_prune_commands(
    ledger: JobLedger, db: str, tmp_path
) -> None:
    jobs = await ledger.submit_many([{"operator": "noop"}] * 3)
    for j in jobs[:2]:
        await ledger.mark_running(j.id, actor="exec")
        await ledger.mark_completed(j.id, actor="exec")
    await ledger.cancel(jobs[2].id, actor="ana", reason="not needed")

    code, out, _ = await cli(db, "projections", "status")
    assert code == 0 and "reports" in out and "async" in out
    code, out, _ = await cli(db, "projections", "rebuild", "reports")
    assert code == 0 and "rebuilt from 8 events" in out
    code, out, _ = await cli(db, "report", "--format", "json")
    [row] = json.loads(out)
    assert (row["key"], row["submitted"], row["completed"], row["cancelled"]) == ("noop", 3, 2, 1)
    code, out, _ = await cli(db, "report", "--by", "queue", "--bucket", "day")
    assert code == 0 and "default" in out and "2 ok, 0 failed" in out
    code, out, _ = await cli(db, "report", "--format", "csv")
    assert out.splitlines()[0].startswith("bucket,key,submitted")

    code, out, _ = await cli(db, "verify")
    assert code == 0 and "exactly the replay of the log" in out

    jid = str(jobs[0].id)
    history = await ledger.history(jobs[0].id)
    code, out, _ = await cli(db, "replay", jid, "--at", str(history[1].position))
    assert code == 0 and "job.started" in out and "job.completed" not in out
    assert "state at" in out and "running" in out
    stream = tmp_path / "stream.json"
    assert (await cli(db, "replay", jid, "--json", str(stream)))[0] == 0
    code, out, _ = await cli(
        "postgresql://postgres@127.0.0.1:1/none", "replay", "--from-file", str(stream)
    )
    assert code == 0 and "job.completed" in out and "state reached" in out  # no database needed
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    code, _, err = await cli(db, "replay", "--from-file", str(bad))
    assert code == 2 and "not a jobledger event stream" in err

    code, out, _ = await cli(db, "audit", "--actor", "ana")
    assert code == 0 and "job.cancelled" in out and "not needed" in out and "job.started" not in out

    code, out, _ = await cli(db, "prune", "--finished-before", "2000-01-01")
    assert code == 0 and "removed 0 jobs" in out
    code, out, _ = await cli(db, "prune", "--finished-before", "2999-01-01", "--dry-run")
    assert code == 0 and "would remove 3 jobs and 8 events" in out
    code, out, _ = await cli(db, "prune", "--finished-before", "2999-01-01", "--reason", "test")
    assert code == 0 and "removed 3 jobs and 8 events" in out and "prune #1" in out
    code, out, _ = await cli(db, "report", "--format", "json")
    assert json.loads(out)[0]["submitted"] == 3  # reports kept their counts
    code, out, _ = await cli(db, "verify")
    assert code == 0


async def test_verify_exits_1_on_a_difference(ledger: JobLedger, db: str) -> None:
    job = await ledger.submit("noop")
    from engine.postgres import connect

    conn = await connect(db)
    try:
        await conn.execute("UPDATE jobledger.jobs SET priority = 7")
        code, out, _ = await cli(db, "verify")
        assert code == 1 and f"jobs {job.id}: fields differ" in out and "priority" in out
        code, out, _ = await cli(db, "projections", "rebuild", "jobs")
        assert code == 0 and "jobs: rebuilt from 1 events" in out
        code, out, _ = await cli(db, "verify")
        assert code == 0
        await conn.execute("UPDATE jobledger.jobs SET priority = 8")
        code, out, _ = await cli(db, "projections", "rebuild", "jobs", "--processes", "2")
        assert code == 0 and "jobs: rebuilt from 1 events" in out
        code, out, _ = await cli(db, "verify")
        assert code == 0
        code, _, err = await cli(db, "projections", "rebuild", "jobs", "--processes", "0")
        assert code == 2 and "--processes: expected a positive whole number, got '0'" in err
    finally:
        await conn.close()


async def test_a_worker_logs_json_lines_off_a_terminal(ledger: JobLedger, db: str) -> None:
    """Each job's start and end are one JSON object per line, with stable event names."""
    job = await ledger.submit("dataset.import", {"dataset": "cats", "rows": 7})
    code, _, err = await cli(db, "--app", "tests.operators:app", "worker", "--burst")
    assert code == 0, err
    lines = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    mine = {rec["event"]: rec for rec in lines if rec.get("job_id") == str(job.id)}
    assert set(mine) >= {"job_started", "job_completed"}
    done = mine["job_completed"]
    assert done["level"] == "info" and done["operator"] == "dataset.import"
    assert done["duration_ms"] >= 0 and done["timestamp"].endswith("Z")
    assert list(done)[:3] == ["timestamp", "level", "event"]
    assert (await ledger.get(job.id)).status == "completed"


async def test_bad_log_settings_are_refused_by_name(db: str) -> None:
    env = {**os.environ, "JOBLEDGER_DSN": db}
    for var, value in (("JOBLEDGER_LOG_FORMAT", "xml"), ("JOBLEDGER_LOG_LEVEL", "loud")):
        proc = await anyio.run_process(
            [sys.executable, "-m", "engine.cli", "workers"], env={**env, var: value}, check=False
        )
        assert proc.returncode == 2
        assert f"got {value!r}" in proc.stderr.decode()


async def test_the_demo_ends_as_it_expects(db: str) -> None:
    """The README's first command: every demo job must end as the demo says
    (exit 0), and its piped output must stay readable."""
    code, out, err = await cli(db, "demo")
    assert code == 0, err
    assert "Every row above is an event in PostgreSQL" in out
    rule = [line for line in out.splitlines() if "what happened, from the log" in line]
    assert len(rule) == 1 and "━" not in rule[0]  # not glued to the last progress bar


async def test_tables_show_text_as_written_on_any_console(ledger: JobLedger) -> None:
    """A service may print jobledger's tables on its own rich console, where
    markup is on: the cells still show users' text as written."""
    from rich.console import Console

    from engine import render
    from projections.history import steps
    from projections.replay import diff

    job = await ledger.submit("noop", label="Import [draft] cats", reason="a [bold]b[/bold] c")
    history = await ledger.history(job.id)
    console = Console(record=True, width=200, markup=True)
    console.print(render.jobs_table([job]))
    console.print(render.job_card(job))
    console.print(render.timeline([(rec, diff(None, state)) for rec, state in steps(history)]))
    out = console.export_text()
    # the table, the card's title and label row, the timeline
    assert out.count("Import [draft] cats") == 4 and "a [bold]b[/bold] c" in out


async def test_audit_is_newest_first_in_log_order_and_reads_time_windows(
    ledger: JobLedger, db: str
) -> None:
    """audit lists events newest first in the log's order, (tx_id, position); a time
    window keeps exactly the events recorded in it and reads the BRIN index (011)."""
    jobs = await ledger.submit_many([{"operator": "noop"}] * 2)
    await ledger.mark_running(jobs[0].id, actor="exec")
    await ledger.cancel(jobs[1].id, actor="ana")
    log = [rec for j in jobs for rec in await ledger.history(j.id)]
    code, out, _ = await cli(db, "audit", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [(e["tx_id"], e["position"]) for e in listed] == sorted(
        ((r.tx_id, r.position) for r in log), reverse=True
    )
    started = next(r for r in log if r.type == "job.started")
    later = max(r.recorded_at for r in log)
    code, out, _ = await cli(
        db,
        "audit",
        "--json",
        "--since",
        started.recorded_at.isoformat(),
        "--until",
        later.isoformat(),
    )
    window = {e["position"] for e in json.loads(out)}
    assert (
        window == {r.position for r in log if started.recorded_at <= r.recorded_at < later}
        and started.position in window
    )

    from engine.sqlfiles import Q

    async with ledger.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                f"EXPLAIN {Q.audit}", None, started.recorded_at, later, None, None, 10
            )
        )
    assert "events_recorded_at_brin" in plan, plan
