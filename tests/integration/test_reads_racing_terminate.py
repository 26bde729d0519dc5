"""A read that meets a Terminate between its two reads does not call the memory lost.

GetSession, and the explanation of a refused working-memory call, read the
session's record and then its marker. A Terminate that commits in between drops
the marker with the memory: the record read first still says ACTIVE or PAUSED,
and the missing marker looked like lost working memory (whose advice, Resume,
then fails). The store here runs a Terminate at the moment the marker is read.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from memsvc.domain import SessionRef
from memsvc.domain._session_memory import Marker
from memsvc.server import Server
from memsvc.store.memory import InMemoryWorkingMemoryStore
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import embedded_config, value


class TerminatesOnMarkerRead(InMemoryWorkingMemoryStore):
    """Runs ``before_next_read`` (once) when a marker is next read, then reads it."""

    def __init__(self) -> None:
        super().__init__(max_session_keys=100, max_session_bytes=1 << 20)
        self.before_next_read: Callable[[], Awaitable[object]] | None = None

    async def read_marker(self, session: SessionRef) -> Marker | None:
        hook, self.before_next_read = self.before_next_read, None
        if hook is not None:
            await hook()
        return await super().read_marker(session)


@pytest.fixture
async def rig(
    tmp_path: Path,
) -> AsyncIterator[tuple[TerminatesOnMarkerRead, LifecycleServiceStub, WorkingMemoryServiceStub]]:
    store = TerminatesOnMarkerRead()
    config = embedded_config(tmp_path)
    async with (
        Server(config, working_memory=store) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield store, LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)


def _ids() -> dict[str, Any]:
    return {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": "racing-terminate",
    }


async def _spawned(life: LifecycleServiceStub, ids: dict[str, Any]) -> None:
    await life.Spawn(lc.SpawnRequest(**ids, initial_entries=[
        pb.EntryInput(key="k", value=value("v"))]))  # fmt: skip


async def test_get_session_racing_a_terminate_reports_it_terminated_not_lost(rig):
    store, life, _ = rig
    ids = _ids()
    await _spawned(life, ids)
    store.before_next_read = lambda: life.Terminate(lc.TerminateRequest(**ids))
    got = await life.GetSession(lc.GetSessionRequest(**ids))
    assert store.before_next_read is None, "the Terminate ran between the two reads"
    assert got.session.state == lc.SESSION_STATE_TERMINATED
    assert got.session.working_memory_status != lc.WORKING_MEMORY_STATUS_LOST


async def test_a_write_refused_while_a_terminate_commits_says_terminated_not_lost(rig):
    store, life, wm = rig
    ids = _ids()
    await _spawned(life, ids)
    await life.Pause(lc.PauseRequest(**ids))
    store.before_next_read = lambda: life.Terminate(lc.TerminateRequest(**ids))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await wm.Set(pb.SetRequest(**ids, key="k", value=value("late")))
    assert store.before_next_read is None, "the Terminate ran between the two reads"
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "terminated" in (refused.value.details() or "")
    assert "lost" not in (refused.value.details() or "").lower()
