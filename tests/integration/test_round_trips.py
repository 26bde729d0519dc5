"""Pause, resume and terminate cost the same round trips at 10 keys as at 10,000.

Redis: a private server's MONITOR shows every command a client sends, and marks
the ones a Lua script runs; only the client's own count. PostgreSQL: the
durable store's connection is wrapped to count the statements memsvc sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from memsvc.config import Config
from memsvc.server import Server
from memsvc.store.postgres import PostgresDurableStore
from memsvc.testing import PrivateRedis, free_port
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import value


class CountingPostgres(PostgresDurableStore):
    """The PostgreSQL store, counting the statements its transactions send."""

    statements = 0

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        async with super().transaction() as transaction:
            tx: Any = transaction
            inner = tx._conn
            store = self

            class Counting:
                async def execute(self, sql: Any, params: Any = (), **options: Any) -> Any:
                    store.statements += 1
                    return await inner.execute(sql, params, **options)

            tx._conn = Counting()
            # BEGIN and COMMIT are one round trip each, around what is counted.
            store.statements += 2
            yield tx


class RedisCommands:
    """Counts the commands clients send to a Redis, script internals excluded."""

    def __init__(self, url: str) -> None:
        self._url = url

    async def count(self, operation: Any) -> dict[str, int]:
        sentinel = f"sentinel-{uuid.uuid4().hex}"
        seen: dict[str, int] = {}
        client = aioredis.Redis.from_url(self._url)
        ready = asyncio.Event()

        async def listen() -> None:
            async with client.monitor() as monitor:
                ready.set()
                async for info in monitor.listen():
                    command = info["command"]
                    if sentinel in command:
                        return
                    name = command.split()[0].upper()
                    if info.get("client_type") == "lua" or name in ("PING", "ECHO"):
                        continue
                    seen[name] = seen.get(name, 0) + 1

        other = aioredis.Redis.from_url(self._url)
        await other.ping()  # connect now, so its handshake is not counted
        listener = asyncio.create_task(listen())
        await ready.wait()
        await asyncio.sleep(0.05)
        await operation()
        await other.echo(sentinel)
        await other.aclose()
        await asyncio.wait_for(listener, 30)
        await client.aclose()
        return seen


@pytest.fixture
async def rig(tmp_path: Path, postgres_url: str) -> AsyncIterator[tuple[Server, RedisCommands]]:
    redis = PrivateRedis(free_port(), tmp_path / "redis")
    redis.start()
    config = Config(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path),
        working_memory_url=redis.url,
        database_url=postgres_url,
        health_interval_seconds=30,
        max_session_keys=20_000,
        max_session_bytes=64 << 20,
        health_listen="",
        metrics_listen="",
    )
    try:
        async with Server(config, durable=CountingPostgres(postgres_url)) as server:
            yield server, RedisCommands(redis.url)
    finally:
        redis.kill()


async def costs(server: Server, commands: RedisCommands, keys: int) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": f"rt-{keys}",
    }
    database = server.durable_store
    assert isinstance(database, CountingPostgres)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        life = LifecycleServiceStub(channel)
        wm = WorkingMemoryServiceStub(channel)
        await life.Spawn(lc.SpawnRequest(**scope))
        big = value({"payload": "x" * 180})
        for start in range(0, keys, 1000):
            entries = [
                pb.EntryInput(key=f"key-{i:05d}", value=big)
                for i in range(start, min(keys, start + 1000))
            ]
            await wm.BatchSet(pb.BatchSetRequest(**scope, entries=entries))
        result: dict[str, Any] = {}
        for name, call in (
            ("pause", lambda: life.Pause(lc.PauseRequest(**scope))),
            ("resume", lambda: life.Resume(lc.ResumeRequest(**scope))),
            ("terminate", lambda: life.Terminate(lc.TerminateRequest(**scope))),
        ):
            before = database.statements

            async def run(call: Any = call) -> None:
                await call()

            redis_commands = await commands.count(run)
            result[name] = (redis_commands, database.statements - before)
        return result


async def test_lifecycle_round_trips_do_not_grow_with_keys(rig):
    server, commands = rig
    small = await costs(server, commands, 10)
    large = await costs(server, commands, 10_000)
    assert small == large, f"10 keys: {small}\n10,000 keys: {large}"
    for name, (redis_commands, statements) in small.items():
        assert redis_commands == {"EVALSHA": 2}, (name, redis_commands)
        assert statements <= 8, (name, statements)
