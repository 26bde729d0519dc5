"""Values the domain keeps without importing protobuf match the proto's enums."""

from __future__ import annotations

from memsvc.domain._watch import WATCH_STARTS
from memsvc.v1 import lifecycle_pb2 as lc


def test_watch_starts_are_the_proto_enum():
    assert set(WATCH_STARTS) == set(lc.WatchStart.values())
