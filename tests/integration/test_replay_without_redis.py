"""A retried call whose answer the database holds is answered without Redis.

The retry of a lifecycle call settles what a crash may have left in Redis, but
after answering: retries are what clients send during an outage, and an answer
the database stored must not wait on a Redis that does not respond.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from memsvc.config import Config
from memsvc.server import Server
from memsvc.testing._proxy import TcpProxy
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.conftest import REDIS_URL, need, track_project


async def test_a_replayed_answer_needs_no_redis(tmp_path: Path, postgres_url: str):
    need(REDIS_URL)
    redis = urlsplit(REDIS_URL)
    ids: dict[str, Any] = {
        "project_id": track_project(str(uuid.uuid4())),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": "replayed",
    }
    with TcpProxy(redis.port or 6379) as proxy:
        config = Config(
            listen="127.0.0.1:0",
            data_dir=str(tmp_path),
            working_memory_url=f"redis://127.0.0.1:{proxy.port}{redis.path}",
            database_url=postgres_url,
            health_listen="",
            metrics_listen="",
        )
        async with (
            Server(config) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            life = LifecycleServiceStub(channel)
            lifecycle = server.lifecycle
            assert lifecycle is not None
            spawn = lc.SpawnRequest(**ids, request_id=str(uuid.uuid4()))
            await life.Spawn(spawn)
            await life.CreateCheckpoint(lc.CreateCheckpointRequest(**ids, checkpoint_id="c"))
            delete = lc.DeleteCheckpointRequest(
                **ids, checkpoint_id="c", request_id=str(uuid.uuid4())
            )
            await life.DeleteCheckpoint(delete)
            proxy.blackhole()  # Redis stops answering (a partition)
            try:
                await life.DeleteCheckpoint(delete, timeout=3)  # the first answer, at once
                assert not len(lifecycle._heals)  # no marker step: nothing to heal
                # A burst of retries of a Spawn: answered at once, and one heal pending
                # (not one each, queued on the row lock or holding Redis connections).
                await asyncio.gather(*(life.Spawn(spawn, timeout=3) for _ in range(5)))
                assert len(lifecycle._heals) == 1
            finally:
                proxy.restore()
