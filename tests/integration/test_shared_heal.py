"""Calls refused by one session's transitional marker share one heal.

Each refused call used to heal the marker itself: a transaction each, waiting on
the session's row lock with a pooled connection held, so a burst of writes during
one slow Pause could take the whole pool (4 connections by default) and stall
every other session's calls. Found by a review. The replica that runs the step 3
of a Pause that answered needs none: its refused calls wait for that step.
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

# Two replicas on one database: SQLite with working memory in process refuses a
# second server on its file (one process per data directory), PostgreSQL takes it.
pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


class SlowToSettle(InMemoryWorkingMemoryStore):
    """Settles markers as paused (a Pause's last step, and heals of its marker) only
    once ``settle`` is set; counts the writes refused by a transitional marker."""

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
        if final_state == "paused":
            await self.settle.wait()
        await super().finish(session, op, final_state, swap, clear)


@dataclass
class PausedSlowly:
    """A spawned session, paused on one replica (``pauser``): its Pause answered, its
    last step waiting on ``store``. The calls go to another replica (``server``),
    which has no step of its own to wait for: it heals the marker."""

    store: SlowToSettle
    pauser: Server
    server: Server
    life: LifecycleServiceStub
    wm: WorkingMemoryServiceStub
    ids: dict[str, Any]


def new_ids(session_id: str) -> dict[str, Any]:
    return {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": session_id,
    }


@pytest.fixture
async def paused(local_config: Config) -> AsyncIterator[PausedSlowly]:
    store = SlowToSettle()
    ids = new_ids("paused-slowly")
    async with (
        Server(local_config, working_memory=store) as pauser,
        Server(local_config, working_memory=store) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{pauser.port}") as pausing,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
        await life.Spawn(lc.SpawnRequest(**ids))
        await wm.Set(pb.SetRequest(**ids, key="k", value=value(1)))
        store.settle.clear()
        # Answered before its last step, which now waits: the marker stays 'pausing'.
        await LifecycleServiceStub(pausing).Pause(lc.PauseRequest(**ids))
        try:
            yield PausedSlowly(store, pauser, server, life, wm, ids)
        finally:
            store.settle.set()


def counting_heals(lifecycle: Any) -> list[SessionRef]:
    """The sessions ``lifecycle`` heals from now on (each heal run, not joined)."""
    heal = lifecycle.heal
    heals: list[SessionRef] = []

    async def counted_heal(session: SessionRef) -> None:
        heals.append(session)
        await heal(session)

    lifecycle.heal = counted_heal
    return heals


def writes_to(paused: PausedSlowly, wm: WorkingMemoryServiceStub) -> list[asyncio.Future[Any]]:
    return [
        asyncio.ensure_future(wm.Set(pb.SetRequest(**paused.ids, key=f"w{i}", value=value(i))))
        for i in range(WRITERS)
    ]


async def refused_as_paused(paused: PausedSlowly, writes: list[asyncio.Future[Any]]) -> None:
    """Every writer met the 'pausing' marker and waits: one that came after the
    marker settled would be refused without waiting, and go unseen. Released,
    each is refused by the settled marker: the session is PAUSED."""

    async def all_waiting() -> bool:
        return paused.store.met_transitional == WRITERS

    await eventually(all_waiting)
    assert not any(write.done() for write in writes)
    paused.store.settle.set()
    for outcome in await asyncio.gather(*writes, return_exceptions=True):
        assert isinstance(outcome, grpc.aio.AioRpcError), outcome
        assert outcome.code() == grpc.StatusCode.FAILED_PRECONDITION
    session = await paused.life.GetSession(lc.GetSessionRequest(**paused.ids))
    assert session.session.state == lc.SESSION_STATE_PAUSED


async def test_writes_refused_during_a_pause_wait_for_one_heal(paused: PausedSlowly):
    """On a replica that does not run the Pause's last step."""
    heals = counting_heals(paused.server.lifecycle)
    writes = writes_to(paused, paused.wm)

    async def healing() -> bool:
        return bool(heals)

    await eventually(healing)
    await refused_as_paused(paused, writes)
    assert len(heals) == 1, f"{len(heals)} heals for one marker"


async def test_writes_refused_during_a_pause_wait_for_its_step_on_its_replica(
    paused: PausedSlowly,
):
    """The replica that runs the Pause's last step needs no heal: its writers wait
    for that step, which settles the marker."""
    heals = counting_heals(paused.pauser.lifecycle)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{paused.pauser.port}") as channel:
        await refused_as_paused(paused, writes_to(paused, WorkingMemoryServiceStub(channel)))
    assert heals == []


async def test_a_shutdown_that_stops_waiting_for_settling_cancels_the_heals_too(
    paused: PausedSlowly,
):
    """The server waits a bounded time for the work left after answers, then cancels
    that wait: the heals went on running (while the stores closed) when the
    after-answer steps were still running before them. Found by a review."""
    store, life, wm, ids = paused.store, paused.life, paused.wm, paused.ids
    lifecycle: Any = paused.server.lifecycle
    # A step of its own after an answer: another session paused on this replica.
    other = new_ids("paused-here")
    await life.Spawn(lc.SpawnRequest(**other))
    await life.Pause(lc.PauseRequest(**other))
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
