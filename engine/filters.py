"""Job filters and ordering for ``list``, ``count``, ``iter_jobs`` and ``delete_where``.

Each filter name maps to one fixed SQL fragment; values are always bind
parameters, and field names come only from the tables below, never from the
caller, so no caller text ever reaches the SQL. An unknown filter or order
field is a ``ValueError`` naming it and the valid ones.

Filters (all optional, combined with AND):

=========================  ==================================================
``status``                 a status or a list of statuses
``operator``, ``queue``,   a value or a list of values
``owner``, ``worker``
``ids``                    a list of job ids
``parent_id``              a job id
``pinned``                 ``True`` / ``False``
``tags``                   a list: ``"x"`` must carry x, ``"-x"`` must not
``context``                ``{key: value}`` (equal) or ``{key: [v1, v2]}`` (any of)
``search``                 text, case-insensitive, in label or description
``created_after`` ...      ``<time>_after`` / ``<time>_before`` for created,
                           started, finished, updated and status_changed
``include_deleted``        also return deleted jobs (default ``False``)
=========================  ==================================================

Ordering: ``order_by="-created_at"`` (the default: newest first) or a list of
fields; ``-`` for descending. The job id is always the last key, so order and
cursors are stable.

Creation order is id order. A job id is a UUIDv7: its first 48 bits are the
millisecond of submission, and one process's ids increase in submission
order. So ``created_at`` (and ``id``) as an order key sorts by id, which is
what the listing indexes hold (migration 012): newest first is a backward
scan of an index on ``(filter column, id)``, or of the primary key. Jobs
submitted in the same millisecond by different processes are listed in id
order, which may differ from the order of their ``created_at`` microseconds;
the ``created_after`` / ``created_before`` filters compare ``created_at``
itself, exactly.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from engine.lifecycle import check_status

TIME_FIELDS = ("created", "started", "finished", "updated", "status_changed")
LIST_FILTERS = ("status", "operator", "queue", "owner", "worker")
ORDER_FIELDS = {
    "created_at": "timestamptz",
    "updated_at": "timestamptz",
    "started_at": "timestamptz",
    "finished_at": "timestamptz",
    "status_changed_at": "timestamptz",
    "run_at": "timestamptz",
    "priority": "integer",
    "status": "text",
    "operator": "text",
    "queue": "text",
    "label": "text",
    "attempt": "integer",
}
NULLABLE_ORDER = {"started_at", "finished_at", "run_at"}
FILTER_NAMES = frozenset(
    {
        *LIST_FILTERS,
        "ids",
        "parent_id",
        "pinned",
        "tags",
        "context",
        "search",
        "include_deleted",
        *(f"{t}_{side}" for t in TIME_FIELDS for side in ("after", "before")),
    }
)


@dataclass
class Compiled:
    """A WHERE clause and its parameters."""

    where: str
    params: list[Any]

    def param(self, value: Any) -> str:
        """Add a bind parameter; return its placeholder."""
        self.params.append(value)
        return f"${len(self.params)}"


def _values(name: str, value: Any) -> list[Any]:
    if isinstance(value, str | UUID) or not isinstance(value, Iterable):
        return [value]
    values = list(value)
    if not values:
        raise ValueError(f"filter {name!r} got an empty list")
    return values


def _check_time(name: str, value: Any) -> datetime:
    if not isinstance(value, datetime):
        raise ValueError(f"filter {name!r} takes a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        raise ValueError(f"filter {name!r} needs a timezone-aware datetime")
    return value


def compile_filters(filters: dict[str, Any], *, start: int = 0) -> Compiled:
    """Turn filter keyword arguments into a WHERE clause (see the module docstring)."""
    unknown = sorted(set(filters) - FILTER_NAMES)
    if unknown:
        raise ValueError(
            f"unknown job filter {', '.join(map(repr, unknown))}; "
            f"valid filters: {', '.join(sorted(FILTER_NAMES))}"
        )
    c = Compiled("", [None] * start)
    clauses: list[str] = []
    if not filters.get("include_deleted", False):
        clauses.append("deleted_at IS NULL")
    for name, value in filters.items():
        if value is None or name == "include_deleted":
            continue
        if name in LIST_FILTERS:
            values = [str(v) for v in _values(name, value)]
            if name == "status":
                values = [check_status(v) for v in values]
            if len(values) == 1:  # a constant: the index on (name, id) gives the order
                clauses.append(f"{name} = {c.param(values[0])}::text")
            else:
                clauses.append(f"{name} = ANY({c.param(values)}::text[])")
        elif name == "ids":
            clauses.append(
                f"id = ANY({c.param([_uuid(name, v) for v in _values(name, value)])}::uuid[])"
            )
        elif name == "parent_id":
            clauses.append(f"parent_id = {c.param(_uuid(name, value))}::uuid")
        elif name == "pinned":
            if not isinstance(value, bool):
                raise ValueError("filter 'pinned' takes True or False")
            clauses.append(f"pinned = {c.param(value)}::boolean")
        elif name == "tags":
            tags = [str(t) for t in _values(name, value)]
            want = [t for t in tags if not t.startswith("-")]
            avoid = [t[1:] for t in tags if t.startswith("-")]
            if want:  # "<> '{}'" lets the planner use the partial index jobs_tags
                clauses.append(f"tags @> {c.param(want)}::text[] AND tags <> '{{}}'")
            if avoid:
                clauses.append(f"NOT (tags && {c.param(avoid)}::text[])")
        elif name == "context":
            if not isinstance(value, dict) or not value:
                raise ValueError("filter 'context' takes a non-empty {key: value} dict")
            for key, wanted in value.items():
                options = wanted if isinstance(wanted, list | tuple | set | frozenset) else [wanted]
                ors = [f"context @> {c.param({str(key): v})}::jsonb" for v in options]
                # "<> '{}'" lets the planner use the partial index jobs_context.
                clauses.append("(" + " OR ".join(ors) + ") AND context <> '{}'")
        elif name == "search":
            pattern = (
                "%" + str(value).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            )
            p = c.param(pattern)
            clauses.append(f"(label ILIKE {p} OR coalesce(description, '') ILIKE {p})")
        else:  # <time>_after / <time>_before
            field, side = name.rsplit("_", 1)
            op = ">=" if side == "after" else "<"
            clauses.append(f"{field}_at {op} {c.param(_check_time(name, value))}::timestamptz")
    c.where = " AND ".join(clauses) if clauses else "TRUE"
    return c


def _uuid(name: str, value: Any) -> UUID:
    try:
        return value if isinstance(value, UUID) else UUID(str(value))
    except ValueError:
        raise ValueError(f"filter {name!r}: {value!r} is not a job id") from None


def as_list(value: str | Iterable[str]) -> list[str]:
    """One string as a list of itself (not of its letters); any other iterable as a list.

    Every argument that takes "a name or several" (statuses, tags, queues,
    operators, order fields) reads its value through this.
    """
    return [value] if isinstance(value, str) else list(value)


CREATION_ORDER = frozenset({"created_at", "id"})
"""The order keys that sort by id, the creation order (see the module docstring)."""


def parse_order(order_by: str | Sequence[str] | None) -> list[tuple[str, bool]]:
    """``"-created_at"`` or a list of such -> [(field, descending)], ending with the id.

    ``created_at`` and ``id`` are the id key (creation order); the id is
    unique, so any key after it could never decide and is dropped. Without
    it, the id follows the last key in that key's direction."""
    fields = as_list(order_by or ["-created_at"])
    keys: list[tuple[str, bool]] = []
    for f in fields:
        desc = f.startswith("-")
        name = f.lstrip("-+")
        if name in CREATION_ORDER:
            keys.append(("id", desc))
            return keys
        if name not in ORDER_FIELDS:
            raise ValueError(
                f"cannot order jobs by {name!r}; order fields: "
                f"{', '.join(sorted({*ORDER_FIELDS, 'id'}))}"
            )
        keys.append((name, desc))
    last_desc = keys[-1][1] if keys else False
    keys.append(("id", last_desc))
    return keys


def order_sql(keys: list[tuple[str, bool]]) -> str:
    """The ORDER BY list. NULLs sort last in both directions; the clause is only
    written for nullable fields, so the others match their indexes exactly."""
    return ", ".join(
        f"{f} {'DESC' if d else 'ASC'}" + (" NULLS LAST" if f in NULLABLE_ORDER else "")
        for f, d in keys
    )


def _cast(field: str) -> str:
    return "uuid" if field == "id" else ORDER_FIELDS[field]


def after_cursor(c: Compiled, keys: list[tuple[str, bool]], values: list[Any]) -> str:
    """The keyset condition "strictly after the row with these order values"."""
    ors: list[str] = []
    for i, (field, desc) in enumerate(keys):
        eqs: list[str] = []
        for (f, _), v in zip(keys[:i], values[:i], strict=True):
            eqs.append(f"{f} IS NULL" if v is None else f"{f} = {c.param(v)}::{_cast(f)}")
        v = values[i]
        if v is None:
            continue  # nothing sorts after NULL (NULLS LAST) but ties on later keys
        op = "<" if desc else ">"
        cond = f"{field} {op} {c.param(v)}::{_cast(field)}"
        if field in NULLABLE_ORDER:
            cond = f"({cond} OR {field} IS NULL)"
        ors.append("(" + " AND ".join([*eqs, cond]) + ")")
    return "(" + " OR ".join(ors) + ")" if ors else "FALSE"


class _Cursor(msgspec.Struct, array_like=True):
    order: list[str]
    values: list[Any]


def page_query(
    filters: dict[str, Any],
    keys: list[tuple[str, bool]],
    *,
    limit: int,
    offset: int = 0,
    cursor: str | None = None,
) -> tuple[str, list[Any]]:
    """The SELECT of one page of jobs (each row one job as JSON) and its parameters:
    the rows matching ``filters`` in the order ``keys`` (from :func:`parse_order`),
    after ``cursor`` when given, at most ``limit`` of them from ``offset``."""
    c = compile_filters(filters)
    where = c.where
    if cursor is not None:
        where = f"{where} AND {after_cursor(c, keys, decode_cursor(keys, cursor))}"
    lim, off = c.param(limit), c.param(offset)
    # Fixed fragments only; every value is a parameter.
    sql = (
        f"SELECT to_json(j) FROM jobledger.jobs AS j WHERE {where} "
        f"ORDER BY {order_sql(keys)} LIMIT {lim} OFFSET {off}"
    )
    return sql, c.params


def encode_cursor(keys: list[tuple[str, bool]], job: Any) -> str:
    """An opaque cursor pointing just after ``job`` in this order."""
    values = [getattr(job, f) for f, _ in keys]
    order = [("-" if d else "") + f for f, d in keys]
    return base64.urlsafe_b64encode(msgspec.json.encode(_Cursor(order, values))).decode()


def decode_cursor(keys: list[tuple[str, bool]], cursor: str) -> list[Any]:
    """The order values stored in a cursor (which must match the order)."""
    try:
        raw = msgspec.json.decode(base64.urlsafe_b64decode(cursor.encode()), type=_Cursor)
    except (ValueError, msgspec.DecodeError):
        raise ValueError("invalid cursor") from None
    order = [("-" if d else "") + f for f, d in keys]
    if raw.order != order:
        raise ValueError(f"the cursor was made for order {raw.order}, not {order}")
    values: list[Any] = []
    for (field, _), v in zip(keys, raw.values, strict=True):
        if v is None:
            values.append(None)
        elif field == "id":
            values.append(UUID(v))
        elif ORDER_FIELDS[field] == "timestamptz":
            values.append(msgspec.convert(v, datetime))
        else:
            values.append(v)
    return values
