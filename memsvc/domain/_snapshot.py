"""The binary form of a working-memory snapshot, as checkpoints store it.

A snapshot is a sequence of entries, each::

    u32 key length | key (UTF-8) | u32 value length | value | i64 remaining TTL in ms (-1: none)

all little-endian, after a 4-byte header ``MSN1`` and a u32 entry count (so a
truncated snapshot is detected even when it is cut between two entries). Values are the stored
protobuf encoding of ``google.protobuf.Value`` (ADR 0003). The format is ours,
compact, and decodes with one pass of ``struct``; any language can read it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MAGIC = b"MSN1"
_LENGTH = struct.Struct("<I")
_TTL = struct.Struct("<q")


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    """One key of a snapshot; ``remaining_ttl_ms`` None means no expiry."""

    key: str
    value: bytes
    remaining_ttl_ms: int | None


class SnapshotFormatError(ValueError):
    """Bytes that are not a snapshot of this format."""


def encode_snapshot(entries: Iterable[SnapshotEntry]) -> bytes:
    """The stored form of a snapshot."""
    items = list(entries)
    parts = [MAGIC, _LENGTH.pack(len(items))]
    for entry in items:
        key = entry.key.encode("utf-8")
        ttl = -1 if entry.remaining_ttl_ms is None else entry.remaining_ttl_ms
        parts += [
            _LENGTH.pack(len(key)),
            key,
            _LENGTH.pack(len(entry.value)),
            entry.value,
            _TTL.pack(ttl),
        ]
    return b"".join(parts)


def encode_flat(
    flat: Sequence[bytes], expiries: Sequence[bytes], now_ms: int
) -> tuple[bytes, int, int, int]:
    """The stored form of a snapshot given as Redis replies, in one pass.

    ``flat`` alternates keys and values (HGETALL); ``expiries`` alternates keys
    and expiry times in ms (ZRANGE WITHSCORES). Returns (snapshot, key count,
    bytes of keys and values, keys with a TTL).
    """
    expire_at = {expiries[i]: int(float(expiries[i + 1])) for i in range(0, len(expiries), 2)}
    count = len(flat) // 2
    parts = [MAGIC, _LENGTH.pack(count)]
    size = 0
    for i in range(0, len(flat), 2):
        key, value = flat[i], flat[i + 1]
        at = expire_at.get(key)
        ttl = -1 if at is None else max(1, at - now_ms)
        parts += [_LENGTH.pack(len(key)), key, _LENGTH.pack(len(value)), value, _TTL.pack(ttl)]
        size += len(key) + len(value)
    return b"".join(parts), count, size, len(expire_at)


def decode_snapshot(data: bytes) -> list[SnapshotEntry]:
    """The entries of a stored snapshot, in stored order."""
    if not data.startswith(MAGIC):
        raise SnapshotFormatError("not a memsvc snapshot (bad header)")
    view = memoryview(data)
    offset = len(MAGIC)
    entries = []
    try:
        (count,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        while offset < len(view):
            (key_length,) = _LENGTH.unpack_from(view, offset)
            offset += _LENGTH.size
            key = bytes(view[offset : offset + key_length]).decode("utf-8")
            offset += key_length
            (value_length,) = _LENGTH.unpack_from(view, offset)
            offset += _LENGTH.size
            value = bytes(view[offset : offset + value_length])
            offset += value_length
            (ttl,) = _TTL.unpack_from(view, offset)
            offset += _TTL.size
            if len(value) != value_length:
                raise SnapshotFormatError("truncated snapshot")
            entries.append(SnapshotEntry(key, value, None if ttl < 0 else ttl))
    except (struct.error, UnicodeDecodeError) as error:
        raise SnapshotFormatError(f"corrupt snapshot: {error}") from error
    if len(entries) != count:
        raise SnapshotFormatError(f"truncated snapshot: {len(entries)} of {count} entries")
    return entries
