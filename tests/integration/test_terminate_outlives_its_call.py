"""A Terminate's last step runs to its end even when the call is cancelled in it.

Spawn and Terminate settle their marker (step 3) before they answer. Found by a
review: a Terminate whose deadline ran out during that step was cancelled with it,
and the cancellation, not an error, skipped the background retries a failed step 3
gets. The session was TERMINATED, yet its working memory and a 'terminating' marker
stayed in the store for good: no later call on a terminated session meets them.
"""

from __future__ import annotations

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
from tests.helpers import value
from tests.integration._held_step import HeldStep3, serving


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[Server, HeldStep3, grpc.aio.Channel]]:
    def holds(final_state: str | None, swap: bool) -> bool:
        return final_state is None  # a Terminate's step 3 removes the marker

    async with serving(holds, tmp_path) as served:
        yield served


async def test_a_terminate_cancelled_in_its_last_step_still_clears_the_memory(rig):
    server, store, channel = rig
    ids: dict[str, Any] = {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": "ends-late",
    }
    life = LifecycleServiceStub(channel)
    await life.Spawn(lc.SpawnRequest(**ids, initial_entries=[
        pb.EntryInput(key="secret", value=value("x"))]))  # fmt: skip
    request = lc.TerminateRequest(**ids, skip_consolidation=True)
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        await life.Terminate(request, timeout=1.0)  # runs out during the held step
    assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert store.reached.is_set()
    session = (await life.GetSession(lc.GetSessionRequest(**ids))).session
    assert session.state == lc.SESSION_STATE_TERMINATED  # committed

    store.release.set()
    assert server.lifecycle is not None
    await server.lifecycle.settled()
    ref = SessionRef(ids["project_id"], ids["agent_instance_id"], ids["session_id"])
    assert await store.read_marker(ref) is None, "the memory and its marker are gone"
