"""A purge runs to its end when its client stops waiting.

Found by a review: a purge whose scope took longer than the call's deadline was
cancelled with the call and rolled back, after it had deleted the working memory:
every session was left ACTIVE with its memory lost, nothing else purged, and each
retry started over, to be cut short again. Here the working-memory step waits
until the client has given up.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import grpc

from memsvc.config import Config
from memsvc.domain import SessionRef
from memsvc.server import Server
from memsvc.store.memory import InMemoryWorkingMemoryStore
from memsvc.v1 import data_removal_pb2 as dr
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.data_removal_pb2_grpc import DataRemovalServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import eventually, expect_error, value

SESSIONS = 3


class SlowToForget(InMemoryWorkingMemoryStore):
    """Forgets only once ``go`` is set (the purge's last step before its commit)."""

    def __init__(self) -> None:
        super().__init__(max_session_keys=100, max_session_bytes=1 << 20)
        self.forgetting = asyncio.Event()
        self.go = asyncio.Event()
        self.forgets = 0

    async def forget(self, sessions: Sequence[SessionRef]) -> int:
        self.forgets += 1
        self.forgetting.set()
        await self.go.wait()
        return await super().forget(sessions)


async def test_a_purge_its_client_gave_up_on_finishes_and_its_retry_answers_it(
    local_config: Config,
):
    store = SlowToForget()
    project, agent = str(uuid.uuid4()), str(uuid.uuid4())
    scopes: list[dict[str, Any]] = [
        {"project_id": project, "agent_instance_id": agent, "session_id": f"s{i}"}
        for i in range(SESSIONS)
    ]
    async with (
        Server(local_config, working_memory=store) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
        removal = DataRemovalServiceStub(channel)
        for scope in scopes:
            await life.Spawn(lc.SpawnRequest(**scope))
            await wm.Set(pb.SetRequest(**scope, key="k", value=value("v")))
        request = dr.PurgeDataRequest(project_id=project, request_id=str(uuid.uuid4()))
        await expect_error(
            removal.PurgeData(request, timeout=0.5), grpc.StatusCode.DEADLINE_EXCEEDED
        )
        await asyncio.wait_for(store.forgetting.wait(), 10)
        # A retry while it still runs waits for it (no second purge queued behind it,
        # which on PostgreSQL would hold a pooled connection all that time).
        retry = asyncio.ensure_future(removal.PurgeData(request, timeout=10))
        await asyncio.sleep(0.2)
        assert not retry.done()
        assert server.purger is not None
        assert len(server.purger._purges) == 1  # joined, not a second purge queued
        store.go.set()
        joined = await retry
        assert joined.sessions_deleted == SESSIONS
        assert store.forgets == 1

        async def purged() -> bool:
            try:
                await life.GetSession(lc.GetSessionRequest(**scopes[0]))
            except grpc.aio.AioRpcError as error:
                return bool(error.code() == grpc.StatusCode.NOT_FOUND)
            return False

        await eventually(purged)  # by the first call, which nobody waits for now
        # A retry after it ended gets its answer too.
        report = await removal.PurgeData(request, timeout=10)
        assert report.sessions_deleted == SESSIONS
        assert report.working_memories_deleted == SESSIONS
        for scope in scopes:
            await expect_error(
                life.GetSession(lc.GetSessionRequest(**scope)), grpc.StatusCode.NOT_FOUND
            )
            await expect_error(wm.Get(pb.GetRequest(**scope, key="k")), grpc.StatusCode.NOT_FOUND)


async def test_purges_waiting_for_one_running_leave_the_pool_to_other_calls(
    local_config: Config,
):
    """Purges of a project that one purge is working on wait for it in the process,
    holding no pooled connection: each used to take one and then wait on the
    project's lock, so a few retries took the whole pool (4 by default on
    PostgreSQL) and every other call stalled. Found by a review."""
    store = SlowToForget()
    project, agent = str(uuid.uuid4()), str(uuid.uuid4())
    other: dict[str, Any] = {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": agent,
        "session_id": "elsewhere",
    }
    async with (
        Server(local_config, working_memory=store) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        life, removal = LifecycleServiceStub(channel), DataRemovalServiceStub(channel)
        await life.Spawn(
            lc.SpawnRequest(project_id=project, agent_instance_id=agent, session_id="s")
        )
        await life.Spawn(lc.SpawnRequest(**other))
        purges = [
            asyncio.ensure_future(removal.PurgeData(dr.PurgeDataRequest(project_id=project)))
            for _ in range(6)
        ]
        await asyncio.wait_for(store.forgetting.wait(), 10)
        try:
            # Another project's session is read while they wait.
            got = await life.GetSession(lc.GetSessionRequest(**other), timeout=5)
            assert got.session.session_id == "elsewhere"
        finally:
            store.go.set()
        reports = await asyncio.gather(*purges)
        assert sorted(r.sessions_deleted for r in reports) == [0, 0, 0, 0, 0, 1]
