"""Health follows the backends: NOT_SERVING while one is down, SERVING once it is back."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memsvc.config import Config
from memsvc.server import Server
from memsvc.store.redis import RedisWorkingMemoryStore
from memsvc.testing import PrivateRedis, free_port
from memsvc.testing._proxy import TcpProxy
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import (
    durable_store_at,
    eventually,
    expect_error,
    local_server_config,
    metric,
    python,
    redis_client,
    value,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def status_of(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service)
    )
    return int(reply.status)


async def test_a_redis_probe_whose_connection_was_cut_asks_again(tmp_path: Path):
    """Found by a review: a probe whose own connection Redis had closed (CLIENT
    KILL, a restart that was over) reported Redis unready for a whole health
    interval while Redis answered."""
    redis = PrivateRedis(free_port(), tmp_path / "redis")
    redis.start()
    store = RedisWorkingMemoryStore(redis.url, max_session_keys=10, max_session_bytes=1000)
    try:
        await store.open()
        await store.ping()
        client = redis_client(redis.url)
        try:
            killed = await client.execute_command(
                "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"
            )
        finally:
            await client.aclose()
        assert int(killed) >= 1  # the probe's connection, at least
        await store.ping()  # raised BackendUnavailable before
    finally:
        await store.aclose()
        redis.kill()


async def test_redis_outage_turns_health_off_and_calls_unavailable(tmp_path: Path):
    """Killing Redis: NOT_SERVING and UNAVAILABLE (retryable, reason given);
    a new Redis on the same port: SERVING and working calls again, by itself."""
    redis = PrivateRedis(free_port(), tmp_path / "redis")
    redis.start()
    config = Config(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path / "data"),
        working_memory_url=redis.url,
        health_interval_seconds=0.1,
        health_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
    )
    ids: dict[str, Any] = {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": "s",
    }
    try:
        async with (
            Server(config) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            wm = WorkingMemoryServiceStub(channel)
            life = LifecycleServiceStub(channel)
            await life.Spawn(lc.SpawnRequest(**ids))
            await wm.Set(pb.SetRequest(**ids, key="k", value=value(1)))
            checkpoint = (await life.CreateCheckpoint(lc.CreateCheckpointRequest(**ids))).checkpoint
            assert await status_of(channel) == SERVING

            redis.kill()

            async def not_serving() -> bool:
                return bool(await status_of(channel) == NOT_SERVING)

            await eventually(not_serving)
            assert await status_of(channel, "memsvc.v1.WorkingMemoryService") == NOT_SERVING
            # On the probe port: not ready, but alive, so kubelet does not restart
            # every sidecar because Redis is down.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as probe:
                assert await status_of(probe, "readiness") == NOT_SERVING
                assert await status_of(probe, "liveness") == SERVING
            assert metric(server, "memsvc_backend_up", backend="working memory (Redis)") == 0
            error = await expect_error(
                wm.Get(pb.GetRequest(**ids, key="k"), timeout=10), grpc.StatusCode.UNAVAILABLE
            )
            assert error.reason == "ERROR_REASON_BACKEND_UNAVAILABLE"
            assert error.metadata == {"backend": "working memory (Redis)"}
            assert error.retry_delay_seconds is not None

            redis.start()  # empty: this Redis keeps nothing on disk

            async def serving() -> bool:
                return bool(await status_of(channel) == SERVING)

            await eventually(serving)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as probe:
                assert await status_of(probe, "readiness") == SERVING
            assert metric(server, "memsvc_backend_up", backend="working memory (Redis)") == 1
            # The working memory is gone with Redis: memsvc says so instead of
            # serving an empty session as if it were intact.
            session = (await life.GetSession(lc.GetSessionRequest(**ids))).session
            assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_LOST
            lost = await expect_error(
                wm.Set(pb.SetRequest(**ids, key="k", value=value(2))),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            assert lost.reason == "ERROR_REASON_WORKING_MEMORY_LOST"
            # The durable checkpoint survived; resuming from it restores the memory.
            await life.Resume(lc.ResumeRequest(**ids, checkpoint_id=checkpoint.checkpoint_id))
            assert python((await wm.Get(pb.GetRequest(**ids, key="k"))).entry.value) == 1
            await wm.Set(pb.SetRequest(**ids, key="k", value=value(2)))
            assert python((await wm.Get(pb.GetRequest(**ids, key="k"))).entry.value) == 2
    finally:
        redis.kill()


async def test_unreachable_database_means_not_serving_from_the_start(tmp_path: Path):
    """With the durable store down (and migrations skipped), the server starts NOT_SERVING."""
    config = local_server_config(
        tmp_path,
        f"postgresql://postgres@127.0.0.1:{free_port()}/none?connect_timeout=1",
        migrate=False,
        health_interval_seconds=0.2,
    )
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        assert await status_of(ch) == NOT_SERVING


async def test_without_migrations_readiness_waits_for_the_schema(
    tmp_path: Path, fresh_postgres_url: str
):
    """--no-migrate with the database down at start: once it answers, its schema
    is checked; behind this memsvc's, health stays NOT_SERVING (every call would
    fail) until someone migrates it."""
    database = urlsplit(fresh_postgres_url)
    with TcpProxy(database.port or 5432) as proxy:
        proxy.refuse()
        through_proxy = database._replace(netloc=f"postgres@127.0.0.1:{proxy.port}")
        config = Config(
            listen="127.0.0.1:0",
            data_dir=str(tmp_path),
            database_url=through_proxy.geturl() + "?connect_timeout=1",
            migrate=False,
            health_interval_seconds=0.2,
            health_listen="",
            metrics_listen="127.0.0.1:0",
        )
        async with (
            Server(config) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            assert await status_of(channel) == NOT_SERVING
            proxy.restore()

            async def schema_read() -> bool:
                return bool(server._schema_behind)

            await eventually(schema_read)
            assert await status_of(channel) == NOT_SERVING
            # The database answers: what keeps readiness off is its schema.
            database_name = server.durable_store.backend_name
            assert metric(server, "memsvc_backend_up", backend=database_name) == 1
            assert metric(server, "memsvc_schema_behind") == 1
            store = durable_store_at(fresh_postgres_url)
            await store.open()
            try:
                await store.migrate()
            finally:
                await store.aclose()

            async def serving() -> bool:
                return bool(await status_of(channel) == SERVING)

            await eventually(serving)
            assert metric(server, "memsvc_schema_behind") == 0


async def test_the_api_serves_liveness_when_the_probe_port_is_off(tmp_path: Path):
    """The image's HEALTHCHECK asks the API for liveness when MEMSVC_HEALTH_LISTEN is
    empty: it is there, and stays SERVING while a backend is down."""
    config = Config(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path),
        working_memory_url="redis://127.0.0.1:1/0?socket_connect_timeout=0.2",
        health_listen="",
        metrics_listen="",
        health_interval_seconds=0.2,
    )
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service="liveness"))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_backend_that_hangs_is_named_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Found by a review: a backend that did not answer was logged as
    "working memory (Redis): " (a bare TimeoutError says nothing)."""
    with TcpProxy(free_port()) as proxy:
        proxy.blackhole()  # accepts, and answers nothing
        config = Config(
            listen="127.0.0.1:0",
            data_dir=str(tmp_path),
            working_memory_url=f"redis://127.0.0.1:{proxy.port}/0",
            health_listen="",
            metrics_listen="",
            health_interval_seconds=0.2,
        )
        with caplog.at_level(logging.WARNING, logger="memsvc"):
            async with Server(config):

                async def logged() -> bool:
                    # Bounded by Redis's connect timeout (2 s), longer than the interval.
                    return "working memory (Redis): no answer within 2 s" in caplog.text

                await eventually(logged)


async def test_readiness_allows_a_probe_its_connect_timeout(
    tmp_path: Path, fresh_postgres_url: str
):
    """A probe that connects first (at start, or after its connection was lost) may
    take the store's connect timeout, not only health_interval_seconds. Found by a
    review: with PostgreSQL 60 ms away each way and a 0.3 s interval, readiness
    stayed NOT_SERVING for good (every probe connection took longer than the
    interval), while every call succeeded."""
    store = durable_store_at(fresh_postgres_url)
    await store.open()
    try:
        await store.migrate()
    finally:
        await store.aclose()
    database = urlsplit(fresh_postgres_url)
    with TcpProxy(database.port or 5432) as proxy:
        proxy.delay(0.1)  # a connection takes a few round trips of 0.2 s
        far_away = database._replace(netloc=f"postgres@127.0.0.1:{proxy.port}")
        config = local_server_config(
            tmp_path, far_away.geturl(), migrate=False, health_interval_seconds=0.15
        )
        async with (
            Server(config) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):

            async def serving() -> bool:
                return bool(await status_of(channel) == SERVING)

            await eventually(serving)


async def failed_at_its_deadline(call: Any) -> None:
    """A call whose backend hangs ends at its deadline: DEADLINE_EXCEEDED from the
    client's own timer, or, when memsvc's answer for the operation it cut at the same
    deadline gets there first (a loaded machine: the CI run of f698bd3), UNAVAILABLE."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        assert error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        return
    raise AssertionError("the call succeeded against a Redis that hangs")


async def test_a_redis_that_hangs_counts_as_errors(tmp_path: Path):
    """Found by a review: a Redis that hangs rather than refuses (a partition, a
    frozen process) failed every call at its deadline and every probe at its
    timeout, and memsvc_backend_errors_total counted none of it: a cancelled
    operation counted as the client's. One cancelled at its deadline is now an
    OperationTimedOut, the probe's ping included."""
    from tests.conftest import REDIS_URL, need

    need(REDIS_URL)
    redis_port = urlsplit(REDIS_URL).port or 6379
    ids: dict[str, Any] = {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": "hangs",
    }
    redis = "working memory (Redis)"
    with TcpProxy(redis_port) as proxy:
        config = local_server_config(
            tmp_path,
            working_memory_url=f"redis://127.0.0.1:{proxy.port}/0",
            health_interval_seconds=0.2,
            metrics_listen="127.0.0.1:0",
        )
        async with (
            Server(config) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            life = LifecycleServiceStub(channel)
            wm = WorkingMemoryServiceStub(channel)
            await life.Spawn(lc.SpawnRequest(**ids))
            try:
                assert metric(server, "memsvc_backend_errors_total", backend=redis) is None
                proxy.blackhole()
                await failed_at_its_deadline(
                    wm.Set(pb.SetRequest(**ids, key="k", value=value(1)), timeout=1)
                )

                def timed_out(operation: str) -> float:
                    found = metric(
                        server, "memsvc_backend_errors_total", backend=redis,
                        operation=operation, error="OperationTimedOut",
                    )  # fmt: skip
                    return found or 0

                # A Redis step that hangs inside the database's transaction: the
                # database answered, and is not counted (a review of this change).
                await failed_at_its_deadline(
                    life.Spawn(lc.SpawnRequest(**{**ids, "session_id": "other"}), timeout=1)
                )

                async def both_counted() -> bool:
                    return (
                        timed_out("set_entries") >= 1
                        and timed_out("ping") >= 1
                        and timed_out("lifecycle_begin_spawn") >= 1
                    )

                await eventually(both_counted, timeout=20)
                database = server.durable_store.backend_name
                counted = metric(
                    server, "memsvc_backend_errors_total", backend=database, operation="transaction"
                )
                assert counted is None
            finally:
                proxy.restore()
                await life.Terminate(
                    lc.TerminateRequest(**ids, skip_consolidation=True), timeout=30
                )
