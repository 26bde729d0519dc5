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

    async def forget(self, sessions: Sequence[SessionRef]) -> int:
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
        assert store.forgetting.is_set()
        store.go.set()

        async def purged() -> bool:
            try:
                await life.GetSession(lc.GetSessionRequest(**scopes[0]))
            except grpc.aio.AioRpcError as error:
                return bool(error.code() == grpc.StatusCode.NOT_FOUND)
            return False

        await eventually(purged)  # by the first call, which nobody waits for now
        # A retry gets its answer.
        report = await removal.PurgeData(request, timeout=10)
        assert report.sessions_deleted == SESSIONS
        assert report.working_memories_deleted == SESSIONS
        for scope in scopes:
            await expect_error(
                life.GetSession(lc.GetSessionRequest(**scope)), grpc.StatusCode.NOT_FOUND
            )
            await expect_error(wm.Get(pb.GetRequest(**scope, key="k")), grpc.StatusCode.NOT_FOUND)
