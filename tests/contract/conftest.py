"""The contract suite runs every test on both deployments (see tests/conftest.py)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub


async def spawn(channel: grpc.aio.Channel, scope: dict[str, Any]) -> None:
    """Spawn the session named by ``scope`` (working memory needs a spawned session)."""
    await LifecycleServiceStub(channel).Spawn(lc.SpawnRequest(**scope))


@pytest.fixture
async def spawned(channel: grpc.aio.Channel, scope: dict[str, str]) -> dict[str, str]:
    """The test's scope, spawned."""
    await spawn(channel, scope)
    return scope
