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
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.conftest import REDIS_URL, need
from tests.helpers import expect_error, python, value

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
    need(REDIS_URL)
    ids: dict[str, Any] = {"project_id": str(uuid.uuid4()), "agent_instance_id": str(uuid.uuid4()),
                           "session_id": "crash"}  # fmt: skip
    port = free_port()
    process = serve(port, tmp_path, fresh_postgres_url, f"{point}=crash")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
            await life.Spawn(lc.SpawnRequest(**ids))
            await wm.Set(pb.SetRequest(**ids, key="k", value=value("before")))
            if point.startswith("resume"):
                await life.Pause(lc.PauseRequest(**ids))
                call = life.Resume(lc.ResumeRequest(**ids), timeout=10)
            else:
                call = life.Pause(lc.PauseRequest(**ids), timeout=10)
            await expect_error(call, grpc.StatusCode.UNAVAILABLE)
        assert await asyncio.to_thread(process.wait, 30) == CRASH_EXIT_STATUS
        process = serve(port, tmp_path, fresh_postgres_url)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
            session = (await life.GetSession(lc.GetSessionRequest(**ids))).session
            assert session.state == state_after
            got = await wm.Get(pb.GetRequest(**ids, key="k"))
            assert python(got.entry.value) == "before"
            write = wm.Set(pb.SetRequest(**ids, key="k", value=value("after")))
            if state_after == lc.SESSION_STATE_ACTIVE:
                await write
            else:
                await expect_error(write, grpc.StatusCode.FAILED_PRECONDITION)
                await life.Resume(lc.ResumeRequest(**ids))
                await wm.Set(pb.SetRequest(**ids, key="k", value=value("after")))
            assert python((await wm.Get(pb.GetRequest(**ids, key="k"))).entry.value) == "after"
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 30)
        client = aioredis.Redis.from_url(REDIS_URL)
        ref = SessionRef(**ids)
        await client.delete(*session_keys(ref), *[f"{k}'" for k in session_keys(ref)[:3]])
        await client.aclose()
