"""Per-process call limits: concurrent calls and the default deadline."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memsvc.api._errors import OTHER_UNARY_CALLS
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


@contextlib.asynccontextmanager
async def holding_checks(port: int | None, count: int) -> AsyncIterator[UnreadingClient]:
    """A client on ``port`` that sent ``count`` health Checks and reads no answer."""
    assert port is not None
    hoarder = await asyncio.to_thread(UnreadingClient, port)
    try:
        for _ in range(count):
            hoarder.call("/grpc.health.v1.Health/Check", b"")
        yield hoarder
    finally:
        hoarder.close()


def limited(tmp_path: Path, **settings: Any) -> Config:
    return replace(
        Config(listen="127.0.0.1:0", data_dir=str(tmp_path), health_listen="", metrics_listen=""),
        **settings,
    )


async def test_answers_nobody_reads_count_against_the_limit(tmp_path: Path):
    """Found by a review: a call counted only while its handler ran, and its answer
    then waited in memory until its client read it. A client that read nothing
    (HTTP/2 windows at 0) held every answer it asked for: 40,000 health Checks (no
    token needed) took the server from 69 to 658 MB, BatchGets of 3 MB gigabytes.
    memsvc's calls count against max_concurrent_calls until answered; health Checks,
    which need no token, against a bound of their own (a later review: sharing the
    limit, a client without a token locked every authenticated call out)."""
    limit = 4
    project = str(uuid.uuid4())
    listing = lc.ListSessionsRequest(project_id=project).SerializeToString()
    async with (
        Server(limited(tmp_path, max_concurrent_calls=limit)) as server,
        holding_checks(server.port, OTHER_UNARY_CALLS + 8) as hoarder,
    ):
        for _ in range(3 * limit):
            hoarder.call("/memsvc.v1.LifecycleService/ListSessions", listing)

        async def held() -> bool:
            calls = server._calls
            return calls.unanswered == limit and calls.unanswered_other == OTHER_UNARY_CALLS

        await eventually(held)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            sessions = LifecycleServiceStub(channel).ListSessions
            ask = lc.ListSessionsRequest(project_id=project)
            await expect_error(
                check(health_pb2.HealthCheckRequest(), timeout=10),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
            await expect_error(sessions(ask, timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED)
            hoarder.close()

            async def let_go() -> bool:
                return server._calls.unanswered == server._calls.unanswered_other == 0

            await eventually(let_go)
            reply = await check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert not (await sessions(ask, timeout=10)).sessions


async def test_health_checks_held_unanswered_leave_memsvcs_calls_alone(tmp_path: Path):
    """A client without a token that holds unread health Checks takes none of the
    slots of memsvc's own calls (found by the review of the fix above)."""
    async with (
        Server(limited(tmp_path, max_concurrent_calls=4)) as server,
        holding_checks(server.port, OTHER_UNARY_CALLS + 8),
    ):

        async def held() -> bool:
            return server._calls.unanswered_other == OTHER_UNARY_CALLS

        await eventually(held)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            ask = lc.ListSessionsRequest(project_id=str(uuid.uuid4()))
            listed = await asyncio.gather(
                *(LifecycleServiceStub(channel).ListSessions(ask, timeout=10) for _ in range(4))
            )
            assert all(not page.sessions for page in listed)


async def test_a_probe_is_answered_while_another_connection_holds_unread_checks(tmp_path: Path):
    """The probe port bounds Checks per connection, not per port: 64 unread Checks
    held on one connection kept the kubelet's probes out (a review), and the pod
    would have been restarted."""
    async with (
        Server(limited(tmp_path, health_listen="127.0.0.1:0")) as server,
        holding_checks(server.health_port, 200),
    ):
        await asyncio.sleep(0.5)  # taken (or refused) by the server meanwhile
        for _ in range(3):  # a kubelet: a new connection for each probe
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="liveness"), timeout=10
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
