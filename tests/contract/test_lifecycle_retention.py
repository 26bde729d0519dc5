"""LifecycleService contract: checkpoint retention, and what survives a restart."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2

from memsvc import server as server_module
from memsvc.config import Config
from memsvc.domain import SessionRef
from memsvc.server import Server
from memsvc.store.redis import session_keys
from memsvc.v1 import episodic_pb2 as ep
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.episodic_pb2_grpc import EpisodicMemoryServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.conftest import DEPLOYMENTS, track_project
from tests.helpers import (
    eventually,
    expect_error,
    next_event,
    python,
    redis_client,
    sql_rows,
    value,
)


@pytest.fixture
def config_overrides() -> dict[str, object]:
    return {
        "checkpoint_keep_last": 2,
        "checkpoint_max_age_seconds": 1,
        "retention_interval_seconds": 0.1,
    }


@pytest.fixture
def life(channel: grpc.aio.Channel) -> LifecycleServiceStub:
    return LifecycleServiceStub(channel)


async def checkpoint_ids(life, scope) -> list[str]:
    page = await life.ListCheckpoints(lc.ListCheckpointsRequest(**scope))
    return [c.checkpoint_id for c in page.checkpoints]


# No age limit within the test (a slow machine would otherwise expire c2 and c3).
HOUR_AGE = {
    "checkpoint_keep_last": 2,
    "checkpoint_max_age_seconds": 3600,
    "retention_interval_seconds": 3600,
}


@pytest.mark.parametrize("config_overrides", [HOUR_AGE])
async def test_keep_last_prunes_older_checkpoints_but_never_the_resume_point(life, scope):
    await life.Spawn(lc.SpawnRequest(**scope))
    paused = await life.Pause(lc.PauseRequest(**scope, checkpoint_id="resume-point"))
    assert not paused.checkpoint.HasField("expire_time"), "the resume point is protected"
    await life.Resume(lc.ResumeRequest(**scope))
    # Resumed: the pause checkpoint is an ordinary one now.
    for name in ("c1", "c2", "c3"):
        made = await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id=name))
        assert made.checkpoint.expire_time.ToMilliseconds() == (
            made.checkpoint.create_time.ToMilliseconds() + 3_600_000
        )
    assert sorted(await checkpoint_ids(life, scope)) == ["c2", "c3"]
    paused = await life.Pause(lc.PauseRequest(**scope, checkpoint_id="p2"))
    assert sorted(await checkpoint_ids(life, scope)) == ["c3", "p2"]


async def watch_deletions(life: LifecycleServiceStub, scope: dict[str, str]) -> Any:
    """A watch of the session's CHECKPOINT_DELETED events, past its start message."""
    call = life.WatchLifecycle(
        lc.WatchLifecycleRequest(
            project_id=scope["project_id"],
            session_id=scope["session_id"],
            event_types=[lc.EVENT_TYPE_CHECKPOINT_DELETED],
        )
    )
    await asyncio.wait_for(call.read(), 10)
    return call


@pytest.mark.parametrize("config_overrides", [HOUR_AGE])
async def test_checkpoint_deletions_are_announced_with_the_session_and_the_call(life, scope):
    """A prune is the call's doing: its event has the call's request id and the
    session's agent type. DeleteCheckpoint's event carries that call's metadata."""
    agent_type, request_id = str(uuid.uuid4()), str(uuid.uuid4())
    call = await watch_deletions(life, scope)
    spawn_metadata = struct_pb2.Struct()
    spawn_metadata.update({"reason": "spawned by the test"})
    await life.Spawn(lc.SpawnRequest(**scope, agent_type_id=agent_type, metadata=spawn_metadata))
    for name in ("c1", "c2"):
        await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id=name))
    await life.CreateCheckpoint(
        lc.CreateCheckpointRequest(**scope, checkpoint_id="c3", request_id=request_id)
    )
    deleted_metadata = struct_pb2.Struct()
    deleted_metadata.update({"why": "superseded"})
    await life.DeleteCheckpoint(
        lc.DeleteCheckpointRequest(**scope, checkpoint_id="c2", metadata=deleted_metadata)
    )
    pruned, deleted = [await next_event(call) for _ in range(2)]
    call.cancel()
    assert (pruned.checkpoint_id, pruned.agent_type_id) == ("c1", agent_type)
    assert pruned.request_id == request_id
    assert python_struct(pruned.metadata) == {"reason": "retention"}
    assert (deleted.checkpoint_id, deleted.agent_type_id) == ("c2", agent_type)
    assert python_struct(deleted.metadata) == {"why": "superseded"}


def python_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(struct)


async def test_age_retention_deletes_expired_checkpoints_except_the_resume_point(life, scope):
    agent_type = str(uuid.uuid4())
    call = await watch_deletions(life, scope)
    await life.Spawn(lc.SpawnRequest(**scope, agent_type_id=agent_type))
    await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id="old"))
    await life.Pause(lc.PauseRequest(**scope, checkpoint_id="resume-point"))

    async def only_resume_point_left() -> bool:
        return await checkpoint_ids(life, scope) == ["resume-point"]

    await eventually(only_resume_point_left)
    swept = await next_event(call)
    call.cancel()
    assert (swept.checkpoint_id, swept.agent_type_id, swept.request_id) == ("old", agent_type, "")
    assert python_struct(swept.metadata) == {"reason": "retention"}
    resumed = await life.Resume(lc.ResumeRequest(**scope))
    assert resumed.checkpoint.checkpoint_id == "resume-point"

    async def all_gone() -> bool:
        return await checkpoint_ids(life, scope) == []

    await eventually(all_gone)
    await expect_error(
        life.Resume(lc.ResumeRequest(**scope, checkpoint_id="old")), grpc.StatusCode.NOT_FOUND
    )


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
@pytest.mark.parametrize("memory", ["older copy", "lost"])
async def test_a_memory_memsvc_did_not_leave_is_not_kept_as_the_final_one(
    copy, life, scope, wm, memory
):
    """Terminate with skip_consolidation and keep_working_memory ends such a session,
    but does not keep an older copy (or nothing) as if it were its final memory:
    reads then say the session ended, never serve the copy or an empty memory."""
    await life.Spawn(lc.SpawnRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="k", value=value("before")))
    await copy.take()
    await life.Pause(lc.PauseRequest(**scope))
    await life.Resume(lc.ResumeRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="k", value=value("after")))
    if memory == "lost":
        await copy.client.delete(*copy.keys)
    else:
        await copy.put_back()
    ended = await life.Terminate(
        lc.TerminateRequest(**scope, skip_consolidation=True, keep_working_memory=True)
    )
    assert ended.session.state == lc.SESSION_STATE_TERMINATED
    for read in (
        wm.Get(pb.GetRequest(**scope, key="k")),
        wm.ListKeys(pb.ListKeysRequest(**scope)),
    ):
        error = await expect_error(read, grpc.StatusCode.NOT_FOUND)
        assert error.reason == "ERROR_REASON_SESSION_NOT_FOUND"
    assert await copy.client.exists(*copy.keys) == 0


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
@pytest.mark.parametrize("config_overrides", [{"failpoints": "terminate.before_finish=error"}])
async def test_a_lost_memory_is_not_kept_when_the_terminate_is_finished_by_a_heal(
    copy, life, scope, wm
):
    """The Terminate commits, then fails before its last Redis step: the next call
    that meets its marker finishes it, and keeps no lost memory either."""
    await life.Spawn(lc.SpawnRequest(**scope))
    await copy.client.delete(*copy.keys)
    keep = lc.TerminateRequest(**scope, skip_consolidation=True, keep_working_memory=True)
    await expect_error(life.Terminate(keep), grpc.StatusCode.INTERNAL)
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.state == lc.SESSION_STATE_TERMINATED  # committed
    error = await expect_error(wm.ListKeys(pb.ListKeysRequest(**scope)), grpc.StatusCode.NOT_FOUND)
    assert error.reason == "ERROR_REASON_SESSION_NOT_FOUND"


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
@pytest.mark.parametrize("config_overrides", [{"failpoints": "spawn.before_finish=error"}])
async def test_an_older_copy_taken_before_a_spawn_settled_is_lost_memory(copy, life, scope, wm):
    """Redis comes back from a copy taken between a Spawn's commit and its last
    step, after the session took writes and paused. Settled by the database's
    state now, that copy passed for the paused memory (and Terminate consolidated
    it): it is the Spawn's memory, reported lost as any older copy."""
    spawn = lc.SpawnRequest(**scope, initial_entries=[pb.EntryInput(key="a", value=value(1))])
    await expect_error(life.Spawn(spawn), grpc.StatusCode.INTERNAL)  # committed, not settled
    await copy.take()
    await wm.Set(pb.SetRequest(**scope, key="b", value=value(2)))  # heals the Spawn first
    paused = await life.Pause(lc.PauseRequest(**scope))
    assert paused.checkpoint.key_count == 2
    await copy.put_back()
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_LOST
    error = await expect_error(
        wm.Get(pb.GetRequest(**scope, key="a")), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert error.reason == "ERROR_REASON_WORKING_MEMORY_LOST"
    await life.Resume(lc.ResumeRequest(**scope))
    assert python((await wm.Get(pb.GetRequest(**scope, key="b"))).entry.value) == 2


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
@pytest.mark.parametrize("config_overrides", [{"failpoints": "terminate.before_finish=error"}])
@pytest.mark.parametrize("same_request_id", [True, False], ids=["retried", "called-again"])
async def test_a_terminate_that_died_before_its_last_step_is_finished_by_its_retry(
    copy, life, scope, wm, server, same_request_id
):
    """A Terminate commits, then dies before deleting the working memory. Every
    other call on a TERMINATED session is refused before it meets the marker, so
    its retry (or a second Terminate) must finish it: no memory is left behind."""
    await life.Spawn(lc.SpawnRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="secret", value=value("x")))
    request = lc.TerminateRequest(**scope, request_id=str(uuid.uuid4()))
    await expect_error(life.Terminate(request), grpc.StatusCode.INTERNAL)  # committed
    assert await copy.client.exists(*copy.keys) > 0  # the marker and the data are left
    if same_request_id:
        assert (await life.Terminate(request)).entries_cleared == 1  # the first answer
    else:
        retry = lc.TerminateRequest(**scope)
        await expect_error(life.Terminate(retry), grpc.StatusCode.FAILED_PRECONDITION)
    await server.lifecycle.settled()  # finished after the answer
    assert await copy.client.exists(*copy.keys) == 0


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
async def test_resume_replaces_an_older_copy_of_a_paused_memory_of_the_same_size(
    copy, life, scope, wm
):
    """A Resume keeps a paused memory that still holds its checkpoint instead of
    rebuilding it. A copy from an earlier Pause under the same checkpoint id (deleted,
    then used again), with as many keys and bytes, is not that memory: its epoch
    differs, and Resume rebuilds from the durable checkpoint."""
    await life.Spawn(lc.SpawnRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="k", value=value("A")))
    await life.Pause(lc.PauseRequest(**scope, checkpoint_id="cp"))
    await copy.take()
    await life.Resume(lc.ResumeRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="k", value=value("B")))
    await life.DeleteCheckpoint(lc.DeleteCheckpointRequest(**scope, checkpoint_id="cp"))
    await life.Pause(lc.PauseRequest(**scope, checkpoint_id="cp"))
    await copy.put_back()
    await life.Resume(lc.ResumeRequest(**scope))
    assert python((await wm.Get(pb.GetRequest(**scope, key="k"))).entry.value) == "B"


async def test_a_kept_memory_stays_readable_after_terminate(life, wm, scope):
    await life.Spawn(lc.SpawnRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="k", value=value("kept")))
    ended = await life.Terminate(
        lc.TerminateRequest(**scope, skip_consolidation=True, keep_working_memory=True)
    )
    assert ended.entries_cleared == 0
    assert python((await wm.Get(pb.GetRequest(**scope, key="k"))).entry.value) == "kept"


async def test_checkpoints_survive_a_restart_and_lost_memory_is_reported(server, scope):
    """After memsvc restarts (the embedded working memory dies with it), the session
    says its memory is lost and Resume from the durable checkpoint restores it."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        life = LifecycleServiceStub(channel)
        wm = WorkingMemoryServiceStub(channel)
        await life.Spawn(lc.SpawnRequest(**scope))
        await wm.Set(pb.SetRequest(**scope, key="k", value=value({"v": 1})))
        paused = await life.Pause(lc.PauseRequest(**scope))
    # Any free port: the first one came from the ephemeral range, where an outgoing
    # connection may take it while memsvc is down, and nothing here needs it again.
    config = replace(server.config, listen="127.0.0.1:0")
    await server.stop()
    if config.working_memory_url != "memory://":
        # Redis keeps its data across a memsvc restart; flush this session to make
        # the loss real (the private-Redis test covers a whole Redis restart).
        client = redis_client(config.working_memory_url)
        await client.delete(*session_keys(SessionRef(**scope)))
        await client.aclose()
    async with (
        Server(config) as restarted,
        grpc.aio.insecure_channel(f"127.0.0.1:{restarted.port}") as channel,
    ):
        life = LifecycleServiceStub(channel)
        wm = WorkingMemoryServiceStub(channel)
        session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
        assert session.state == lc.SESSION_STATE_PAUSED
        assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_LOST
        error = await expect_error(
            wm.Get(pb.GetRequest(**scope, key="k")), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert error.reason == "ERROR_REASON_WORKING_MEMORY_LOST"
        assert await checkpoint_ids(life, scope) == [paused.checkpoint.checkpoint_id]
        resumed = await life.Resume(lc.ResumeRequest(**scope))
        assert resumed.checkpoint.checkpoint_id == paused.checkpoint.checkpoint_id
        assert python((await wm.Get(pb.GetRequest(**scope, key="k"))).entry.value) == {"v": 1}
        session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
        assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_INTACT


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
async def test_a_paused_session_whose_memory_was_lost_ends_with_its_checkpoint(
    server, life, scope, channel
):
    """A PAUSED session's state is its resume checkpoint: Terminate records that
    episode even when the working memory was lost meanwhile, then cleans up."""
    await life.Spawn(lc.SpawnRequest(**scope))
    await WorkingMemoryServiceStub(channel).Set(pb.SetRequest(**scope, key="k", value=value(7)))
    await life.Pause(lc.PauseRequest(**scope))
    client = redis_client(server.config.working_memory_url)
    await client.delete(*session_keys(SessionRef(**scope)))
    await client.aclose()
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_LOST
    ended = await life.Terminate(lc.TerminateRequest(**scope))
    assert (ended.entries_consolidated, ended.entries_cleared) == (1, 0)
    episode = await EpisodicMemoryServiceStub(channel).GetEpisode(
        ep.GetEpisodeRequest(project_id=scope["project_id"], episode_id=ended.episode_id)
    )
    assert episode.episode.context_summary == '{"k": 7}'
    assert await checkpoint_ids(life, scope) == []


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
async def test_a_merge_resume_over_a_lost_paused_memory_keeps_the_paused_entries(
    server, life, scope, channel
):
    """Lost while PAUSED, the working memory is still the resume checkpoint: a
    merge Resume from an earlier checkpoint goes over that, not over nothing."""
    wm = WorkingMemoryServiceStub(channel)
    await life.Spawn(lc.SpawnRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="c", value=value(1)))
    earlier = (await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope))).checkpoint
    await wm.Set(pb.SetRequest(**scope, key="a", value=value(2)))
    await life.Pause(lc.PauseRequest(**scope))
    client = redis_client(server.config.working_memory_url)
    await client.delete(*session_keys(SessionRef(**scope)))
    await client.aclose()
    await life.Resume(
        lc.ResumeRequest(**scope, checkpoint_id=earlier.checkpoint_id, merge_with_current=True)
    )
    listed = await wm.ListEntries(pb.ListEntriesRequest(**scope))
    assert {e.key: python(e.value) for e in listed.entries} == {"a": 2, "c": 1}
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_INTACT


# The server's own sweeper waits an hour: only the test's holders compete.
@pytest.mark.parametrize("config_overrides", [{"retention_interval_seconds": 3600}])
async def test_one_replica_at_a_time_runs_the_background_jobs(server):
    """The background lease: held by one holder until it lapses or is released."""
    lifecycle = server.lifecycle
    assert lifecycle is not None
    first, second = f"a-{uuid.uuid4()}", f"b-{uuid.uuid4()}"
    assert await lifecycle.sweep(holder=first, lease_ms=60_000) is not None
    assert await lifecycle.sweep(holder=second, lease_ms=60_000) is None  # first holds it
    assert await lifecycle.sweep(holder=first, lease_ms=60_000) is not None  # renewed
    await lifecycle.release_background(first)
    assert await lifecycle.sweep(holder=second, lease_ms=1) is not None  # taken over
    await asyncio.sleep(0.01)  # second's 1 ms lease lapses: nothing is asserted on time
    assert await lifecycle.sweep(holder=first, lease_ms=60_000) is not None
    await lifecycle.release_background(first)


async def remembered(config: Config, project: str) -> int:
    """How many request ids of ``project`` the database remembers."""
    rows = await sql_rows(
        config.database_url, "SELECT count(*) FROM request_log WHERE project_id = ?", project
    )
    return int(rows[0][0])


async def spawn_with_request_id(channel: grpc.aio.Channel, project: str, session_id: str) -> None:
    await LifecycleServiceStub(channel).Spawn(
        lc.SpawnRequest(project_id=project, agent_instance_id=str(uuid.uuid4()),
                        session_id=session_id, request_id=str(uuid.uuid4()))
    )  # fmt: skip


async def test_a_backlog_past_one_batch_is_cleared_in_one_interval(base_config, monkeypatch):
    """More expired rows than one batch: the jobs run batch after batch until a batch
    comes back short, so retention keeps up with a busy project."""
    monkeypatch.setattr(server_module, "SWEEP_BATCH", 2)
    config = replace(base_config, request_id_ttl_seconds=1, retention_interval_seconds=3600)
    project = track_project(str(uuid.uuid4()))
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        for index in range(5):
            await spawn_with_request_id(channel, project, f"s{index}")
        assert await remembered(config, project) == 5
        await asyncio.sleep(1.5)  # past the 1 s TTL of all five
        _, requests, _ = await server.sweep_until_caught_up()
        # The database may hold other tests' expired ids too: at least three batches.
        assert requests >= 5
        assert await remembered(config, project) == 0


async def test_request_ids_are_remembered_a_margin_past_their_ttl(base_config, monkeypatch):
    """Claimed by one replica's clock, forgotten by the sweeper's: 1% past the TTL
    (14.4 minutes of 24 hours) absorbs that much clock skew."""
    config = replace(base_config, request_id_ttl_seconds=100, retention_interval_seconds=3600)
    project = track_project(str(uuid.uuid4()))
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        claimed_ms = time.time_ns() // 1_000_000
        await spawn_with_request_id(channel, project, "s")
        assert server.lifecycle is not None
        for after_ms, left in ((100_500, 1), (102_000, 0)):  # the TTL is 100 s
            now = claimed_ms + after_ms
            monkeypatch.setattr(server.lifecycle, "_clock_ms", lambda now=now: now)
            await server.lifecycle.sweep()
            assert await remembered(config, project) == left


class RedisCopy:
    """A copy of one session's Redis keys, put back later: a Redis restored from an
    older copy (a replica that lagged, an old RDB file)."""

    def __init__(self, url: str, scope: dict[str, str]) -> None:
        self.client = redis_client(url)
        self.keys = session_keys(SessionRef(**scope))
        self.saved: dict[str, bytes | None] = {}

    async def take(self) -> None:
        self.saved = {key: await self.client.dump(key) for key in self.keys}

    async def put_back(self) -> None:
        for key, data in self.saved.items():
            await self.client.delete(key)
            if data is not None:
                await self.client.restore(key, 0, data)


@pytest.fixture
async def copy(server: Server, scope: dict[str, str]) -> AsyncIterator[RedisCopy]:
    """The test session's Redis keys, to take and put back (a restored older copy)."""
    taken = RedisCopy(server.config.working_memory_url, scope)
    try:
        yield taken
    finally:
        await taken.client.aclose()


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
@pytest.mark.parametrize("evicted", ["data", "key index"])
async def test_a_session_redis_evicted_in_part_is_lost_memory(server, life, scope, wm, evicted):
    """Found by a review: a Redis that evicts (any maxmemory-policy but noeviction)
    dropped one of a session's keys and not the others, and memsvc served what was
    left: an empty session, or keys that Get found and ListKeys did not. The data
    and its index live and die together, so one without the other is a loss."""
    await life.Spawn(lc.SpawnRequest(**scope))
    for key in ("a", "b"):
        await wm.Set(pb.SetRequest(**scope, key=key, value=value(key)))
    checkpoint = (await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope))).checkpoint
    data, _, index, _ = session_keys(SessionRef(**scope))
    client = redis_client(server.config.working_memory_url)
    try:
        await client.delete(data if evicted == "data" else index)
    finally:
        await client.aclose()
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_LOST
    for call in (
        wm.Get(pb.GetRequest(**scope, key="a")),
        wm.ListKeys(pb.ListKeysRequest(**scope)),
        wm.Set(pb.SetRequest(**scope, key="c", value=value("c"))),
    ):
        error = await expect_error(call, grpc.StatusCode.FAILED_PRECONDITION)
        assert error.reason == "ERROR_REASON_WORKING_MEMORY_LOST", error
    await life.Resume(lc.ResumeRequest(**scope, checkpoint_id=checkpoint.checkpoint_id))
    listed = await wm.ListKeys(pb.ListKeysRequest(**scope))
    assert [info.key for info in listed.keys] == ["a", "b"]
    await life.Terminate(lc.TerminateRequest(**scope))


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
async def test_a_merge_resume_over_a_lost_memory_is_refused(copy, life, scope, wm):
    """Found by a review: a merge Resume of an ACTIVE session whose memory was lost
    answered OK, the entries it was asked to keep gone, though the proto promises
    WORKING_MEMORY_LOST for a merge over a memory that is lost. A plain Resume
    restores the checkpoint, as for any lost memory."""
    await life.Spawn(lc.SpawnRequest(**scope, initial_entries=[
        pb.EntryInput(key="a", value=value(1))]))  # fmt: skip
    checkpoint = (await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope))).checkpoint
    await wm.Set(pb.SetRequest(**scope, key="b", value=value(2)))
    await copy.client.delete(*copy.keys)  # lost (a flush, a restart without persistence)
    merge = lc.ResumeRequest(
        **scope, checkpoint_id=checkpoint.checkpoint_id, merge_with_current=True
    )
    error = await expect_error(life.Resume(merge), grpc.StatusCode.FAILED_PRECONDITION)
    assert error.reason == "ERROR_REASON_WORKING_MEMORY_LOST"
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_LOST  # unchanged
    await life.Resume(lc.ResumeRequest(**scope, checkpoint_id=checkpoint.checkpoint_id))
    assert [k.key for k in (await wm.ListKeys(pb.ListKeysRequest(**scope))).keys] == ["a"]


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
async def test_a_session_whose_keys_all_expired_is_intact_and_empty(server, life, scope, wm):
    """When every key has a TTL, Redis expires the session's data and key index
    whole at the last one (the marker stays): that is an expiry, not an eviction.
    The session stays intact, empty, and writable. (Both evicted at once, under an
    evicting maxmemory-policy, look the same: deployment.md.)"""
    await life.Spawn(lc.SpawnRequest(**scope))
    for key in ("a", "b"):
        ttl = duration_pb2.Duration(nanos=300_000_000)
        await wm.Set(pb.SetRequest(**scope, key=key, value=value(key), ttl=ttl))
    data, _, index, marker = session_keys(SessionRef(**scope))
    client = redis_client(server.config.working_memory_url)
    try:

        async def expired_by_redis() -> bool:
            return await client.exists(data, index) == 0

        await eventually(expired_by_redis)  # by Redis itself: no script ran meanwhile
        assert await client.exists(marker) == 1
    finally:
        await client.aclose()
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_INTACT
    assert (await wm.ListKeys(pb.ListKeysRequest(**scope))).keys == []
    await wm.Set(pb.SetRequest(**scope, key="c", value=value("c")))
    assert [k.key for k in (await wm.ListKeys(pb.ListKeysRequest(**scope))).keys] == ["c"]


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
async def test_a_store_restored_from_an_older_copy_is_lost_memory(copy, life, scope, wm):
    """Redis brought back in an older state (a replica that lagged, an old RDB):
    the memory is not what memsvc left. It is reported lost, Resume replaces it,
    and the session never gets stuck."""
    await life.Spawn(lc.SpawnRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="k", value=value("paused")))
    await copy.take()
    await life.Pause(lc.PauseRequest(**scope))
    await copy.put_back()
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.state == lc.SESSION_STATE_PAUSED
    assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_LOST
    await life.Resume(lc.ResumeRequest(**scope))
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_INTACT
    assert python((await wm.Get(pb.GetRequest(**scope, key="k"))).entry.value) == "paused"
    await wm.Set(pb.SetRequest(**scope, key="k", value=value("again")))
    await life.Terminate(lc.TerminateRequest(**scope))


async def reported_lost_and_refusing_writes(
    life: LifecycleServiceStub,
    wm: WorkingMemoryServiceStub,
    scope: dict[str, Any],
    state: lc.SessionState.ValueType,
) -> None:
    """GetSession says the session is in ``state`` with its memory LOST, and a write
    is refused as WORKING_MEMORY_LOST, as GetSession's answer implies."""
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.state == state
    assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_LOST
    error = await expect_error(
        wm.Set(pb.SetRequest(**scope, key="k", value=value("after"))),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error.reason == "ERROR_REASON_WORKING_MEMORY_LOST", error


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
async def test_a_paused_copy_of_an_active_session_refuses_writes_as_lost(copy, life, scope, wm):
    """Found by a review: a copy taken while PAUSED, put back after the Resume, made
    writes fail as SESSION_NOT_WRITABLE ('paused') while GetSession said ACTIVE with
    its memory LOST. A refusal by a marker the database disagrees with says LOST."""
    await life.Spawn(lc.SpawnRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="k", value=value("before")))
    await life.Pause(lc.PauseRequest(**scope))
    await copy.take()
    await life.Resume(lc.ResumeRequest(**scope))
    await copy.put_back()
    await reported_lost_and_refusing_writes(life, wm, scope, lc.SESSION_STATE_ACTIVE)


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
async def test_a_paused_copy_of_an_earlier_epoch_refuses_writes_as_lost(copy, life, scope, wm):
    """The copy's state is the database's (PAUSED) but of the epoch before the last
    Resume: GetSession says LOST, and so does a refused write (a review found it
    said SESSION_NOT_WRITABLE)."""
    await life.Spawn(lc.SpawnRequest(**scope))
    await life.Pause(lc.PauseRequest(**scope))
    await copy.take()
    await life.Resume(lc.ResumeRequest(**scope))
    await life.Pause(lc.PauseRequest(**scope))
    await copy.put_back()
    await reported_lost_and_refusing_writes(life, wm, scope, lc.SESSION_STATE_PAUSED)


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
@pytest.mark.parametrize("config_overrides", [{"failpoints": "pause.before_finish=error"}])
@pytest.mark.parametrize("paused_again", [False, True], ids=["active", "paused again"])
async def test_a_copy_taken_during_a_pause_of_an_earlier_epoch_is_lost_memory(
    copy, life, scope, wm, paused_again
):
    """Found by a review: a copy taken between a Pause's commit and its last step
    (its marker 'pausing'), put back after a Resume into a new epoch, passed for a
    pause in flight: GetSession said INTACT, and the first write's heal undid that
    'pause', made the old memory writable and acknowledged the write into it. The
    epoch a transitional marker began from is compared too: lost, and dropped."""
    await life.Spawn(lc.SpawnRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="k", value=value("old")))
    await expect_error(life.Pause(lc.PauseRequest(**scope)), grpc.StatusCode.INTERNAL)
    await copy.take()  # committed, its marker still 'pausing'
    await life.Resume(lc.ResumeRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="k", value=value("current")))
    if paused_again:
        await expect_error(life.Pause(lc.PauseRequest(**scope)), grpc.StatusCode.INTERNAL)
        await life.GetSession(lc.GetSessionRequest(**scope))
    await copy.put_back()
    state = lc.SESSION_STATE_PAUSED if paused_again else lc.SESSION_STATE_ACTIVE
    await reported_lost_and_refusing_writes(life, wm, scope, state)
    await reported_lost_and_refusing_writes(life, wm, scope, state)  # after the heal too
    newest = (await life.ListCheckpoints(lc.ListCheckpointsRequest(**scope))).checkpoints[0]
    resumed = await life.Resume(lc.ResumeRequest(**scope, checkpoint_id=newest.checkpoint_id))
    assert resumed.session.working_memory_status == lc.WORKING_MEMORY_STATUS_INTACT
    expected = "current" if paused_again else "old"  # the newest checkpoint's
    assert python((await wm.Get(pb.GetRequest(**scope, key="k"))).entry.value) == expected


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
async def test_a_copy_from_before_the_last_resume_is_lost_memory(copy, life, scope, wm):
    """A copy taken before a Resume holds the session in the same state (ACTIVE)
    but of the earlier epoch: Pause, CreateCheckpoint and Terminate refuse it as
    lost (their atomic steps compare the epoch), and Resume replaces it."""
    await life.Spawn(lc.SpawnRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="k", value=value("before")))
    await copy.take()
    paused = await life.Pause(lc.PauseRequest(**scope))
    await life.Resume(lc.ResumeRequest(**scope))
    await copy.put_back()
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.state == lc.SESSION_STATE_ACTIVE
    assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_LOST
    checkpoint_id = paused.checkpoint.checkpoint_id
    for call in (
        life.Pause(lc.PauseRequest(**scope)),
        life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope)),
        life.Terminate(lc.TerminateRequest(**scope)),
        # A merge keeps what is there: not an older copy.
        life.Resume(
            lc.ResumeRequest(**scope, checkpoint_id=checkpoint_id, merge_with_current=True)
        ),
    ):
        error = await expect_error(call, grpc.StatusCode.FAILED_PRECONDITION)
        assert error.reason == "ERROR_REASON_WORKING_MEMORY_LOST"
    await life.Resume(lc.ResumeRequest(**scope, checkpoint_id=checkpoint_id))
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_INTACT
    await life.Pause(lc.PauseRequest(**scope))


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["production"]], ids=["production"])
async def test_an_older_copy_with_no_checkpoint_left_can_still_end(copy, life, scope):
    """No checkpoint to resume from: Terminate without an episode still ends the
    session (nothing reads the copy), so no session is ever stuck."""
    await life.Spawn(lc.SpawnRequest(**scope))
    await copy.take()
    paused = await life.Pause(lc.PauseRequest(**scope))
    await life.Resume(lc.ResumeRequest(**scope))
    await life.DeleteCheckpoint(
        lc.DeleteCheckpointRequest(**scope, checkpoint_id=paused.checkpoint.checkpoint_id)
    )
    await copy.put_back()
    await expect_error(
        life.Terminate(lc.TerminateRequest(**scope)), grpc.StatusCode.FAILED_PRECONDITION
    )
    ended = await life.Terminate(lc.TerminateRequest(**scope, skip_consolidation=True))
    assert ended.session.state == lc.SESSION_STATE_TERMINATED
