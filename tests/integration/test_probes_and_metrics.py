"""The probe port serves only health; the metrics port counts what the API did."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memsvc import metrics as metrics_module
from memsvc.config import Config
from memsvc.domain import SessionRef
from memsvc.server import Server
from memsvc.store.memory import InMemoryWorkingMemoryStore
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import eventually, expect_error, metric, value


@pytest.fixture
def config_overrides() -> dict[str, object]:
    return {"health_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}


async def test_the_probe_port_serves_health_and_nothing_else(server: Server, scope: dict[str, Any]):
    assert server.health_port is not None and server.health_port != server.port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as probe:
        health = health_pb2_grpc.HealthStub(probe)
        for service in ("liveness", "readiness", ""):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        await expect_error(
            LifecycleServiceStub(probe).Spawn(lc.SpawnRequest(**scope)),
            grpc.StatusCode.UNIMPLEMENTED,
        )
        # Check only: the port is open to the cluster, without a token or a limit,
        # and a Watch would hold a stream (and memory) for as long as its caller likes.
        watch = health.Watch(health_pb2.HealthCheckRequest(service="readiness"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await watch.read()
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "Watch health on the API port" in (refused.value.details() or "")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as api:
        watched = health_pb2_grpc.HealthStub(api).Watch(
            health_pb2.HealthCheckRequest(service="readiness")
        )
        assert (await watched.read()).status == health_pb2.HealthCheckResponse.SERVING
        watched.cancel()


async def test_health_and_reflection_refuse_requests_larger_than_they_take(server: Server):
    """Found by a review: health and reflection need no token, and took requests of
    max_message_bytes. 64 concurrent probe Checks of 4 MB took 580 MB; a health Watch
    on the API kept its 4 MB service name (19 MB resident) as long as it stayed open."""
    long_name = "s" * 2_000
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as probe:
        health = health_pb2_grpc.HealthStub(probe)
        await expect_error(
            health.Check(health_pb2.HealthCheckRequest(service=long_name)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,  # gRPC's own refusal, before reading it
        )
        reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as api:
        health = health_pb2_grpc.HealthStub(api)
        error = await expect_error(
            health.Check(health_pb2.HealthCheckRequest(service=long_name)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "over the 1024 this method takes" in error.violations["request"]
        watch = health.Watch(health_pb2.HealthCheckRequest(service=long_name))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await watch.read()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        reflection = reflection_pb2_grpc.ServerReflectionStub(api)
        call = reflection.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        assert (await call.read()).HasField("list_services_response")
        await call.write(
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="x" * 70_000)
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "over the 65536 this method takes" in (refused.value.details() or "")
        # The API serves health as before.
        reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_metrics_count_rpcs_backends_and_watchers(
    server: Server, channel: grpc.aio.Channel, scope: dict[str, Any]
):
    life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
    service = "memsvc.v1.WorkingMemoryService"
    watch = life.WatchLifecycle(lc.WatchLifecycleRequest(project_id=scope["project_id"]))
    await watch.read()  # the start position: the stream is open

    assert metric(server, "memsvc_watchers") == 1
    # The process's own figures, which deployment.md sizes a sidecar by.
    assert (metric(server, "process_resident_memory_bytes") or 0) > 1 << 20
    await life.Spawn(lc.SpawnRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="k", value=value(1)))
    await wm.Get(pb.GetRequest(**scope, key="k"))
    await expect_error(wm.Get(pb.GetRequest(**scope, key="absent")), grpc.StatusCode.NOT_FOUND)
    assert (await watch.read()).event.event_type == lc.EVENT_TYPE_SESSION_SPAWNED

    def handled(method: str, code: str) -> float | None:
        return metric(
            server, "grpc_server_handled_total", grpc_service=service, grpc_method=method,
            grpc_code=code,
        )  # fmt: skip

    assert handled("Get", "OK") == 1
    assert handled("Get", "NOT_FOUND") == 1
    assert handled("Set", "OK") == 1
    assert metric(server, "grpc_server_started_total", grpc_method="Get") == 2
    assert metric(server, "grpc_server_handling_seconds_count", grpc_method="Get") == 2
    # The durable store's Spawn transaction and the working-memory scripts were timed.
    assert (metric(server, "memsvc_backend_operation_seconds_count", operation="transaction")
            or 0) >= 1  # fmt: skip
    if server.config.working_memory_url.startswith("redis"):
        assert (metric(server, "memsvc_backend_operation_seconds_count", operation="get_entries")
                or 0) >= 1  # fmt: skip
    # An invalid transition is the caller's error, not the backend's.
    await expect_error(life.Resume(lc.ResumeRequest(**scope)), grpc.StatusCode.FAILED_PRECONDITION)
    assert metric(server, "memsvc_backend_errors_total") is None
    assert (metric(server, "memsvc_watch_event_delay_seconds_count") or 0) >= 1

    watch.cancel()

    async def closed() -> bool:
        return metric(server, "memsvc_watchers") == 0

    await eventually(closed)
    assert metric(server, "grpc_server_handled_total", grpc_method="WatchLifecycle") == 1


def with_database_down(base_config: Config) -> Config:
    """Metrics served, and a durable store that cannot be reached."""
    return replace(
        base_config,
        metrics_listen="127.0.0.1:0",
        database_url="postgresql://postgres@127.0.0.1:1/none?connect_timeout=1",
        migrate=False,
    )


async def test_backend_failures_are_counted(base_config: Config, scope: dict[str, Any]):
    """A durable store that is unreachable: its reads fail, and the metrics say so."""
    config = with_database_down(base_config)
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        await expect_error(
            LifecycleServiceStub(channel).GetSession(lc.GetSessionRequest(**scope), timeout=20),
            grpc.StatusCode.UNAVAILABLE,
        )
        await asyncio.sleep(0)
        assert (metric(server, "memsvc_backend_errors_total", operation="get_session") or 0) >= 1
        assert metric(server, "memsvc_backend_up", backend="durable store (PostgreSQL)") == 0
        # Labelled with the driver's error (api.md: "the exception class"), not with
        # the wrapper that memsvc's retries raise (an ops review).
        assert metric(server, "memsvc_backend_errors_total", error="BackendUnavailable") is None


async def test_an_empty_host_listens_on_every_interface(base_config: Config):
    """``:port`` is documented for the probes and metrics: it binds, and both
    answer on loopback (one of every interface)."""
    config = replace(base_config, health_listen=":0", metrics_listen=":0")
    async with Server(config) as server:
        assert server.health_port and server.metrics.port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as probe:
            reply = await health_pb2_grpc.HealthStub(probe).Check(
                health_pb2.HealthCheckRequest(service="liveness")
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reader, writer = await asyncio.open_connection("127.0.0.1", server.metrics.port)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.0 200") and b"memsvc_watchers" in answer


async def test_one_backends_failure_is_not_counted_against_another(
    base_config: Config, scope: dict[str, Any]
):
    """Found by a review: a Spawn whose Redis step failed inside the database's
    transaction counted as a failure of the database too, so an alert on database
    errors fired during a Redis outage."""
    config = replace(
        base_config,
        metrics_listen="127.0.0.1:0",
        working_memory_url="redis://127.0.0.1:1/0?socket_connect_timeout=0.2",
    )
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        await expect_error(
            LifecycleServiceStub(channel).Spawn(lc.SpawnRequest(**scope), timeout=20),
            grpc.StatusCode.UNAVAILABLE,
        )
        await asyncio.sleep(0)
        redis = "working memory (Redis)"
        assert (metric(server, "memsvc_backend_errors_total", backend=redis) or 0) >= 1
        database = server.durable_store.backend_name
        errors = metric(server, "memsvc_backend_errors_total", backend=database)
        assert not errors, f"{database}: {errors} errors"


class HangingReads(InMemoryWorkingMemoryStore):
    """Reads that never answer (a backend hung with the connection open)."""

    def __init__(self) -> None:
        super().__init__(max_session_keys=100, max_session_bytes=1 << 20)

    async def get_entries(self, session: SessionRef, keys: Sequence[str], budget_bytes: int) -> Any:
        await asyncio.Event().wait()


async def test_a_call_past_its_deadline_is_counted_as_such(
    base_config: Config, scope: dict[str, Any]
):
    """Found by a review: the client saw DEADLINE_EXCEEDED while the metrics said
    CANCELLED (the handler cancelled at the deadline) or UNAVAILABLE."""
    config = replace(base_config, metrics_listen="127.0.0.1:0", working_memory_url="memory://")
    async with (
        Server(config, working_memory=HangingReads()) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        await LifecycleServiceStub(channel).Spawn(lc.SpawnRequest(**scope))
        await expect_error(
            WorkingMemoryServiceStub(channel).Get(pb.GetRequest(**scope, key="k"), timeout=0.5),
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )

        async def counted() -> bool:
            handled = metric(
                server,
                "grpc_server_handled_total",
                grpc_method="Get",
                grpc_code="DEADLINE_EXCEEDED",
            )
            return (handled or 0) >= 1

        await eventually(counted)


def test_idle_connections_to_the_metrics_port_hold_no_thread_for_long(
    monkeypatch: pytest.MonkeyPatch,
):
    """Each connection has a thread until it closes: idle ones are closed after
    SCRAPE_IDLE_SECONDS and at most MAX_SCRAPES are served at once, so a few
    thousand left open cannot make as many threads (they did)."""
    monkeypatch.setattr(metrics_module, "SCRAPE_IDLE_SECONDS", 0.5)
    served = metrics_module.Metrics()
    served.start("127.0.0.1:0")
    assert served.port is not None
    try:
        before = threading.active_count()
        with contextlib.ExitStack() as opened:
            idle = [
                opened.enter_context(
                    socket.create_connection(("127.0.0.1", served.port), timeout=10)
                )
                for _ in range(metrics_module.MAX_SCRAPES + 30)
            ]
            # Every connection beyond the limit is closed at once, the others once idle
            # too long: each read ends (b"") instead of waiting out the client's timeout.
            for connection in idle:
                assert connection.recv(1) == b""
            assert threading.active_count() - before <= metrics_module.MAX_SCRAPES
        with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/metrics") as scraped:
            assert b"process_resident_memory_bytes" in scraped.read()
    finally:
        served.stop()


def test_a_request_that_trickles_in_is_cut_off_at_the_scrape_deadline(
    monkeypatch: pytest.MonkeyPatch,
):
    """Found by a review: the socket's timeout bounded each read only, so a request
    sent a header every few seconds held its connection (and slot) for as long as
    it went on, and 16 of them kept every scrape out. The whole head must arrive
    within SCRAPE_IDLE_SECONDS."""
    monkeypatch.setattr(metrics_module, "SCRAPE_IDLE_SECONDS", 0.5)
    served = metrics_module.Metrics()
    served.start("127.0.0.1:0")
    assert served.port is not None
    try:
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as slow:
            slow.sendall(b"GET /metrics HTTP/1.1\r\n")
            closed = False
            for n in range(40):  # 8 s of headers, each well within the read timeout
                time.sleep(0.2)
                try:
                    slow.sendall(f"X-{n}: x\r\n".encode())
                except OSError:
                    closed = True
                    break
                slow.settimeout(0.01)
                try:
                    if slow.recv(1) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
                finally:
                    slow.settimeout(10)
            assert closed, "the server kept a request that trickled in for 8 s"
    finally:
        served.stop()
