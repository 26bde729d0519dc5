"""The server as a whole: health, reflection, Unix socket and graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memsvc import server as server_module
from memsvc.config import Config, ConfigError, StartupError
from memsvc.server import Server
from memsvc.testing._proxy import TcpProxy
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import details_of, eventually, expect_error, python, value
from tests.integration._gated import GatedStore, StubbornStore

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRPCURL = str(Path(sys.executable).parent / "grpcurl")


@pytest.fixture
def embedded(tmp_path: Path) -> Config:
    return Config(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path),
        health_interval_seconds=0.2,
        health_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
    )


def scope() -> dict[str, Any]:
    return {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": "s",
    }


async def test_health_reports_serving_for_server_and_service(embedded):
    async with (
        Server(embedded) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "memsvc.v1.WorkingMemoryService", "memsvc.v1.LifecycleService"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == SERVING, service
        await expect_error(
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service")),
            grpc.StatusCode.NOT_FOUND,
        )


async def test_reflection_lists_every_service(embedded):
    async with (
        Server(embedded) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        reply = await call.read()
        call.cancel()
        names = {s.name for s in reply.list_services_response.service}
        assert names == {
            "memsvc.v1.WorkingMemoryService",
            "memsvc.v1.LifecycleService",
            "memsvc.v1.EpisodicMemoryService",
            "memsvc.v1.DataRemovalService",
            "memsvc.v1.GraphCheckpointService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }


def grpcurl(args: Sequence[str]) -> str:
    done = subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_grpcurl_lists_and_calls_without_proto_files(embedded):
    """The README's grpcurl examples work: list, then Set and Get through reflection."""
    async with Server(embedded) as server:
        address = f"127.0.0.1:{server.port}"
        ids = scope()
        spawn_body = json.dumps(ids)
        await asyncio.to_thread(
            grpcurl, ["-d", spawn_body, address, "memsvc.v1.LifecycleService/Spawn"]
        )
        listing = await asyncio.to_thread(grpcurl, [address, "list"])
        assert "memsvc.v1.WorkingMemoryService" in listing.split()
        assert "grpc.health.v1.Health" in listing.split()
        set_body = json.dumps({**ids, "key": "plan", "value": {"steps": ["a", "b"]}, "ttl": "60s"})
        await asyncio.to_thread(
            grpcurl, ["-d", set_body, address, "memsvc.v1.WorkingMemoryService/Set"]
        )
        got = await asyncio.to_thread(
            grpcurl,
            [
                "-d",
                json.dumps({**ids, "key": "plan"}),
                address,
                "memsvc.v1.WorkingMemoryService/Get",
            ],
        )
        assert json.loads(got)["entry"]["value"] == {"steps": ["a", "b"]}


async def test_unix_socket_serves_the_api(embedded, tmp_path):
    path = tmp_path / "memsvc.sock"
    async with (
        Server(replace(embedded, unix_socket=str(path))),
        grpc.aio.insecure_channel(f"unix:{path}") as ch,
    ):
        # The agent's container shares the pod's group: read-write for the group too.
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        wm = WorkingMemoryServiceStub(ch)
        ids = scope()
        await LifecycleServiceStub(ch).Spawn(lc.SpawnRequest(**ids))
        await wm.Set(pb.SetRequest(**ids, key="k", value=value("over the socket")))
        assert (
            python((await wm.Get(pb.GetRequest(**ids, key="k"))).entry.value) == "over the socket"
        )
    assert not path.exists(), "the socket file is removed at shutdown"


async def test_a_second_server_on_a_served_socket_leaves_it_to_the_first(embedded, tmp_path):
    """A second memsvc configured with the same socket refuses to start (and one that
    fails to start for another reason, here its TCP port, leaves the socket alone):
    the first keeps serving on it."""
    path = tmp_path / "memsvc.sock"
    first_config = replace(embedded, unix_socket=str(path))
    async with Server(first_config) as first:
        other_dir = tmp_path / "other"
        other_dir.mkdir()
        # Its own database too (the data dir alone does not move the derived URL).
        other = replace(
            first_config, data_dir=str(other_dir), database_url=f"sqlite:///{other_dir}/memsvc.db"
        )
        with pytest.raises(StartupError, match="another process serves"):
            await Server(other).start()
        taken_port = replace(other, listen=f"127.0.0.1:{first.port}")
        with pytest.raises(StartupError):
            await Server(taken_port).start()
        async with grpc.aio.insecure_channel(f"unix:{path}") as ch:
            await LifecycleServiceStub(ch).Spawn(lc.SpawnRequest(**scope()))
    assert not path.exists(), "the first removes its own socket at shutdown"


async def test_a_socket_that_cannot_be_made_is_a_clear_startup_error(embedded, tmp_path):
    """A missing directory (an absent volume mount, a typo) or a file in the way is
    said plainly, before the stores open and migrate, not as gRPC's bare bind
    failure (a traceback, which the docs call a bug)."""
    missing = replace(embedded, unix_socket=str(tmp_path / "absent" / "memsvc.sock"))
    with pytest.raises(StartupError, match="is not a directory"):
        await Server(missing).start()
    assert not list(tmp_path.glob("*.db*")), "the stores were opened first"
    in_the_way = tmp_path / "memsvc.sock"
    in_the_way.write_text("not a socket")
    with pytest.raises(StartupError, match="is not a socket"):
        await Server(replace(embedded, unix_socket=str(in_the_way))).start()
    assert in_the_way.read_text() == "not a socket", "left alone"
    assert not list(tmp_path.glob("*.db*")), "the stores were opened first"


async def test_a_socket_path_too_long_is_a_configuration_error(embedded, tmp_path):
    """A path longer than an address holds (sun_path: 107 bytes on Linux) is said,
    with the limit, before the stores open and migrate. A review found it failing
    only at the bind, after the migrations, with a hint about another process."""
    limit = server_module.UNIX_SOCKET_PATH_BYTES
    longest = tmp_path / ("s" * (limit - len(str(tmp_path)) - 1))
    assert len(str(longest).encode()) == limit
    async with (
        Server(replace(embedded, unix_socket=str(longest))),
        grpc.aio.insecure_channel(f"unix:{longest}") as ch,
    ):
        await LifecycleServiceStub(ch).Spawn(lc.SpawnRequest(**scope()))
    for database in tmp_path.glob("*.db*"):
        database.unlink()
    one_byte_over = replace(embedded, unix_socket=f"{longest}s")
    with pytest.raises(ConfigError, match=f"{limit + 1} bytes long.*at most {limit}"):
        await Server(one_byte_over).start()
    assert not list(tmp_path.glob("*.db*")), "the stores were opened first"


async def test_shutdown_refuses_new_calls_before_its_database_work(embedded):
    """Releasing the background lease is a database call (during an outage it waits
    its timeout): it comes after the listener closed, so new calls are refused at
    once, not accepted meanwhile."""
    server = Server(embedded)
    await server.start()
    assert server.lifecycle is not None
    releasing, release = asyncio.Event(), asyncio.Event()
    real_release = server.lifecycle.release_background

    async def slow_release(holder: str) -> None:
        releasing.set()
        await release.wait()
        await real_release(holder)

    server.lifecycle.release_background = slow_release  # type: ignore[method-assign]
    stopping = asyncio.ensure_future(server.stop(grace=1))
    try:
        await asyncio.wait_for(releasing.wait(), 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await expect_error(
                LifecycleServiceStub(channel).Spawn(lc.SpawnRequest(**scope()), timeout=5),
                grpc.StatusCode.UNAVAILABLE,
            )
    finally:
        release.set()
        await stopping


async def test_shutdown_stops_grpc_while_background_tasks_unwind(embedded):
    """A background task cancelled in a backend call may take seconds to unwind (a
    rollback on a connection to a database that stopped answering): new calls are
    refused meanwhile, not served until it has. Found by a review: with PostgreSQL
    blackholed, SIGTERM took 12-23 s whatever the grace period, the gRPC server
    not stopping until the health monitor and the retention sweep had unwound."""
    server = Server(embedded)
    await server.start()
    unwinding, unwound = asyncio.Event(), asyncio.Event()

    async def slow_to_unwind() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            unwinding.set()
            await unwound.wait()
            raise

    assert server._monitor is not None
    server._monitor.cancel()
    server._monitor = monitor = asyncio.create_task(slow_to_unwind(), name="memsvc-health")
    await asyncio.sleep(0)  # let it start waiting
    stopping = asyncio.ensure_future(server.stop(grace=1))
    try:
        await asyncio.wait_for(unwinding.wait(), 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            life = LifecycleServiceStub(channel)

            async def refused() -> bool:
                try:
                    await life.Spawn(lc.SpawnRequest(**scope()), timeout=5)
                except grpc.aio.AioRpcError as error:
                    return bool(error.code() == grpc.StatusCode.UNAVAILABLE)
                return False

            await eventually(refused)
        assert not monitor.done(), "gRPC stopped only once the task had unwound"
    finally:
        unwound.set()
        await stopping


async def test_shutdown_leaves_the_lease_of_an_unanswering_database_to_lapse(
    tmp_path: Path, fresh_postgres_url: str, caplog: pytest.LogCaptureFixture
):
    """The background-jobs lease is released at shutdown only when the database
    answered its last health check: otherwise the release would wait for nothing
    (the review measured 10 s of a 12.5 s shutdown), and the lease lapses anyway."""
    database = urlsplit(fresh_postgres_url)
    with TcpProxy(database.port or 5432) as proxy:
        through = database._replace(netloc=f"postgres@127.0.0.1:{proxy.port}")
        config = Config(
            listen="127.0.0.1:0",
            data_dir=str(tmp_path),
            database_url=through.geturl(),
            health_interval_seconds=0.1,
            health_listen="",
            metrics_listen="",
        )
        server = Server(config)
        await server.start()
        assert server.lifecycle is not None
        releases: list[str] = []

        async def recorded_release(holder: str) -> None:
            releases.append(holder)

        server.lifecycle.release_background = recorded_release  # type: ignore[method-assign]
        proxy.blackhole()

        async def not_serving() -> bool:
            reply = await server.health.Check(health_pb2.HealthCheckRequest(), None)
            return bool(reply.status == NOT_SERVING)

        await eventually(not_serving)
        with caplog.at_level(logging.INFO, logger="memsvc.server"):
            await server.stop(grace=1)
        assert releases == []
        assert "background-jobs lease lapses" in caplog.text
        # Answering, it is released: the check above is not what skips it always.
        proxy.restore()
        server = Server(config)
        await server.start()
        assert server.lifecycle is not None
        server.lifecycle.release_background = recorded_release  # type: ignore[method-assign]
        await server.stop(grace=1)
        assert releases == [server.instance_id]


async def test_flushing_traces_at_shutdown_leaves_the_event_loop_free(embedded):
    """The tracer provider's shutdown is synchronous (up to its exporter's timeout
    against a collector that never answers): it runs in a thread of its own, and
    the event loop goes on meanwhile."""
    flushing, loop_ran = threading.Event(), threading.Event()
    saw_the_loop: list[bool] = []

    class SlowProvider:
        def shutdown(self) -> None:
            flushing.set()
            saw_the_loop.append(loop_ran.wait(5))

    async def tick() -> None:
        await asyncio.to_thread(flushing.wait, 30)
        loop_ran.set()  # only once the loop runs again

    server = Server(embedded, tracer_provider=SlowProvider())
    await server.start()
    ticking = asyncio.ensure_future(tick())
    await server.stop(grace=1)
    ticking.cancel()
    assert saw_the_loop == [True]


async def test_a_trace_collector_that_never_answers_costs_only_the_last_spans(
    embedded, caplog, monkeypatch
):
    """A collector down is not memsvc hanging: shutdown stops waiting for the flush
    after TRACE_FLUSH_SECONDS (its exporter would wait ten seconds and more) and
    says the last spans are dropped, without the hang report's task stacks."""
    monkeypatch.setattr(server_module, "TRACE_FLUSH_SECONDS", 0.2)
    released = threading.Event()

    class UnansweredProvider:
        def shutdown(self) -> None:
            released.wait(30)

    server = Server(embedded, tracer_provider=UnansweredProvider())
    await server.start()
    try:
        with caplog.at_level(logging.WARNING, logger="memsvc.server"):
            await server.stop(grace=1)
    finally:
        released.set()
    messages = [record.getMessage() for record in caplog.records]
    assert any("trace collector took no spans" in m for m in messages), messages
    assert not any("took over" in m for m in messages), messages


async def test_graceful_shutdown_finishes_in_flight_calls_and_refuses_new_ones(embedded):
    """On stop: health NOT_SERVING, watchers end with UNAVAILABLE, the call in flight
    completes, new calls are refused."""
    store = GatedStore()
    server = Server(replace(embedded, shutdown_grace_seconds=10), working_memory=store)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    wm = WorkingMemoryServiceStub(channel)
    ids = scope()
    await LifecycleServiceStub(channel).Spawn(lc.SpawnRequest(**ids))
    await wm.Set(pb.SetRequest(**ids, key="k", value=value("v")))
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == SERVING
    in_flight = asyncio.ensure_future(wm.Get(pb.GetRequest(**ids, key="k")))
    await asyncio.wait_for(store.entered.wait(), 10)

    stopping = asyncio.ensure_future(server.stop())
    assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(watch.read(), 10)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details_of(ended.value).reason == "ERROR_REASON_SERVER_SHUTTING_DOWN"

    # A second connection is refused (the listener is closed) while the first call still runs.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as late:
        await expect_error(
            WorkingMemoryServiceStub(late).Get(pb.GetRequest(**ids, key="k"), timeout=5),
            grpc.StatusCode.UNAVAILABLE,
        )
    assert not stopping.done(), "stop() must wait for the call in flight"
    store.gate.set()
    reply = await asyncio.wait_for(in_flight, 10)
    assert python(reply.entry.value) == "v"
    await asyncio.wait_for(stopping, 10)
    await channel.close()


async def test_health_watches_on_the_api_are_bounded(embedded):
    """grpc.health.v1 Watch needs no token (probes have none): beyond max_watchers
    open ones, another is RESOURCE_EXHAUSTED, so nobody can hold the server's memory
    with them. WatchLifecycle streams have their own count."""
    async with (
        Server(replace(embedded, max_watchers=2)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        held = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
        for stream in held:
            assert (await asyncio.wait_for(stream.read(), 10)).status == SERVING
        refused = health.Watch(health_pb2.HealthCheckRequest())
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(refused.read(), 10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details_of(error.value).reason == "ERROR_REASON_TOO_MANY_WATCHERS"
        events = LifecycleServiceStub(channel).WatchLifecycle(
            lc.WatchLifecycleRequest(project_id=str(uuid.uuid4()))
        )
        assert (await asyncio.wait_for(events.read(), 10)).HasField("progress")
        held[0].cancel()  # a slot comes free

        async def admitted() -> bool:
            again = health.Watch(health_pb2.HealthCheckRequest())
            try:
                return bool((await asyncio.wait_for(again.read(), 10)).status == SERVING)
            except grpc.aio.AioRpcError:
                return False
            finally:
                again.cancel()

        await eventually(admitted)
        for stream in (*held, events):
            stream.cancel()


async def test_a_stream_opened_once_shutdown_began_ends_as_the_others_did(embedded):
    """Shutdown ends the open streams with UNAVAILABLE; one whose handler starts just
    after that (accepted on an open connection) ends the same way, at once."""
    server = Server(embedded)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            life = LifecycleServiceStub(channel)
            await life.Spawn(lc.SpawnRequest(**scope()))
            server._calls.end_streams()  # the step of stop() that ends the streams
            for stream in (
                life.WatchLifecycle(lc.WatchLifecycleRequest(project_id=str(uuid.uuid4()))),
                health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await asyncio.wait_for(stream.read(), 10)
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
                assert details_of(ended.value).reason == "ERROR_REASON_SERVER_SHUTTING_DOWN"
    finally:
        await server.stop()


async def test_an_open_reflection_stream_ends_at_shutdown_as_the_others_do(embedded):
    """Tools (grpcui, evans, Postman) keep a reflection stream open: shutdown ends it
    with UNAVAILABLE at once, as it ends the watch streams, instead of waiting for it
    through the whole grace period and then cancelling it."""
    server = Server(embedded)
    await server.start()
    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
            await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            assert (await asyncio.wait_for(stream.read(), 10)).HasField("list_services_response")
            # A grace far longer than the wait below: only ending the stream lets stop() end.
            stopping = asyncio.create_task(server.stop(grace=600))
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(stream.read(), 20)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert details_of(ended.value).reason == "ERROR_REASON_SERVER_SHUTTING_DOWN"
            await asyncio.wait_for(stopping, 20)
    finally:
        if stopping is None or not stopping.done():
            await server.stop(0)  # safe to call again: ends what the first left


async def test_stop_cancels_calls_still_running_after_the_grace_period(embedded):
    store = GatedStore()
    server = Server(embedded, working_memory=store)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = WorkingMemoryServiceStub(channel).Get(pb.GetRequest(**scope(), key="k"))
        await asyncio.wait_for(store.entered.wait(), 10)
        await server.stop(grace=0.2)
        with pytest.raises(grpc.aio.AioRpcError) as cancelled:
            await call
        assert cancelled.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


async def test_stop_never_hangs_on_a_handler_that_ignores_cancellation(
    embedded, monkeypatch, caplog
):
    """A stuck step is logged with the stacks of the tasks still running and skipped:
    the stores still close and stop() returns."""
    monkeypatch.setattr(server_module, "STEP_LIMIT_SECONDS", 0.5)
    caplog.set_level(logging.INFO, logger="memsvc.server")
    store = StubbornStore()
    server = Server(embedded, working_memory=store)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = WorkingMemoryServiceStub(channel).Get(pb.GetRequest(**scope(), key="k"))
            await asyncio.wait_for(store.entered.wait(), 10)
            await asyncio.wait_for(server.stop(grace=0.1), 30)
            call.cancel()
    finally:
        store.gate.set()  # let the stubborn handler go, so the test leaves nothing behind
    stuck = [r for r in caplog.records if "handler(s) still running" in r.message]
    assert stuck, [r.message for r in caplog.records]
    assert "WorkingMemoryService/Get" in stuck[0].message, "the log names the stuck call"
    assert caplog.records[-1].message == "stopped", "the steps after the stuck one still ran"
