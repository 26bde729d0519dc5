"""A session over its limits (lowered since it filled) may still overwrite and shrink.

Found by a review: a session filled under larger limits, served after a restart with
smaller ones (its working memory in Redis outlives the process), refused every write
but deletes, even one that replaced a value with a smaller one.
"""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from memsvc.domain import EntryWrite, SessionLimitExceeded, SessionRef
from memsvc.store.redis import RedisWorkingMemoryStore, session_keys
from tests.conftest import REDIS_URL, need


@pytest.fixture(autouse=True)
def _redis() -> None:
    need(REDIS_URL)


async def test_a_session_over_lowered_limits_takes_writes_that_do_not_grow_it():
    session = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "lowered")
    before = RedisWorkingMemoryStore(REDIS_URL, max_session_keys=5, max_session_bytes=1000)
    after = RedisWorkingMemoryStore(REDIS_URL, max_session_keys=3, max_session_bytes=100)
    await before.open()
    await after.open()
    try:
        await before.begin_spawn(session, "op", "epoch", [])
        await before.finish(session, "op", "active", swap=False, clear=False)
        await before.set_entries(
            session, [EntryWrite(f"k{i}", b"v" * 40, None) for i in range(5)]
        )  # 5 keys, 210 bytes: over both of the lower limits
        # Overwritten, smaller, and a key deleted: fewer keys and bytes, all taken.
        await after.set_entries(session, [EntryWrite("k0", b"v" * 40, None)])
        await after.set_entries(session, [EntryWrite("k1", b"s", None)])
        assert await after.delete_entries(session, ["k2"]) == [True]
        # A new key, or a larger value, still grows it past a limit: refused.
        with pytest.raises(SessionLimitExceeded) as keys:
            await after.set_entries(session, [EntryWrite("new", b"v", None)])
        assert keys.value.reason == "ERROR_REASON_SESSION_KEY_LIMIT"
        assert keys.value.metadata["requested"] == "5"
        with pytest.raises(SessionLimitExceeded) as grown:
            await after.set_entries(session, [EntryWrite("k1", b"v" * 2, None)])
        assert grown.value.reason == "ERROR_REASON_SESSION_SIZE_LIMIT"
    finally:
        client = aioredis.Redis.from_url(REDIS_URL)
        await client.delete(*session_keys(session))
        await client.aclose()
        await before.aclose()
        await after.aclose()
