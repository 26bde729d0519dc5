"""The checkpoint snapshot format round-trips any entries and refuses corrupt bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memsvc.domain._lifecycle_reads import _KeyIndexes
from memsvc.domain._session_memory import SnapshotEntry
from memsvc.domain._snapshot import (
    SnapshotFormatError,
    decode_snapshot,
    encode_flat,
    encode_snapshot,
    entries_at,
    key_index,
)

entries = st.lists(
    st.builds(
        SnapshotEntry,
        key=st.text(min_size=1, max_size=40),
        value=st.binary(min_size=1, max_size=200),
        remaining_ttl_ms=st.none() | st.integers(min_value=0, max_value=2**62),
    ),
    max_size=20,
)


@given(entries)
def test_round_trip(snapshot):
    assert decode_snapshot(encode_snapshot(snapshot)) == snapshot


@given(entries)
def test_the_key_index_finds_every_entry_in_key_byte_order(snapshot):
    """A page of a checkpoint decodes only its entries, found by the key index."""
    encoded = encode_snapshot(snapshot)
    index = key_index(encoded)
    assert entries_at(encoded, index.offsets) == snapshot
    ordered = index.sorted()
    by_key = sorted(snapshot, key=lambda e: e.key.encode())  # stable: ties in stored order
    assert ordered.keys == [e.key.encode() for e in by_key]
    assert entries_at(encoded, ordered.offsets) == by_key


@given(entries.filter(bool), st.data())
def test_truncated_snapshots_are_refused(snapshot, data):
    encoded = encode_snapshot(snapshot)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(SnapshotFormatError):
        decode_snapshot(encoded[:cut])
    with pytest.raises(SnapshotFormatError):
        key_index(encoded[:cut])


@given(entries, st.binary(min_size=1, max_size=20))
def test_bytes_after_the_last_entry_are_refused(snapshot, extra):
    with pytest.raises(SnapshotFormatError):
        key_index(encode_snapshot(snapshot) + extra)


# Redis keeps expiries as doubles: exact to the millisecond for any real date.
redis_entries = st.lists(
    st.builds(
        SnapshotEntry,
        key=st.text(min_size=1, max_size=40),
        value=st.binary(min_size=1, max_size=200),
        remaining_ttl_ms=st.none() | st.integers(min_value=1, max_value=10 * 365 * 86_400_000),
    ),
    max_size=20,
)


@given(redis_entries)
def test_encoding_from_redis_replies_matches(snapshot):
    """encode_flat (Redis replies in, remaining TTLs computed) encodes the same bytes."""
    now = 1_000_000
    unique = list({e.key: e for e in snapshot}.values())
    flat = [part for e in unique for part in (e.key.encode(), e.value)]
    expire_at = {
        e.key.encode(): str(now + e.remaining_ttl_ms).encode()
        for e in unique
        if e.remaining_ttl_ms is not None
    }
    blob, count, size, timed = encode_flat(flat[0::2], flat[1::2], expire_at, now)
    expected = [
        SnapshotEntry(
            e.key, e.value, None if e.remaining_ttl_ms is None else max(1, e.remaining_ttl_ms)
        )
        for e in unique
    ]
    assert decode_snapshot(blob) == expected
    assert count == len(unique)
    assert size == sum(len(e.key.encode()) + len(e.value) for e in unique)
    assert timed == sum(1 for e in unique if e.remaining_ttl_ms is not None)


def test_the_key_index_cache_stays_bounded_with_empty_checkpoints():
    """Found by a review: an index of an empty snapshot weighed nothing, so a cache
    of them never evicted, and grew with every empty checkpoint read."""
    cache = _KeyIndexes(max_weight=4_000)
    for n in range(1_000):
        cache.put(f"checkpoint-{n}", key_index(encode_snapshot([])))
    assert len(cache._indexes) <= 10
    assert cache.get("checkpoint-999") is not None  # the newest stay
