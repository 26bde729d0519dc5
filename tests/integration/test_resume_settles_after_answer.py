"""A Resume answers once it has committed; its marker settles after the answer.

Step 3 swaps the restored memory into place, so until it has run the marker is
'resuming' and no call may be served from the memory as it was: a read or a
write that meets it waits for the step this process is running (not a heal
transaction on the row lock), then is served from the restored memory. The
store here holds the Resume's step 3 until released.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from memsvc.domain import SessionRef
from memsvc.server import Server
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import python, value
from tests.integration._held_step import HeldStep3, serving


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[Server, HeldStep3, grpc.aio.Channel]]:
    def holds(final_state: str | None, swap: bool) -> bool:
        return swap  # a Resume's step 3

    async with serving(holds, tmp_path) as served:
        yield served


async def test_a_resume_answers_before_its_marker_settles_and_calls_wait_for_it(rig):
    server, store, channel = rig
    ids: dict[str, Any] = {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": "resumes-late",
    }
    life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
    await life.Spawn(lc.SpawnRequest(**ids, initial_entries=[
        pb.EntryInput(key="k", value=value("checkpointed"))]))  # fmt: skip
    first = await life.CreateCheckpoint(lc.CreateCheckpointRequest(**ids))
    await wm.Set(pb.SetRequest(**ids, key="k", value=value("later")))

    # A rollback to the checkpoint, answered while its step 3 is held.
    resumed = await asyncio.wait_for(
        life.Resume(lc.ResumeRequest(**ids, checkpoint_id=first.checkpoint.checkpoint_id)), 10
    )
    assert resumed.session.state == lc.SESSION_STATE_ACTIVE
    assert store.held == 1, "the answer came while step 3 was still held"
    ref = SessionRef(ids["project_id"], ids["agent_instance_id"], ids["session_id"])
    assert (await store.read_marker(ref)).state == "resuming"

    # Neither the memory as it was nor a refusal: both wait for the step.
    read = asyncio.ensure_future(wm.Get(pb.GetRequest(**ids, key="k")))
    await asyncio.sleep(0.2)
    write = asyncio.ensure_future(wm.Set(pb.SetRequest(**ids, key="w", value=value(1))))
    await asyncio.sleep(0.2)
    assert not read.done() and not write.done()
    store.release.set()
    assert python((await asyncio.wait_for(read, 10)).entry.value) == "checkpointed"
    await asyncio.wait_for(write, 10)
    await server.lifecycle.settled()
    assert store.outcomes == ["settled"], "no heal settled the marker before it"
    assert (await store.read_marker(ref)).state == "active"
    assert python((await wm.Get(pb.GetRequest(**ids, key="w"))).entry.value) == 1
