"""The network between memsvc and each backend slowed, blackholed, reset or refused,
by a TCP proxy the test controls, under traffic.

While the fault lasts, calls fail only with UNAVAILABLE or DEADLINE_EXCEEDED (a
slow network may also let them succeed); afterwards memsvc recovers by itself and
nothing it acknowledged is lost (see ``under_traffic`` and ``audit``).
"""

from __future__ import annotations

import asyncio

import pytest

from memsvc.testing._proxy import TcpProxy
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from tests.faults._support import (
    RETRYABLE,
    FaultRun,
    MemsvcProcess,
    expect_code,
    under_traffic,
    wait_serving,
)
from tests.faults.conftest import Rig, RigFactory

BACKENDS = ["redis", "postgres"]
# Per direction, so a round trip takes twice as long. A lifecycle call makes two
# Redis round trips and about ten PostgreSQL ones, within a 3 s deadline.
LATENCY = {"redis": 0.2, "postgres": 0.05}


def proxy_of(rig: Rig, backend: str) -> TcpProxy:
    proxy = rig.redis_proxy if backend == "redis" else rig.postgres_proxy
    assert proxy is not None
    return proxy


async def expect_unreachable(run: FaultRun, backend: str) -> None:
    """While a backend cannot be reached: NOT_SERVING, and calls that need it fail
    with a retryable code."""
    stubs, ids = run.traffic.stubs, run.probe.ids
    await wait_serving(stubs, serving=False)
    if backend == "redis":
        call = stubs.wm.Get(pb.GetRequest(**ids, key="plan"), timeout=2)
    else:
        call = stubs.life.ListCheckpoints(lc.ListCheckpointsRequest(**ids), timeout=2)
    await expect_code(call, *RETRYABLE)
    await run.met_by_traffic()


def redis_retries(memsvc: MemsvcProcess) -> int:
    """How many times memsvc has logged retrying a Redis call."""
    return memsvc.log_path.read_text().count("working memory (Redis) backend error, retrying")


@pytest.fixture
def rig(make_rig: RigFactory) -> Rig:
    rig = make_rig(redis_keeps_data=True, proxies=True)
    rig.start()
    return rig


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_slow_network(rig: Rig, backend: str):
    """Every byte late: calls get slower (or past their deadline), nothing breaks."""
    proxy = proxy_of(rig, backend)
    assert rig.memsvc is not None

    async def slow(run: FaultRun) -> None:
        proxy.delay(LATENCY[backend])
        # Work goes on over the slow network.
        await run.traffic.progress(1, timeout=45, what="over the slow network")

    async def fast(run: FaultRun) -> None:
        proxy.restore()

    await under_traffic(rig.memsvc, slow, fast)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_blackholed_network(rig: Rig, backend: str):
    """Connections accepted but nothing delivered, open and new ones alike (the
    blackholed connections are reset when the network comes back)."""
    proxy = proxy_of(rig, backend)
    assert rig.memsvc is not None

    async def blackhole(run: FaultRun) -> None:
        proxy.blackhole()
        await expect_unreachable(run, backend)

    async def restore(run: FaultRun) -> None:
        proxy.restore()

    run = await under_traffic(rig.memsvc, blackhole, restore)
    assert run.failures_during(), "no call met the blackhole"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_connections_reset(rig: Rig, backend: str):
    """Every open connection reset (TCP RST) again and again for a while: in-flight
    calls fail or are retried, and no half-done operation survives.

    PostgreSQL connections are reset only between a request and its answer's end
    (``idle_only``), which still breaks transactions midway; a COMMIT whose answer is
    lost is covered deterministically, for every operation, by
    test_lost_commit_replies.py."""
    proxy = proxy_of(rig, backend)
    memsvc = rig.memsvc
    assert memsvc is not None
    resets = 0

    async def reset(run: FaultRun) -> None:
        nonlocal resets
        retried_before = redis_retries(memsvc)
        for _ in range(12):
            resets += proxy.reset(idle_only=backend == "postgres")
            await asyncio.sleep(0.15)
        if backend == "postgres":
            # A reset between a transaction's statements breaks it midway: memsvc
            # cannot know its outcome, so the call fails (UNAVAILABLE), not retried.
            await run.met_by_traffic()
        else:
            # memsvc retries a Redis call whose connection was reset, so no call need
            # fail: its log shows that the resets met calls in flight.
            assert redis_retries(memsvc) > retried_before, "no Redis call met a reset"
        await run.traffic.progress(0)

    async def nothing(run: FaultRun) -> None:
        pass

    await under_traffic(memsvc, reset, nothing)
    assert resets, "no connection was open to reset"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_connections_refused(rig: Rig, backend: str):
    """The backend's host refuses connections (open ones reset): as a backend that is
    down, without the backend knowing."""
    proxy = proxy_of(rig, backend)
    assert rig.memsvc is not None

    async def refuse(run: FaultRun) -> None:
        proxy.refuse()
        proxy.reset()
        await expect_unreachable(run, backend)

    async def accept(run: FaultRun) -> None:
        proxy.restore()

    run = await under_traffic(rig.memsvc, refuse, accept)
    assert run.failures_during(), "no call met the refusal"
