"""Operators: named job kinds with typed inputs and results.

An operator is an async handler registered under a name::

    class ImportInputs(msgspec.Struct):
        dataset: str
        rows: int = 1000

    @ledger.operator("dataset.import", queue="imports", max_attempts=3, timeout=600)
    async def import_dataset(ctx: JobContext, inputs: ImportInputs) -> ImportResult:
        ...

The input and result types come from the handler's annotations (msgspec
Structs, or any type msgspec can validate). Inputs are validated when the job
is submitted, in any process that has the operator registered; the error
names the bad field. Each registered operator is published to the
``jobledger.operators`` table with its JSON Schemas, so every process can list
them and submit to them.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.errors import InvalidInputs

Handler = Callable[..., Awaitable[Any]]

RESTART_POLICIES = ("never", "on_error")
_PATH = re.compile(r" - at `([^`]*)`$")


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed attempt is retried: up to ``max_attempts`` attempts in a run,
    waiting ``backoff * 2**(attempt-1)`` seconds (capped at ``backoff_max``) with
    full jitter between them. ``restart_policy="never"`` never retries."""

    max_attempts: int = 1
    backoff: float = 1.0
    backoff_max: float = 300.0
    restart_policy: str = "on_error"

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff < 0 or self.backoff_max < 0:
            raise ValueError("retry backoff must not be negative")
        if self.restart_policy not in RESTART_POLICIES:
            raise ValueError(
                f"restart_policy must be one of {RESTART_POLICIES}, got {self.restart_policy!r}"
            )


@dataclass
class Operator:
    """A registered operator: its handler, types and defaults."""

    name: str
    handler: Handler
    queue: str = "default"
    inputs_type: Any = None
    result_type: Any = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float | None = None
    description: str | None = None
    takes_inputs: bool = True

    def validate_inputs(self, inputs: Any) -> Any:
        """Check ``inputs`` against the input type; return them as plain JSON values."""
        if self.inputs_type is None:
            return to_json_value(self.name, inputs)
        if isinstance(inputs, msgspec.Struct) and isinstance(inputs, self.inputs_type):
            return msgspec.to_builtins(inputs)
        try:
            value = msgspec.convert({} if inputs is None else inputs, self.inputs_type)
        except msgspec.ValidationError as exc:
            raise _invalid(self.name, exc) from exc
        return msgspec.to_builtins(value)

    def decode_inputs(self, raw: Any) -> Any:
        """Stored inputs -> the handler's input value (raises :class:`InvalidInputs`)."""
        if self.inputs_type is None:
            return raw
        try:
            return msgspec.convert({} if raw is None else raw, self.inputs_type)
        except msgspec.ValidationError as exc:
            raise _invalid(self.name, exc) from exc

    def encode_result(self, value: Any) -> Any:
        """A handler's return value -> plain JSON values (checked against the result type)."""
        if self.result_type is not None and value is not None:
            try:
                value = msgspec.convert(
                    msgspec.to_builtins(value), self.result_type, from_attributes=True
                )
            except msgspec.ValidationError as exc:
                raise TypeError(
                    f"operator {self.name!r} returned an invalid result: {exc}"
                ) from exc
        return to_json_value(self.name, value, what="result")

    def input_schema(self) -> dict[str, Any] | None:
        """JSON Schema of the inputs (``None`` when untyped)."""
        return msgspec.json.schema(self.inputs_type) if self.inputs_type is not None else None

    def output_schema(self) -> dict[str, Any] | None:
        """JSON Schema of the result (``None`` when untyped)."""
        return msgspec.json.schema(self.result_type) if self.result_type is not None else None


def _invalid(name: str, exc: msgspec.ValidationError) -> InvalidInputs:
    text = str(exc)
    m = _PATH.search(text)
    detail = text[: m.start()] if m else text
    return InvalidInputs(name, detail, path=m.group(1) if m else None)


def json_values(value: Any, *, what: str) -> Any:
    """``value`` as plain JSON values, or ``ValueError`` naming ``what`` is not JSON."""
    if value is None:  # most jobs have no inputs: no encoding round trip
        return None
    try:
        return msgspec.json.decode(msgspec.json.encode(value))
    except (TypeError, msgspec.EncodeError, OverflowError) as exc:
        raise ValueError(f"{what} must be JSON values: {exc}") from exc


def to_json_value(operator: str, value: Any, *, what: str = "inputs") -> Any:
    """``value`` as plain JSON values, or :class:`InvalidInputs` if it is not JSON."""
    try:
        return json_values(value, what=what)
    except ValueError as exc:
        raise InvalidInputs(operator, str(exc)) from exc.__cause__


def operator_from_handler(
    name: str,
    handler: Handler,
    *,
    queue: str = "default",
    max_attempts: int = 1,
    timeout: float | None = None,
    retry_backoff: float = 1.0,
    retry_backoff_max: float = 300.0,
    restart_policy: str = "on_error",
) -> Operator:
    """Build an :class:`Operator`, reading the input and result types from annotations.

    The handler is ``async def h(ctx, inputs: T) -> R`` or ``async def h(ctx) -> R``.
    """
    if not name or not isinstance(name, str):
        raise ValueError("an operator needs a non-empty name")
    if not inspect.iscoroutinefunction(handler):
        raise TypeError(f"operator {name!r}: the handler must be an async function")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"operator {name!r}: timeout must be positive, got {timeout}")
    if not queue or not isinstance(queue, str):
        raise ValueError(f"operator {name!r}: queue must be a non-empty name, got {queue!r}")
    params = list(inspect.signature(handler).parameters.values())
    if len(params) not in (1, 2):
        raise TypeError(f"operator {name!r}: the handler must take (ctx) or (ctx, inputs)")
    hints = typing.get_type_hints(handler)
    inputs_type = hints.get(params[1].name) if len(params) == 2 else None
    result_type = hints.get("return")
    if result_type is type(None):
        result_type = None
    return Operator(
        name=name,
        handler=handler,
        queue=queue,
        inputs_type=inputs_type,
        result_type=result_type,
        retry=RetryPolicy(max_attempts, retry_backoff, retry_backoff_max, restart_policy),
        timeout=timeout,
        description=inspect.getdoc(handler),
        takes_inputs=len(params) == 2,
    )


class OperatorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An operator as published: what ``ledger.operators()`` lists."""

    name: str
    queue: str
    max_attempts: int
    timeout: float | None = None
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    published_by: str | None = None
    published_at: Any = None


def info(op: Operator, published_by: str | None = None) -> OperatorInfo:
    """The published description of a registered operator."""
    return OperatorInfo(
        name=op.name,
        queue=op.queue,
        max_attempts=op.retry.max_attempts,
        timeout=op.timeout,
        description=op.description,
        input_schema=op.input_schema(),
        output_schema=op.output_schema(),
        published_by=published_by,
    )
