"""The contract suite runs every test on both deployments (see tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from memsvc.store.redis._working_memory import KEY_PREFIX
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.conftest import REDIS_URL, Deployment, need


@pytest.fixture(autouse=True)
async def _clean_redis(deployment: Deployment, scope: dict[str, str]) -> AsyncIterator[None]:
    """Delete every Redis key of this test's project afterwards (tests use one project)."""
    if deployment.working_memory != "redis":
        yield
        return
    need(REDIS_URL)
    yield
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        pattern = f"{KEY_PREFIX}:{{{scope['project_id'].replace('-', '')}.*"
        keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def spawn(channel: grpc.aio.Channel, scope: dict[str, Any]) -> None:
    """Spawn the session named by ``scope`` (working memory needs a spawned session)."""
    await LifecycleServiceStub(channel).Spawn(lc.SpawnRequest(**scope))


@pytest.fixture
async def spawned(channel: grpc.aio.Channel, scope: dict[str, str]) -> dict[str, str]:
    """The test's scope, spawned."""
    await spawn(channel, scope)
    return scope
