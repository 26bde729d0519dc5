"""The reference lifecycle's pause and resume, re-implemented for the benchmark.

The algorithm of the in-process "agent lifecycle manager" memsvc replaces
(shared/design/reference-lifecycle.md), on redis-py asyncio, as it ran:

* Working memory is one Redis string per entry,
  ``ref:{project}:{agent}:{session}:{key}``, holding the value as JSON.
* ``list_keys`` is a SCAN over the whole keyspace with ``MATCH`` on the
  session's prefix, one round trip per SCAN page.
* pause lists the keys, then GETs each key (one round trip per key), and writes
  the checkpoint (id, time, key count, state) as one JSON string under
  ``ref-checkpoint:{project}:{agent}:{session}:{checkpoint_id}`` with a 7-day
  TTL, in the same Redis. The checkpoint id has one-second resolution, as the
  reference's did (two pauses in one second overwrite each other).
* resume GETs the checkpoint, then (``clear_current``) lists the current keys
  and DELs each, then SETs each checkpointed key: one round trip per key.

Nothing is pipelined, batched or scripted: that is the reference's cost.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

CHECKPOINT_TTL_SECONDS = 7 * 24 * 3600
# SCAN page size. shared/design/baselines.md counts N+12 round trips for a pause
# among 10,000 other keys, i.e. about 11 SCAN pages: COUNT 1000. A smaller
# COUNT only adds round trips to the reference.
DEFAULT_SCAN_COUNT = 1000
KEY_PREFIX = "ref"
CHECKPOINT_PREFIX = "ref-checkpoint"


def _text(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name


class CheckpointNotFound(LookupError):
    """resume of a checkpoint that does not exist (or expired)."""


class ReferenceLifecycle:
    """One session's working memory and checkpoints, the reference's way."""

    def __init__(
        self,
        client: aioredis.Redis,
        project_id: str,
        agent_instance_id: str,
        session_id: str,
        scan_count: int = DEFAULT_SCAN_COUNT,
    ) -> None:
        self._redis = client
        self._scope = f"{project_id}:{agent_instance_id}:{session_id}"
        self._prefix = f"{KEY_PREFIX}:{self._scope}:"
        self._scan_count = scan_count

    def _checkpoint_key(self, checkpoint_id: str) -> str:
        return f"{CHECKPOINT_PREFIX}:{self._scope}:{checkpoint_id}"

    async def list_keys(self) -> list[str]:
        """The session's keys (full Redis names): SCAN the keyspace page by page."""
        keys: list[str] = []
        cursor = 0
        while True:
            cursor, page = await self._redis.scan(
                cursor, match=f"{self._prefix}*", count=self._scan_count
            )
            keys.extend(_text(key) for key in page)
            if cursor == 0:
                return keys

    async def pause(self) -> tuple[str, int]:
        """Copy every entry into a new checkpoint; return its id and the items saved."""
        state: dict[str, Any] = {}
        for name in await self.list_keys():
            raw = await self._redis.get(name)
            if raw is not None:
                state[name[len(self._prefix) :]] = json.loads(raw)
        now = datetime.now(UTC)
        checkpoint_id = f"checkpoint_{now:%Y%m%d_%H%M%S}"
        document = {
            "checkpoint_id": checkpoint_id,
            "timestamp": now.isoformat(),
            "key_count": len(state),
            "metadata": {},
            "state": state,
        }
        await self._redis.set(
            self._checkpoint_key(checkpoint_id), json.dumps(document), ex=CHECKPOINT_TTL_SECONDS
        )
        return checkpoint_id, len(state)

    async def resume(self, checkpoint_id: str, clear_current: bool = True) -> int:
        """Replace the working memory by the checkpoint's entries; return how many."""
        raw = await self._redis.get(self._checkpoint_key(checkpoint_id))
        if raw is None:
            raise CheckpointNotFound(checkpoint_id)
        state: dict[str, Any] = json.loads(raw)["state"]
        if clear_current:
            for name in await self.list_keys():
                await self._redis.delete(name)
        for key, value in state.items():
            await self._redis.set(f"{self._prefix}{key}", json.dumps(value))
        return len(state)

    async def load(self, entries: dict[str, Any]) -> None:
        """Set-up, not part of the algorithm: write the entries in one pipeline."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, value in entries.items():
                pipe.set(f"{self._prefix}{key}", json.dumps(value))
            await pipe.execute()

    async def drop(self) -> int:
        """Clean-up: delete the session's entries and checkpoints; return how many keys."""
        names = await self.list_keys()
        async for name in self._redis.scan_iter(
            match=f"{CHECKPOINT_PREFIX}:{self._scope}:*", count=1000
        ):
            names.append(_text(name))
        if names:
            await self._redis.unlink(*names)
        return len(names)
