"""The binary form of a working-memory snapshot, as checkpoints store it.

A snapshot is a sequence of entries, each::

    u32 key length | key (UTF-8) | u32 value length | value | i64 remaining TTL in ms (-1: none)

all little-endian, after a 4-byte header ``MSN1`` and a u32 entry count (so a
truncated snapshot is detected even when it is cut between two entries). Values are the stored
protobuf encoding of ``google.protobuf.Value`` (ADR 0003). The format is ours,
compact, and decodes with one pass of ``struct``; any language can read it.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

MAGIC = b"MSN1"
_LENGTH = struct.Struct("<I")
_TTL = struct.Struct("<q")
_NO_TTL = _TTL.pack(-1)


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
    ttls = [_NO_TTL if e.remaining_ttl_ms is None else _TTL.pack(e.remaining_ttl_ms) for e in items]
    return _pack([e.key.encode("utf-8") for e in items], [e.value for e in items], ttls)[0]


def encode_flat(
    keys: Sequence[bytes],
    values: Sequence[bytes],
    expire_at: Mapping[bytes, float | bytes],
    now_ms: int,
) -> tuple[bytes, int, int, int]:
    """The stored form of a snapshot given as Redis replies.

    ``keys`` and ``values`` are the hash's fields and values in the same order
    (HGETALL); ``expire_at`` maps the keys that have a TTL to their expiry time
    in ms (the scores of ZRANGE WITHSCORES, as numbers or as Redis's text).
    Returns (snapshot, key count, bytes of keys and values, keys with a TTL).
    """
    ttls: Iterable[bytes] = itertools.repeat(_NO_TTL, len(keys))
    if expire_at:
        ttls = [
            _NO_TTL
            if (at := expire_at.get(key)) is None
            else _TTL.pack(max(1, int(float(at)) - now_ms))
            for key in keys
        ]
    blob, size = _pack(keys, values, ttls)
    return blob, len(keys), size, len(expire_at)


def _pack(
    keys: Sequence[bytes], values: Sequence[bytes], ttls: Iterable[bytes]
) -> tuple[bytes, int]:
    """The snapshot of these entries (``ttls`` already packed) and the bytes of their
    keys and values. The entries are interleaved by slice assignments of C-level
    iterators, not a Python loop: at 1,000 keys a pause runs this between the
    Redis reply and the database write."""
    count = len(keys)
    key_lengths = list(map(len, keys))
    value_lengths = list(map(len, values))
    parts: list[bytes] = [MAGIC, _LENGTH.pack(count), *itertools.repeat(b"", 5 * count)]
    parts[2::5] = map(_LENGTH.pack, key_lengths)
    parts[3::5] = keys
    parts[4::5] = map(_LENGTH.pack, value_lengths)
    parts[5::5] = values
    parts[6::5] = ttls
    return b"".join(parts), sum(key_lengths) + sum(value_lengths)


def decode_snapshot(data: bytes) -> list[SnapshotEntry]:
    """The entries of a stored snapshot, in stored order."""
    return entries_at(data, key_index(data).offsets)


@dataclass(frozen=True, slots=True)
class KeyIndex:
    """Where each entry of a snapshot starts, by its UTF-8 key: in stored order, or
    in key byte order once :meth:`sorted`. Made without copying any value, so a page
    of a large snapshot decodes only its own entries."""

    keys: list[bytes]
    offsets: list[int]

    def sorted(self) -> KeyIndex:
        pairs = sorted(zip(self.keys, self.offsets, strict=True))
        return KeyIndex([key for key, _ in pairs], [offset for _, offset in pairs])

    def weight(self) -> int:
        """About the bytes it holds (a cache's bound): its keys, and the objects
        around them, also when it has none (an index of an empty snapshot weighed
        nothing, and a cache of them grew without bound)."""
        return _INDEX_OVERHEAD_BYTES + sum(map(len, self.keys)) + 100 * len(self.keys)


# A KeyIndex with no key, its two lists and the cache's entry for it (measured with
# tracemalloc: about 350 bytes).
_INDEX_OVERHEAD_BYTES = 400


def key_index(data: bytes) -> KeyIndex:
    """The keys of a stored snapshot and where their entries start, in stored order
    (SnapshotFormatError when it is not a whole snapshot of this format)."""
    if not data.startswith(MAGIC):
        raise SnapshotFormatError("not a memsvc snapshot (bad header)")
    unpack = _LENGTH.unpack_from
    keys: list[bytes] = []
    offsets: list[int] = []
    end = len(data)
    try:
        (count,) = unpack(data, len(MAGIC))
        offset = len(MAGIC) + _LENGTH.size
        while offset < end:
            offsets.append(offset)
            (key_length,) = unpack(data, offset)
            offset += _LENGTH.size
            keys.append(data[offset : offset + key_length])
            offset += key_length
            (value_length,) = unpack(data, offset)
            offset += _LENGTH.size + value_length + _TTL.size
    except struct.error as error:
        raise SnapshotFormatError(f"corrupt snapshot: {error}") from error
    if offset != end:
        raise SnapshotFormatError("truncated snapshot")
    if len(keys) != count:
        raise SnapshotFormatError(f"truncated snapshot: {len(keys)} of {count} entries")
    return KeyIndex(keys, offsets)


def entries_at(data: bytes, offsets: Iterable[int]) -> list[SnapshotEntry]:
    """The entries of a snapshot that start at ``offsets`` (from its KeyIndex)."""
    view = memoryview(data)
    entries = []
    try:
        for offset in offsets:
            (key_length,) = _LENGTH.unpack_from(view, offset)
            offset += _LENGTH.size
            key = bytes(view[offset : offset + key_length]).decode("utf-8")
            offset += key_length
            (value_length,) = _LENGTH.unpack_from(view, offset)
            offset += _LENGTH.size
            value = bytes(view[offset : offset + value_length])
            offset += value_length
            (ttl,) = _TTL.unpack_from(view, offset)
            entries.append(SnapshotEntry(key, value, None if ttl < 0 else ttl))
    except (struct.error, UnicodeDecodeError) as error:
        raise SnapshotFormatError(f"corrupt snapshot: {error}") from error
    return entries
