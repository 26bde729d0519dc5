"""Fuzz tests run on both deployments, like the contract suite (see tests/conftest.py).

Every example uses project ids of its own; the ``projects`` fixture collects them
and deletes their Redis keys afterwards, as tests/contract/conftest.py does for
the single project of a contract test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from memsvc.store.redis._working_memory import KEY_PREFIX
from tests.conftest import REDIS_URL, Deployment, need


@pytest.fixture
def projects(deployment: Deployment) -> Iterator[list[str]]:
    """A list the test appends its project ids to; their Redis keys go at the end."""
    used: list[str] = []
    if deployment.working_memory == "redis":
        need(REDIS_URL)
    yield used
    if deployment.working_memory != "redis" or not used:
        return
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for project in set(used):
            pattern = f"{KEY_PREFIX}:{{{project.lower().replace('-', '')}.*"
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)
    finally:
        client.close()
