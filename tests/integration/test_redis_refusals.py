"""A Redis that refuses writes (a replica, as the old primary after a failover; or
out of memory under ``noeviction``, mapped alike) makes the calls that write it
UNAVAILABLE, with the refusal named: a condition of the backend to wait out or
fix, never INTERNAL."""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import struct_pb2

from memsvc.config import Config
from memsvc.server import Server
from memsvc.testing import PrivateRedis, free_port
from memsvc.testing._proxy import TcpProxy
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as wm
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import eventually


def config_for(tmp_path: Path, working_memory_url: str, database_url: str) -> Config:
    return Config(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path),
        working_memory_url=working_memory_url,
        database_url=database_url,
        health_listen="",
        metrics_listen="",
    )


def new_scope(session_id: str) -> dict[str, Any]:
    return {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": session_id,
    }


async def fill(admin: aioredis.Redis) -> None:
    """Make the private Redis full from now on: under noeviction, it refuses what
    needs memory."""
    for filler in range(256):
        await admin.set(f"filler{filler}", b"x" * (4 << 10))
    used = int((await admin.info("memory"))["used_memory"])
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", used - (256 << 10))


async def test_a_redis_that_refuses_writes_is_unavailable(tmp_path: Path, postgres_url: str):
    redis = PrivateRedis(free_port(), tmp_path / "redis")
    redis.start()
    try:
        config = config_for(tmp_path, redis.url, postgres_url)
        scope = new_scope("refused")
        # A replica that refuses writes, as the old primary after a failover.
        admin = aioredis.Redis.from_url(redis.url)
        await admin.config_set("replica-read-only", "yes")
        await admin.replicaof("127.0.0.1", free_port())
        await admin.aclose()
        async with (
            Server(config) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            life = LifecycleServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await life.Spawn(lc.SpawnRequest(**scope), timeout=30)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value.details()
            assert "ReadOnlyError" in (raised.value.details() or "")
            # Nothing was spawned: the database's insert was rolled back with it.
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await life.GetSession(lc.GetSessionRequest(**scope))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        redis.kill()


async def test_after_a_failover_calls_reach_the_new_primary(tmp_path: Path, postgres_url: str):
    """The address memsvc uses (a proxy here, a DNS name or a Service in production)
    now leads to the new primary, while its pooled connections still reach the old
    one, a replica now: the READONLY answer drops them, and the retry reaches the
    new primary. Before, every call kept failing until memsvc restarted."""
    old, new = (PrivateRedis(free_port(), tmp_path / name) for name in ("old", "new"))
    old.start()
    new.start()
    try:
        with TcpProxy(old.port) as address:
            config = config_for(tmp_path, f"redis://127.0.0.1:{address.port}/0", postgres_url)
            project, agent = str(uuid.uuid4()), str(uuid.uuid4())
            async with (
                Server(config) as server,
                grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
            ):
                life = LifecycleServiceStub(channel)
                request: dict[str, Any] = {"project_id": project, "agent_instance_id": agent}
                await life.Spawn(lc.SpawnRequest(**request, session_id="before"))
                demoted = aioredis.Redis.from_url(old.url)
                await demoted.replicaof("127.0.0.1", new.port)  # the failover
                await demoted.aclose()
                address.upstream = ("127.0.0.1", new.port)  # new connections: new primary
                await life.Spawn(lc.SpawnRequest(**request, session_id="after"), timeout=30)
    finally:
        old.kill()
        new.kill()


async def test_a_full_redis_still_terminates_sessions(tmp_path: Path, postgres_url: str):
    """Found by a review: a Redis out of memory under noeviction (the policy memsvc
    asks for) refused every lifecycle script at its first write, so no session could
    be Paused, or Terminated to free it. The steps that only mark the session or free
    memory run anyway; writes of data are still refused."""
    redis = PrivateRedis(free_port(), tmp_path / "redis")
    redis.start()
    try:
        config = config_for(tmp_path, redis.url, postgres_url)
        scope = new_scope("full")
        async with (
            Server(config) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            life = LifecycleServiceStub(channel)
            memory = WorkingMemoryServiceStub(channel)
            await life.Spawn(lc.SpawnRequest(**scope))
            one = struct_pb2.Value(number_value=1)
            await memory.Set(wm.SetRequest(**scope, key="k", value=one))
            admin = aioredis.Redis.from_url(redis.url)
            try:
                await fill(admin)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await memory.Set(wm.SetRequest(**scope, key="j", value=one), timeout=30)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "OutOfMemoryError" in (refused.value.details() or "")
                # A Pause reads the memory in a transaction, which Redis refuses
                # then: it reads it in its script instead.
                paused = await life.Pause(lc.PauseRequest(**scope), timeout=30)
                assert paused.checkpoint.key_count == 1
                ended = await life.Terminate(lc.TerminateRequest(**scope), timeout=30)
                assert ended.session.state == lc.SESSION_STATE_TERMINATED
                assert await admin.keys("memsvc:wm:*") == []  # its memory freed
            finally:
                await admin.aclose()
    finally:
        redis.kill()


async def test_a_full_redis_refuses_data_into_empty_sessions_spawns_and_resumes(
    tmp_path: Path, postgres_url: str
):
    """Found by a review: Redis checked an unflagged script's memory only at its first
    write, and a script that begins by freeing memory (a purge of an empty session,
    a Spawn's or Resume's DEL) passed it: a Set into an empty session, a Spawn with
    entries and a Resume wrote into a full Redis unchecked, far past maxmemory."""
    redis = PrivateRedis(free_port(), tmp_path / "redis")
    redis.start()
    try:
        config = config_for(tmp_path, redis.url, postgres_url)
        empty, paused = new_scope("empty"), new_scope("paused")
        async with (
            Server(config) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            life = LifecycleServiceStub(channel)
            memory = WorkingMemoryServiceStub(channel)
            one = struct_pb2.Value(number_value=1)
            entries = [wm.EntryInput(key=f"k{i}", value=one) for i in range(100)]
            await life.Spawn(lc.SpawnRequest(**empty))
            await life.Spawn(lc.SpawnRequest(**paused, initial_entries=entries))
            await life.Pause(lc.PauseRequest(**paused))
            admin = aioredis.Redis.from_url(redis.url)
            try:
                await fill(admin)
                calls = {
                    "a Set into an empty session": memory.Set(
                        wm.SetRequest(**empty, key="j", value=one), timeout=30
                    ),
                    "a Spawn with entries": life.Spawn(
                        lc.SpawnRequest(**new_scope("new"), initial_entries=entries), timeout=30
                    ),
                    "a Resume": life.Resume(lc.ResumeRequest(**paused), timeout=30),
                }
                for what, call in calls.items():
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, what
                    assert "OutOfMemoryError" in (refused.value.details() or ""), what
                # Nothing was half done: the paused session is still paused.
                got = await life.GetSession(lc.GetSessionRequest(**paused))
                assert got.session.state == lc.SESSION_STATE_PAUSED
            finally:
                await admin.aclose()
    finally:
        redis.kill()


async def test_a_redis_that_evicts_is_named_at_start(
    tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture
):
    """memsvc needs noeviction (docs/deployment.md): another policy is logged at start."""
    redis = PrivateRedis(free_port(), tmp_path / "redis")
    redis.start()
    try:
        admin = aioredis.Redis.from_url(redis.url)
        await admin.config_set("maxmemory-policy", "allkeys-lru")
        await admin.aclose()
        with caplog.at_level(logging.WARNING, logger="memsvc"):
            async with Server(config_for(tmp_path, redis.url, postgres_url)):
                pass
        assert "maxmemory-policy allkeys-lru" in caplog.text
    finally:
        redis.kill()


async def test_a_redis_that_evicts_is_named_once_it_answers_after_the_start(
    tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture
):
    """A sidecar often starts before Redis: the policy is read, and warned of, once a
    health probe reaches Redis (before, only at start, so never then)."""
    redis = PrivateRedis(free_port(), tmp_path / "redis")
    config = replace(config_for(tmp_path, redis.url, postgres_url), health_interval_seconds=0.1)
    try:
        with caplog.at_level(logging.WARNING, logger="memsvc"):
            async with Server(config):
                redis.start()
                admin = aioredis.Redis.from_url(redis.url)
                await admin.config_set("maxmemory-policy", "allkeys-lru")
                await admin.aclose()

                async def warned() -> bool:
                    return "maxmemory-policy allkeys-lru" in caplog.text

                await eventually(warned, timeout=20)
        assert caplog.text.count("maxmemory-policy allkeys-lru") == 1
    finally:
        redis.kill()
