"""A call that meets a Spawn still committing waits for it; it never undoes it.

Between its working-memory step 1 (marker 'spawning', the initial entries in
place) and its COMMIT, a Spawn's session row is invisible to every other
transaction. A working-memory call refused by the 'spawning' marker heals it:
were the missing row read as "this Spawn died", the heal would drop the initial
entries of a Spawn that then commits and answers OK, leaving an ACTIVE session
whose memory is gone. The store here holds the Spawn right after its step 1.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import grpc

from memsvc.config import Config
from memsvc.domain import EntryWrite, Marker, SessionRef
from memsvc.server import Server
from memsvc.store.memory import InMemoryWorkingMemoryStore
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import python, value


class SpawnHeldAfterStepOne(InMemoryWorkingMemoryStore):
    """Holds the first Spawn after its step 1 until ``release`` is set; tells
    when a heal reads the marker (``healing``)."""

    def __init__(self) -> None:
        super().__init__(max_session_keys=100, max_session_bytes=1 << 20)
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.healing = asyncio.Event()
        self.aborted: list[str] = []

    async def begin_spawn(
        self,
        session: SessionRef,
        op: str,
        epoch: str,
        writes: Sequence[EntryWrite],
    ) -> None:
        await super().begin_spawn(session, op, epoch, writes)
        if not self.held.is_set():
            self.held.set()
            await self.release.wait()

    async def read_marker(self, session: SessionRef) -> Marker | None:
        marker = await super().read_marker(session)
        if marker is not None and marker.state == "spawning":
            self.healing.set()
        return marker

    async def abort(self, session: SessionRef, op: str) -> str:
        self.aborted.append(op)
        return await super().abort(session, op)


async def test_a_read_during_a_spawn_waits_for_its_commit(local_config: Config):
    store = SpawnHeldAfterStepOne()
    ids: dict[str, Any] = {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": "spawn-race",
    }
    async with (
        Server(local_config, working_memory=store) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
        entry = pb.EntryInput(key="seed", value=value({"from": "spawn"}))
        spawn = asyncio.ensure_future(life.Spawn(lc.SpawnRequest(**ids, initial_entries=[entry])))
        await asyncio.wait_for(store.held.wait(), 10)
        read = asyncio.ensure_future(wm.Get(pb.GetRequest(**ids, key="seed")))
        await asyncio.wait_for(store.healing.wait(), 10)
        # Time for a heal that does not wait to undo the Spawn (the defect this
        # guards against); a heal that waits is still waiting when released.
        await asyncio.sleep(0.3)
        store.release.set()
        spawned = await asyncio.wait_for(spawn, 10)
        assert spawned.initial_entries_written == 1
        got = await asyncio.wait_for(read, 10)
        assert python(got.entry.value) == {"from": "spawn"}
        assert store.aborted == [], "a heal undid the Spawn in flight"
        status = await life.GetSession(lc.GetSessionRequest(**ids))
        assert status.session.state == lc.SESSION_STATE_ACTIVE
        assert status.session.working_memory_status == lc.WORKING_MEMORY_STATUS_INTACT
