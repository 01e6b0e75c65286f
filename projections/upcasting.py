"""Upcasting: reading old event payloads as the current Structs.

Events evolve by adding fields with defaults, which needs nothing here. When a
payload's shape must change in another way (a field renamed or split), bump
:data:`engine.events.SCHEMA_VERSION` and register an upcaster for the event
type: a pure function from the old payload (a dict of the event's fields;
rows written before 2026-12-03 also hold its ``type``) to the new one. Stored
events are never rewritten; they are upcast each time they are read.

An event's schema version travels in its meta (``meta.schema``); payloads
written before this mechanism carry none and count as version 1. Upcasters
dispatch on the shape of the payload (the presence of an old field), so they
are idempotent and safe to apply to any version.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_UPCASTERS: dict[str, list[Upcaster]] = {}


def upcaster(event_type: str) -> Callable[[Upcaster], Upcaster]:
    """Register ``fn`` to rewrite old payloads of ``event_type`` when read."""

    def register(fn: Upcaster) -> Upcaster:
        _UPCASTERS.setdefault(event_type, []).append(fn)
        return fn

    return register


def upcast(event_type: str, data: str | bytes) -> str | bytes:
    """The payload of ``event_type`` in its current shape (unchanged when nothing applies)."""
    fns = _UPCASTERS.get(event_type)
    if not fns:
        return data
    payload = msgspec.json.decode(data)
    for fn in fns:
        payload = fn(payload)
    return msgspec.json.encode(payload)


def registered() -> list[tuple[str, str, str]]:
    """``(event type, module, qualified name)`` of every upcaster, in the order applied."""
    return [(t, fn.__module__, fn.__qualname__) for t, fns in _UPCASTERS.items() for fn in fns]


def loadable() -> str | None:
    """The first upcaster another process could not load by name, or ``None``.

    An upcaster is found by importing its module and following its qualified
    name, so it must be defined at a module's top level (not in a function).
    """
    for t, module, qualname in registered():
        if "<" in qualname or module == "__main__":
            return f"{module}.{qualname} (for {t})"
    return None


def load(names: Iterable[tuple[str, str, str]]) -> None:
    """Register here the upcasters another process has (``registered()`` there).

    Each module is imported (an upcaster registered on import is not
    registered twice); then this process must have exactly that list, in
    that order, or ``RuntimeError`` says which differ.
    """
    wanted = [tuple(n) for n in names]
    for t, module, qualname in wanted:
        target: Any = importlib.import_module(module)
        if (t, module, qualname) in registered():
            continue
        for part in qualname.split("."):
            target = getattr(target, part)
        upcaster(t)(target)
    if registered() != wanted:
        raise RuntimeError(f"upcasters differ from the parent's: {registered()} != {wanted}")


def unregister(event_type: str, fn: Upcaster) -> None:
    """Remove an upcaster (for tests that register their own)."""
    _UPCASTERS.get(event_type, []).remove(fn)
