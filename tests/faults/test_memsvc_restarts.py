"""memsvc itself SIGKILLed under traffic, at whatever point each call has reached,
and started again.

Unlike the failpoint crashes of test_crash_boundaries.py, the moment is not chosen:
calls may die before, inside or after their transaction. While memsvc is down,
calls fail with UNAVAILABLE; once it is back, the clients' retries (same request
id) complete every call exactly once and nothing acknowledged is lost.
"""

from __future__ import annotations

import grpc
import pytest

from memsvc.v1 import working_memory_pb2 as pb
from tests.faults._support import FaultRun, expect_code, under_traffic, wait_serving
from tests.faults.conftest import RigFactory


@pytest.mark.timeout(90)
async def test_memsvc_killed_twice_under_traffic(make_rig: RigFactory):
    rig = make_rig(redis_keeps_data=True)
    memsvc = rig.start()

    async def kill(run: FaultRun) -> None:
        for _ in range(2):
            assert memsvc.kill() == -9
            await expect_code(
                run.traffic.stubs.wm.Get(pb.GetRequest(**run.probe.ids, key="plan"), timeout=2),
                grpc.StatusCode.UNAVAILABLE,
            )
            await run.met_by_traffic()
            memsvc.start()
            await wait_serving(run.traffic.stubs)
            await run.traffic.progress(1, what="after a restart")
        assert memsvc.kill() == -9

    async def start(run: FaultRun) -> None:
        memsvc.start()

    run = await under_traffic(memsvc, kill, start)
    assert run.failures_during(), "no call met the crashes"
