"""A lifecycle call cancelled while it undoes its working-memory step leaves no
transitional marker behind.

A call's deadline ends it twice: memsvc's own retry budget turns into the failure
that starts the undo, and gRPC cancels the handler a moment later. Found by a
review: the undo ran in the handler, so that cancellation cut it short (2 undos in
5 under load), leaving the marker transitional until a later call healed it (a
Spawn's until its id was spawned again). It runs as work of its own now.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import grpc

from memsvc.domain import SessionRef
from memsvc.server import Server
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.helpers import eventually, local_server_config


async def test_an_undo_is_not_cut_short_by_its_calls_cancellation(tmp_path: Path, monkeypatch):
    config = local_server_config(tmp_path, failpoints="pause.after_prepare=error")
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        life = LifecycleServiceStub(channel)
        ids: dict[str, Any] = {
            "project_id": str(uuid.uuid4()),
            "agent_instance_id": str(uuid.uuid4()),
            "session_id": "s",
        }
        ref = SessionRef(**ids)
        await life.Spawn(lc.SpawnRequest(**ids))
        assert server.lifecycle is not None
        memory: Any = server.lifecycle._memory
        undoing, go_on = asyncio.Event(), asyncio.Event()
        abort = memory.abort

        async def slow_abort(*args: Any) -> Any:
            undoing.set()
            await go_on.wait()  # as a Redis that answers slowly
            return await abort(*args)

        monkeypatch.setattr(memory, "abort", slow_abort)
        call = life.Pause(lc.PauseRequest(**ids))
        await asyncio.wait_for(undoing.wait(), 10)
        call.cancel()

        async def handler_ended() -> bool:
            return server._calls.unary_in_flight == 0

        await eventually(handler_ended)
        go_on.set()

        async def marker_settled() -> bool:
            marker = await memory.read_marker(ref)
            return marker is not None and marker.state == "active"

        await eventually(marker_settled)  # before: "pausing", until a call healed it
