"""Fixtures of the SDK tests: an AsyncClient on the `server` fixture (both deployments)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from memsvc.client import AsyncClient, AsyncSessionClient, RetryPolicy
from memsvc.server import Server
from memsvc.store.redis._working_memory import KEY_PREFIX
from tests.conftest import REDIS_URL, Deployment, need

# Quick retries keep fault tests short; the budget (timeout) still bounds them.
FAST_RETRY = RetryPolicy(max_attempts=5, initial_backoff=0.05, max_backoff=0.5)


@pytest.fixture(autouse=True)
async def _clean_redis(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """After a test on Redis, delete every Redis key of its project (tests use one).

    Only tests that run on a deployment (they use ``server``) are affected; the others
    are not parametrized by it.
    """
    if "deployment" not in request.fixturenames:
        yield
        return
    deployment: Deployment = request.getfixturevalue("deployment")
    scope: dict[str, str] = request.getfixturevalue("scope")
    if deployment.working_memory != "redis":
        yield
        return
    need(REDIS_URL)
    yield
    redis = aioredis.Redis.from_url(REDIS_URL)
    try:
        pattern = f"{KEY_PREFIX}:{{{scope['project_id'].replace('-', '')}.*"
        keys = [key async for key in redis.scan_iter(match=pattern, count=1000)]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{server.port}", retry=FAST_RETRY) as sdk:
        yield sdk


@pytest.fixture
def session(client: AsyncClient, scope: dict[str, str]) -> AsyncSessionClient:
    return client.session(scope["project_id"], scope["agent_instance_id"], scope["session_id"])
