"""One INVALID_ARGUMENT names every bad field of a request: the fields the API
converts (a Duration, a Struct) as well as those the domain checks, and nothing
is written."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2

from memsvc.v1 import episodic_pb2 as ep
from memsvc.v1 import graph_checkpoint_pb2 as gpb
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.episodic_pb2_grpc import EpisodicMemoryServiceStub
from memsvc.v1.graph_checkpoint_pb2_grpc import GraphCheckpointServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.helpers import expect_error, value

# seconds and nanos of opposite signs: not a valid Duration
MALFORMED = duration_pb2.Duration(seconds=5, nanos=-1)


def nan_struct() -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.fields["score"].number_value = float("nan")
    return struct


@pytest.fixture
def life(channel: grpc.aio.Channel) -> LifecycleServiceStub:
    return LifecycleServiceStub(channel)


async def test_working_memory_writes(wm, life, scope):
    await life.Spawn(lc.SpawnRequest(**scope))
    error = await expect_error(
        wm.Set(pb.SetRequest(**scope, key="", value=value(1), ttl=MALFORMED)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {"key", "ttl"} <= set(error.violations)
    entries = [pb.EntryInput(key="a", value=value(1), ttl=MALFORMED), pb.EntryInput(key="")]
    error = await expect_error(
        wm.BatchSet(pb.BatchSetRequest(**scope, entries=entries)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert {"entries[0].ttl", "entries[1].key", "entries[1].value"} <= set(error.violations)
    assert (await wm.ListKeys(pb.ListKeysRequest(**scope))).keys == []


async def test_lifecycle_calls(life, scope):
    bad: dict[str, Any] = {**scope, "session_id": "not valid"}
    entries = [pb.EntryInput(key="a", value=value(1), ttl=MALFORMED)]
    error = await expect_error(
        life.Spawn(lc.SpawnRequest(**bad, initial_entries=entries, metadata=nan_struct())),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {"session_id", "initial_entries[0].ttl", "metadata"} <= set(error.violations)
    for call in (
        life.Pause(lc.PauseRequest(**bad, metadata=nan_struct())),
        life.CreateCheckpoint(lc.CreateCheckpointRequest(**bad, metadata=nan_struct())),
        life.Resume(lc.ResumeRequest(**bad, metadata=nan_struct())),
    ):
        error = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert {"session_id", "metadata"} <= set(error.violations)
    error = await expect_error(
        life.Terminate(
            lc.TerminateRequest(**bad, outcome=lc.Outcome.ValueType(9), metadata=nan_struct())
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {"session_id", "outcome", "metadata"} <= set(error.violations)
    error = await expect_error(
        life.DeleteCheckpoint(lc.DeleteCheckpointRequest(**bad)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert set(error.violations) == {"session_id", "checkpoint_id"}
    watch = life.WatchLifecycle(
        lc.WatchLifecycleRequest(project_id="nope", progress_interval=MALFORMED)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await watch.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "project_id" in (raised.value.details() or "")
    assert "progress_interval" in (raised.value.details() or "")
    await expect_error(life.GetSession(lc.GetSessionRequest(**scope)), grpc.StatusCode.NOT_FOUND)


async def test_record_episode(channel, scope):
    episodes = EpisodicMemoryServiceStub(channel)
    episode = ep.Episode(
        **scope, task_type="", importance=2, metadata=nan_struct(), duration=MALFORMED
    )
    error = await expect_error(
        episodes.RecordEpisode(ep.RecordEpisodeRequest(episode=episode)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {
        "episode.task_type",
        "episode.importance",
        "episode.metadata",
        "episode.duration",
    } <= set(error.violations)


async def test_put_graph_checkpoint(channel, scope):
    graphs = GraphCheckpointServiceStub(channel)
    message = gpb.GraphCheckpoint(
        thread_id="t", checkpoint_id="c 9", checkpoint=gpb.TypedValue(type="json", data=b"{}")
    )
    options = gpb.GraphThreadOptions(ttl=MALFORMED, keep_last=-1)
    error = await expect_error(
        graphs.PutGraphCheckpoint(
            gpb.PutGraphCheckpointRequest(
                project_id=scope["project_id"], checkpoint=message, options=options
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {"checkpoint.checkpoint_id", "options.ttl", "options.keep_last"} <= set(error.violations)


async def test_list_graph_checkpoints(channel):
    graphs = GraphCheckpointServiceStub(channel)
    error = await expect_error(
        graphs.ListGraphCheckpoints(
            gpb.ListGraphCheckpointsRequest(
                project_id="nope", metadata_filter_json="[1]", page_size=-1
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {"project_id", "metadata_filter_json", "page_size"} <= set(error.violations)


async def test_a_bad_conversion_alone_writes_nothing(wm, life, scope):
    """Only the converted field is bad: still refused, and nothing written."""
    await life.Spawn(lc.SpawnRequest(**scope))
    error = await expect_error(
        wm.Set(pb.SetRequest(**scope, key="k", value=value(1), ttl=MALFORMED)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(error.violations) == {"ttl"}
    error = await expect_error(
        life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, metadata=nan_struct())),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(error.violations) == {"metadata"}
    assert (await wm.ListKeys(pb.ListKeysRequest(**scope))).keys == []
    listed = await life.ListCheckpoints(lc.ListCheckpointsRequest(**scope))
    assert list(listed.checkpoints) == []
