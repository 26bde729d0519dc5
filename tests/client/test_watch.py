"""watch(): reconnects and resumes after the last sequence, never repeating or skipping.

Waits are bounded by timeouts that only catch a broken test; nothing is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from memsvc.client import (
    AsyncClient,
    Cancelled,
    Client,
    EventType,
    InvalidArgument,
    LifecycleEvent,
    RetryPolicy,
    Unavailable,
    WatchPositionCompacted,
    WatchProgress,
)
from memsvc.config import Config
from memsvc.server import Server
from memsvc.testing import free_port
from memsvc.v1 import lifecycle_pb2
from tests.client._proxy import FaultProxy
from tests.client.conftest import FAST_RETRY
from tests.conftest import Deployment, track_project
from tests.helpers import eventually

WAIT = 20.0


async def take(events: Any, count: int) -> list[LifecycleEvent]:
    """The next ``count`` events of a watch (progress messages skipped)."""
    got: list[LifecycleEvent] = []
    while len(got) < count:
        item = await asyncio.wait_for(anext(events), WAIT)
        if isinstance(item, LifecycleEvent):
            got.append(item)
    return got


def assert_once_in_order(events: list[LifecycleEvent]) -> None:
    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences)), sequences
    assert len({e.event_id for e in events}) == len(events)


async def test_watch_resumes_across_a_server_restart(
    server: Server, scope: dict[str, str], auth_token: str
):
    """Stop memsvc mid-stream, start a new one on the same port and stores, keep
    writing: the watcher gets every event exactly once, in order."""
    project, agent = scope["project_id"], scope["agent_instance_id"]
    target = f"127.0.0.1:{server.port}"
    config = replace(server.config, listen=target)
    written: list[str] = []

    async def spawn(writer: AsyncClient, name: str) -> None:
        await writer.session(project, agent, name).spawn()
        written.append(name)

    async with (
        AsyncClient(target, retry=FAST_RETRY, token=auth_token) as watcher,
        AsyncClient(target, retry=FAST_RETRY, timeout=30, token=auth_token) as writer,
        watcher.watch(project, progress_interval=0.2) as events,
    ):
        for i in range(3):
            await spawn(writer, f"before-{i}")
        received = await take(events, 2)  # one spawn stays unread when the server stops
        for i in range(2):
            await spawn(writer, f"unread-{i}")
        await server.stop()
        restarted = Server(config)
        await restarted.start()
        try:
            for i in range(3):
                await spawn(writer, f"after-{i}")
            received += await take(events, len(written) - len(received))
            # Nothing more arrives: a duplicate would show up here.
            await spawn(writer, "last")
            received += await take(events, 1)
        finally:
            await restarted.stop()
    assert [e.session_id for e in received] == written
    assert all(e.event_type is EventType.SESSION_SPAWNED for e in received)
    assert_once_in_order(received)
    assert events.connections >= 2
    assert events.sequence == received[-1].sequence


@pytest.fixture
async def proxy(server: Server) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(f"127.0.0.1:{server.port}") as running:
        yield running


async def test_watch_resumes_after_an_outage_from_its_progress_cursor(
    proxy: FaultProxy, client: AsyncClient, scope: dict[str, str], auth_token: str
):
    """Events committed while the watcher cannot connect arrive after it reconnects,
    and progress messages (for events its filter skips) advance its cursor."""
    project, agent = scope["project_id"], scope["agent_instance_id"]
    watched = client.session(project, agent, "watched")
    other = client.session(project, agent, "other")
    items: list[LifecycleEvent | WatchProgress] = []

    async with (
        AsyncClient(proxy.target, retry=FAST_RETRY, token=auth_token) as via_proxy,
        client.watch(project) as everything,
        via_proxy.watch(
            project, session_id="watched", progress_interval=0.1, include_progress=True
        ) as events,
    ):

        async def consume() -> None:
            async for item in events:
                items.append(item)

        consumer = asyncio.create_task(consume())
        try:
            await watched.spawn()
            await other.spawn()  # not matched: only progress covers it
            _, other_spawned = await take(everything, 2)

            async def progressed_past_other() -> bool:
                return (events.sequence or 0) >= other_spawned.sequence

            await eventually(progressed_past_other, timeout=WAIT)
            proxy.refuse()
            assert proxy.cut_streams() == 1
            await watched.pause()  # committed during the outage
            await other.pause()
            await watched.resume()
            connects_before = len(proxy.calls("WatchLifecycle"))

            async def tried_to_reconnect() -> bool:
                return len(proxy.calls("WatchLifecycle")) > connects_before

            await eventually(tried_to_reconnect, timeout=WAIT)
            proxy.accept()

            def matched() -> list[LifecycleEvent]:
                return [i for i in items if isinstance(i, LifecycleEvent)]

            async def all_arrived() -> bool:
                return len(matched()) >= 3

            await eventually(all_arrived, timeout=WAIT)
            await watched.terminate()

            async def terminated_arrived() -> bool:
                return len(matched()) >= 5

            await eventually(terminated_arrived, timeout=WAIT)
        finally:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
    events_seen = [i for i in items if isinstance(i, LifecycleEvent)]
    assert [e.event_type for e in events_seen] == [
        EventType.SESSION_SPAWNED,
        EventType.SESSION_PAUSED,
        EventType.SESSION_RESUMED,
        EventType.CHECKPOINT_DELETED,  # the Pause's, by the Terminate
        EventType.SESSION_TERMINATED,
    ]
    assert {e.session_id for e in events_seen} == {"watched"}
    assert_once_in_order(events_seen)
    # Every reconnection resumed after the progress cursor, past the other session's event.
    reconnects = proxy.calls("WatchLifecycle")[1:]
    assert reconnects
    assert all(c.request.after_sequence >= other_spawned.sequence for c in reconnects)
    cursors = [i.sequence for i in items]
    assert cursors == sorted(cursors)


async def test_a_silent_stream_is_replaced(
    proxy: FaultProxy, client: AsyncClient, scope: dict[str, str], auth_token: str
):
    """A stream that stays open but says nothing for three progress intervals (a dead
    peer) is dropped and reopened from the cursor."""
    project, agent = scope["project_id"], scope["agent_instance_id"]
    async with (
        AsyncClient(proxy.target, retry=FAST_RETRY, token=auth_token) as via_proxy,
        via_proxy.watch(project, progress_interval=0.1) as events,
    ):
        await client.session(project, agent, "a").spawn()
        received = await take(events, 1)
        assert proxy.stall_streams() == 1
        await client.session(project, agent, "b").spawn()
        received += await take(events, 1)
    assert [e.session_id for e in received] == ["a", "b"]
    assert events.connections == 2
    assert proxy.calls("WatchLifecycle")[1].request.after_sequence >= received[0].sequence


async def test_a_stream_the_other_side_cancels_is_resumed(
    proxy: FaultProxy, client: AsyncClient, scope: dict[str, str], auth_token: str
):
    """A proxy (Envoy) resetting the stream ends it with CANCELLED: the watch resumes
    from its cursor, as after UNAVAILABLE. A cancel of the client's own (here, its
    close) still ends the watch at once."""
    project, agent = scope["project_id"], scope["agent_instance_id"]
    async with AsyncClient(proxy.target, retry=FAST_RETRY, token=auth_token) as via_proxy:
        events = via_proxy.watch(project)
        async with events:
            await client.session(project, agent, "a").spawn()
            received = await take(events, 1)
            assert proxy.cut_streams(grpc.StatusCode.CANCELLED) == 1
            await client.session(project, agent, "b").spawn()
            received += await take(events, 1)
            assert [e.session_id for e in received] == ["a", "b"]
            assert events.connections == 2
            resumed = proxy.calls("WatchLifecycle")[1].request
            assert resumed.after_sequence == received[0].sequence
            reading = asyncio.ensure_future(anext(events))
            # Pending, or not started yet: closing the client ends it either way,
            # and opens no new stream (checked below).
            await via_proxy.close()
            with pytest.raises(Cancelled):
                await asyncio.wait_for(reading, WAIT)
    assert len(proxy.calls("WatchLifecycle")) == 2


async def test_an_oldest_watch_without_events_follows_compaction_past_its_progress(
    base_config: Config,
    deployment: Deployment,
    request: pytest.FixtureRequest,
    scope: dict[str, str],
    token_file: Path,
):
    """Progress messages move the cursor of a watch from the oldest event (another
    project's events pass by), but it has had no event: when compaction passes that
    cursor during an outage, the resumption refused as compacted starts from the
    oldest again, as asked, instead of ending the watch with WatchPositionCompacted."""
    config = replace(base_config, event_keep_last=2, retention_interval_seconds=0.1)
    if deployment.durable == "postgres":
        # Compaction is global: give it a database of its own.
        config = replace(config, database_url=request.getfixturevalue("fresh_postgres_url"))
    project, agent = scope["project_id"], scope["agent_instance_id"]
    other = track_project(str(uuid.uuid4()))
    async with (
        Server(config) as compacting,
        FaultProxy(f"127.0.0.1:{compacting.port}") as cutter,
        AsyncClient(f"127.0.0.1:{compacting.port}", token_file=token_file) as direct,
        AsyncClient(cutter.target, retry=FAST_RETRY, token_file=token_file) as via_proxy,
        via_proxy.watch(
            project, start="oldest", progress_interval=0.1, include_progress=True
        ) as events,
    ):
        started = events.sequence
        assert started is not None
        await direct.session(other, agent, "elsewhere").spawn()
        while (item := await asyncio.wait_for(anext(events), WAIT)).sequence <= started:
            pass
        assert isinstance(item, WatchProgress)  # moved on, no event of its own
        cutter.refuse()
        assert cutter.cut_streams() == 1
        for i in range(3):
            await direct.session(other, agent, f"during-outage-{i}").spawn()

        async def compacted_past_the_cursor() -> bool:
            oldest, _ = await compacting.durable_store.event_bounds()
            return bool(oldest > item.sequence)

        await eventually(compacted_past_the_cursor, timeout=WAIT)
        cutter.accept()
        await direct.session(project, agent, "mine").spawn()
        (event,) = await take(events, 1)
    assert event.session_id == "mine"
    streams = [c.request for c in cutter.calls("WatchLifecycle")]
    assert any(r.after_sequence == item.sequence for r in streams)  # refused: compacted
    assert not streams[-1].HasField("after_sequence")  # then from the oldest again
    assert streams[-1].start == lifecycle_pb2.WATCH_START_OLDEST


async def test_watch_from_oldest_and_from_a_saved_cursor(client: AsyncClient, scope):
    project = scope["project_id"]
    s = client.session(project, scope["agent_instance_id"], scope["session_id"])
    await s.spawn()
    await s.create_checkpoint()
    await s.pause()
    async with client.watch(project, start="oldest") as events:
        first, second, third = await take(events, 3)
    assert [first.event_type, second.event_type, third.event_type] == [
        EventType.SESSION_SPAWNED,
        EventType.CHECKPOINT_CREATED,
        EventType.SESSION_PAUSED,
    ]
    async with client.watch(project, after_sequence=first.sequence) as resumed:
        assert resumed.sequence == first.sequence
        assert [e.event_id for e in await take(resumed, 2)] == [second.event_id, third.event_id]
    async with client.watch(project, start="now", include_progress=True) as live:
        start = await asyncio.wait_for(anext(live), WAIT)
        assert isinstance(start, WatchProgress) and start.sequence >= third.sequence


async def test_events_that_came_in_one_message_are_handed_out_one_at_a_time(
    client: AsyncClient, scope, server: Server, monkeypatch
):
    """The watch asks for batches: five events already in the log come in one
    message. The cursor moves as each is handed out, not as the message arrives,
    so a cursor saved after the first resumes with the other four."""
    hub = server.hub
    assert hub is not None
    asked: list[int] = []  # each stream's events per message
    handed: list[int] = []  # how many events each list from the hub held
    watch = hub.watch

    async def spied(*args: Any) -> AsyncIterator[Any]:
        asked.append(args[4])
        async with contextlib.aclosing(watch(*args)) as stream:
            async for item in stream:
                if isinstance(item, list):
                    handed.append(len(item))
                yield item

    monkeypatch.setattr(hub, "watch", spied)
    project = scope["project_id"]
    s = client.session(project, scope["agent_instance_id"], scope["session_id"])
    async with client.watch(project, include_progress=True) as now:
        before = await asyncio.wait_for(anext(now), WAIT)
    assert isinstance(before, WatchProgress)
    await s.spawn()
    for _ in range(4):
        await s.create_checkpoint()
    async with client.watch(project, after_sequence=before.sequence) as events:
        (first,) = await take(events, 1)
        assert events.sequence == first.sequence
        saved = events.sequence
        rest_in_this_stream = await take(events, 4)
    assert handed == [5] and asked == [100, 100]  # one message (the servicer's rule)
    async with client.watch(project, after_sequence=saved) as resumed:
        rest = await take(resumed, 4)
    assert [e.event_id for e in rest] == [e.event_id for e in rest_in_this_stream]
    assert_once_in_order([first, *rest])
    assert [e.event_type for e in [first, *rest]] == [EventType.SESSION_SPAWNED] + [
        EventType.CHECKPOINT_CREATED
    ] * 4


async def test_a_bad_progress_interval_is_refused_not_reconnected_for_ever(client, scope):
    """The server refuses a negative interval; the watch must hear it, not time
    each stream out (three intervals of silence) before its first message."""
    watch = client.watch(scope["project_id"], progress_interval=-1)
    with pytest.raises(InvalidArgument):
        await asyncio.wait_for(watch.start(), WAIT)
    assert watch.connections == 1


async def test_a_zero_progress_interval_is_the_servers_default_here_too(client, scope):
    """The server takes a zero interval as its default (10 s); the watch must too:
    a review found it timed each quiet stream out after a second of silence
    (three zero intervals, plus one) and reconnected, for as long as it ran."""
    async with client.watch(scope["project_id"], progress_interval=0) as events:

        async def read_on() -> None:
            async for _ in events:
                pass

        reading = asyncio.ensure_future(read_on())
        # Reading on, well past that second, twice: a stream replaced meanwhile counts.
        await asyncio.sleep(2.5)
        assert not reading.done()
        reading.cancel()
        assert events.connections == 1


async def test_watch_without_reconnect_raises_unavailable(
    server: Server, scope: dict[str, str], auth_token: str
):
    async with AsyncClient(f"127.0.0.1:{server.port}", token=auth_token) as sdk:
        events = sdk.watch(scope["project_id"], reconnect=False)
        async with events:
            await server.stop()
            with pytest.raises(Unavailable):
                await asyncio.wait_for(anext(events), WAIT)
            with pytest.raises(StopAsyncIteration):
                await anext(events)


async def test_watch_gives_up_after_reconnect_timeout(proxy: FaultProxy, scope, auth_token: str):
    async with (
        AsyncClient(proxy.target, retry=FAST_RETRY, token=auth_token) as sdk,
        sdk.watch(scope["project_id"], reconnect_timeout=0.5) as events,
    ):
        proxy.refuse()
        proxy.cut_streams()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(anext(events), WAIT)
    assert len(proxy.calls("WatchLifecycle")) >= 2


async def test_a_watch_opened_while_memsvc_is_down_starts_once_it_is_back(
    base_config: Config, scope: dict[str, str], auth_token: str
):
    """The stream waits for the channel to connect (gRPC's wait_for_ready), as unary
    attempts do, instead of failing at once and backing off (an hour here) while
    gRPC waits out its own reconnection backoff (an SDK review: after a restart,
    events came up to ten seconds late)."""
    config = replace(base_config, listen=f"127.0.0.1:{free_port()}")
    slow = RetryPolicy(initial_backoff=3600, max_backoff=3600)
    project = scope["project_id"]
    async with AsyncClient(config.listen, retry=slow, token=auth_token) as sdk:
        events = sdk.watch(project, start="oldest")
        reading = asyncio.ensure_future(events.start())
        try:
            async with asyncio.timeout(WAIT):
                while events.connections == 0:  # noqa: ASYNC110 (until its stream opened)
                    await asyncio.sleep(0.01)
            async with Server(config):
                await asyncio.wait_for(reading, WAIT)
                await sdk.session(project, scope["agent_instance_id"], "back").spawn()
                (event,) = await take(events, 1)
        finally:
            reading.cancel()
            await events.aclose()
    assert event.session_id == "back"
    assert events.connections == 1


async def test_a_watch_that_never_connects_says_so_when_it_gives_up():
    """Its streams wait for a connection, so none fails with gRPC's reason: giving
    up says that there was no connection (a wrong address, a TLS error), not only
    that nothing arrived, as of a server that does not answer (a review)."""
    async with AsyncClient(f"127.0.0.1:{free_port()}", retry=FAST_RETRY) as sdk:
        events = sdk.watch(str(uuid.uuid4()), reconnect_timeout=1)
        with pytest.raises(Unavailable, match="no connection to memsvc"):
            await asyncio.wait_for(events.start(), WAIT)


async def test_aclose_ends_a_watch_waiting_to_reconnect(proxy: FaultProxy, scope, auth_token):
    """The backoff before a reconnection (an hour here) ends with aclose() from
    another task: iteration stops at once instead of after it."""
    slow = RetryPolicy(initial_backoff=3600, max_backoff=3600)
    async with AsyncClient(proxy.target, retry=slow, token=auth_token) as sdk:
        events = sdk.watch(scope["project_id"])
        await events.start()
        proxy.refuse()
        proxy.cut_streams()
        reading = asyncio.ensure_future(anext(events))
        async with asyncio.timeout(WAIT):
            while events._failures == 0:  # noqa: ASYNC110 (until the read met the cut)
                await asyncio.sleep(0.01)
        assert not reading.done()
        await events.aclose()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(reading, WAIT)


async def test_a_compacted_cursor_raises_with_the_oldest_sequence(
    base_config: Config,
    deployment: Deployment,
    request: pytest.FixtureRequest,
    scope,
    auth_token: str,
):
    config = replace(base_config, event_keep_last=2, retention_interval_seconds=0.1)
    if deployment.durable == "postgres":
        # Compaction is global: give it a database of its own.
        config = replace(config, database_url=request.getfixturevalue("fresh_postgres_url"))
    async with (
        Server(config) as compacting,
        AsyncClient(f"127.0.0.1:{compacting.port}", retry=FAST_RETRY, token=auth_token) as sdk,
    ):
        for i in range(5):
            await sdk.session(scope["project_id"], scope["agent_instance_id"], f"s{i}").spawn()

        async def compacted() -> bool:
            oldest, latest = await compacting.durable_store.event_bounds()
            return bool(oldest == latest - 2)

        await eventually(compacted, timeout=WAIT)
        _, latest = await compacting.durable_store.event_bounds()
        with pytest.raises(WatchPositionCompacted) as raised:
            async with sdk.watch(after_sequence=latest - 4):
                pass
        assert raised.value.oldest_sequence == latest - 2
        assert raised.value.after_sequence == latest - 4
        async with sdk.watch(after_sequence=raised.value.oldest_sequence) as events:
            assert [e.session_id for e in await take(events, 2)] == ["s3", "s4"]


async def test_a_watch_that_started_on_an_empty_log_misses_nothing(
    base_config: Config,
    deployment: Deployment,
    request: pytest.FixtureRequest,
    scope,
    token_file: Path,
):
    """Its cursor is 0, which the server reads as "not given" (= now): the reconnection
    must ask for the oldest instead, or the events of the outage would be lost."""
    config = base_config
    if deployment.durable == "postgres":
        config = replace(config, database_url=request.getfixturevalue("fresh_postgres_url"))
    project, agent = scope["project_id"], scope["agent_instance_id"]
    async with (
        Server(config) as empty,
        FaultProxy(f"127.0.0.1:{empty.port}") as cutter,
        AsyncClient(f"127.0.0.1:{empty.port}", token_file=token_file) as direct,
        AsyncClient(cutter.target, retry=FAST_RETRY, token_file=token_file) as via_proxy,
        via_proxy.watch(project) as events,
    ):
        assert events.sequence == 0
        cutter.refuse()
        cutter.cut_streams()
        await direct.session(project, agent, "during-outage").spawn()
        cutter.accept()
        (event,) = await take(events, 1)
    assert event.session_id == "during-outage" and event.sequence == 1
    assert events.connections >= 2


@pytest.mark.parametrize("config_overrides", [{"max_watchers": 1}])
async def test_a_full_replica_is_retried_until_a_watcher_leaves(client: AsyncClient, scope):
    """TooManyWatchers says to retry later (or elsewhere): a resuming watch backs
    off and connects once a slot is free, missing nothing committed meanwhile."""
    project = scope["project_id"]
    s = client.session(project, scope["agent_instance_id"], scope["session_id"])
    first = client.watch(project)
    async with first:
        await s.spawn()
        assert [e.event_type for e in await take(first, 1)] == [EventType.SESSION_SPAWNED]
        second = client.watch(project, start="oldest")
        waiting = asyncio.ensure_future(take(second, 2))
        await asyncio.sleep(0.5)
        assert not waiting.done(), "the second watch connected past the limit"
    await s.pause()
    got = await asyncio.wait_for(waiting, WAIT)
    assert [e.event_type for e in got] == [EventType.SESSION_SPAWNED, EventType.SESSION_PAUSED]
    assert second.connections >= 1
    await second.aclose()


async def watchers_released(server: Server) -> None:
    """Wait until the server serves no watch stream any more."""
    hub = server.hub
    assert hub is not None

    async def none_left() -> bool:
        return hub.watchers == 0

    await eventually(none_left, timeout=WAIT)


async def test_a_watch_dropped_unclosed_releases_its_stream(
    client: AsyncClient, server: Server, scope: dict[str, str]
):
    """grpc.aio keeps a call in flight alive by itself: without the watch's
    finalizer, its stream and the server's watcher slot would last until the
    client closes (it stays open here)."""
    assert server.hub is not None
    watches = [await client.watch(scope["project_id"]).start()]
    assert server.hub.watchers == 1
    watches.clear()
    gc.collect()
    await watchers_released(server)


async def test_a_blocking_watch_dropped_unclosed_releases_its_stream(
    server: Server, scope: dict[str, str], token_file: Path
):
    """The same for the blocking Watch, dropped in another thread than the one
    its stream runs in (the client's loop thread)."""
    assert server.hub is not None
    client = await asyncio.to_thread(Client, f"127.0.0.1:{server.port}", token_file=token_file)
    try:
        watches = [await asyncio.to_thread(lambda: client.watch(scope["project_id"]).start())]
        assert server.hub.watchers == 1
        watches.clear()
        gc.collect()
        await watchers_released(server)
    finally:
        await asyncio.to_thread(client.close)
