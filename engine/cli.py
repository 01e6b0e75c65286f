"""The ``jobledger`` command line.

Every command connects with ``--dsn`` / ``JOBLEDGER_DSN``, or the embedded
server in ``--home`` / ``JOBLEDGER_HOME``. ``--app module:attr`` imports an
application's ``JobLedger`` so its operators are registered (input validation,
workers). Errors end with one line on stderr: exit code 2 for bad usage or bad
input, 1 for a missing job, a refused transition or an unreachable server.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import anyio
import msgspec
import structlog
from rich.console import Console

from engine import render
from engine.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    InvalidInputs,
    JobLedgerError,
    PayloadTooLarge,
    UnknownOperator,
    WaitTimeout,
)
from engine.ledger import JobLedger
from engine.lifecycle import check_status

Command = Callable[[JobLedger, argparse.Namespace, Console], Awaitable[int]]
COMMANDS: dict[str, Command] = {}
USAGE_ERRORS = (InvalidInputs, PayloadTooLarge, UnknownOperator, ConfigurationError, ValueError)


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


def command(name: str) -> Callable[[Command], Command]:
    """Register ``fn`` as the implementation of ``jobledger NAME``."""

    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn

    return register


# -- argument helpers ----------------------------------------------------------


def json_arg(text: str) -> Any:
    """A JSON value from the command line (``@file`` reads a file)."""
    try:
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as f:
                return json.load(f)
        return json.loads(text)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg} at char {exc.pos})") from exc


def time_arg(text: str) -> datetime:
    """An ISO-8601 time (UTC when no offset is given), or ``now``."""
    if text == "now":
        return datetime.now(UTC)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def key_value(text: str) -> tuple[str, Any]:
    """``key=value``; the value is JSON when it parses, else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def csv_list(text: str) -> list[str]:
    """``a,b,c`` -> ``["a", "b", "c"]``."""
    return [p for p in (s.strip() for s in text.split(",")) if p]


def _positive_int(text: str) -> int:
    """An argument that must be a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def status_list(text: str) -> list[str]:
    """Comma-separated statuses, checked."""
    try:
        return [check_status(v) for v in csv_list(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def filters_from(args: argparse.Namespace) -> dict[str, Any]:
    """The job filters given as flags."""
    f: dict[str, Any] = {}
    for name in ("operator", "queue", "owner"):
        if getattr(args, name, None):
            f[name] = getattr(args, name)
    if getattr(args, "status", None):
        f["status"] = [s for group in args.status for s in group]
    tags = list(getattr(args, "tag", None) or [])
    tags += [f"-{t}" for t in getattr(args, "no_tag", None) or []]
    if tags:
        f["tags"] = tags
    if getattr(args, "context", None):
        ctx: dict[str, list[Any]] = {}
        for k, v in args.context:
            ctx.setdefault(k, []).append(v)
        f["context"] = {k: v[0] if len(v) == 1 else v for k, v in ctx.items()}
    for name in ("parent", "search", "pinned"):
        value = getattr(args, name, None)
        if value is not None:
            f["parent_id" if name == "parent" else name] = value
    if getattr(args, "since", None):
        f["created_after"] = args.since
    if getattr(args, "until", None):
        f["created_before"] = args.until
    if getattr(args, "include_deleted", False):
        f["include_deleted"] = True
    return f


def add_filter_flags(p: argparse.ArgumentParser) -> None:
    """The job filter flags shared by ls and delete."""
    g = p.add_argument_group("filters")
    g.add_argument("--status", type=status_list, action="append", help="status[,status...]")
    g.add_argument("--operator", type=csv_list, help="operator[,operator...]")
    g.add_argument("--queue", type=csv_list, help="queue[,queue...]")
    g.add_argument("--owner", type=csv_list)
    g.add_argument("--tag", action="append", help="must carry this tag (repeatable)")
    g.add_argument("--no-tag", action="append", help="must not carry this tag (repeatable)")
    g.add_argument("--context", type=key_value, action="append", metavar="KEY=VALUE")
    g.add_argument("--parent", metavar="JOB")
    g.add_argument("--search", help="text in label or description")
    g.add_argument("--pinned", action="store_true", default=None)
    g.add_argument("--since", type=time_arg, help="created at or after (ISO time)")
    g.add_argument("--until", type=time_arg, help="created before (ISO time)")
    g.add_argument("--include-deleted", action="store_true")


def how(args: argparse.Namespace) -> dict[str, Any]:
    """The audit fields and transition options given as flags."""
    out: dict[str, Any] = {"actor": args.actor}
    for name in ("reason", "message", "force"):
        value = getattr(args, name, None)
        if value:
            out[name] = value
    if getattr(args, "expect_status", None):
        out["expect_status"] = args.expect_status
    return out


def add_how_flags(p: argparse.ArgumentParser, *, conditional: bool = True) -> None:
    """--reason, --message, --force, --expect-status."""
    p.add_argument("--reason", help="why (kept in the audit trail)")
    p.add_argument("--message", help="a longer note (kept in the audit trail)")
    p.add_argument("--force", action="store_true", help="bypass the lifecycle (recorded)")
    if conditional:
        p.add_argument(
            "--expect-status", type=status_list, help="only if the job is in this status"
        )


# -- commands ------------------------------------------------------------------


@command("migrate")
async def cmd_migrate(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """Apply pending migrations (done by opening the ledger)."""
    from engine.sqlfiles import migrations

    console.print(f"database is at migration {migrations()[-1].version:03d}")
    return 0


@command("submit")
async def cmd_submit(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """Submit one job."""
    job = await ledger.submit(
        args.operator,
        args.inputs,
        label=args.label,
        description=args.description,
        queue=args.queue,
        priority=args.priority,
        delay=args.delay,
        run_at=args.run_at,
        max_attempts=args.max_attempts,
        timeout=args.timeout,
        tags=args.tag or (),
        context=dict(args.context or []),
        owner=args.owner,
        parent_id=args.parent,
        idempotency_key=args.idempotency_key,
        actor=args.actor,
        reason=args.reason,
    )
    if args.json:
        print(msgspec.json.encode(job).decode())
    else:
        console.print(f"submitted {job.id} ({job.operator}, {job.status})")
    return 0


@command("ls")
async def cmd_ls(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """List jobs."""
    page = await ledger.page(
        order_by=args.order or None,
        limit=args.limit,
        offset=args.offset,
        cursor=args.cursor,
        **filters_from(args),
    )
    if args.json:
        print(msgspec.json.encode({"jobs": page.jobs, "cursor": page.cursor}).decode())
        return 0
    console.print(render.jobs_table(page.jobs))
    total = await ledger.count(**filters_from(args))
    more = f"; next page: --cursor {page.cursor}" if page.cursor else ""
    console.print(f"{len(page.jobs)} of {total} jobs{more}", style="dim")
    return 0


@command("show")
async def cmd_show(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """A job's state and the timeline of its events."""
    from projections.history import steps
    from projections.replay import diff

    job = await ledger.get(args.job, include_deleted=True)
    events = await ledger.history(job.id)
    if args.json:
        print(msgspec.json.encode({"job": job, "events": events}).decode())
        return 0
    rows = []
    prev = None
    for rec, state in steps(events):
        rows.append((rec, diff(prev, state)))
        prev = state
    render.show_job(console, job, rows)
    return 0


def _transition_command(name: str, method: str, doc: str, **fixed: Any) -> None:
    async def run(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
        extra = dict(fixed)
        if name == "label":
            extra.update(label=args.label, description=args.description)
        if name in ("retry", "rerun") and args.delay is not None:
            extra["delay"] = args.delay
        job = await getattr(ledger, method)(args.job, **extra, **how(args))
        if job is None:
            console.print(f"no change: job {args.job} is not {'/'.join(args.expect_status)}")
            return 1
        console.print(f"{job.id}: {job.status} (version {job.version})")
        return 0

    run.__doc__ = doc
    COMMANDS[name] = run


_transition_command("cancel", "cancel", "Cancel a job (a running one goes to cancelling).")
_transition_command("retry", "retry", "Send a failed or cancelled job back to the queue.")
_transition_command("rerun", "rerun", "Run a finished job again, as a new run.")
_transition_command("label", "set_label", "Change a job's label.")
_transition_command("pin", "set_pinned", "Pin a job.", pinned=True)
_transition_command("unpin", "set_pinned", "Unpin a job.", pinned=False)


@command("delete")
async def cmd_delete(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """Delete one job, or every job matching filters."""
    if args.job:
        job = await ledger.delete(args.job, **how(args))
        if job is None:
            console.print(f"no change: job {args.job} is not {'/'.join(args.expect_status)}")
            return 1
        console.print(f"{job.id}: deleted")
        return 0
    flt = filters_from(args)
    if not flt:
        raise UsageError("give a job id or at least one filter (e.g. --context dataset=cats)")
    n = await ledger.delete_where(actor=args.actor, reason=args.reason, force=args.force, **flt)
    console.print(f"deleted {n} jobs")
    return 0


@command("worker")
async def cmd_worker(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """Run a worker for the --app's operators until SIGINT/SIGTERM (or, with --burst, done)."""
    if not ledger.registry:
        raise UsageError("the worker has no operators: pass --app module:ledger")
    await ledger.run_worker(
        queues=args.queues,
        operators=args.operator,
        concurrency=args.concurrency,
        burst=args.burst,
        limit=args.limit,
        context=dict(args.context) if args.context else None,
        heartbeat_interval=args.heartbeat,
        rescue_after=args.rescue_after,
        shutdown_grace=args.grace,
        poll_interval=args.poll,
    )
    return 0


@command("workers")
async def cmd_workers(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """Live workers and their last heartbeat (--all: stopped ones too)."""
    from engine.sqlfiles import Q

    rows = await ledger.pool.fetch(Q.list_workers, args.all)
    if args.json:
        print(json.dumps([dict(r) for r in rows], default=str))
        return 0
    console.print(render.workers_table(rows))
    return 0


@command("operators")
async def cmd_operators(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """Every operator published by any process, with its queue and input schema."""
    ops = await ledger.operators()
    if args.json:
        print(msgspec.json.encode(ops).decode())
        return 0
    console.print(render.operators_table(ops))
    return 0


@command("wait")
async def cmd_wait(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """Wait for a job to finish, with a progress bar fed by its progress events."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeElapsedColumn

    job = await ledger.get(args.job)
    bar = Progress(
        render.data_column("task.description"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        render.StatusColumn(),
        render.data_column("task.fields[note]", style="dim"),
        console=console,
        transient=False,
    )
    targets = args.until or None
    with bar:
        task = bar.add_task(job.label, total=1.0, status=job.status, note="")
        with anyio.move_on_after(args.timeout if args.timeout else float("inf")) as scope:
            while True:
                frac = job.progress.fraction if job.progress and job.progress.fraction else 0.0
                note = job.progress.message if job.progress and job.progress.message else ""
                done = job.status in (targets or ("completed", "failed", "cancelled"))
                bar.update(
                    task,
                    completed=1.0 if job.status == "completed" else frac,
                    status=job.status,
                    note=note,
                )
                if done:
                    break
                with contextlib.suppress(WaitTimeout):
                    job = await ledger.wait(job.id, until=targets, timeout=0.25)
                job = await ledger.get(job.id)
    if scope.cancelled_caught:
        console.print(f"still {job.status} after {args.timeout:g}s")
        return 1
    if job.error and job.status != "completed":
        console.print(f"{job.status}: {job.error.type}: {job.error.message}")
    return 0 if job.status == "completed" or targets else 1


@command("demo")
async def cmd_demo(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """Start a worker, run a realistic mix of jobs with live progress, print their histories."""
    from examples.demo import run_demo

    return await run_demo(console, ledger)


@command("report")
async def cmd_report(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """Throughput, failures, wait and run times per operator or queue and time bucket."""
    rows = await ledger.report(
        since=args.since,
        until=args.until,
        by=args.by,
        bucket=args.bucket,
        catch_up=not args.no_catch_up,
    )
    if args.format == "json":
        print(msgspec.json.encode(rows).decode())
    elif args.format == "csv":
        import csv

        fields = list(rows[0].__struct_fields__) if rows else ["bucket", "key"]
        writer = csv.writer(sys.stdout)
        writer.writerow(fields)
        for r in rows:
            writer.writerow([getattr(r, f) for f in fields])
    else:
        console.print(render.report_table(rows, by=args.by))
        console.print(render.report_chart(rows))
    return 0


@command("projections")
async def cmd_projections(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """Status, rebuild or run of the projections."""
    from projections.rebuild import rebuild_jobs, rebuild_projection
    from projections.runner import ProjectionRunner, default_projections

    projs = {p.name: p for p in default_projections()}
    if args.action == "status":
        rows = [await _projection_status(ledger, name) for name in ["jobs", *projs]]
        if args.json:
            print(json.dumps(rows, default=str))
        else:
            console.print(render.projections_table(rows))
        return 0
    if args.action == "run":
        runner = ProjectionRunner(ledger, poll_interval=args.poll)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            console.print(f"running projections: {', '.join(projs)} (Ctrl-C to stop)")
            await anyio.sleep_forever()
        return 0
    names = [*projs, "jobs"] if args.all else [args.name]
    if not args.all and args.name not in (*projs, "jobs"):
        raise UsageError(
            f"unknown projection {args.name!r} (projections: jobs, {', '.join(projs)})"
        )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    for name in names:
        with Progress(
            f"rebuilding {name}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task(name, total=None)

            def tick(done: int, total: int, bar: Progress = bar, task: Any = task) -> None:
                bar.update(task, completed=done, total=total)

            if name == "jobs":
                n = await rebuild_jobs(
                    ledger.pool, progress=tick, dsn=ledger.dsn, processes=args.processes
                )
            else:
                n = await rebuild_projection(ledger.pool, projs[name], progress=tick)
        console.print(f"{name}: rebuilt from {n} events")
    return 0


async def _projection_status(ledger: JobLedger, name: str) -> dict[str, Any]:
    from engine.sqlfiles import Q

    if name == "jobs":
        return {
            "name": "jobs",
            "kind": "inline",
            "checkpoint": "-",
            "lag_events": 0,
            "lag_seconds": 0.0,
            "applied": None,
        }
    row = await ledger.pool.fetchrow(Q.checkpoint_read, name)
    tx, pos = (row["tx_id"], row["position"]) if row else (0, 0)
    lag = await ledger.pool.fetchrow(Q.log_lag, str(tx), pos)
    return {
        "name": name,
        "kind": "async",
        "checkpoint": f"{tx}/{pos}",
        "lag_events": lag["events"],
        "lag_seconds": lag["age"].total_seconds() if lag["age"] else 0.0,
        "applied": row["applied"] if row else 0,
    }


@command("verify")
async def cmd_verify(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """Replay the log into memory and compare it with every projection."""
    from projections.replay import verify_all

    diffs = await verify_all(ledger.pool, limit=args.limit)
    for d in diffs:
        console.print(str(d), markup=False, highlight=False)
    if diffs:
        console.print(f"{len(diffs)} difference(s) between the log and the projections")
        return 1
    console.print("the projections are exactly the replay of the log")
    return 0


@command("replay")
async def cmd_replay(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """A job's events one by one, with the fields each changed; or its state at a time."""
    events = await ledger.history(args.job)
    return await _replay(events, args, console)


async def _replay(events: list[Any], args: argparse.Namespace, console: Console) -> int:
    from projections.history import steps
    from projections.replay import diff, state_at

    if args.json:
        payload = msgspec.json.encode(events)
        if args.json == "-":
            sys.stdout.write(payload.decode() + "\n")
        else:
            await anyio.Path(args.json).write_bytes(payload)
            console.print(f"wrote {len(events)} events to {args.json}")
        return 0
    at = args.at
    shown = [e for e in events if at is None or _before(e, at)]
    if at is not None:
        state = state_at(events, at)
        if state is None:
            console.print(f"the job did not exist yet at {args.at}")
            return 1
    prev = None
    rows = []
    for rec, state in steps(shown):
        rows.append((rec, diff(prev, state)))
        prev = state
    if args.step and console.is_terminal:
        for i in range(len(rows)):
            console.print(render.timeline(rows[i : i + 1]))
            if i + 1 < len(rows):
                await anyio.to_thread.run_sync(input, "[enter] next event ")
    else:
        console.print(render.timeline(rows))
    if prev is not None:
        title = f"state at {args.at}" if at is not None else "state reached"
        console.print(render.job_card(prev, title=title))
    return 0


def at_arg(text: str) -> int | datetime:
    """``replay --at``: a log position (digits) or an ISO-8601 time."""
    return int(text) if text.isdigit() else time_arg(text)


def _before(rec: Any, at: int | datetime) -> bool:
    if isinstance(at, datetime):
        return rec.recorded_at <= at
    return rec.position is not None and rec.position <= at


@command("audit")
async def cmd_audit(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """Who changed what, across jobs."""
    from engine.sqlfiles import Q
    from projections.codec import recorded_from_row

    rows = await ledger.pool.fetch(
        Q.audit, args.actor_filter, args.since, args.until, args.operator, args.type, args.limit
    )
    if args.json:
        print(msgspec.json.encode([recorded_from_row(r) for r in rows]).decode())
        return 0
    console.print(
        render.audit_table([(recorded_from_row(r), r["operator"], r["label"]) for r in rows])
    )
    return 0


@command("prune")
async def cmd_prune(ledger: JobLedger, args: argparse.Namespace, console: Console) -> int:
    """Remove the streams of finished jobs (audited; reports keep their counts)."""
    result = await ledger.prune(
        finished_before=args.finished_before,
        operator=args.operator,
        actor=args.actor,
        reason=args.reason,
        dry_run=args.dry_run,
    )
    verb = "would remove" if result.dry_run else "removed"
    console.print(f"{verb} {result.jobs} jobs and {result.events} events")
    if result.prune_id is not None:
        console.print(f"recorded as prune #{result.prune_id}")
    return 0


# -- the parser ----------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"jobledger: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``jobledger`` argument parser."""
    parser = _Parser(prog="jobledger", description="jobledger: jobs as an immutable event log")
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: $JOBLEDGER_DSN, else embedded)")
    parser.add_argument(
        "--home", help="embedded server home (default: $JOBLEDGER_HOME or ./.jobledger)"
    )
    parser.add_argument(
        "--app",
        default=os.environ.get("JOBLEDGER_APP"),
        help="module:attr of your JobLedger (registers its operators: input validation, workers)",
    )
    parser.add_argument("--actor", default=_default_actor(), help="who you are (audit trail)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("migrate", help="apply pending migrations")

    p = sub.add_parser("submit", help="submit a job")
    p.add_argument("operator")
    p.add_argument(
        "inputs", nargs="?", type=json_arg, default=None, help="JSON inputs (or @file.json)"
    )
    p.add_argument("--label")
    p.add_argument("--description")
    p.add_argument("--queue")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--delay", type=float, help="seconds")
    p.add_argument("--run-at", type=time_arg)
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--timeout", type=float, help="seconds")
    p.add_argument("--tag", action="append")
    p.add_argument("--context", type=key_value, action="append", metavar="KEY=VALUE")
    p.add_argument("--owner")
    p.add_argument("--parent", metavar="JOB")
    p.add_argument("--idempotency-key")
    p.add_argument("--reason")
    p.add_argument("--json", action="store_true", help="print the job as JSON")

    p = sub.add_parser("ls", help="list jobs")
    add_filter_flags(p)
    p.add_argument("--order", action="append", help="field, -field for descending (repeatable)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--cursor")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("show", help="a job's state and event timeline")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")

    for name, help_ in (
        ("cancel", "cancel a job"),
        ("retry", "retry a failed or cancelled job"),
        ("rerun", "rerun a finished job"),
        ("pin", "pin a job"),
        ("unpin", "unpin a job"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("job")
        add_how_flags(p)
        if name in ("retry", "rerun"):
            p.add_argument("--delay", type=float, help="seconds before it runs")

    p = sub.add_parser("label", help="change a job's label")
    p.add_argument("job")
    p.add_argument("label")
    p.add_argument("--description")
    add_how_flags(p)

    p = sub.add_parser("delete", help="delete a job, or all jobs matching filters")
    p.add_argument("job", nargs="?")
    add_filter_flags(p)
    add_how_flags(p)

    p = sub.add_parser("worker", help="run a worker for --app's operators")
    p.add_argument("--queues", type=csv_list, help="queues to claim from (default: the operators')")
    p.add_argument("--operator", type=csv_list, help="only these operators")
    p.add_argument(
        "--concurrency",
        type=int,
        default=10,
        help="handlers running at once (a returned handler's outcome is written in the "
        "background; at most twice as many jobs are held)",
    )
    p.add_argument("--burst", action="store_true", help="exit when no claimable job is left")
    p.add_argument("--limit", type=int, help="with --burst: run at most N jobs")
    p.add_argument("--context", type=key_value, action="append", metavar="KEY=VALUE")
    p.add_argument("--heartbeat", type=float, default=2.0, help="seconds between heartbeats")
    p.add_argument("--rescue-after", type=float, default=30.0, help="seconds of silence = dead")
    p.add_argument("--grace", type=float, default=30.0, help="shutdown grace period (seconds)")
    p.add_argument("--poll", type=float, default=1.0, help="poll interval (seconds)")

    p = sub.add_parser("workers", help="list workers and their last heartbeat")
    p.add_argument("--all", action="store_true", help="include stopped workers")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("operators", help="list operators published by any process")
    p.add_argument("--json", action="store_true", help="with full JSON Schemas")

    p = sub.add_parser("wait", help="wait for a job, with a progress bar")
    p.add_argument("job")
    p.add_argument("--until", type=status_list, help="status[,status] (default: terminal)")
    p.add_argument("--timeout", type=float, help="seconds")

    sub.add_parser("demo", help="run the demo (worker + jobs + live progress + history)")

    p = sub.add_parser("report", help="throughput, failures, wait and run times")
    p.add_argument("--since", type=time_arg, default=None, help="ISO time (default: 24h ago)")
    p.add_argument("--until", type=time_arg, default=None, help="ISO time (default: now)")
    p.add_argument("--by", choices=("operator", "queue"), default="operator")
    p.add_argument("--bucket", choices=("hour", "day", "week"), default="hour")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument(
        "--no-catch-up",
        action="store_true",
        help="read the report projection as it is, without applying the log's newest events",
    )

    p = sub.add_parser("projections", help="projection status, rebuild, run")
    psub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    q = psub.add_parser("status", help="each projection's checkpoint and lag")
    q.add_argument("--json", action="store_true")
    q = psub.add_parser("rebuild", help="rebuild a projection from the log")
    q.add_argument("name", nargs="?", help="jobs or reports")
    q.add_argument("--all", action="store_true")
    q.add_argument(
        "--processes",
        type=_positive_int,
        default=None,
        help="processes folding the log for jobs (default: one per CPU, at most 4,"
        " one per 100,000 events)",
    )
    q = psub.add_parser("run", help="run the async projections (catch up, then tail)")
    q.add_argument("--poll", type=float, default=0.5)

    p = sub.add_parser("verify", help="replay the log and compare with every projection")
    p.add_argument("--limit", type=int, default=1000)

    p = sub.add_parser("replay", help="a job's events step by step; its state at a time")
    p.add_argument("job", nargs="?")
    p.add_argument("--at", type=at_arg, help="a log position or an ISO time")
    p.add_argument("--step", action="store_true", help="one event at a time (terminal)")
    p.add_argument("--json", metavar="FILE", help="write the event stream to FILE (- for stdout)")
    p.add_argument("--from-file", metavar="FILE", help="replay a stream written by --json")

    p = sub.add_parser("prune", help="remove the streams of finished jobs (audited)")
    p.add_argument("--finished-before", type=time_arg, required=True, metavar="TIME")
    p.add_argument("--operator")
    p.add_argument("--reason")
    p.add_argument("--dry-run", action="store_true")

    p = sub.add_parser("audit", help="who changed what, across jobs")
    p.add_argument("--actor", dest="actor_filter")
    p.add_argument("--since", type=time_arg)
    p.add_argument("--until", type=time_arg)
    p.add_argument("--operator")
    p.add_argument("--type", help="event type, e.g. job.cancelled")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    return parser


def _default_actor() -> str:
    try:
        return os.environ.get("JOBLEDGER_ACTOR") or getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def load_app(spec: str | None, dsn: str | None, home: str | None) -> JobLedger:
    """The application's JobLedger (``module:attr``), or a plain one."""
    if not spec:
        return JobLedger(dsn, home=home)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import --app module {module_name!r}: {exc}") from exc
    ledger = getattr(module, attr or "ledger", None)
    if not isinstance(ledger, JobLedger):
        raise UsageError(f"--app {spec!r} is not a JobLedger")
    if dsn:
        ledger._dsn_arg = dsn
    if home:
        ledger._home = home
    return ledger


LOG_FORMATS = ("json", "console")


def _log_json(event: dict[str, Any], **_: Any) -> bytes:
    # When, how bad and what first: the rest are the event's own fields.
    line = {"timestamp": event.pop("timestamp", None), "level": event.pop("level", None)}
    line["event"] = event.pop("event", None)
    line.update(event)
    return _log_encoder.encode(line)


_log_encoder = msgspec.json.Encoder(enc_hook=str)


def configure_logging(level: str = "warning", fmt: str | None = None) -> None:
    """Structured logs on stderr at ``level`` and above.

    ``fmt`` is ``"json"`` (one JSON object per line: what log shippers read,
    and a tenth of the console renderer's cost per line) or ``"console"``
    (aligned, coloured, for a person at a terminal). By default: console when
    stderr is a terminal, JSON otherwise. Both stamp events in UTC, ISO 8601.
    """
    import logging

    levels = ("debug", "info", "warning", "error", "critical")
    if level.lower() not in levels:
        raise UsageError(f"log level must be one of {', '.join(levels)}, got {level!r}")
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    if fmt not in LOG_FORMATS:
        raise UsageError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_log_json),
        ]
        factory: Any = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        processors += [
            structlog.processors.StackInfoRenderer(),
            structlog.dev.set_exc_info,
            structlog.dev.ConsoleRenderer(),
        ]
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


async def _run(args: argparse.Namespace) -> int:
    if args.command == "replay" and args.from_file:
        return await _replay_file(args)
    if args.command == "replay" and not args.job:
        raise UsageError("replay needs a job id (or --from-file FILE)")
    if args.command == "projections" and args.action == "rebuild" and not (args.name or args.all):
        raise UsageError("rebuild needs a projection name (jobs, reports) or --all")
    if args.command == "report":
        args.until = args.until or datetime.now(UTC)
        args.since = args.since or args.until - timedelta(days=1)
    if args.command == "demo" and not args.app:
        args.app = "examples.demo_app:ledger"
    ledger = load_app(args.app, args.dsn, args.home)
    console = render.console()
    async with ledger:
        return await COMMANDS[args.command](ledger, args, console)


async def _replay_file(args: argparse.Namespace) -> int:
    from engine.events import Recorded

    try:
        raw = await anyio.Path(args.from_file).read_bytes()
        events = msgspec.json.decode(raw, type=list[Recorded])
    except OSError as exc:
        raise UsageError(f"cannot read {args.from_file}: {exc.strerror}") from exc
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise UsageError(f"{args.from_file} is not a jobledger event stream: {exc}") from exc
    if not events:
        raise UsageError(f"{args.from_file} holds no events")
    return await _replay(events, args, render.console())


# Options whose value may start with "-": argparse would read ``--order
# -created_at`` as a second option and fail with "expected one argument".
DASH_VALUED = ("--order",)


def attach_dash_values(argv: Sequence[str]) -> list[str]:
    """Join ``--order -field`` into ``--order=-field``, the one spelling argparse accepts.

    Only a value with one leading dash is joined: ``--order --json`` is still
    an ``--order`` without its value.
    """
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in DASH_VALUED:
            value = next(it, None)
            if value is None:
                out.append(arg)
            elif value.startswith("-") and not value.startswith("--"):
                out.append(f"{arg}={value}")
            else:
                out.extend((arg, value))
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jobledger`` console script."""
    parser = build_parser()
    args = parser.parse_args(attach_dash_values(sys.argv[1:] if argv is None else argv))
    default_level = "info" if args.command == "worker" else "warning"
    try:
        configure_logging(
            os.environ.get("JOBLEDGER_LOG_LEVEL", default_level),
            os.environ.get("JOBLEDGER_LOG_FORMAT") or None,
        )
        return anyio.run(_run, args)
    except (UsageError, *USAGE_ERRORS) as exc:
        _fail(exc, 2)
    except (JobLedgerError, DatabaseUnavailable) as exc:
        _fail(exc, 1)
    except KeyboardInterrupt:
        return 130


def _fail(exc: BaseException, code: int) -> NoReturn:
    print(f"jobledger: error: {exc}", file=sys.stderr)
    raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
