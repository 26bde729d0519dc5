"""The checkpoint snapshot format round-trips any entries and refuses corrupt bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memsvc.domain._session_memory import SnapshotEntry
from memsvc.domain._snapshot import SnapshotFormatError, decode_snapshot, encode_snapshot

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


@given(entries.filter(bool), st.data())
def test_truncated_snapshots_are_refused(snapshot, data):
    encoded = encode_snapshot(snapshot)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(SnapshotFormatError):
        decode_snapshot(encoded[:cut])
