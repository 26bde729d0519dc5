"""A write refused by a marker that an operation settled right after is tried
again, not reported with the old marker's reason.

Between the store's refusal (the session PAUSED) and the explanation (which reads
the database), another client's Resume may commit. Found by a review: the write was
then answered WORKING_MEMORY_LOST, for an intact ACTIVE session, and the SDK's
advice for that reason (resume from a checkpoint) would throw away its writes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
import pytest

from memsvc.config import Config
from memsvc.domain import BatchRead, EntryWrite, SessionNotWritable, SessionRef, WriteResult
from memsvc.domain._markers import NoSession
from memsvc.server import Server
from memsvc.store.memory import InMemoryWorkingMemoryStore
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import python, value


class HoldsFirstRefusal(InMemoryWorkingMemoryStore):
    """Holds the first call it refuses (a write, or a read of an unknown session)
    until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__(max_session_keys=100, max_session_bytes=1 << 20)
        self.refused = asyncio.Event()
        self.release = asyncio.Event()

    async def _hold(self) -> None:
        if not self.refused.is_set():
            self.refused.set()
            await self.release.wait()

    async def set_entries(
        self, session: SessionRef, writes: Sequence[EntryWrite]
    ) -> list[WriteResult]:
        try:
            return await super().set_entries(session, writes)
        except SessionNotWritable:
            await self._hold()
            raise

    async def get_entries(
        self, session: SessionRef, keys: Sequence[str], budget_bytes: int
    ) -> BatchRead:
        try:
            return await super().get_entries(session, keys, budget_bytes)
        except NoSession:
            await self._hold()
            raise


async def test_a_write_refused_just_before_a_resume_is_written(local_config: Config):
    store = HoldsFirstRefusal()
    ids: dict[str, Any] = {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": "refused-then-resumed",
    }
    async with (
        Server(local_config, working_memory=store) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
        await life.Spawn(lc.SpawnRequest(**ids))
        await wm.Set(pb.SetRequest(**ids, key="k", value=value("before")))
        await life.Pause(lc.PauseRequest(**ids))
        write = asyncio.ensure_future(wm.Set(pb.SetRequest(**ids, key="k", value=value("after"))))
        await asyncio.wait_for(store.refused.wait(), 10)
        await life.Resume(lc.ResumeRequest(**ids))
        store.release.set()
        await asyncio.wait_for(write, 10)
        got = await wm.Get(pb.GetRequest(**ids, key="k"))
        assert python(got.entry.value) == "after"


async def test_a_resume_settling_while_the_refusal_reads_the_database(local_config: Config):
    """The same race one step later: the refusal read the record (PAUSED) before the
    Resume committed, and the marker after its last step (active, a new epoch). Found
    by a review of the first fix, which judged that pair as lost memory."""
    ids: dict[str, Any] = {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": "record-then-marker",
    }
    async with (
        Server(local_config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
        await life.Spawn(lc.SpawnRequest(**ids))
        await wm.Set(pb.SetRequest(**ids, key="k", value=value("before")))
        await life.Pause(lc.PauseRequest(**ids))
        assert server.lifecycle is not None
        database: Any = server.lifecycle._db
        read_record = database.get_session
        record_read, resumed = asyncio.Event(), asyncio.Event()

        async def get_session(ref: SessionRef) -> Any:
            record = await read_record(ref)
            if not record_read.is_set():  # the refusal's read: held until resumed
                record_read.set()
                await resumed.wait()
            return record

        database.get_session = get_session
        write = asyncio.ensure_future(wm.Set(pb.SetRequest(**ids, key="k", value=value("after"))))
        await asyncio.wait_for(record_read.wait(), 10)
        await life.Resume(lc.ResumeRequest(**ids))
        resumed.set()
        await asyncio.wait_for(write, 10)
        got = await wm.Get(pb.GetRequest(**ids, key="k"))
        assert python(got.entry.value) == "after"


async def test_a_call_refused_just_before_a_spawn_is_answered_for_the_new_session(
    local_config: Config,
):
    """A call that found no marker, explained after a Spawn committed: the session is
    new and intact. Found by a review: the Set and the Get were answered
    WORKING_MEMORY_LOST, whose advice (resume from a checkpoint, or terminate) would
    throw the fresh session away."""
    for call in ("set", "get"):
        store = HoldsFirstRefusal()
        ids: dict[str, Any] = {
            "project_id": str(uuid.uuid4()),
            "agent_instance_id": str(uuid.uuid4()),
            "session_id": f"refused-then-spawned-{call}",
        }
        async with (
            Server(local_config, working_memory=store) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
            if call == "set":
                early = wm.Set(pb.SetRequest(**ids, key="k", value=value("early")))
            else:
                early = wm.Get(pb.GetRequest(**ids, key="k"))
            refused = asyncio.ensure_future(early)
            await asyncio.wait_for(store.refused.wait(), 10)
            await life.Spawn(lc.SpawnRequest(**ids))
            store.release.set()
            if call == "set":
                await asyncio.wait_for(refused, 10)  # written to the new session
                got = await wm.Get(pb.GetRequest(**ids, key="k"))
                assert python(got.entry.value) == "early"
            else:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await asyncio.wait_for(refused, 10)
                # The key is not there (the session is): not a lost session.
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
                assert "WORKING_MEMORY_LOST" not in str(caught.value.trailing_metadata())
            status = await life.GetSession(lc.GetSessionRequest(**ids))
            assert status.session.working_memory_status == lc.WORKING_MEMORY_STATUS_INTACT
