"""Terminal rendering for the CLI (rich): job tables, job cards, timelines."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import msgspec
from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import ProgressColumn, Task, TextColumn
from rich.table import Table
from rich.text import Text

from engine.events import Recorded
from projections.job_state import Job

STATUS_STYLE = {
    "scheduled": "cyan",
    "queued": "blue",
    "running": "yellow",
    "cancelling": "magenta",
    "completed": "green",
    "failed": "red",
    "cancelled": "dim",
}


def _add(table: Table, *cells: Any) -> None:
    """Add a row whose text cells are shown as written: a ``str`` cell would be
    read as rich markup by a console that has it on (a label ``[draft]``)."""
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells))


def status_text(status: str) -> Text:
    """A status, coloured."""
    return Text(status, style=STATUS_STYLE.get(status, ""))


def when(value: datetime | None) -> str:
    """A timestamp for humans (UTC, to the millisecond)."""
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if value else "-"


def short(value: Any, width: int = 60) -> str:
    """A value as compact JSON, cut to ``width``."""
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return text if len(text) <= width else text[: width - 1] + "…"


def jobs_table(jobs: Sequence[Job], *, title: str | None = None) -> Table:
    """A table of jobs, one row each."""
    table = Table(title=title, header_style="bold", expand=False)
    columns = (
        "id",
        "label",
        "operator",
        "queue",
        "status",
        "att",
        "progress",
        "created",
        "updated",
    )
    for col in columns:
        table.add_column(col, no_wrap=col in ("id", "created", "updated"))
    for j in jobs:
        frac = j.progress.fraction if j.progress else None
        _add(
            table,
            str(j.id),
            j.label + (" 📌" if j.pinned else ""),
            j.operator,
            j.queue,
            status_text(j.status),
            f"{j.attempt}/{j.max_attempts}" + (f" r{j.run}" if j.run > 1 else ""),
            "-" if frac is None else f"{frac:.0%}",
            when(j.created_at),
            when(j.updated_at),
        )
    return table


def job_card(job: Job, *, title: str | None = None) -> Panel:
    """Every field of one job."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for name in job.__struct_fields__:
        value = getattr(job, name)
        if value is None or value == [] or value == {}:
            continue
        if name == "status":
            _add(grid, name, status_text(value))
        elif isinstance(value, datetime):
            _add(grid, name, when(value))
        elif isinstance(value, str | int | float | bool) or name == "id":
            _add(grid, name, str(value))
        else:
            _add(grid, name, short(msgspec.to_builtins(value), 100))
    heading = f"{job.label} · {job.id}" + (f" · {title}" if title else "")
    return Panel(grid, title=Text(heading), title_align="left")  # a str title is markup


QUIET_FIELDS = frozenset(
    {"version", "updated_at", "status_changed_at", "status_reason", "status_message"}
)
"""Fields every status change touches; the timeline shows them in other columns."""


def console() -> Console:
    """A console: the terminal's width, or a wide one when output is piped.

    Markup is off: labels, reasons, messages and errors are the users' own
    text and are shown as written, brackets included (``Import [draft]``
    would otherwise lose a word, and ``[/x]`` stop the command). Styles are
    given as ``Text`` and ``style=``, never as markup in a string.
    """
    c = Console(markup=False)
    return c if c.is_terminal else Console(markup=False, width=200)


class StatusColumn(ProgressColumn):
    """A progress bar column: the task's ``status`` field, coloured as in every table."""

    def render(self, task: Task) -> Text:
        """The status of ``task`` (its ``status`` field)."""
        return status_text(str(task.fields.get("status", "")))


def data_column(field: str, *, style: str = "none") -> TextColumn:
    """A progress bar column showing ``{field}`` of a task (a job's label, status
    or progress message) as plain text: rich reads a column's format as markup."""
    return TextColumn("{" + field + "}", style=style, markup=False)


def timeline(steps: Iterable[tuple[Recorded, dict[str, tuple[Any, Any]]]]) -> Table:
    """Each event with who, why, when, and the fields it changed."""
    table = Table(header_style="bold", expand=False)
    for col in ("v", "time", "event", "actor", "reason", "changed"):
        table.add_column(col, overflow="fold")
    for rec, changes in steps:
        if rec.version == 1:
            payload = msgspec.to_builtins(rec.event)
            payload.pop("type", None)
            changed = ", ".join(f"{k}={short(v, 30)}" for k, v in payload.items())
        else:
            shown = {k: v for k, v in changes.items() if k not in QUIET_FIELDS}
            parts = []
            for k, (a, b) in shown.items():
                if k == "progress" and b is not None:
                    parts.append(f"progress: {progress_text(b)}")
                else:
                    parts.append(f"{k}: {short(_plain(a), 20)} → {short(_plain(b), 30)}")
            # An event can leave every field as it was (a second pin, an
            # artifact published again as it was): say so, not an empty cell.
            changed = ", ".join(parts) or Text("(no field changed)", style="dim")
        who = rec.meta.actor or rec.meta.worker or "-"
        why = " ".join(x for x in (rec.meta.reason, rec.meta.message) if x) or "-"
        if rec.meta.forced:
            why = f"[FORCED] {why}"
        _add(table, str(rec.version), when(rec.recorded_at), rec.type, who, why, changed)
    return table


def progress_text(p: Any) -> str:
    """Progress in a few words: 45% · epoch 9 · loss=0.031."""
    bits = []
    if p.fraction is not None:
        bits.append(f"{p.fraction:.0%}")
    if p.message:
        bits.append(p.message)
    bits += [f"{k}={v.last:.4g}" for k, v in p.metrics.items()]
    return " · ".join(bits) or "-"


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return when(value)
    return msgspec.to_builtins(value) if value is not None else None


def show_job(console: Console, job: Job, steps: Sequence[tuple[Recorded, dict[str, Any]]]) -> None:
    """A job card followed by its timeline."""
    console.print(Group(job_card(job), timeline(steps)))


def workers_table(rows: Sequence[Any]) -> Table:
    """Workers: where, what, and how recently they were heard from."""
    table = Table(header_style="bold")
    for col in ("worker", "queues", "concurrency", "running", "started", "last heartbeat", "state"):
        table.add_column(col)
    for r in rows:
        silent = r["silent_for"].total_seconds()
        state = "stopped" if r["stopped_at"] else ("alive" if silent < 30 else "silent")
        _add(
            table,
            r["id"],
            ",".join(r["queues"]),
            str(r["concurrency"]),
            str(r["running"]),
            when(r["started_at"]),
            f"{when(r['last_heartbeat'])} ({silent:.0f}s ago)",
            Text(state, style={"alive": "green", "silent": "red"}.get(state, "dim")),
        )
    return table


def operators_table(ops: Sequence[Any]) -> Table:
    """Operators: queue, retry and timeout defaults, input fields."""
    table = Table(header_style="bold")
    for col in ("operator", "queue", "attempts", "timeout", "inputs", "published by"):
        table.add_column(col)
    for o in ops:
        fields = "-"
        schema = o.input_schema or {}
        ref = schema.get("$ref", "").rsplit("/", 1)[-1]
        props = schema.get("$defs", {}).get(ref, schema).get("properties")
        if props:
            fields = ", ".join(f"{k}: {v.get('type', '?')}" for k, v in props.items())
        _add(
            table,
            o.name,
            o.queue,
            str(o.max_attempts),
            "-" if o.timeout is None else f"{o.timeout:g}s",
            fields,
            o.published_by or "-",
        )
    return table


def report_table(rows: Sequence[Any], *, by: str) -> Table:
    """Report rows: counts, failure rate, wait and run percentiles."""
    table = Table(header_style="bold")
    cols = (
        "bucket",
        by,
        "submitted",
        "started",
        "completed",
        "failed",
        "retried",
        "cancelled",
        "rescued",
        "fail %",
        "wait p50/p95/p99",
        "run p50/p95/p99",
    )
    for col in cols:
        table.add_column(col, justify="left" if col in ("bucket", by) else "right")
    for r in rows:
        _add(
            table,
            when(r.bucket)[:16],
            r.key,
            *(
                str(getattr(r, c))
                for c in (
                    "submitted",
                    "started",
                    "completed",
                    "failed",
                    "retried",
                    "cancelled",
                    "rescued",
                )
            ),
            "-" if r.failure_rate is None else f"{r.failure_rate:.1%}",
            _ms3(r.wait_p50_ms, r.wait_p95_ms, r.wait_p99_ms),
            _ms3(r.run_p50_ms, r.run_p95_ms, r.run_p99_ms),
        )
    return table


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}ms" if v < 10_000 else f"{v / 1000:.1f}s"


def _ms3(*values: float | None) -> str:
    return " / ".join(_ms(v) for v in values)


def report_chart(rows: Sequence[Any], width: int = 50) -> Table:
    """A terminal bar chart of completed (green) and failed (red) jobs per bucket."""
    per: dict[Any, list[int]] = {}
    for r in rows:
        c = per.setdefault(r.bucket, [0, 0])
        c[0] += r.completed
        c[1] += r.failed
    top = max((a + b for a, b in per.values()), default=0) or 1
    chart = Table.grid(padding=(0, 1))
    for bucket, (ok, bad) in sorted(per.items()):
        bar = Text("█" * round(ok / top * width), style="green")
        bar.append("█" * round(bad / top * width), style="red")
        _add(chart, when(bucket)[:16], bar, f"{ok} ok, {bad} failed")
    return chart


def projections_table(rows: Sequence[dict[str, Any]]) -> Table:
    """Projections: checkpoint and lag."""
    table = Table(header_style="bold")
    for col in (
        "projection",
        "kind",
        "checkpoint (tx/position)",
        "applied",
        "lag (events)",
        "lag (s)",
    ):
        table.add_column(col)
    for r in rows:
        _add(
            table,
            r["name"],
            r["kind"],
            r["checkpoint"],
            "-" if r["applied"] is None else str(r["applied"]),
            str(r["lag_events"]),
            f"{r['lag_seconds']:.1f}",
        )
    return table


def audit_table(rows: Sequence[tuple[Recorded, str | None, str | None]]) -> Table:
    """Events across jobs: when, which job, what, who, why."""
    table = Table(header_style="bold")
    for col in ("time", "job", "operator", "event", "actor", "reason"):
        table.add_column(col, overflow="fold")
    for rec, operator, label in rows:
        why = " ".join(x for x in (rec.meta.reason, rec.meta.message) if x) or "-"
        if rec.meta.forced:
            why = f"[FORCED] {why}"
        _add(
            table,
            when(rec.recorded_at),
            f"{label or '?'} {rec.job_id}",
            operator or "-",
            rec.type,
            rec.meta.actor or rec.meta.worker or "-",
            why,
        )
    return table
