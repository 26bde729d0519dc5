"""Metadata must leave its session, checkpoint or event room to fit one response.

A request may be as large as max_message_bytes; what it stores comes back in
responses of 3/4 of that at most (and in watch events, a little larger than the
metadata they carry). Metadata that encodes past that room is refused before
anything is written.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.contract.test_lifecycle_metadata import LIMIT, json_size
from tests.helpers import expect_error

MESSAGE_BYTES = 128 << 10


@pytest.fixture
def config_overrides() -> dict[str, object]:
    return {"max_message_bytes": MESSAGE_BYTES, "max_value_bytes": 32 << 10}


@pytest.fixture
def life(channel: grpc.aio.Channel) -> LifecycleServiceStub:
    return LifecycleServiceStub(channel)


async def test_metadata_that_encodes_past_a_response_is_refused_and_changes_nothing(
    life: LifecycleServiceStub, scope: dict[str, Any]
):
    """Within the JSON limit, and the request within max_message_bytes, but past 3/4
    of it (a list of numbers encodes to 2.75 times its JSON): stored, its session,
    checkpoint or event would fit no response, and the call's answer and every
    watch stream reaching its event would fail."""
    dense = struct_pb2.Struct()
    dense.update({"n": [0] * 10_000})
    assert json_size(dense) <= LIMIT
    assert 3 * MESSAGE_BYTES // 4 < dense.ByteSize() < MESSAGE_BYTES
    error = await expect_error(
        life.Spawn(lc.SpawnRequest(**scope, metadata=dense)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert list(error.violations) == ["metadata"]
    assert "max_message_bytes" in error.violations["metadata"]
    await expect_error(life.GetSession(lc.GetSessionRequest(**scope)), grpc.StatusCode.NOT_FOUND)
    await life.Spawn(lc.SpawnRequest(**scope))
    calls: list[Awaitable[Any]] = [
        life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, metadata=dense)),
        life.Pause(lc.PauseRequest(**scope, metadata=dense)),
        life.Terminate(lc.TerminateRequest(**scope, metadata=dense)),
    ]
    for call in calls:
        error = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert list(error.violations) == ["metadata"]
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.state == lc.SESSION_STATE_ACTIVE
    assert session.version == 1
    listed = await life.ListCheckpoints(lc.ListCheckpointsRequest(**scope))
    assert list(listed.checkpoints) == []


async def test_no_call_commits_an_answer_it_cannot_send(
    life: LifecycleServiceStub, scope: dict[str, Any]
):
    """Found by a review: each metadata fitted the room alone, but a Pause's answer
    carries two (the session's and the checkpoint's): the Pause committed, and its
    answer, and every retry of it, failed with RESOURCE_EXHAUSTED. Each call now
    either answers or is refused with nothing written."""
    dense = struct_pb2.Struct()
    dense.update({"n": [0] * 6_000})  # 66 KB encoded: two are over the budget (96 KiB)
    # One after the other: a grpc.aio call starts when it is made.
    for method, request in (
        (life.Spawn, lc.SpawnRequest(**scope, metadata=dense)),
        (life.Pause, lc.PauseRequest(**scope, metadata=dense)),
    ):
        try:
            await method(request)
        except grpc.aio.AioRpcError as error:
            assert error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
