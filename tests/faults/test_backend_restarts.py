"""Redis and PostgreSQL stopped and restarted under traffic.

While a backend is down, calls that need it fail with UNAVAILABLE or
DEADLINE_EXCEEDED (never INTERNAL or UNKNOWN) and health says NOT_SERVING; once
it is back, memsvc recovers by itself (no restart) and nothing it acknowledged
is lost: every checkpoint, episode and event is there, complete, and the event
log is gap-free and matches what a live watcher saw.
"""

from __future__ import annotations

import grpc
import pytest

from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from tests.faults._support import (
    RETRYABLE,
    FaultRun,
    expect_code,
    under_traffic,
    wait_serving,
)
from tests.faults.conftest import RigFactory
from tests.helpers import python, value

LOST = (grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_WORKING_MEMORY_LOST")


async def expect_redis_refused(run: FaultRun) -> None:
    """What holds while Redis is down: NOT_SERVING, and working memory UNAVAILABLE."""
    stubs = run.traffic.stubs
    await wait_serving(stubs, serving=False)
    details = await expect_code(
        stubs.wm.Get(pb.GetRequest(**run.probe.ids, key="plan"), timeout=10), *RETRYABLE
    )
    if details.code == grpc.StatusCode.UNAVAILABLE:
        assert details.reason == "ERROR_REASON_BACKEND_UNAVAILABLE"
        assert details.metadata == {"backend": "working memory (Redis)"}
    # Durable reads that do not report on working memory do not need Redis.
    await stubs.life.ListCheckpoints(lc.ListCheckpointsRequest(**run.probe.ids), timeout=10)
    await run.met_by_traffic()


@pytest.mark.timeout(90)
async def test_redis_killed_and_restarted_with_its_data(make_rig: RigFactory):
    """A Redis that keeps its data (append-only file, fsync always), SIGKILLed under
    traffic: nothing is lost, working memory included."""
    rig = make_rig(redis_keeps_data=True)
    memsvc = rig.start()

    async def kill(run: FaultRun) -> None:
        rig.redis.kill()
        await expect_redis_refused(run)

    async def restart(run: FaultRun) -> None:
        rig.redis.start()

    run = await under_traffic(memsvc, kill, restart)
    assert run.failures_during(), "no call met the outage"


@pytest.mark.timeout(90)
async def test_redis_restarted_empty_reports_the_loss_and_resumes(make_rig: RigFactory):
    """A Redis that keeps nothing, SIGKILLed under traffic: the durable data is all
    there, the lost working memory is reported as WORKING_MEMORY_LOST (never served as
    an empty session), and Resume from a checkpoint restores it."""
    rig = make_rig(redis_keeps_data=False)
    memsvc = rig.start()

    async def kill(run: FaultRun) -> None:
        rig.redis.kill()
        await expect_redis_refused(run)

    async def restart(run: FaultRun) -> None:
        rig.redis.start()

    async def probe_is_lost(run: FaultRun) -> None:
        stubs, ids = run.traffic.stubs, run.probe.ids
        session = (await stubs.life.GetSession(lc.GetSessionRequest(**ids), timeout=10)).session
        assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_LOST
        assert session.state == lc.SESSION_STATE_ACTIVE
        for call in (
            stubs.wm.Get(pb.GetRequest(**ids, key="plan"), timeout=10),
            stubs.wm.Set(pb.SetRequest(**ids, key="plan", value=value(0)), timeout=10),
        ):
            details = await expect_code(call, grpc.StatusCode.FAILED_PRECONDITION)
            assert details.reason == "ERROR_REASON_WORKING_MEMORY_LOST"
        worker_probe = run.probe
        assert worker_probe.last_checkpoint is not None
        import uuid

        rid = str(uuid.uuid4())
        await stubs.life.Resume(
            lc.ResumeRequest(**ids, checkpoint_id=worker_probe.last_checkpoint, request_id=rid),
            timeout=10,
        )
        worker_probe.events.append((lc.EVENT_TYPE_SESSION_RESUMED, rid))
        got = await stubs.wm.Get(pb.GetRequest(**ids, key="plan"), timeout=10)
        assert worker_probe.memory is not None
        assert python(got.entry.value) == worker_probe.memory["plan"]

    run = await under_traffic(
        memsvc,
        kill,
        restart,
        allowed=RETRYABLE | {LOST},
        after_heal=probe_is_lost,
        working_memory_lost=True,
    )
    assert run.failures_during(), "no call met the outage"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["fast", "kill"])
async def test_postgres_restarted_under_traffic(make_rig: RigFactory, how: str):
    """PostgreSQL stopped (``fast``: sessions ended by the server; ``kill``: SIGKILL
    of every PostgreSQL process, recovery from the WAL at start) and started again."""
    rig = make_rig(redis_keeps_data=True)
    memsvc = rig.start()

    async def stop(run: FaultRun) -> None:
        if how == "kill":
            rig.postgres.kill()
        else:
            rig.postgres.stop("fast")
        stubs, probe = run.traffic.stubs, run.probe
        await wait_serving(stubs, serving=False)
        # memsvc waits for a pooled connection up to 5 s; a shorter deadline cuts it.
        details = await expect_code(
            stubs.life.GetSession(lc.GetSessionRequest(**probe.ids), timeout=2), *RETRYABLE
        )
        if details.code == grpc.StatusCode.UNAVAILABLE:
            assert details.reason == "ERROR_REASON_BACKEND_UNAVAILABLE"
        # The hot path of working memory never reads the database: it keeps working.
        await stubs.wm.Set(pb.SetRequest(**probe.ids, key="during", value=value(1)), timeout=10)
        assert probe.memory is not None
        probe.memory["during"] = 1
        got = await stubs.wm.Get(pb.GetRequest(**probe.ids, key="during"), timeout=10)
        assert python(got.entry.value) == 1
        await run.met_by_traffic()

    async def start(run: FaultRun) -> None:
        rig.postgres.start()

    run = await under_traffic(memsvc, stop, start)
    assert run.failures_during(), "no call met the outage"
