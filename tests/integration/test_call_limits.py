"""Per-process call limits: concurrent calls and the default deadline."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memsvc.config import Config
from memsvc.server import Server
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import eventually, expect_error, python, value
from tests.integration._gated import GatedStore
from tests.integration._unread_h2 import UnreadingClient


async def holding(store: GatedStore, calls: int) -> bool:
    return store.waiting == calls


@pytest.fixture
def store() -> GatedStore:
    return GatedStore()


@pytest.fixture
async def stubs(
    tmp_path: Path, store: GatedStore, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[WorkingMemoryServiceStub, dict[str, Any]]]:
    config = Config(listen="127.0.0.1:0", data_dir=str(tmp_path), health_listen="",
                    metrics_listen="")  # fmt: skip
    server = Server(replace(config, **request.param), working_memory=store)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            ids: dict[str, Any] = {
                "project_id": str(uuid.uuid4()),
                "agent_instance_id": str(uuid.uuid4()),
                "session_id": "s",
            }
            # Deadlines of their own: a short default deadline must not cut the set-up.
            await LifecycleServiceStub(channel).Spawn(lc.SpawnRequest(**ids), timeout=30)
            wm = WorkingMemoryServiceStub(channel)
            await wm.Set(pb.SetRequest(**ids, key="k", value=value("v")), timeout=30)
            yield wm, ids
    finally:
        store.gate.set()
        await server.stop(grace=1)


@pytest.mark.parametrize("stubs", [{"max_concurrent_calls": 2}], indirect=True)
async def test_past_the_concurrent_call_limit_calls_are_refused_at_once(stubs, store):
    wm, ids = stubs
    held = [asyncio.ensure_future(wm.Get(pb.GetRequest(**ids, key="k"))) for _ in range(2)]
    await eventually(lambda: holding(store, 2))
    refused = await expect_error(
        wm.Set(pb.SetRequest(**ids, key="other", value=value(1))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert refused.reason == "ERROR_REASON_TOO_MANY_CALLS"
    assert refused.metadata == {"limit": "2"}
    assert refused.quota_subjects == ["concurrent calls"]
    store.gate.set()
    for call in held:
        assert python((await call).entry.value) == "v"
    # The refused write changed nothing, and calls are admitted again.
    await expect_error(wm.Get(pb.GetRequest(**ids, key="other")), grpc.StatusCode.NOT_FOUND)
    await wm.Set(pb.SetRequest(**ids, key="other", value=value(1)))


@pytest.mark.parametrize("stubs", [{"default_deadline_seconds": 0.3}], indirect=True)
async def test_a_call_without_a_deadline_gets_the_default_one(stubs, store):
    wm, ids = stubs
    late = await expect_error(
        wm.Get(pb.GetRequest(**ids, key="k")), grpc.StatusCode.DEADLINE_EXCEEDED
    )
    assert late.reason == "ERROR_REASON_DEADLINE_EXCEEDED"
    assert late.metadata == {"deadline_seconds": "0.3"}
    assert store.waiting == 0, "the handler was cancelled, not left running"


@pytest.mark.parametrize("stubs", [{"default_deadline_seconds": 0.3}], indirect=True)
async def test_the_clients_own_deadline_wins_over_the_default(stubs, store):
    wm, ids = stubs
    call = asyncio.ensure_future(wm.Get(pb.GetRequest(**ids, key="k"), timeout=10))
    await eventually(lambda: holding(store, 1))
    await asyncio.sleep(0.6)  # twice the default deadline: still running
    assert not call.done()
    store.gate.set()
    assert python((await call).entry.value) == "v"


async def test_answers_nobody_reads_count_against_the_limit(tmp_path: Path):
    """Found by a review: a call counted only while its handler ran, and its answer
    then waited in memory until its client read it. A client that read nothing
    (HTTP/2 windows at 0) held every answer it asked for: 40,000 health Checks (no
    token needed) took the server from 69 to 658 MB, BatchGets of 3 MB gigabytes."""
    limit = 4
    config = Config(listen="127.0.0.1:0", data_dir=str(tmp_path), health_listen="",
                    metrics_listen="", max_concurrent_calls=limit)  # fmt: skip
    async with Server(config) as server:
        assert server.port is not None
        hoarder = await asyncio.to_thread(UnreadingClient, server.port)
        try:
            for _ in range(3 * limit):
                hoarder.call("/grpc.health.v1.Health/Check", b"")

            async def held() -> bool:
                return server._calls.unanswered == limit

            await eventually(held)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                check = health_pb2_grpc.HealthStub(channel).Check
                await expect_error(
                    check(health_pb2.HealthCheckRequest(), timeout=10),
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                )
                hoarder.close()

                async def let_go() -> bool:
                    return server._calls.unanswered == 0

                await eventually(let_go)
                reply = await check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            hoarder.close()
