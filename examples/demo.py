"""``jobledger demo``: a worker, a realistic mix of jobs, live progress, then every history.

Runs against whatever server the ledger resolves (the embedded one when
nothing is configured) and finishes in well under a minute.
"""

from __future__ import annotations

import uuid

import anyio
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn
from rich.rule import Rule
from rich.text import Text

from engine import Job, JobLedger
from engine.render import StatusColumn, data_column, status_text, timeline
from engine.worker import Worker
from examples.demo_app import ledger as demo_ledger
from projections.history import steps
from projections.replay import diff


async def run_demo(console: Console, ledger: JobLedger = demo_ledger) -> int:
    """Run the demo; return 0 when every job ended as expected."""
    run_id = uuid.uuid4().hex[:6]
    ctx = {"demo_run": run_id}
    worker = Worker(ledger, concurrency=8, heartbeat_interval=0.5, progress_interval=0.2)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        console.print(Rule(f"jobledger demo · run {run_id} · worker {worker.id}"))
        jobs = await ledger.submit_many(
            [
                {
                    "operator": "dataset.import",
                    "inputs": {"dataset": "cats", "chunks": 20},
                    "label": "Import cats",
                    "context": {**ctx, "dataset": "cats"},
                    "tags": ["demo"],
                },
                {
                    "operator": "flaky.export",
                    "inputs": {"failures": 2},
                    "label": "Export (flaky service)",
                    "context": ctx,
                    "tags": ["demo"],
                },
                {
                    "operator": "model.train",
                    "inputs": {"epochs": 20, "epoch_seconds": 0.3},
                    "label": "Train (times out)",
                    "context": ctx,
                    "tags": ["demo"],
                },
                {
                    "operator": "dataset.import",
                    "inputs": {"dataset": "dogs", "chunks": 60},
                    "label": "Import dogs (cancelled)",
                    "context": {**ctx, "dataset": "dogs"},
                    "tags": ["demo"],
                },
                {
                    "operator": "dataset.import",
                    "inputs": {"dataset": "birds", "chunks": 6},
                    "label": "Import birds (rerun)",
                    "context": {**ctx, "dataset": "birds"},
                    "tags": ["demo"],
                },
            ],
            actor="demo",
            reason="demo run",
        )
        imports, flaky, train, dogs, birds = jobs
        console.print(f"submitted {len(jobs)} jobs; watching them run…")
        reran = cancelled = False
        progress = Progress(
            data_column("task.description:<26"),
            BarColumn(),
            TaskProgressColumn(),
            StatusColumn(),
            data_column("task.fields[attempt]"),
            data_column("task.fields[note]", style="dim"),
        )
        bars = {
            j.id: progress.add_task(j.label, total=1.0, status="", attempt="", note="")
            for j in jobs
        }
        with Live(Group(progress), console=console, refresh_per_second=10, transient=False):
            with anyio.fail_after(50):
                while True:
                    states = {j.id: await ledger.get(j.id) for j in jobs}
                    for jid, job in states.items():
                        _update(progress, bars[jid], job)
                    dog = states[dogs.id]
                    if not cancelled and dog.status == "running" and dog.progress:
                        await ledger.cancel(dogs.id, actor="demo-user", reason="wrong dataset")
                        cancelled = True
                    bird = states[birds.id]
                    if not reran and bird.status == "completed":
                        await ledger.rerun(birds.id, actor="demo-user", reason="source updated")
                        reran = True
                    if reran and cancelled and all(s.terminal for s in states.values()):
                        break
                    await anyio.sleep(0.1)
        worker.stop()
    if not console.is_terminal:
        console.line()  # piped, the live display's last line ends without a newline
    console.print(Rule("what happened, from the log"))
    for job in jobs:
        final = await ledger.get(job.id)
        rows, prev = [], None
        for rec, state in steps(await ledger.history(job.id)):
            rows.append((rec, diff(prev, state)))
            prev = state
        console.print(status_text(final.status), Text(final.label, style="bold"), f" {final.id}")
        console.print(timeline(rows))
    expected = {
        imports.id: "completed",
        flaky.id: "completed",
        train.id: "failed",
        dogs.id: "cancelled",
        birds.id: "completed",
    }
    finals = {j.id: (await ledger.get(j.id)).status for j in jobs}
    ok = finals == expected and (await ledger.get(birds.id)).run == 2
    console.print(Rule())
    console.print(
        Text.assemble(
            "Every row above is an event in PostgreSQL. Try: ",
            (f"jobledger ls --context demo_run={run_id}", "bold"),
            ", ",
            (f"jobledger show {flaky.id}", "bold"),
        )
    )
    return 0 if ok else 1


def _update(progress: Progress, task: int, job: Job) -> None:
    frac = job.progress.fraction if job.progress and job.progress.fraction is not None else 0.0
    if job.status == "completed":
        frac = 1.0
    note = ""
    if job.progress and job.progress.message:
        note = job.progress.message
    if job.error and job.status != "completed":
        note = f"{job.error.type}: {job.error.message}"[:60]
    if job.run > 1:
        note = f"run {job.run} · {note}"
    progress.update(task, completed=frac, status=job.status, attempt=f"a{job.attempt}", note=note)
