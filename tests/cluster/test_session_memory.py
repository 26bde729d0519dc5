"""tests/integration/test_session_memory.py (the store's lifecycle steps) on the Redis Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from memsvc.store.redis import RedisWorkingMemoryStore
from memsvc.testing import PrivateRedisCluster
from tests.cluster._support import reuse


@pytest.fixture(params=["redis-cluster"])
async def store(redis_cluster: PrivateRedisCluster) -> AsyncIterator[Any]:
    created: Any = RedisWorkingMemoryStore(
        redis_cluster.url, max_session_keys=10, max_session_bytes=1000
    )
    await created.open()
    created.touched = []  # the cluster is flushed after each test
    yield created
    await created.aclose()


# Standalone Redis only: they change keys behind the store's back with their own client.
reuse(
    "tests.integration.test_session_memory",
    globals(),
    leave_out={
        "test_a_paused_memory_that_lost_its_data_is_not_kept",
        "test_an_eviction_during_a_resume_leaves_the_session_lost",
        "test_keys_expiring_a_moment_apart_are_not_an_eviction",
    },
)
