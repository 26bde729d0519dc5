"""A command that the network delivers late, after memsvc gave up on it and did
the same step again on another connection.

TCP delivers what a partition held back once it heals, even after the sender
closed the connection: a Lua script that memsvc timed out on (and retried on a
new connection, as every backend call is retried) can still run afterwards. The
proxy holds memsvc's one Redis connection, lets the retry through a new one, and
releases the held bytes once the operation has completed and been acknowledged.
A late copy of a step that was already settled must change nothing: each step 1
is refused by the script itself once its operation has settled (the marker keeps
the last few settled operation ids).
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
import redis

from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from tests.faults._support import Stubs, eventually, expect_code, wait_serving
from tests.faults.conftest import RigFactory
from tests.helpers import python, value


class PreconditionFailed(RuntimeError):
    """The scenario did not unfold as designed (not the bug under test)."""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("operation", ["spawn", "resume"])
async def test_a_late_copy_of_a_settled_step_changes_nothing(make_rig: RigFactory, operation: str):
    rig = make_rig(proxies=True)
    # One Redis connection, and no health probe to use it meanwhile.
    memsvc = rig.start(args=["--redis-max-connections=1", "--health-interval-seconds=60"])
    proxy = rig.redis_proxy
    assert proxy is not None
    ids: dict[str, Any] = {"project_id": str(uuid.uuid4()), "agent_instance_id": str(uuid.uuid4()),
           "session_id": f"late-{operation}"}  # fmt: skip
    async with grpc.aio.insecure_channel(memsvc.target) as channel:
        stubs = Stubs(channel)
        await wait_serving(stubs)
        seed = [pb.EntryInput(key="a", value=value(1))]
        if operation == "resume":
            # A rollback of an ACTIVE session to a checkpoint.
            await stubs.life.Spawn(lc.SpawnRequest(**ids, initial_entries=seed), timeout=10)
            await stubs.life.CreateCheckpoint(
                lc.CreateCheckpointRequest(**ids, checkpoint_id="cp"), timeout=10
            )
            call = stubs.life.Resume(
                lc.ResumeRequest(**ids, checkpoint_id="cp", request_id=str(uuid.uuid4())),
                timeout=15,
            )
        else:
            # The pool's one connection exists before it is held.
            await expect_code(
                stubs.wm.Get(pb.GetRequest(**ids, key="a"), timeout=10), grpc.StatusCode.NOT_FOUND
            )
            call = stubs.life.Spawn(
                lc.SpawnRequest(**ids, initial_entries=seed, request_id=str(uuid.uuid4())),
                timeout=15,
            )
        proxy.hold()  # the open connection forwards nothing more, new ones pass
        accepted = proxy.accepted
        await call  # step 1 timed out on the held connection, then ran on a new one
        if proxy.accepted == accepted:
            raise PreconditionFailed("the step was not retried on a new connection")
        await stubs.wm.Set(pb.SetRequest(**ids, key="b", value=value(2)), timeout=10)
        scripts_run = scripts_run_by(rig.redis.port)
        proxy.release()  # the first copy of step 1 arrives now

        async def late_copy_ran() -> bool:
            # Nothing else runs a script meanwhile (no health probe, no call in flight).
            return scripts_run_by(rig.redis.port) > scripts_run

        try:
            await eventually(late_copy_ran, "the late copy runs", timeout=10)
        except AssertionError as error:
            raise PreconditionFailed(str(error)) from None
        # Acknowledged before the late copy: still there, also after the next write.
        assert await value_of(stubs, ids, "b") == 2
        await stubs.wm.Set(pb.SetRequest(**ids, key="c", value=value(3)), timeout=10)
        assert await value_of(stubs, ids, "b") == 2


def scripts_run_by(port: int) -> int:
    """How many EVALSHA calls the Redis on ``port`` has run (its INFO commandstats)."""
    with redis.Redis(port=port, socket_timeout=5) as client:
        stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def value_of(stubs: Stubs, ids: dict[str, Any], key: str) -> Any:
    """A key's value, or None when memsvc says it is not there (or the session is not)."""
    try:
        got = await stubs.wm.Get(pb.GetRequest(**ids, key=key), timeout=10)
    except grpc.aio.AioRpcError as error:
        if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
            return None
        raise
    return python(got.entry.value)
