"""Calls refused by one session's transitional marker share one heal.

Each refused call used to heal the marker itself: a transaction each, waiting on
the session's row lock with a pooled connection held, so a burst of writes during
one slow Pause could take the whole pool (4 connections by default) and stall
every other session's calls. Found by a review.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from memsvc.config import Config
from memsvc.domain import EntryWrite, SessionNotWritable, SessionRef, WriteResult
from memsvc.domain._markers import TRANSITIONAL
from memsvc.server import Server
from memsvc.store.memory import InMemoryWorkingMemoryStore
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import eventually, value

WRITERS = 8


class SlowToSettle(InMemoryWorkingMemoryStore):
    """Settles markers (the operations' last step, and heals) only once ``settle`` is set;
    counts the writes refused by a transitional marker."""

    def __init__(self) -> None:
        super().__init__(max_session_keys=100, max_session_bytes=1 << 20)
        self.settle = asyncio.Event()
        self.settle.set()
        self.met_transitional = 0

    async def set_entries(
        self, session: SessionRef, writes: Sequence[EntryWrite]
    ) -> list[WriteResult]:
        try:
            return await super().set_entries(session, writes)
        except SessionNotWritable as refused:
            # From here the refused call goes on, without a pause, to wait for a heal.
            if refused.metadata["state"] in TRANSITIONAL:
                self.met_transitional += 1
            raise

    async def finish(
        self, session: SessionRef, op: str, final_state: str | None, swap: bool, clear: bool
    ) -> None:
        await self.settle.wait()
        await super().finish(session, op, final_state, swap, clear)


@dataclass
class PausedSlowly:
    """A spawned session, paused: its Pause answered, its last step waiting on ``store``."""

    store: SlowToSettle
    server: Server
    life: LifecycleServiceStub
    wm: WorkingMemoryServiceStub
    ids: dict[str, Any]


@pytest.fixture
async def paused(local_config: Config) -> AsyncIterator[PausedSlowly]:
    store = SlowToSettle()
    ids: dict[str, Any] = {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": "paused-slowly",
    }
    async with (
        Server(local_config, working_memory=store) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
        await life.Spawn(lc.SpawnRequest(**ids))
        await wm.Set(pb.SetRequest(**ids, key="k", value=value(1)))
        store.settle.clear()
        # Answered before its last step, which now waits: the marker stays 'pausing'.
        await life.Pause(lc.PauseRequest(**ids))
        try:
            yield PausedSlowly(store, server, life, wm, ids)
        finally:
            store.settle.set()


async def test_writes_refused_during_a_pause_wait_for_one_heal(paused: PausedSlowly):
    store, life, wm, ids = paused.store, paused.life, paused.wm, paused.ids
    lifecycle: Any = paused.server.lifecycle
    heal = lifecycle.heal
    heals: list[SessionRef] = []

    async def counted_heal(session: SessionRef) -> None:
        heals.append(session)
        await heal(session)

    lifecycle.heal = counted_heal
    writes = [
        asyncio.ensure_future(wm.Set(pb.SetRequest(**ids, key=f"w{i}", value=value(i))))
        for i in range(WRITERS)
    ]

    async def all_waiting() -> bool:
        return store.met_transitional == WRITERS

    # Every writer met the 'pausing' marker, so each waits for a heal: one that came
    # after the heal would meet 'paused' and be refused without one, and a heal per
    # writer would go unseen.
    await eventually(all_waiting)
    assert not any(write.done() for write in writes)
    assert heals, "no heal began"
    store.settle.set()
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    assert len(heals) == 1, f"{len(heals)} heals for one marker"
    for outcome in outcomes:
        assert isinstance(outcome, grpc.aio.AioRpcError), outcome
        # Refused by the settled marker: the session is PAUSED.
        assert outcome.code() == grpc.StatusCode.FAILED_PRECONDITION
    session = await life.GetSession(lc.GetSessionRequest(**ids))
    assert session.session.state == lc.SESSION_STATE_PAUSED


async def test_a_shutdown_that_stops_waiting_for_settling_cancels_the_heals_too(
    paused: PausedSlowly,
):
    """The server waits a bounded time for the work left after answers, then cancels
    that wait: the heals went on running (while the stores closed) when the
    after-answer steps were still running before them. Found by a review."""
    store, wm, ids = paused.store, paused.wm, paused.ids
    lifecycle: Any = paused.server.lifecycle
    write = asyncio.ensure_future(wm.Set(pb.SetRequest(**ids, key="k", value=value(1))))

    async def healing() -> bool:
        return len(lifecycle._heals) == 1 and len(lifecycle._after_calls) == 1

    await eventually(healing)
    waiting = asyncio.ensure_future(lifecycle.settled())
    await asyncio.sleep(0.1)
    waiting.cancel()

    async def all_cancelled() -> bool:
        return len(lifecycle._heals) == 0 and len(lifecycle._after_calls) == 0

    await eventually(all_cancelled)
    store.settle.set()
    write.cancel()
