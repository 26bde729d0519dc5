"""Conversions between protobuf messages and domain values.

Values are kept as the protobuf binary encoding of ``google.protobuf.Value``:
compact, exact (numbers stay doubles, strings stay UTF-8) and readable by any
protobuf runtime. Times are Unix milliseconds in the domain and Timestamps on
the wire; TTLs are Durations on the wire and milliseconds in the domain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message

from memsvc.domain import FieldViolation, InvalidArgument
from memsvc.domain._storable import json_problem, without_negative_zero
from memsvc.v1 import episodic_pb2, working_memory_pb2

_NANOS_PER_MS = 1_000_000


def encode_value(message: struct_pb2.Value, present: bool) -> bytes | None:
    """The stored form of a request's value; None when it is absent or empty."""
    if not present or message.WhichOneof("kind") is None:
        return None
    # A Value has no fields beyond its own: unknown ones (kept by the parser, at
    # any depth) would be stored and sent back in every response holding the
    # value, where check_readable does not look for them (e.g. groups nested
    # past protobuf's limit after a bool, which no response could then parse).
    message.DiscardUnknownFields()
    # Deterministic: map entries in key order, so equal values have equal bytes in
    # every process (a request id's arguments hash depends on it).
    return message.SerializeToString(deterministic=True)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    header, number = bytearray(), (field_number << 3) | 2
    for part in (number, len(payload)):
        while part > 0x7F:
            header.append(part & 0x7F | 0x80)
            part >>= 7
        header.append(part)
    return bytes(header) + payload


_NESTING_TAGS = frozenset(
    (struct_pb2.Value.DESCRIPTOR.fields_by_name[name].number << 3) | 2
    for name in ("struct_value", "list_value")
)
# Where a value sits in a response: GetResponse.entry.value.
_VALUE_PATH = (
    working_memory_pb2.GetResponse.DESCRIPTOR.fields_by_name["entry"].number,
    working_memory_pb2.Entry.DESCRIPTOR.fields_by_name["value"].number,
)
TOO_DEEP = (
    "nests too deep: a response holding it would pass protobuf's limit of 100 "
    "nested messages (each list takes 2, each object 3)"
)


def _parses_at(encoded: bytes, path: tuple[int, ...], response: type[Message]) -> bool:
    """Whether ``encoded``, placed at ``path`` (field numbers from the top) of a
    ``response`` message, still parses within protobuf's nesting limit."""
    for number in reversed(path):
        encoded = _length_delimited(number, encoded)
    try:
        response.FromString(encoded)
    except DecodeError:
        return False
    return True


def check_readable(encoded: bytes | None, field: str, violations: list[FieldViolation]) -> None:
    """A value must fit where every response puts it, inside an Entry (a
    CheckpointEntry, one level deep as well): protobuf refuses messages nested
    past 100 levels, and a SetRequest holds its value a level nearer the top.
    Accepted, it could never be read back, nor could any page holding it."""
    # Only a list or an object nests (a Value's first byte is its field's tag:
    # struct_value 5 and list_value 6, length-delimited), and 100 levels take 2
    # bytes each at least: a string of any size is never parsed again.
    if encoded is None or len(encoded) < 150 or encoded[0] not in _NESTING_TAGS:
        return
    if not _parses_at(encoded, _VALUE_PATH, working_memory_pb2.GetResponse):
        violations.append(FieldViolation(field, TOO_DEEP))


T = TypeVar("T")


def collected(violations: list[FieldViolation], convert: Callable[[], T], default: T) -> T:
    """``convert()``, or ``default`` with its violations added to ``violations``, for
    the domain to report with its own: one INVALID_ARGUMENT names every bad field."""
    try:
        return convert()
    except InvalidArgument as error:
        violations.extend(error.violations)
        return default


def plain_struct(message: struct_pb2.Struct, field: str) -> dict[str, Any]:
    """A Struct (metadata, an action) as plain Python, to be stored as JSON.

    JSON has no NaN or Infinity, so a Struct holding one is a bad request, not
    a failure of the server.
    """
    try:
        plain = dict(json_format.MessageToDict(message))
    except ValueError as error:
        raise InvalidArgument.single(
            field, "numbers must be finite: it is stored as JSON, which has no NaN or Infinity"
        ) from error
    problem = json_problem(plain) or _unreadable_struct(message, plain)
    if problem:
        raise InvalidArgument.single(field, problem)
    return {key: without_negative_zero(item) for key, item in plain.items()}


# Where a Struct sits deepest in any response: an episode's metadata or action in
# SearchEpisodesResponse.results[].episode (a Terminate's metadata becomes its
# episode's). Lifecycle events and sessions hold metadata nearer the top.
_DEEPEST_STRUCT_PATH = (
    episodic_pb2.SearchEpisodesResponse.DESCRIPTOR.fields_by_name["results"].number,
    episodic_pb2.SearchResult.DESCRIPTOR.fields_by_name["episode"].number,
    episodic_pb2.Episode.DESCRIPTOR.fields_by_name["metadata"].number,
)
# JSON levels below which no Struct can reach protobuf's limit (each level takes
# 3 nested messages at most, an object: Struct, map entry, Value).
_SHALLOW_JSON = 30


def _unreadable_struct(message: struct_pb2.Struct, plain: dict[str, Any]) -> str | None:
    """Why a Struct could not be sent back, or None: protobuf refuses messages
    nested past 100 levels, and every response holds a request's Struct deeper than
    the request did. Accepted, it would be stored and then fail every read, page
    and watch event that carries it."""
    if _json_depth(plain) < _SHALLOW_JSON:
        return None
    encoded = message.SerializeToString()
    if _parses_at(encoded, _DEEPEST_STRUCT_PATH, episodic_pb2.SearchEpisodesResponse):
        return None
    return TOO_DEEP


def _json_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_json_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_json_depth, value), default=0)
    return 0


def seconds_of(duration: duration_pb2.Duration, field: str) -> float:
    """A Duration in seconds, for any value the wire can carry (ToTimedelta()
    overflows past ~1e9 days); a malformed one is INVALID_ARGUMENT, range checks
    are the caller's."""
    _check_duration(duration, field)
    return duration.seconds + duration.nanos / 1e9


def ttl_ms(duration: duration_pb2.Duration, present: bool, field: str) -> int | None:
    """A TTL in whole milliseconds, rounded up; None when absent or zero.

    A negative TTL is returned as is for the domain to reject; a malformed
    Duration is rejected here.
    """
    if not present:
        return None
    _check_duration(duration, field)
    total = duration.seconds * 1_000_000_000 + duration.nanos
    if total < 0:
        return min(-1, total // _NANOS_PER_MS)
    milliseconds = -(-total // _NANOS_PER_MS)
    return milliseconds or None


def ttl_of(message: Any, field: str, violations: list[FieldViolation]) -> int | None:
    """The TTL of a message with a ``ttl`` Duration (an entry, a thread's options),
    as ttl_ms gives it; a malformed one goes to ``violations``."""
    return collected(violations, lambda: ttl_ms(message.ttl, message.HasField("ttl"), field), None)


def _check_duration(duration: duration_pb2.Duration, field: str) -> None:
    """protobuf's rule for a Duration: seconds and nanos share a sign, |nanos| < 1e9."""
    seconds, nanos = duration.seconds, duration.nanos
    if (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0) or abs(nanos) >= 1_000_000_000:
        raise InvalidArgument.single(
            field, "is not a valid Duration (seconds and nanos must share a sign, |nanos| < 1e9)"
        )


def timestamp(epoch_ms: int) -> timestamp_pb2.Timestamp:
    """A Timestamp for Unix milliseconds."""
    return timestamp_pb2.Timestamp(
        seconds=epoch_ms // 1000, nanos=(epoch_ms % 1000) * _NANOS_PER_MS
    )


def epoch_ms(moment: timestamp_pb2.Timestamp, field: str, round_up: bool = False) -> int:
    """Unix milliseconds of a Timestamp (rounded down, or up); a malformed one
    (nanos outside 0..999,999,999, which protobuf's rule forbids) is
    INVALID_ARGUMENT, range checks are the caller's."""
    if not 0 <= moment.nanos < 1_000_000_000:
        raise InvalidArgument.single(
            field, "is not a valid Timestamp (nanos must be from 0 to 999,999,999)"
        )
    whole, rest = divmod(moment.nanos, _NANOS_PER_MS)
    return int(moment.seconds * 1000 + whole + (1 if round_up and rest else 0))
