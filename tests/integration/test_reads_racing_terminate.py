"""A read that meets a Terminate (or a Pause and a Resume) between its reads does not
call the memory lost.

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
from tests.helpers import embedded_config, eventually, value


class TerminatesOnMarkerRead(InMemoryWorkingMemoryStore):
    """Runs ``before_next_read`` (once) when a marker is next read, then reads it,
    then runs ``after_next_read`` (once) before answering."""

    def __init__(self) -> None:
        super().__init__(max_session_keys=100, max_session_bytes=1 << 20)
        self.before_next_read: Callable[[], Awaitable[object]] | None = None
        self.after_next_read: Callable[[], Awaitable[object]] | None = None

    async def read_marker(self, session: SessionRef) -> Marker | None:
        hook, self.before_next_read = self.before_next_read, None
        if hook is not None:
            await hook()
        marker = await super().read_marker(session)
        hook, self.after_next_read = self.after_next_read, None
        if hook is not None:
            await hook()
        return marker

    async def settled(self, session: dict[str, Any], state: str) -> None:
        """Wait for the session's marker to settle in ``state`` (step 3 of an
        operation that answered before it)."""
        ref = SessionRef(session["project_id"], session["agent_instance_id"], session["session_id"])
        read = super().read_marker

        async def in_state() -> bool:
            marker = await read(ref)
            return marker is not None and marker.state == state

        await eventually(in_state, interval=0.005)


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


async def _pause_settled(
    store: TerminatesOnMarkerRead, life: LifecycleServiceStub, ids: Any
) -> None:
    await life.Pause(lc.PauseRequest(**ids))
    await store.settled(ids, "paused")


async def test_get_session_racing_a_pause_and_a_resume_reports_it_intact_not_lost(rig):
    """Found by a review (two replicas, thousands of GetSessions racing Pauses and
    Resumes): the record read first (ACTIVE) disagreed with the marker a Pause had
    settled since (paused, epoch 1), and was read again after a Resume committed
    (ACTIVE, epoch 2): that pair, from two moments, read as lost memory."""
    store, life, _ = rig
    ids = _ids()
    await _spawned(life, ids)
    store.before_next_read = lambda: _pause_settled(store, life, ids)
    store.after_next_read = lambda: life.Resume(lc.ResumeRequest(**ids))
    got = await life.GetSession(lc.GetSessionRequest(**ids))
    assert store.before_next_read is None and store.after_next_read is None
    assert got.session.state == lc.SESSION_STATE_ACTIVE
    assert got.session.working_memory_status == lc.WORKING_MEMORY_STATUS_INTACT


async def test_a_write_refused_while_pauses_and_resumes_commit_is_not_lost(rig):
    """The same race on a refused write's explanation: refused as paused, it met a
    Resume and a Pause (marker paused, epoch 2), then a Resume (ACTIVE, epoch 3),
    and was refused as lost memory; the session is ACTIVE: the write goes through."""
    store, life, wm = rig
    ids = _ids()
    await _spawned(life, ids)
    await _pause_settled(store, life, ids)

    async def resume_and_pause() -> None:
        await life.Resume(lc.ResumeRequest(**ids))
        await _pause_settled(store, life, ids)

    store.before_next_read = resume_and_pause
    store.after_next_read = lambda: life.Resume(lc.ResumeRequest(**ids))
    await wm.Set(pb.SetRequest(**ids, key="k", value=value("late")))
    assert store.before_next_read is None and store.after_next_read is None
    got = await wm.Get(pb.GetRequest(**ids, key="k"))
    assert got.entry.value == value("late")
