"""Calls cut short by tiny deadlines, thousands of them, at every await they reach,
leave nothing behind: no pool slot, no call counted in flight, no session that a
later call cannot use, and never an INTERNAL answer.

Found by reviews: a cancellation while a PostgreSQL connection went back to its
pool lost that slot for good; a cut-short pipeline left a connection whose next
call was INTERNAL; a failed call's undo was cut short, leaving its marker
transitional. Each has a targeted test; this one sends the storm they came from.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from typing import Any

import grpc
import psycopg_pool
import pytest

from memsvc.server import Server
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import eventually, value

SESSIONS = 8
WORKERS = 16
CALLS_PER_WORKER = 80
# What a call cut short by its deadline, or racing the others on its session, may
# answer; anything else (INTERNAL, UNKNOWN) fails the test.
EXPECTED = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


async def test_a_storm_of_cut_short_calls_leaves_nothing_behind(server: Server) -> None:
    project, agent = str(uuid.uuid4()), str(uuid.uuid4())
    scopes: list[dict[str, Any]] = [
        {"project_id": project, "agent_instance_id": agent, "session_id": f"s{n}"}
        for n in range(SESSIONS)
    ]
    seen: Counter[grpc.StatusCode] = Counter()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        life = LifecycleServiceStub(channel)
        wm = WorkingMemoryServiceStub(channel)
        for scope in scopes:
            await life.Spawn(lc.SpawnRequest(**scope))

        def calls(scope: dict[str, Any]) -> list[Any]:
            return [
                lambda t: wm.Set(pb.SetRequest(**scope, key="k", value=value(1)), timeout=t),
                lambda t: wm.Get(pb.GetRequest(**scope, key="k"), timeout=t),
                lambda t: wm.BatchSet(
                    pb.BatchSetRequest(
                        **scope,
                        entries=[pb.EntryInput(key=f"b{i}", value=value(i)) for i in range(5)],
                    ),
                    timeout=t,
                ),
                lambda t: life.Pause(lc.PauseRequest(**scope), timeout=t),
                lambda t: life.Resume(lc.ResumeRequest(**scope), timeout=t),
                lambda t: life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope), timeout=t),
                lambda t: life.GetSession(lc.GetSessionRequest(**scope), timeout=t),
            ]

        async def watch_briefly(deadline: float) -> None:
            stream = life.WatchLifecycle(lc.WatchLifecycleRequest(project_id=project))
            try:
                await asyncio.wait_for(stream.read(), deadline)
            except TimeoutError:
                pass
            finally:
                stream.cancel()

        async def worker(seed: int) -> None:
            draw = random.Random(seed)
            for _ in range(CALLS_PER_WORKER):
                deadline = draw.uniform(0.0005, 0.02)
                if draw.random() < 0.1:
                    await watch_briefly(deadline)
                    continue
                call = draw.choice(calls(draw.choice(scopes)))
                try:
                    await call(deadline)
                except grpc.aio.AioRpcError as error:
                    seen[error.code()] += 1

        await asyncio.gather(*(worker(seed) for seed in range(WORKERS)))
        assert set(seen) <= EXPECTED, seen
        assert seen[grpc.StatusCode.DEADLINE_EXCEEDED] > 0  # the storm cut calls short

        pool = getattr(server.durable_store, "_pool", None)
        if isinstance(pool, psycopg_pool.AsyncConnectionPool):

            async def pool_whole() -> bool:
                stats = pool.get_stats()
                return stats["pool_available"] == stats["pool_size"]

            await eventually(pool_whole)

        # Every session goes on with ordinary deadlines: paused ones resume, and each
        # takes a write and ends.
        for scope in scopes:
            session = (await life.GetSession(lc.GetSessionRequest(**scope), timeout=10)).session
            if session.state == lc.SESSION_STATE_PAUSED:
                await life.Resume(lc.ResumeRequest(**scope), timeout=10)
            await wm.Set(pb.SetRequest(**scope, key="after", value=value(2)), timeout=10)
            await life.Terminate(lc.TerminateRequest(**scope), timeout=10)


@pytest.fixture
def config_overrides() -> dict[str, object]:
    # Room for the storm: the call limit is not what this test is about.
    return {"max_concurrent_calls": 1000}
