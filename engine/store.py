"""The storage edge: appending events with their inline projection, reading streams.

Every write appends events and rewrites the affected ``jobs`` rows **in one
statement** (``sql/queries/store.sql``), guarded by the version the writer
read. Nothing here decides what the new row is: callers compute it with the
reducer (:func:`projections.job_state.apply`) and pass both the event and the
resulting row, so the live table is by construction the fold of the log.

A job missing from an append's result (the set of ids written) was moved by
someone else first (its version moved on); the caller reloads and re-applies,
or reports the conflict.

A write's rows travel as one template row and, per job, the columns that
differ from it (:func:`_encode_writes`): the jobs of a submission or a claim
share most of their row, and parsing a whole row of JSON per job was a third
to a half of every write's server time.

Notifications: a write may carry one NOTIFY payload, sent once by the same
statement (never once per job of a batch). Listeners on channel ``jobledger``
receive a JSON object with any of ``ready`` (queues that got claimable work),
``cancel`` (job ids whose cancellation was requested) and ``done`` (job ids
that reached a terminal status, or ``"*"`` when there were many).

Reading the whole log without gaps
----------------------------------

``position`` is an identity: its values are handed out when rows are
inserted, not when transactions commit. Transaction A can take position 10,
transaction B position 11, and B can commit first. A reader that follows
``position`` and sees 11 would move its checkpoint past 10 and never see A's
event once A commits. That is the classic gap of "ordered by sequence" event
stores.

:func:`read_log` instead orders by ``(tx_id, position)``, where ``tx_id`` is
the writing transaction's id (``pg_current_xact_id()``), and only returns
events whose ``tx_id`` is below the fence ``pg_snapshot_xmin(pg_current_snapshot())``:
the oldest transaction still running. Every transaction below the fence has
ended, so no event can ever appear below it later; reading up to it and
checkpointing ``(tx_id, position)`` never skips one. Events of one transaction
stay together, in append order.

Consequences, which operators should know:

* **Lag, never loss.** Any open transaction in the cluster holds the fence
  back, including ones that never touch jobledger (a long report query, an
  idle-in-transaction session). Projections then wait until it ends. Monitor
  ``jobledger projections status``; keep ``idle_in_transaction_session_timeout``
  set.
* **Transaction ids belong to one cluster.** A log restored from a logical
  dump into another cluster keeps its old ``tx_id`` values, which may be above
  the new cluster's ``pg_current_xact_id()``; new events would then sort
  *below* old ones. :func:`log_ahead_of_cluster` detects this; the projection
  runner refuses to run and tells the operator to rebuild.

Driver errors are translated here, by SQLSTATE and constraint name.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg
import msgspec
from msgspec.structs import astuple

from engine import events as ev
from engine.errors import ImmutableLog, JobNotFound, PayloadTooLarge
from engine.pool import Pool
from engine.sqlfiles import Q
from projections.codec import decode_event, decode_job, decode_meta, recorded_from_row
from projections.job_state import JOB_FIELDS, Job

CHANNEL = "jobledger"
MAX_DONE_IDS = 100
IMMUTABLE_SQLSTATE = "JL001"

_encoder = msgspec.json.Encoder()

_TAG_LENGTHS = {cls: len(_encoder.encode(cls.tag)) + 8 for cls in ev.EVENT_TYPES.values()}
"""Per event class, the length of ``{"type":"<tag>"`` that msgspec writes first."""


def encode_payload(event: ev.Event) -> bytes:
    """The ``data`` stored for ``event``: its JSON without the ``type`` key.

    The row's ``type`` column holds the tag, and every reader decodes a
    payload by that column (:func:`projections.codec.decode_event`), so the
    tag inside ``data`` was 24 bytes of every event row and of its WAL
    record, written and never read (a job that runs writes three events).
    Events stored with the key still read the same. msgspec writes a tagged
    Struct's tag first, so leaving it out is a slice of the encoding.
    """
    return _untagged(type(event), _encoder.encode(event))


def _untagged(kind: type[ev.Event], data: bytes) -> bytes:
    """``data``, msgspec's encoding of an event of class ``kind``, without its tag."""
    n = _TAG_LENGTHS[kind]
    return b"{" + data[n + 1 :] if len(data) > n + 1 else b"{}"


Executor = asyncpg.Connection | Pool
"""What the functions here run their statements on: a connection, or the pool."""


class Change(msgspec.Struct, frozen=True, gc=False):
    """One append: the event and the job row the reducer made of it."""

    state: Job
    recorded: ev.Recorded


@dataclass
class Limits:
    """Size limits on what a single event may carry (encoded JSON bytes)."""

    max_event_bytes: int = 1 << 20


LIMITS = Limits()


def notification(
    changes: Iterable[tuple[Job | None, Job]],
) -> str | None:
    """The one NOTIFY payload for a write, or ``None`` when nobody needs waking."""
    ready: set[str] = set()
    cancel: list[str] = []
    done: list[str] = []
    for old, new in changes:
        if old is not None and old.status == new.status and old.run_at == new.run_at:
            continue
        if new.status == "queued" or new.status == "scheduled":
            ready.add(new.queue)
        elif new.status == "cancelling":
            cancel.append(str(new.id))
        elif new.status in ("completed", "failed", "cancelled"):
            done.append(str(new.id))
    if not (ready or cancel or done):
        return None
    payload: dict[str, Any] = {}
    if ready:
        payload["ready"] = sorted(ready)
    if cancel:
        payload["cancel"] = cancel if len(cancel) <= MAX_DONE_IDS else "*"
    if done:
        payload["done"] = done if len(done) <= MAX_DONE_IDS else "*"
    return _encoder.encode(payload).decode()


def check_event(event: ev.Event) -> None:
    """Raise :class:`PayloadTooLarge` if ``event`` is over :data:`LIMITS` encoded, and
    ``ValueError`` if the log's readers could not decode it (a wrong type in a field).

    Every write checks its events; writers that batch several callers' events
    (the completer, a handler's progress) check each one first, so one
    caller's bad event is refused to that caller instead of failing
    everyone's batch.
    """
    data = encode_payload(event)
    if len(data) > LIMITS.max_event_bytes:
        raise PayloadTooLarge(f"the {event.tag} event", len(data), LIMITS.max_event_bytes)
    _check_decodes(f"the {event.tag} event", decode_event, event.tag, data)


def _ids(value: Sequence[UUID] | None) -> set[UUID]:
    """The result of append_events or create_streams: one uuid[] row, or no row."""
    return set(value) if value is not None else set()


async def append(
    conn: Executor,
    changes: Sequence[Change],
    *,
    notify: str | None = None,
) -> set[UUID]:
    """Append one event to each of several existing streams, with their new rows.

    Returns the ids of the jobs written; a job missing from it was moved by
    another writer first and nothing was written for it. One job goes
    through ``append_event``, more through ``append_events``; both take the
    rows of :func:`_encode_writes`.
    """
    if not changes:
        return set()
    w = _encode_writes(changes)
    try:
        if len(changes) == 1:
            written = await conn.fetchval(Q.append_event, w.template, w.ids[0], w.events, notify)
        else:
            written = await conn.fetchval(Q.append_events, *w, notify)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "events_stream_version":
            # The row guard let it through but the log already has that
            # version: the jobs row is behind its log. Treat as a conflict.
            return set()
        raise
    return _ids(written)


class _Writes(NamedTuple):
    """The parameters of every write (``append_events``, ``create_streams``)."""

    template: msgspec.Raw
    ids: list[UUID]
    patches: msgspec.Raw | None
    events: msgspec.Raw


JSON_COLUMNS = frozenset({"inputs", "context", "progress", "result", "error", "artifacts"})
"""The ``jsonb`` columns of ``jobs``: their values are compared as encoded JSON,
where ``1 == 1.0 == True`` in Python would hide a difference the column keeps.
``tests/test_migrations.py`` checks this against the table."""

_JSON_INDEXES = frozenset(i for i, name in enumerate(JOB_FIELDS) if name in JSON_COLUMNS)


_EMPTY = ([], {}, ())


def _encoded_once(values: Sequence[Any]) -> list[bytes]:
    """Each value as encoded JSON; one encoding (a list of one) when every value is
    the same object."""
    first = values[0]
    if all(v is first for v in values):
        return [_encoder.encode(first)]
    return [_encoder.encode(v) for v in values]


def _one_or_each(values: list[Any]) -> Any:
    """The one value when all are equal, else the list of them, one per job."""
    return values[0] if values.count(values[0]) == len(values) else values


def _tags(kinds: list[type[ev.Event]]) -> str | list[str]:
    """The stored type of a write's events: one tag when all are of one kind (a
    class compared by identity, not a tag read per event), else one per event."""
    first = kinds[0]
    if kinds.count(first) == len(kinds):
        return first.tag
    return [k.tag for k in kinds]


def _same_json(values: Sequence[Any]) -> bool:
    """Whether every value encodes to the same JSON as the first."""
    encoded = _encoded_once(values)
    return encoded.count(encoded[0]) == len(encoded)


def _check_readable(
    changes: Sequence[Change],
    kinds: Sequence[type[ev.Event]],
    encoded: Sequence[bytes],
    metas: Sequence[bytes],
) -> None:
    """Raise ``ValueError`` unless every event (``encoded``, stored payloads of the
    classes ``kinds``) and meta (``metas``, one or one per change) decodes as
    the log's readers will decode it.

    A Struct is built without type checks, so a caller's wrong value (an
    ``int`` label, a list for a reason) would reach the log and stop every
    replay of its stream. Each distinct payload is decoded once (a batch's
    events are mostly alike): ~0.5 us an event.
    """
    # A stored payload leaves its type out: equal bytes are the same event
    # when the events are of one kind, else equal (kind, bytes) pairs are.
    # The message is only written on failure: formatting a job id costs
    # what decoding its event does.
    one_kind = kinds.count(kinds[0]) == len(kinds)
    for i in _distinct(encoded if one_kind else list(zip(kinds, encoded, strict=True))):
        rec = changes[i].recorded
        try:
            decode_event(rec.type, encoded[i])
        except (msgspec.ValidationError, ValueError) as exc:
            raise ValueError(f"the {rec.type} event of job {changes[i].state.id}: {exc}") from None
    for i in _distinct(metas):
        try:
            decode_meta(metas[i])
        except (msgspec.ValidationError, ValueError) as exc:
            rec = changes[i].recorded
            what = f"the meta of the {rec.type} event of job {changes[i].state.id}"
            raise ValueError(f"{what}: {exc}") from None


def _check_decodes(what: str, decode: Any, *args: Any) -> None:
    """``decode(*args)``, its failure a ``ValueError`` naming ``what`` and the field."""
    try:
        decode(*args)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ValueError(f"{what}: {exc}") from None


def _distinct(values: Sequence[Hashable]) -> Iterable[int]:
    """The index of each distinct value's first occurrence (only 0 when all are equal)."""
    if values.count(values[0]) == len(values):
        return range(1)
    seen: dict[Hashable, int] = {}
    for i, v in enumerate(values):
        seen.setdefault(v, i)
    return seen.values()


def _encode_writes(changes: Sequence[Change]) -> _Writes:
    """New rows as one template row and, per job, only the columns that differ.

    The jobs of one write share most of their row (a submission's operator,
    queue, defaults and times; a claim's status, worker and start), so the
    server turns one row of JSON into a record and each job overlays its few
    own values, instead of parsing a whole row per job. It is an encoding
    only: every row is still exactly the reducer's. A column counts as shared
    when every job's value equals the first's, by ``==`` for the scalar
    columns (their SQL types keep no distinction that ``==`` hides) and by
    encoded bytes for the ``jsonb`` ones. The events' type, data, meta and
    time go once when they are the same for all, else once per job, in one
    JSON parameter (each array parameter costs the client ~3 us to encode).
    """
    n = len(changes)
    if n == 1:
        return _encode_one(changes[0])
    columns = list(zip(*map(astuple, [c.state for c in changes]), strict=True))
    differ = []
    for i in range(1, len(columns)):  # 0 is the id, sent on its own (one job: no columns)
        col = columns[i]
        if col.count(col[0]) == n and (
            i not in _JSON_INDEXES
            # Only None equals None, only an empty container an empty one:
            # equal is exact for these; other JSON values are compared encoded.
            or col[0] is None
            or col[0] in _EMPTY
            or _same_json(col)
        ):
            continue
        differ.append(i)
    patches = None
    if differ:
        names = [JOB_FIELDS[i] for i in differ]
        patches = msgspec.Raw(
            _encoder.encode(
                [
                    dict(zip(names, vals, strict=True))
                    for vals in zip(*(columns[i] for i in differ), strict=True)
                ]
            )
        )
    batch_events = [c.recorded.event for c in changes]
    kinds = [type(e) for e in batch_events]
    encoded = [_encoder.encode(e) for e in batch_events]
    # The tag goes once when every payload is the same (equal bytes are the
    # same event: an encoding carries its type); else from each.
    if encoded.count(encoded[0]) == n:
        encoded = [_untagged(kinds[0], encoded[0])] * n
    else:
        encoded = [_untagged(k, d) for k, d in zip(kinds, encoded, strict=True)]
    limit = LIMITS.max_event_bytes
    if max(map(len, encoded)) > limit:
        i = next(i for i, d in enumerate(encoded) if len(d) > limit)
        what = f"the {changes[i].recorded.type} event of item {i} of {n}"
        raise PayloadTooLarge(f"{what} (job {changes[i].state.id})", len(encoded[i]), limit)
    metas = _encoded_once([c.recorded.meta for c in changes])
    _check_readable(changes, kinds, encoded, metas)
    data = _one_or_each(encoded)  # wrapped once when shared (0.06 us a job)
    events = {
        "type": _tags(kinds),
        "data": msgspec.Raw(data) if type(data) is bytes else [msgspec.Raw(d) for d in data],
        "meta": _one_or_each([msgspec.Raw(m) for m in metas]),
        "at": _one_or_each([c.recorded.recorded_at for c in changes]),
    }
    return _Writes(
        template=msgspec.Raw(_encoder.encode(changes[0].state)),
        ids=[c.state.id for c in changes],
        patches=patches,
        events=msgspec.Raw(_encoder.encode(events)),
    )


def _encode_one(change: Change) -> _Writes:
    """:func:`_encode_writes` of a single change (a submit, an API transition, a
    claim or outcome of one job): its row is the template, its event's values
    the shared ones; none of the batch's comparisons (4.9 -> 3.3 us)."""
    rec = change.recorded
    data = encode_payload(rec.event)
    if len(data) > LIMITS.max_event_bytes:
        raise PayloadTooLarge(f"the {rec.type} event", len(data), LIMITS.max_event_bytes)
    meta = _encoder.encode(rec.meta)
    _check_readable((change,), (type(rec.event),), (data,), (meta,))
    events = {
        "type": rec.type,
        "data": msgspec.Raw(data),
        "meta": msgspec.Raw(meta),
        "at": rec.recorded_at,
    }
    return _Writes(
        template=msgspec.Raw(_encoder.encode(change.state)),
        ids=[change.state.id],
        patches=None,
        events=msgspec.Raw(_encoder.encode(events)),
    )


async def create(
    conn: Executor,
    changes: Sequence[Change],
    *,
    notify: str | None = None,
) -> Collection[UUID]:
    """Start new streams (``job.submitted`` + first row) in one statement.

    Returns the ids of the jobs stored (a set; the list of all of them, in
    order, when every one was stored: hashing a batch's ids is 0.25 us a
    job); a job missing from it was skipped because its idempotency key is
    taken. A batch without idempotency keys is stored whole or not at all.
    The statement follows the batch's shape: ``create_streams`` when a key
    may conflict, ``create_stream`` for one job, ``create_streams_plain`` for
    more; all take the rows of :func:`_encode_writes`.
    """
    if not changes:
        return set()
    for c in changes:
        if type(c.recorded.event) is not ev.Submitted or c.recorded.version != 1:
            raise ValueError(
                f"a new stream starts with job.submitted at version 1, got {c.recorded.type}"
                f" at version {c.recorded.version} for job {c.state.id}"
            )
    params = _encode_writes(changes)
    if any(c.state.idempotency_key is not None for c in changes):
        return _ids(await conn.fetchval(Q.create_streams, *params, notify))
    if len(changes) == 1:
        await conn.fetchval(Q.create_stream, params.template, params.ids[0], params.events, notify)
        return params.ids
    # All or nothing: a row that fails fails the statement, which returns
    # only whether it notified.
    await conn.fetchval(Q.create_streams_plain, *params, notify)
    return params.ids


async def load(conn: Executor, job_id: UUID) -> Job:
    """The job's current row; raises :class:`JobNotFound`."""
    doc = await conn.fetchval(Q.load_job, job_id)
    if doc is None:
        raise JobNotFound(job_id)
    return decode_job(doc)


async def load_many(conn: Executor, ids: Sequence[UUID]) -> dict[UUID, Job]:
    """The current rows of these jobs (missing ones are absent)."""
    jobs = [decode_job(r[0]) for r in await conn.fetch(Q.load_jobs, list(ids))]
    return {j.id: j for j in jobs}


async def by_idempotency_keys(conn: Executor, keys: Sequence[str]) -> dict[str, Job]:
    """The jobs holding these idempotency keys."""
    jobs = [decode_job(r[0]) for r in await conn.fetch(Q.jobs_by_idempotency_key, list(keys))]
    return {j.idempotency_key: j for j in jobs if j.idempotency_key is not None}


async def read_stream(conn: Executor, job_id: UUID) -> list[ev.Recorded]:
    """One job's events in version order (empty if the job has none)."""
    return [recorded_from_row(r) for r in await conn.fetch(Q.read_stream, job_id)]


class Checkpoint(msgspec.Struct, frozen=True, order=True):
    """A place in the log: the last applied event's ``(tx_id, position)``."""

    tx_id: int = 0
    position: int = 0

    @classmethod
    def after(cls, rec: ev.Recorded) -> Checkpoint:
        """The checkpoint just past ``rec``."""
        return cls(rec.tx_id or 0, rec.position or 0)


async def read_log(conn: Executor, after: Checkpoint, limit: int = 1000) -> list[ev.Recorded]:
    """The next events of the whole log after ``after``, gap-free (see the module docstring)."""
    rows = await conn.fetch(Q.read_log, str(after.tx_id), after.position, limit)
    return [recorded_from_row(r) for r in rows]


class LogFromAnotherCluster(RuntimeError):
    """The log's transaction ids are ahead of this cluster's (a restored dump)."""


async def check_log_cluster(conn: Executor) -> None:
    """Raise :class:`LogFromAnotherCluster` when the log cannot be read gap-free here."""
    if await conn.fetchval(Q.log_ahead_of_cluster):
        top = await conn.fetchval("SELECT max(tx_id)::text FROM jobledger.events")
        raise LogFromAnotherCluster(
            f"the event log holds transaction ids up to {top}, ahead of this PostgreSQL "
            "cluster's (was it restored from a logical dump?): new events would sort before "
            "old ones, so projections refuse to read it. Advance the cluster's transaction "
            f"ids past {top} (pg_resetwal -x on the stopped cluster), then run "
            "`jobledger projections rebuild` for every projection."
        )


def translate(exc: asyncpg.PostgresError) -> Exception:
    """A driver error -> the jobledger error it means (or itself)."""
    if exc.sqlstate == IMMUTABLE_SQLSTATE:
        return ImmutableLog(str(exc))
    return exc
