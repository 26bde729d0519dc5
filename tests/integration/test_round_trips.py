"""Pause, resume and terminate cost the same round trips at 10 keys as at 10,000.

Redis: a private server's MONITOR shows every command a client sends, and marks
the ones a Lua script runs; only the client's own count. PostgreSQL: memsvc
reaches the database through a counting proxy (memsvc.testing.WireMeter), which
sees every statement and every round trip on the wire.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
import redis.asyncio as aioredis

from memsvc.config import Config
from memsvc.server import Server
from memsvc.testing import PrivateRedis, WireMeter, free_port
from memsvc.v1 import graph_checkpoint_pb2 as gpb
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.graph_checkpoint_pb2_grpc import GraphCheckpointServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import value


def through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by 127.0.0.1:``port``, TLS off."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    query = "&".join(filter(None, [parts.query, "sslmode=disable"]))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


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


Rig = tuple[Server, RedisCommands, WireMeter]


@pytest.fixture
async def rig(tmp_path: Path, postgres_url: str) -> AsyncIterator[Rig]:
    redis = PrivateRedis(free_port(), tmp_path / "redis")
    redis.start()
    meter = WireMeter(urlsplit(postgres_url).port or 5432, "postgres")
    meter.start()
    config = Config(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path),
        working_memory_url=redis.url,
        database_url=through(postgres_url, meter.port),
        # Nothing periodic may talk to the database while calls are counted.
        health_interval_seconds=3600,
        retention_interval_seconds=3600,
        max_session_keys=20_000,
        max_session_bytes=64 << 20,
        health_listen="",
        metrics_listen="",
    )
    try:
        async with Server(config) as server:
            yield server, RedisCommands(redis.url), meter
    finally:
        meter.close()
        redis.kill()


def new_scope(session_id: str) -> dict[str, Any]:
    """The ids of a session of its own (in a project of its own)."""
    return {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": session_id,
    }


async def costs(rig: Rig, keys: int, linked_thread: bool = False) -> dict[str, Any]:
    """Per operation: (Redis commands by name, PostgreSQL statements, round trips).
    With ``linked_thread``, a graph thread linked to the session (to be pruned at
    its end) is written before the Terminate."""
    server, commands, meter = rig
    scope = new_scope(f"rt-{keys}")
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
        paused: list[str] = []

        async def pause() -> None:
            reply = await life.Pause(lc.PauseRequest(**scope, request_id=rid()))
            paused.append(reply.checkpoint.checkpoint_id)

        async def rollback() -> None:
            # The ACTIVE session back to the pause's checkpoint: every entry moves.
            request = lc.ResumeRequest(**scope, checkpoint_id=paused[0], request_id=rid())
            assert (await life.Resume(request)).entries_restored == keys

        async def link_thread() -> None:
            link = gpb.GraphSessionLink(
                agent_instance_id=scope["agent_instance_id"],
                session_id=scope["session_id"],
                on_session_end=gpb.GRAPH_SESSION_END_ACTION_KEEP_LATEST,
            )
            request = gpb.PutGraphCheckpointRequest(
                project_id=scope["project_id"],
                checkpoint=gpb.GraphCheckpoint(
                    thread_id="linked",
                    checkpoint_id="c1",
                    checkpoint=gpb.TypedValue(type="json", data=b"{}"),
                    metadata_json="{}",
                ),
                options=gpb.GraphThreadOptions(session=link),
            )
            await GraphCheckpointServiceStub(channel).PutGraphCheckpoint(request)

        if linked_thread:
            await link_thread()
        # With request ids, as the SDKs send them: the claim must cost no round trip.
        for name, call in (
            ("pause", pause),
            # The paused memory still holds the checkpoint: kept, nothing moves.
            ("resume", lambda: life.Resume(lc.ResumeRequest(**scope, request_id=rid()))),
            ("rollback", rollback),
            ("terminate", lambda: life.Terminate(lc.TerminateRequest(**scope, request_id=rid()))),
        ):
            before = meter.snapshot()

            async def run(call: Any = call) -> None:
                await call()
                assert server.lifecycle is not None
                await server.lifecycle.settled()  # a Pause's step 3 runs after its answer

            redis_commands = await commands.count(run)
            database = meter.snapshot().minus(before)
            result[name] = (redis_commands, database.commands, database.round_trips)
        return result


def rid() -> str:
    return str(uuid.uuid4())


async def test_lifecycle_round_trips_do_not_grow_with_keys(rig):
    small = await costs(rig, 10)
    large = await costs(rig, 10_000)
    assert small == large, f"10 keys: {small}\n10,000 keys: {large}"
    for name, (redis_commands, statements, round_trips) in small.items():
        # Two steps: step 1, then step 3 after the commit. A step that reads the
        # working memory (Pause, and Terminate for its episode) queues HGETALL
        # and ZRANGE behind its script in one MULTI/EXEC, written and answered
        # at once (one round trip): counted here as the commands Redis ran.
        reads = {"MULTI": 1, "HGETALL": 1, "ZRANGE": 1, "EXEC": 1}
        expected = {"EVALSHA": 2, **(reads if name in ("pause", "terminate") else {})}
        assert redis_commands == expected, (name, redis_commands)
        # The request-id claim and the row lock (plus, for a Resume, the
        # checkpoint's read; for a Pause, the count of the session's checkpoints,
        # read after the lock; for a Terminate, the session's checkpoints, with a
        # paused session's resume point for the episode), then one statement for
        # every write and the event (the write batch), then the answer remembered.
        # No BEGIN or COMMIT: the pipeline's Sync ends the transaction. The
        # Terminate also announces the one checkpoint it deletes: one more event.
        assert statements == {"terminate": 6}.get(name, 5), (name, statements)
        # Pipelined: the claim and the row lock (plus, for a Resume, the
        # checkpoint; for a Terminate, whether a graph thread waits for the
        # session's end, and the resume checkpoint) in one round trip; the
        # writes and the Sync in another.
        assert round_trips == 2, (name, round_trips, small)


async def test_terminate_looks_up_linked_graph_threads_only_when_there_are_some(rig):
    """The threads' lookup is a round trip of its own, paid only by a session
    that has a linked thread, and then the same at 10 keys as at 10,000."""
    small = await costs(rig, 10, linked_thread=True)
    large = await costs(rig, 10_000, linked_thread=True)
    assert small["terminate"] == large["terminate"], (small, large)
    # The lock; the lookup; the thread's row lock and its prune (each read);
    # the writes and COMMIT. Without a linked thread, only the first and last.
    assert small["terminate"][2] == 5, small["terminate"]


async def terminate_statements(rig: Rig, checkpoints: int) -> int:
    """PostgreSQL statements of the Terminate of a session with ``checkpoints``."""
    server, _, meter = rig
    scope = new_scope(f"rt-checkpoints-{checkpoints}")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        life = LifecycleServiceStub(channel)
        await life.Spawn(lc.SpawnRequest(**scope))
        for _ in range(checkpoints):
            await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope))
        before = meter.snapshot()
        await life.Terminate(lc.TerminateRequest(**scope, request_id=rid()))
        return meter.snapshot().minus(before).commands


async def test_terminate_statements_do_not_grow_with_checkpoints(rig):
    """A Terminate announces each checkpoint it deletes, all in one statement:
    the event counter, which every writer waits for, is held for one statement
    whether the session had 1 checkpoint or 60."""
    assert await terminate_statements(rig, 1) == await terminate_statements(rig, 60)
