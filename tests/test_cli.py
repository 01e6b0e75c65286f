"""The jobledger command line, run as a real process against the test database."""

from __future__ import annotations

import json
import os
import sys

import anyio

from engine import JobLedger
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
        (("rerun", str(job.id)), 1, "from 'queued' to 'queued'"),
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
