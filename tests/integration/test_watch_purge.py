"""Once PurgeData has answered, no watch stream gets a purged event in its old form.

A stream that reads slowly holds events in its hub queue (up to a thousand), and
one catching up holds a batch read from the store: before, these went out as they
were read, ids and metadata included, after the purge had made them tombstones in
the log. The hub now makes tombstones of what it holds when told of a purge: by
the Purger in its own process, by a NOTIFY on other replicas (PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf import struct_pb2

from memsvc.config import Config
from memsvc.domain import SessionRef
from memsvc.domain._watch import EventFilter, EventHub, StoredEvent
from memsvc.server import Server
from memsvc.v1 import data_removal_pb2 as dr
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.data_removal_pb2_grpc import DataRemovalServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.helpers import eventually
from tests.integration.test_watch_hub import joined

SECRET = {"secret": "what a purge must forget"}
SPAWNS = 12


class Rig:
    """A server, its hub and stubs on one channel."""

    def __init__(self, server: Server, channel: grpc.aio.Channel) -> None:
        assert server.hub is not None
        self.server, self.hub = server, server.hub
        self.life = LifecycleServiceStub(channel)
        self.removal = DataRemovalServiceStub(channel)

    async def spawn(self, project: str, count: int) -> None:
        metadata = struct_pb2.Struct()
        metadata.update(SECRET)
        for _ in range(count):
            await self.life.Spawn(
                lc.SpawnRequest(
                    project_id=project,
                    agent_instance_id=str(uuid.uuid4()),
                    session_id="told-secrets",
                    metadata=metadata,
                )
            )

    async def purge(self, project: str) -> None:
        purged = await self.removal.PurgeData(dr.PurgeDataRequest(project_id=project))
        assert purged.events_tombstoned >= SPAWNS


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[Rig]:
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield Rig(server, channel)


def watch(hub: EventHub, event_filter: EventFilter, after: int | None = None) -> Any:
    return hub.watch(event_filter, after, progress_interval=60, from_oldest=after == 0)


async def events(stream: Any, count: int) -> list[StoredEvent]:
    """The next ``count`` events of a hub stream (asked one per list)."""
    got: list[StoredEvent] = []
    while len(got) < count:
        item = await asyncio.wait_for(anext(stream), 10)
        if isinstance(item, list):
            got += item
    return got


def assert_forgotten(got: list[StoredEvent], project: str) -> None:
    for stored in got:
        assert stored.event.ref.project_id != project, stored
        assert stored.event.metadata != SECRET, stored
        assert stored.event.purged, stored


async def test_events_a_slow_stream_holds_are_tombstones_after_a_purge(local_config: Config):
    project = str(uuid.uuid4())
    async with serving(local_config) as rig:
        everything = watch(rig.hub, EventFilter())
        scoped = watch(rig.hub, EventFilter(project_id=project))
        for stream in (everything, scoped):
            await anext(stream)  # the start position
        # Each takes its first event when it comes, and holds the rest in its queue.
        firsts = [asyncio.ensure_future(events(stream, 1)) for stream in (everything, scoped)]
        await joined(rig.hub, 2)
        await rig.spawn(project, SPAWNS)
        for first in firsts:
            assert (await first)[0].event.metadata == SECRET  # delivered before the purge
        await rig.purge(project)
        # The queues' byte counts follow: each tombstone weighed as it now is.
        for subscriber in rig.hub._subscribers:
            weights = [stored.event.size() for stored in subscriber.queue]
            assert list(subscriber.weights) == weights
            assert subscriber.queued_bytes == sum(weights)
        held = await events(everything, SPAWNS - 1)
        assert_forgotten(held, project)
        # The form the hub gives them is the log's (domain and SQL agree).
        start, end = held[0].sequence - 1, held[-1].sequence
        logged = await rig.server.durable_store.read_events(start, SPAWNS, EventFilter(), end)
        assert logged == held
        # The scoped stream's filter no longer matches them: its next event is the
        # project's next.
        await rig.spawn(project, 1)
        (after,) = await events(scoped, 1)
        assert after.event.ref.project_id == project and not after.event.purged
        for stream in (everything, scoped):
            await stream.aclose()


async def test_what_a_catch_up_holds_is_made_tombstones_by_a_purge(local_config: Config):
    project = str(uuid.uuid4())
    async with serving(local_config) as rig:
        await rig.spawn(project, SPAWNS)
        stream = watch(rig.hub, EventFilter(), after=0)  # catches up from the oldest
        await anext(stream)
        (first,) = await events(stream, 1)
        assert first.event.metadata == SECRET  # the batch it came with is held
        await rig.purge(project)
        assert_forgotten(await events(stream, SPAWNS - 1), project)
        await stream.aclose()


async def test_another_replica_is_told_of_the_purge(fresh_postgres_url: str, tmp_path: Any):
    project = str(uuid.uuid4())
    config = Config(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path / "a"),
        database_url=fresh_postgres_url,
        health_listen="",
        metrics_listen="",
    )
    async with (
        serving(config) as purging,
        serving(replace(config, data_dir=str(tmp_path / "b"))) as watching,
    ):
        told = asyncio.Event()
        hub_purged: Callable[[SessionRef, int | None], None] = watching.hub.purged

        def purged(scope: SessionRef, up_to: int | None = None) -> None:
            hub_purged(scope, up_to)
            told.set()

        watching.hub.purged = purged  # type: ignore[method-assign]
        stream = watch(watching.hub, EventFilter())
        await anext(stream)
        first = asyncio.ensure_future(events(stream, 1))
        await joined(watching.hub, 1)
        await purging.spawn(project, SPAWNS)
        assert (await first)[0].event.metadata == SECRET
        # Every event reached the watching replica's queue before the purge.
        _, latest = await purging.server.durable_store.event_bounds()

        async def all_offered() -> bool:
            return watching.hub.position >= latest

        await eventually(all_offered)
        await purging.purge(project)
        async with asyncio.timeout(10):
            await told.wait()
        assert_forgotten(await events(stream, SPAWNS - 1), project)
        await stream.aclose()
