"""Helpers of the cluster tests: looking into the nodes (and ``reuse``, shared)."""

from __future__ import annotations

import redis
from redis.crc import key_slot

from memsvc.domain import SessionRef
from memsvc.store.redis import session_keys
from tests.helpers import reuse

__all__ = ["held_by", "reuse", "slot_of"]


def slot_of(session: SessionRef) -> int:
    """The Redis Cluster slot of every key of ``session``."""
    return key_slot(session_keys(session)[0].encode())


def held_by(port: int, key: str) -> dict[bytes, bytes] | None:
    """The hash at ``key`` on the node at ``port`` (with ASKING, so also while the
    node imports the slot); None when that node does not hold the key (ASK, MOVED)."""
    with redis.Redis(port=port, socket_timeout=5) as client:
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.execute_command("HGETALL", key)
        _, held = pipe.execute(raise_on_error=False)
    if isinstance(held, redis.exceptions.AskError):  # MovedError too
        return None
    assert isinstance(held, dict), held
    return held
