"""A lifecycle step 1 whose reply is lost and which is sent again (as memsvc's backend
retries do) still completes the operation: the retry finds its own first attempt's
marker, heals it, and goes on under a new operation id (the old one is settled, and
the fence against late copies refuses settled ids)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from memsvc.config import Config
from memsvc.domain import SessionRef
from memsvc.server import Server
from memsvc.store.redis import RedisWorkingMemoryStore, session_keys
from memsvc.store.redis._working_memory import staging_keys
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.conftest import REDIS_URL, need
from tests.helpers import python, value


class RepliesLostOnce(RedisWorkingMemoryStore):
    """The first begin_restore and begin_snapshot run twice: the first run's reply is
    'lost' and the step sent again, as after a connection reset."""

    def __init__(self) -> None:
        super().__init__(REDIS_URL, max_session_keys=100, max_session_bytes=1 << 20)
        self.replayed: set[str] = set()

    async def begin_restore(self, session: SessionRef, op: str, *args: Any, **kw: Any) -> int:
        if "restore" not in self.replayed:
            self.replayed.add("restore")
            await super().begin_restore(session, op, *args, **kw)
        return await super().begin_restore(session, op, *args, **kw)

    async def begin_snapshot(
        self, session: SessionRef, op: str, new_state: str | None, *args: Any, **kw: Any
    ) -> Any:
        if new_state and "snapshot" not in self.replayed:
            self.replayed.add("snapshot")
            await super().begin_snapshot(session, op, new_state, *args, **kw)
        return await super().begin_snapshot(session, op, new_state, *args, **kw)


@pytest.fixture
async def channel(tmp_path: Path) -> AsyncIterator[grpc.aio.Channel]:
    need(REDIS_URL)
    config = Config(listen="127.0.0.1:0", data_dir=str(tmp_path), health_listen="",
                    metrics_listen="", working_memory_url=REDIS_URL)  # fmt: skip
    async with (
        Server(replace(config), working_memory=RepliesLostOnce()) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as opened,
    ):
        yield opened


async def test_pause_and_resume_complete_after_a_replayed_step_one(channel):
    ids: dict[str, Any] = {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": "replayed",
    }
    life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
    try:
        await life.Spawn(lc.SpawnRequest(**ids, initial_entries=[
            pb.EntryInput(key="k", value=value("before"))]))  # fmt: skip
        paused = await life.Pause(lc.PauseRequest(**ids, checkpoint_id="cp"))
        assert paused.session.state == lc.SESSION_STATE_PAUSED
        resumed = await life.Resume(lc.ResumeRequest(**ids, checkpoint_id="cp"))
        assert resumed.session.state == lc.SESSION_STATE_ACTIVE
        await wm.Set(pb.SetRequest(**ids, key="k", value=value("after")))
        assert python((await wm.Get(pb.GetRequest(**ids, key="k"))).entry.value) == "after"
    finally:
        ref = SessionRef(ids["project_id"], ids["agent_instance_id"], ids["session_id"])
        client = aioredis.Redis.from_url(REDIS_URL)
        await client.delete(*session_keys(ref), *staging_keys(ref))
        await client.aclose()
