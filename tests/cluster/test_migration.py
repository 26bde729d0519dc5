"""A session's slot moves to another master while the session is in use.

Writers (Set, BatchSet), a reader (Get) and a Pause/Resume loop run through
memsvc's gRPC API against two sessions of one slot, while the slot migrates
the way ``redis-cli --cluster reshard`` moves it, one key per MIGRATE with
pauses in between so the migration lasts about a second. Every call must
succeed: during the migration Redis refuses the sessions' scripts (TRYAGAIN,
ASK) and memsvc waits for the slot to settle. Afterwards every acknowledged
write is there and the keys live on the new master.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from memsvc.config import Config
from memsvc.domain import SessionRef
from memsvc.server import Server
from memsvc.store.redis import session_keys
from memsvc.testing import PrivateRedisCluster
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.cluster._support import held_by, slot_of
from tests.cluster.conftest import start_cluster
from tests.helpers import eventually, python, value

CALL_TIMEOUT = 15.0  # seconds; bounds each call of a broken run, measures nothing


def same_slot(scope: dict[str, Any]) -> dict[str, Any]:
    """Another session of the same agent whose keys hash to the same slot."""
    wanted = slot_of(SessionRef(**scope))
    for i in itertools.count():
        candidate = {**scope, "session_id": f"lifecycle-{i}"}
        if slot_of(SessionRef(**candidate)) == wanted:
            return candidate
        if i > 1_000_000:
            break
    raise AssertionError("no session id of the same slot found")


@dataclass
class Traffic:
    """What the clients did: acknowledged writes, and any failed call."""

    acknowledged: dict[str, Any] = field(default_factory=dict)
    life_keys: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    async def call(self, name: str, call: Awaitable[Any]) -> Any:
        try:
            result = await call
        except grpc.aio.AioRpcError as error:
            self.failures.append(f"{name}: {error.code().name} {error.details()}")
            return None
        self.calls[name] = self.calls.get(name, 0) + 1
        return result


@pytest.fixture
async def cluster_server(base_config: Config, tmp_path: Path):
    """memsvc on a Redis Cluster of this test's own (its slot map changes)."""
    cluster = await asyncio.to_thread(start_cluster, tmp_path / "own-cluster")
    try:
        config = replace(base_config, working_memory_url=cluster.url)
        async with Server(config) as server:
            yield cluster, server
    finally:
        cluster.stop()


async def test_a_session_moves_to_another_master_while_it_is_used(
    cluster_server: tuple[PrivateRedisCluster, Server],
    scope: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.DEBUG, logger="memsvc.store.redis._working_memory")
    cluster, server = cluster_server
    writer_scope, life_scope = scope, same_slot(scope)
    slot = slot_of(SessionRef(**writer_scope))
    source = cluster.owner_of(slot)
    target = next(port for port in cluster.ports if port != source)
    traffic = Traffic()
    stop = asyncio.Event()
    hour = duration_pb2.Duration(seconds=3600)

    async with (
        asyncio.timeout(60),
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        wm, life = WorkingMemoryServiceStub(channel), LifecycleServiceStub(channel)
        for each in (writer_scope, life_scope):
            await life.Spawn(lc.SpawnRequest(**each), timeout=CALL_TIMEOUT)
        await wm.Set(pb.SetRequest(**life_scope, key="seed", value=value(0), ttl=hour))
        traffic.life_keys.append("seed")

        async def setter() -> None:
            for i in itertools.count():
                key = f"set-{i}"
                request = pb.SetRequest(**writer_scope, key=key, value=value({"i": i}))
                if await traffic.call("Set", wm.Set(request, timeout=CALL_TIMEOUT)):
                    traffic.acknowledged[key] = {"i": i}
                if stop.is_set():
                    return

        async def batcher() -> None:
            for j in itertools.count():
                entries = {f"batch-{j}-{n}": [j, n] for n in range(5)}
                request = pb.BatchSetRequest(
                    **writer_scope,
                    entries=[
                        pb.EntryInput(key=key, value=value(item), ttl=hour if item[1] else None)
                        for key, item in entries.items()
                    ],
                )
                if await traffic.call("BatchSet", wm.BatchSet(request, timeout=CALL_TIMEOUT)):
                    traffic.acknowledged.update(entries)
                if stop.is_set():
                    return

        async def getter() -> None:
            while not stop.is_set():
                if not traffic.acknowledged:
                    await asyncio.sleep(0.01)
                    continue
                key = random.choice(list(traffic.acknowledged))
                request = pb.GetRequest(**writer_scope, key=key)
                got = await traffic.call("Get", wm.Get(request, timeout=CALL_TIMEOUT))
                if got is not None and python(got.entry.value) != traffic.acknowledged[key]:
                    traffic.failures.append(f"Get {key}: {python(got.entry.value)!r}")

        async def pause_resume() -> None:
            for k in itertools.count():
                pause = lc.PauseRequest(**life_scope)
                if not await traffic.call("Pause", life.Pause(pause, timeout=CALL_TIMEOUT)):
                    return
                resume = lc.ResumeRequest(**life_scope)
                if not await traffic.call("Resume", life.Resume(resume, timeout=CALL_TIMEOUT)):
                    return
                request = pb.SetRequest(**life_scope, key=f"life-{k}", value=value(k))
                if await traffic.call("Set", wm.Set(request, timeout=CALL_TIMEOUT)):
                    traffic.life_keys.append(f"life-{k}")
                if stop.is_set():
                    return

        kinds = ("Set", "BatchSet", "Get", "Pause", "Resume")

        def every_kind_ran(since: dict[str, int]) -> Callable[[], Awaitable[bool]]:
            async def ran() -> bool:
                return all(traffic.calls.get(name, 0) > since.get(name, 0) for name in kinds)

            return ran

        clients = [asyncio.create_task(run()) for run in (setter, batcher, getter, pause_resume)]
        try:
            # Each kind of call runs before the migration and again after it,
            # whatever the machine's speed (polled, not slept).
            await eventually(every_kind_ran({}), timeout=30)
            before = dict(traffic.calls)
            await cluster.migrate_slot(slot, target, batch=1, pause_seconds=0.1)
            during = dict(traffic.calls)
            await eventually(every_kind_ran(during), timeout=30)
        finally:
            stop.set()
            await asyncio.gather(*clients)

        assert traffic.failures == []
        # Every kind of call ran before the migration and again after it.
        for name in kinds:
            assert 0 < before.get(name, 0) <= during.get(name, 0) < traffic.calls[name], name
        # ... and met it: memsvc waited for the moving slot.
        assert any("slot moving" in record.getMessage() for record in caplog.records)

        stored = await all_entries(wm, writer_scope)
        assert {key: stored.get(key) for key in traffic.acknowledged} == traffic.acknowledged
        life_stored = await all_entries(wm, life_scope)
        assert set(traffic.life_keys) <= set(life_stored)
        session = await life.GetSession(lc.GetSessionRequest(**life_scope))
        assert session.session.state == lc.SESSION_STATE_ACTIVE

    # The slot, and both sessions with it, now live on the new master only.
    assert all(cluster.owner_of(slot, port) == target for port in cluster.ports)
    assert cluster.keys_in_slot(slot, source) == 0
    for each in (writer_scope, life_scope):
        data_key = session_keys(SessionRef(**each))[0]
        assert held_by(source, data_key) is None
        assert held_by(target, data_key)


async def all_entries(wm: WorkingMemoryServiceStub, scope: dict[str, Any]) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    token = ""
    while True:
        page = await wm.ListEntries(
            pb.ListEntriesRequest(**scope, page_size=1000, page_token=token),
            timeout=CALL_TIMEOUT,
        )
        entries.update({entry.key: python(entry.value) for entry in page.entries})
        token = page.next_page_token
        if not token:
            return entries
