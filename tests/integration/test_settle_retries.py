"""A step 3 that fails after its commit is tried again until the marker settles.

A Terminate answers once it has committed; when the step that then clears its
working memory fails (the store away), no later call on the terminated session
would heal the marker, and the memory would stay though the answer said it was
cleared. memsvc heals it again in the background, with growing delays. The
store here fails a given number of such steps, then lets them through.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from memsvc.domain import SessionRef, _lifecycle
from memsvc.domain._errors import BackendUnavailable
from memsvc.server import Server
from memsvc.store.memory import InMemoryWorkingMemoryStore
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.helpers import embedded_config, value


class FinishFails(InMemoryWorkingMemoryStore):
    """Fails the first ``failures`` steps that clear a session away (final state
    None: a Terminate's step 3, or a heal settling it)."""

    def __init__(self, failures: int) -> None:
        super().__init__(max_session_keys=100, max_session_bytes=1 << 20)
        self.failures = failures
        self.failed = 0
        self.cleared = asyncio.Event()  # a step clearing a session away went through

    async def finish(
        self, session: SessionRef, op: str, final_state: str | None, swap: bool, clear: bool
    ) -> None:
        if final_state is None and self.failed < self.failures:
            self.failed += 1
            raise BackendUnavailable("working memory (test)")
        await super().finish(session, op, final_state, swap, clear)
        if final_state is None:
            self.cleared.set()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lifecycle, "SETTLE_RETRY_FIRST_SECONDS", 0.01)
    monkeypatch.setattr(_lifecycle, "SETTLE_RETRY_LONGEST_SECONDS", 0.05)


@pytest.fixture
def ids() -> dict[str, Any]:
    return {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": "settles-again",
    }


async def _terminated(store: FinishFails, tmp_path: Path, ids: dict[str, Any]) -> Server:
    """A server whose session ``ids`` was spawned with one entry and terminated."""
    config = embedded_config(tmp_path)
    server = Server(config, working_memory=store)
    await server.__aenter__()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        life = LifecycleServiceStub(channel)
        await life.Spawn(lc.SpawnRequest(**ids, initial_entries=[
            pb.EntryInput(key="k", value=value("kept"))]))  # fmt: skip
        ended = await life.Terminate(lc.TerminateRequest(**ids))
    assert ended.session.state == lc.SESSION_STATE_TERMINATED
    assert ended.entries_cleared == 1
    return server


@pytest.fixture
async def running() -> AsyncIterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for server in servers:
        await server.__aexit__(None, None, None)


async def test_a_terminate_whose_clearing_failed_is_cleared_in_the_background(
    tmp_path, ids, running
):
    store = FinishFails(failures=3)  # step 3, then two heals
    running.append(server := await _terminated(store, tmp_path, ids))
    ref = SessionRef(ids["project_id"], ids["agent_instance_id"], ids["session_id"])
    assert store.failed >= 1, "the Terminate's own step 3 failed"
    async with asyncio.timeout(30):
        await store.cleared.wait()
    assert await store.read_marker(ref) is None
    assert store.failed == 3
    assert await store.sessions_in(ref) == [], "its entries are gone with the marker"
    await _settled(server)


async def _settled(server: Server) -> None:
    assert server.lifecycle is not None
    await server.lifecycle.settled()


async def _marker_state(store: FinishFails, ref: SessionRef) -> str | None:
    marker = await store.read_marker(ref)
    return None if marker is None else marker.state


async def test_a_shutdown_stops_the_retries_and_leaves_the_marker_to_a_later_call(
    tmp_path, ids, running, monkeypatch
):
    monkeypatch.setattr(_lifecycle, "SETTLE_RETRY_FIRST_SECONDS", 60.0)
    store = FinishFails(failures=1)
    server = await _terminated(store, tmp_path, ids)
    ref = SessionRef(ids["project_id"], ids["agent_instance_id"], ids["session_id"])
    assert await _marker_state(store, ref) == "terminating"
    async with asyncio.timeout(10):  # not the retry's 60 s
        await _settled(server)
    assert await _marker_state(store, ref) == "terminating"
    await server.__aexit__(None, None, None)
