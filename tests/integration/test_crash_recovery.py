"""A memsvc killed exactly between the Redis step and the database step (or just after
the commit) recovers when it starts again: the session is in its old state or its new
one, never a mix. The failpoints' ``crash`` action exits the process on the spot."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from memsvc.domain import SessionRef
from memsvc.failpoints import CRASH_EXIT_STATUS
from memsvc.store.redis import session_keys
from memsvc.testing import free_port, wait_for_port
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.conftest import REDIS_URL, need
from tests.contract.test_lifecycle_faults import apply, check, ours, prepare, the_call
from tests.helpers import expect_error, lifecycle_log

MEMSVC = str(Path(sys.executable).parent / "memsvc")


def serve(
    port: int, tmp_path: Path, database_url: str, failpoints: str = ""
) -> subprocess.Popen[bytes]:
    args = [MEMSVC, "serve", "--health-listen=", "--metrics-listen=",
            "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path),
            "--working-memory-url", REDIS_URL, "--database-url", database_url]  # fmt: skip
    if failpoints:
        args += ["--failpoints", failpoints]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
    process = subprocess.Popen(args, stderr=subprocess.DEVNULL, env=env)
    wait_for_port(port, timeout=30)
    return process


@pytest.mark.parametrize(
    ("point", "state_after"),
    [
        ("pause.after_prepare", lc.SESSION_STATE_ACTIVE),
        ("pause.before_finish", lc.SESSION_STATE_PAUSED),
        ("resume.after_prepare", lc.SESSION_STATE_PAUSED),
        ("resume.before_finish", lc.SESSION_STATE_ACTIVE),
    ],
)
async def test_killed_mid_operation_recovers_on_restart(
    tmp_path, fresh_postgres_url, point, state_after
):
    """The session takes a "seed" checkpoint, then changes a key and adds others;
    the Pause snapshots that later memory, the Resume rolls back to the seed. After
    the restart the whole memory, the checkpoints, the event log and the state are
    exactly the old ones or exactly the new ones, and a retry with the same request
    id completes the call with one effect (tests/faults/test_crash_boundaries.py
    adds spawn, terminate and private backends)."""
    need(REDIS_URL)
    ids: dict[str, Any] = {"project_id": str(uuid.uuid4()), "agent_instance_id": str(uuid.uuid4()),
                           "session_id": "crash"}  # fmt: skip
    operation, when = point.split(".")
    committed = when == "before_finish"
    request_id = str(uuid.uuid4())
    port = free_port()
    process = serve(port, tmp_path, fresh_postgres_url, f"{point}=crash")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
            model = await prepare(life, wm, ids, operation)
            await check(life, wm, channel, fresh_postgres_url, ids, model)
            call = the_call(life, ids, operation, request_id)
            await expect_error(call, grpc.StatusCode.UNAVAILABLE)
        assert await asyncio.to_thread(process.wait, 30) == CRASH_EXIT_STATUS
        process = serve(port, tmp_path, fresh_postgres_url)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
            # Only the event log says what the crashed call did: its answer was lost.
            mine = ours(await lifecycle_log(fresh_postgres_url, ids), request_id)
            assert len(mine) == (1 if committed else 0)
            if committed:
                apply(model, operation, request_id, mine[0].ref or "")
            assert model.state == state_after
            await check(life, wm, channel, fresh_postgres_url, ids, model)

            # The client retries with the same request id: one effect in all.
            reply = await the_call(life, ids, operation, request_id)
            if not committed:
                mine = ours(await lifecycle_log(fresh_postgres_url, ids), request_id)
                assert len(mine) == 1
                apply(model, operation, request_id, mine[0].ref or "")
            assert reply.checkpoint.checkpoint_id == (
                model.resume_checkpoint if operation == "pause" else "seed"
            )
            log = await check(life, wm, channel, fresh_postgres_url, ids, model)
            assert await the_call(life, ids, operation, request_id) == reply
            assert await lifecycle_log(fresh_postgres_url, ids) == log
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 30)
        client = aioredis.Redis.from_url(REDIS_URL)
        ref = SessionRef(**ids)
        await client.delete(*session_keys(ref), *[f"{k}'" for k in session_keys(ref)[:3]])
        await client.aclose()
