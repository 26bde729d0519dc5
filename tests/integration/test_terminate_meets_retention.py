"""A retention sweep running while a Terminate deletes a session's checkpoints.

The Terminate reads and locks the session's checkpoints in its first round trip,
then deletes them and announces each (CHECKPOINT_DELETED, reason "terminate"). The
sweep takes no session lock: it skips the checkpoints a call has locked, so no
checkpoint is announced twice, and the sweep never waits for the Terminate.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import grpc

from memsvc.config import Config
from memsvc.domain._watch import EventFilter
from memsvc.server import Server
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub


async def test_a_sweep_during_a_terminate_announces_no_checkpoint_twice(
    tmp_path: Path, fresh_postgres_url: str
):
    config = Config(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path),
        database_url=fresh_postgres_url,  # its own: the sweep here expires every checkpoint
        health_listen="",
        metrics_listen="",
        retention_interval_seconds=3600,
    )
    async with Server(config) as server:
        lifecycle = server.lifecycle
        assert lifecycle is not None
        memory: Any = lifecycle._memory
        snapshot = memory.begin_snapshot
        swept: list[Any] = []

        async def sweep_then_snapshot(*args: Any, **kwargs: Any) -> Any:
            if args[2] == "terminating":  # step 1 of the Terminate: its locks are held
                kept = lifecycle.retention
                lifecycle.retention = dataclasses.replace(kept, max_age_ms=0)  # all expired
                try:
                    swept.append(await lifecycle.sweep())
                finally:
                    lifecycle.retention = kept
            return await snapshot(*args, **kwargs)

        memory.begin_snapshot = sweep_then_snapshot
        scope: dict[str, Any] = {
            "project_id": str(uuid.uuid4()),
            "agent_instance_id": str(uuid.uuid4()),
            "session_id": "ending",
        }
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            life = LifecycleServiceStub(channel)
            await life.Spawn(lc.SpawnRequest(**scope))
            for name in ("a", "b"):
                await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id=name))
            await life.Terminate(lc.TerminateRequest(**scope))
        events = await server.durable_store.read_events(
            0, 100, EventFilter(project_id=scope["project_id"])
        )
    assert swept and swept[0] is not None and swept[0][0] == 0  # it left them to the Terminate
    deleted = [
        (e.event.checkpoint_id, e.event.metadata.get("reason"))
        for e in events
        if e.event.event_type.name == "CHECKPOINT_DELETED"
    ]
    assert deleted == [("a", "terminate"), ("b", "terminate")]
