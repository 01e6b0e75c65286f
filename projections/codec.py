"""Decoding stored rows into events and job states (the read side's one codec).

Rows come from the queries in ``sql/queries``: events with their payload and
meta as JSON text, jobs rendered by ``to_json``. Unknown payload fields are
ignored, and old payload shapes are upcast (:mod:`projections.upcasting`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from engine import events as ev
from projections.job_state import Job
from projections.upcasting import upcast

_job_decoder = msgspec.json.Decoder(Job)
_meta_decoder = msgspec.json.Decoder(ev.Meta)
_event_decoders = {tag: msgspec.json.Decoder(cls) for tag, cls in ev.EVENT_TYPES.items()}


def decode_job(doc: str | bytes) -> Job:
    """A ``jobs`` row rendered by ``to_json`` -> :class:`Job`."""
    return _job_decoder.decode(doc)


def decode_event(type_: str, data: str | bytes) -> ev.Event:
    """A stored payload -> its event Struct."""
    try:
        decoder = _event_decoders[type_]
    except KeyError:
        raise ValueError(f"unknown event type {type_!r} in the log") from None
    return decoder.decode(upcast(type_, data))


def decode_meta(data: str | bytes) -> ev.Meta:
    """A stored ``meta`` -> :class:`engine.events.Meta`."""
    return _meta_decoder.decode(data)


def folded_from_row(row: Mapping[str, Any]) -> ev.Recorded:
    """An event row of the fold's queries (job_id, version, type, data, meta,
    recorded_at): the envelope the reducer folds, without its place in the log."""
    return ev.Recorded(
        job_id=row["job_id"],
        version=row["version"],
        event=decode_event(row["type"], row["data"]),  # type: ignore[arg-type]
        recorded_at=row["recorded_at"],
        meta=decode_meta(row["meta"]),
    )


def recorded_from_row(row: Mapping[str, Any]) -> ev.Recorded:
    """An ``events`` row (position, job_id, version, type, data, meta, recorded_at, tx_id):
    :func:`folded_from_row` with the event's place in the log."""
    return msgspec.structs.replace(
        folded_from_row(row), position=row["position"], tx_id=row["tx_id"]
    )
