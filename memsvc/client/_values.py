"""JSON-like Python values to and from google.protobuf.Value, Struct, Duration, Timestamp.

``google.protobuf.Value`` holds every number as a double. On the way in, ``int`` and
``float`` become doubles; an ``int`` beyond +/-2**53 (where doubles stop being exact)
and NaN or infinities (which JSON cannot represent) are refused with ValueError. On
the way out, a number with no fractional part comes back as ``int`` (``3``, not
``3.0``), any other as ``float``: so ``2.0`` reads back as ``2``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from memsvc.client._types import JSONValue, Seconds

MAX_EXACT_INT = 2**53
_NANOS = 1_000_000_000


def to_value(python: JSONValue, message: struct_pb2.Value | None = None) -> struct_pb2.Value:
    """A Value holding ``python`` (filled into ``message`` when given)."""
    target = struct_pb2.Value() if message is None else message
    _fill_value(target, python, "value")
    return target


def _fill_value(target: struct_pb2.Value, python: Any, path: str) -> None:
    if python is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(python, bool):
        target.bool_value = python
    elif isinstance(python, int):
        if abs(python) > MAX_EXACT_INT:
            raise ValueError(
                f"{path}: the integer {python} is beyond 2**53; google.protobuf.Value "
                "holds numbers as doubles and would change it (store it as a string)"
            )
        target.number_value = python
    elif isinstance(python, float):
        if not math.isfinite(python):
            raise ValueError(f"{path}: {python} is not a JSON number")
        target.number_value = python
    elif isinstance(python, str):
        target.string_value = python
    elif isinstance(python, Mapping):
        _fill_struct(target.struct_value, python, path)
    elif isinstance(python, list | tuple):
        values = target.list_value.values
        if not python:
            target.list_value.SetInParent()
        for index, item in enumerate(python):
            _fill_value(values.add(), item, f"{path}[{index}]")
    else:
        raise TypeError(
            f"{path}: {type(python).__name__} is not JSON-like "
            "(use dict, list, tuple, str, int, float, bool or None)"
        )


def _fill_struct(target: struct_pb2.Struct, python: Mapping[Any, Any], path: str) -> None:
    target.SetInParent()
    for key, item in python.items():
        if not isinstance(key, str):
            raise TypeError(f"{path}: keys must be str, got {type(key).__name__} {key!r}")
        _fill_value(target.fields[key], item, f"{path}.{key}")


def to_struct(
    python: Mapping[str, JSONValue] | None, message: struct_pb2.Struct, path: str = "metadata"
) -> None:
    """Fill ``message`` with a JSON-like mapping (nothing for None)."""
    if python is None:
        return
    if not isinstance(python, Mapping):
        raise TypeError(f"{path}: expected a mapping, got {type(python).__name__}")
    _fill_struct(message, python, path)


def from_value(message: struct_pb2.Value) -> JSONValue:
    """The JSON-like Python value held by a Value (an empty Value reads as None)."""
    kind = message.WhichOneof("kind")
    if kind == "number_value":
        number = message.number_value
        # -0.0 stays a float: int() would drop its sign.
        negative_zero = number == 0 and math.copysign(1, number) < 0
        if number.is_integer() and abs(number) <= MAX_EXACT_INT and not negative_zero:
            return int(number)
        return number
    if kind == "string_value":
        return message.string_value
    if kind == "bool_value":
        return message.bool_value
    if kind == "struct_value":
        return from_struct(message.struct_value)
    if kind == "list_value":
        return [from_value(item) for item in message.list_value.values]
    return None


def from_struct(message: struct_pb2.Struct) -> dict[str, JSONValue]:
    """A dict of a Struct (empty for an unset one)."""
    return {key: from_value(item) for key, item in message.fields.items()}


# What a google.protobuf.Duration holds, either way (10,000 years).
_MAX_DURATION_SECONDS = 315_576_000_000


def seconds_of(duration: Seconds, what: str) -> float:
    """Seconds of a number or a timedelta. ValueError past what a Duration holds,
    NaN included (float() of a huge int would raise OverflowError instead)."""
    if isinstance(duration, timedelta):
        return duration.total_seconds()
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        raise TypeError(f"{what}: expected seconds or a timedelta, got {type(duration).__name__}")
    if not abs(duration) <= _MAX_DURATION_SECONDS:
        if isinstance(duration, float):
            shown = repr(duration)
        elif duration.bit_length() <= 256:
            shown = str(duration)
        else:  # not written out (nor may Python write one of over 4,300 digits)
            shown = f"an integer of {duration.bit_length()} bits"
        raise ValueError(
            f"{what}: {shown} is not a duration in seconds (at most 10,000 years either way)"
        )
    return float(duration)


def fill_duration(duration: Seconds, message: duration_pb2.Duration, what: str) -> None:
    """Fill a Duration from seconds or a timedelta (exact for timedelta)."""
    if isinstance(duration, timedelta):
        message.FromTimedelta(duration)
        return
    seconds = seconds_of(duration, what)
    nanos = round(seconds * _NANOS)
    if nanos == 0 and seconds != 0:
        # A zero Duration means "none" (a TTL that never expires): a tiny one must
        # not round to it, nor may a tiny negative one slip past the sign check.
        nanos = 1 if seconds > 0 else -1
    message.FromNanoseconds(nanos)


def fill_ttl(ttl: Seconds, message: duration_pb2.Duration, what: str) -> None:
    """Fill a TTL Duration. Zero is refused: the wire reads a zero TTL as none at
    all (never expires), where any positive TTL, however small, expires."""
    if seconds_of(ttl, what) == 0:
        raise ValueError(f"{what} must be positive; use None for no expiry (got {ttl!r})")
    fill_duration(ttl, message, what)


def from_duration(message: duration_pb2.Duration) -> timedelta:
    return message.ToTimedelta()


def fill_timestamp(moment: datetime, message: timestamp_pb2.Timestamp, what: str) -> None:
    """Fill a Timestamp from an aware datetime (a naive one is refused: which zone?)."""
    if not isinstance(moment, datetime):
        raise TypeError(f"{what}: expected a datetime, got {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what}: a naive datetime is ambiguous; give it a timezone (UTC)")
    message.FromDatetime(moment.astimezone(UTC))


def from_timestamp(message: timestamp_pb2.Timestamp) -> datetime:
    """An aware UTC datetime (microsecond precision)."""
    return message.ToDatetime(tzinfo=UTC)
