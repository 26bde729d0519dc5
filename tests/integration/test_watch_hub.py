"""The event hub: slow subscribers, cancellations, compaction, replicas, shutdown, limits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import subprocess
import sys
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2

from memsvc.config import Config
from memsvc.domain import BackendUnavailable, EventRecord, EventType, SessionRef
from memsvc.domain._watch import (
    CATCH_UP_BYTES,
    CATCH_UP_WINDOW,
    QUEUE_BYTES,
    EventFilter,
    EventHub,
    StoredEvent,
)
from memsvc.server import Server
from memsvc.store.sqlite import SqliteDurableStore
from memsvc.testing import free_port, wait_for_port
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.helpers import details_of, eventually, one_by_one, sql_rows, take_events
from tests.unit.test_event_hub_wakeups import REF, NotifyingLog, settle

MEMSVC = str(Path(sys.executable).parent / "memsvc")


async def append(store: Any, count: int, ref: SessionRef) -> None:
    for _ in range(count):
        async with store.transaction() as tx:
            await tx.append_event(EventRecord(str(uuid.uuid4()), EventType.SPAWNED, ref, None, 0))


async def append_at_once(
    store: Any, count: int, ref: SessionRef, metadata: dict[str, Any] | None = None
) -> None:
    """``count`` events of ``ref`` in one transaction (``append`` commits each alone)."""
    async with store.transaction() as tx:
        await tx.append_events([
            EventRecord(str(uuid.uuid4()), EventType.SPAWNED, ref, None, 0, metadata=metadata or {})
            for _ in range(count)
        ])  # fmt: skip


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> Any:
    store = SqliteDurableStore(f"sqlite:///{tmp_path}/events.db")
    await store.open()
    await store.migrate()
    yield store
    await store.aclose()


async def joined(hub: EventHub, count: int, *, interval: float = 0.01) -> None:
    """Wait until ``count`` streams have joined the hub's fan-out (``hub.watchers``
    counts a stream from its start, before it asks for events and joins; the hub
    has no public count of the joined ones)."""

    async def enough() -> bool:
        return len(hub._subscribers) >= count

    await eventually(enough, interval=interval)


class RecordingReads:
    """The store, recording the filter and position of every ``read_events``: the
    tail reads with an empty filter, a stream catching up with its own."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.reads: list[tuple[EventFilter, int]] = []
        self.weights: list[int] = []  # of the events each read returned (their sizes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def read_events(
        self, after: int, limit: int, event_filter: EventFilter, *window: Any
    ) -> Any:
        self.reads.append((event_filter, after))
        batch = await self._store.read_events(after, limit, event_filter, *window)
        self.weights.append(sum(stored.event.size() for stored in batch))
        return batch

    async def read_events_in_bounds(
        self, after: int, limit: int, event_filter: EventFilter, *window: Any
    ) -> Any:
        self.reads.append((event_filter, after))
        read = await self._store.read_events_in_bounds(after, limit, event_filter, *window)
        self.weights.append(sum(stored.event.size() for stored in read[0]))
        return read

    def by(self, event_filter: EventFilter) -> list[int]:
        """The positions a stream with ``event_filter`` read after."""
        return [after for used, after in self.reads if used == event_filter]


QUEUE_SIZE = 5
SLOW_TOTAL = 30


async def test_a_subscriber_that_reads_nothing_does_not_delay_others(sqlite_store):
    """A stalled subscriber holds at most queue_size events; past that it is left out
    of the fan-out (never waited for), lets go of what it held, and later catches up
    by reading the store itself, while another subscriber gets every event live,
    from the tail."""
    source = RecordingReads(sqlite_store)
    hub = EventHub(source, queue_size=QUEUE_SIZE, poll_interval=30)  # the kicks make it read
    lags: list[None] = []
    hub.watcher_lagged = lambda: lags.append(None)
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    # Both filters match every event here; they tell whose catch-up read is whose.
    stalled_filter = EventFilter(project_id=ref.project_id)
    reader_filter = EventFilter(agent_instance_id=ref.agent_instance_id)
    stalled: Any = one_by_one(hub.watch(stalled_filter, None, 30))
    reader: Any = one_by_one(hub.watch(reader_filter, None, 30))
    assert await anext(stalled) == 0
    assert await anext(reader) == 0
    # Each joins the hub when it asks for its next item.
    stalled_first = asyncio.ensure_future(anext(stalled))
    reader_first = asyncio.ensure_future(anext(reader))
    await joined(hub, 2)
    # One commit at a time, each taken by the reader before the next: the reader
    # never has more than one event queued, so whatever lags is the stalled one.
    for sequence in range(1, SLOW_TOTAL + 1):
        await append(sqlite_store, 1, ref)
        hub.notify()
        if sequence == 1:
            got = [await asyncio.wait_for(reader_first, 10)]
            # The stalled one takes the first event, then reads nothing more.
            first = await asyncio.wait_for(stalled_first, 10)
            assert isinstance(first, StoredEvent) and first.sequence == 1
        else:
            got = [await asyncio.wait_for(anext(reader), 10)]
        assert [item.sequence for item in got if isinstance(item, StoredEvent)] == [sequence]
    # Every event reached the reader live: no stream read the store yet.
    assert source.by(reader_filter) == source.by(stalled_filter) == []
    # The stalled subscriber's queue filled, then went when it overflowed (a client
    # that never reads again must not keep it), and the hub stopped offering it
    # events: it lagged once (the reader never did).
    (state,) = [s for s in hub._subscribers if s.event_filter == stalled_filter]
    assert state.lagging
    assert not state.queue and state.queued_bytes == 0
    assert len(lags) == 1
    # It catches up in order, all from the store, after the one event it took.
    assert await take_events(stalled, SLOW_TOTAL - 1) == list(range(2, SLOW_TOTAL + 1))
    caught_up = source.by(stalled_filter)
    assert caught_up and caught_up[0] == 1
    assert source.by(reader_filter) == []
    await stalled.aclose()
    await reader.aclose()
    assert hub.watchers == 0
    assert not hub.tailing


async def test_a_stalled_subscriber_holds_no_more_than_its_byte_budget(sqlite_store):
    """Found by a review: the queue was bounded by count alone, and a stream whose
    client stopped reading kept it full as long as it stayed connected. Streams
    stalled one after another held a thousand events of up to 64 KiB of metadata each,
    every one other events: the process grew by tens of MB per stalled client."""
    hub = EventHub(sqlite_store, poll_interval=30)  # the default count: 1,000 events
    lags: list[None] = []
    hub.watcher_lagged = lambda: lags.append(None)
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    stalled: Any = one_by_one(hub.watch(EventFilter(project_id=ref.project_id), None, 30))
    assert await anext(stalled) == 0
    first = asyncio.ensure_future(anext(stalled))
    await joined(hub, 1)
    metadata = {"notes": "x" * 60_000}
    await append_at_once(sqlite_store, 1, ref, metadata)
    hub.notify()
    assert (await asyncio.wait_for(first, 10)).sequence == 1
    (state,) = hub._subscribers
    total = 1
    # Events of about 60 KB, one commit each: the stream takes none of them.
    while not lags:
        assert total < 100, "never lagged: the queue kept growing"
        await append_at_once(sqlite_store, 1, ref, metadata)
        hub.notify()
        total += 1
        await eventually(functools.partial(_offered, hub, total), interval=0.005)
        assert state.queued_bytes <= QUEUE_BYTES
    # It lagged on bytes, far below the count, and let go of what it held.
    assert total - 1 < 1000
    assert (total - 1) * 60_000 > QUEUE_BYTES
    assert not state.queue and state.queued_bytes == 0
    # It still gets every event, once, in order: from the store.
    more = 5
    await append_at_once(sqlite_store, more, ref, metadata)
    hub.notify()
    assert await take_events(stalled, total - 1 + more) == list(range(2, total + more + 1))
    await stalled.aclose()
    assert hub.watchers == 0


async def _offered(hub: EventHub, sequence: int) -> bool:
    return hub.position >= sequence


class TailReadHeld:
    """The store, but the tail's next read (unfiltered), once armed, returns what it
    read only when released: a purge can commit, and be told, in between."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.armed = False
        self.reading, self.release = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def read_events(
        self, after: int, limit: int, event_filter: EventFilter, *window: Any
    ) -> Any:
        batch = await self._store.read_events(after, limit, event_filter, *window)
        if self.armed and event_filter == EventFilter() and batch:
            self.armed = False
            self.reading.set()
            await self.release.wait()
        return batch


async def test_a_purge_told_during_the_tails_read_makes_tombstones_of_it(sqlite_store):
    """Found by a review: the tail read events, a purge of their scope committed and
    was told, then the tail offered what it had read: in their old form, ids and
    metadata, after the purge's answer."""
    source = TailReadHeld(sqlite_store)
    hub = EventHub(source, poll_interval=30)
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    stream: Any = one_by_one(hub.watch(EventFilter(), None, 30))
    assert await anext(stream) == 0
    first = asyncio.ensure_future(anext(stream))
    await joined(hub, 1)
    await append_at_once(sqlite_store, 3, ref, {"k": 1})
    source.armed = True
    hub.notify()
    await asyncio.wait_for(source.reading.wait(), 10)
    hub.purged(SessionRef(ref.project_id, "", ""))  # its commit came after the read
    source.release.set()
    got = [await asyncio.wait_for(first, 10), *[await anext(stream) for _ in range(2)]]
    assert [stored.sequence for stored in got] == [1, 2, 3]
    assert all(stored.event.purged and not stored.event.metadata for stored in got), got
    await stream.aclose()


async def test_a_purge_told_late_leaves_a_later_event_of_its_scope_live(sqlite_store):
    """Found by a review: a purge of a session whose id was spawned again before the
    hub was told of the purge (another replica's notice on its way) made the new
    SPAWNED event a tombstone too, and a stream filtered by the session never got it."""
    hub = EventHub(sqlite_store, poll_interval=30)
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    stream: Any = one_by_one(
        hub.watch(EventFilter(agent_instance_id=ref.agent_instance_id), None, 30)
    )
    assert await anext(stream) == 0
    first = asyncio.ensure_future(anext(stream))
    await joined(hub, 1)
    await append_at_once(sqlite_store, 1, ref, {"k": 1})
    hub.notify()
    assert (await asyncio.wait_for(first, 10)).sequence == 1
    async with sqlite_store.transaction() as tx:  # the purge
        assert await tx.tombstone_events(ref) == (1, 1)  # how many, the last one
    await append_at_once(sqlite_store, 1, ref, {"k": 2})  # the id spawned again
    hub.notify()
    await eventually(functools.partial(_offered, hub, 2), interval=0.005)
    hub.purged(ref, 1)  # told now, after the hub queued the new event
    again = await asyncio.wait_for(anext(stream), 10)
    assert again.sequence == 2 and not again.event.purged and again.event.metadata == {"k": 2}
    await stream.aclose()


async def test_another_replicas_purge_is_bounded_by_the_notices_before_it():
    """On PostgreSQL a purge's notice follows the notices of every append committed
    before it and precedes the later ones: the hub makes tombstones up to the last
    sequence announced before it, and of everything when none was (a new LISTEN)."""
    log = NotifyingLog()
    hub = EventHub(log, poll_interval=30)
    scope = SessionRef(REF.project_id, "", "")
    stream: Any = one_by_one(
        hub.watch(EventFilter(agent_instance_id=REF.agent_instance_id), None, 30)
    )
    assert await anext(stream) == 0
    first = asyncio.ensure_future(anext(stream))
    await joined(hub, 1)
    log.commit(1)  # announced: 1
    assert (await asyncio.wait_for(first, 10)).sequence == 1
    # This replica commits event 2 of the scope (after the purge, elsewhere): handed
    # to the hub at once; the purge's notice arrives after that, before 2's own.
    (respawned,) = log.commit(1)
    log.notifications.get_nowait()  # 2's notice comes later
    hub.publish_committed([respawned])
    log.notifications.put_nowait(scope)
    log.notifications.put_nowait(2)
    again = await asyncio.wait_for(anext(stream), 10)
    assert again.sequence == 2 and not again.event.purged
    # A notice after the connection was made again (0) knows nothing announced
    # before it: a purge then makes tombstones of whatever it holds of the scope.
    waiting = asyncio.ensure_future(anext(stream))
    await settle()
    (third,) = log.commit(1)
    log.notifications.get_nowait()
    hub.publish_committed([third])
    for wakeup in (0, scope, 3):
        log.notifications.put_nowait(wakeup)
    await settle()
    assert not waiting.done()  # its event became a tombstone its filter drops
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await stream.aclose()


HEAVY_EVENTS = 120


async def test_a_catch_up_read_holds_about_a_megabyte_whatever_its_events_weigh(sqlite_store):
    """A stream catching up holds each read until its client took it: reads of
    events of 60 KB of metadata take a few at a time, not 500 (30 MB a stream)."""
    source = RecordingReads(sqlite_store)
    hub = EventHub(source, poll_interval=30)
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    heavy = {"note": "x" * 60_000}
    await append_at_once(sqlite_store, HEAVY_EVENTS, ref, heavy)
    stream: Any = one_by_one(hub.watch(EventFilter(project_id=ref.project_id), 0, 30, True))
    assert await anext(stream) == 0
    assert await take_events(stream, HEAVY_EVENTS) == list(range(1, HEAVY_EVENTS + 1))
    assert source.weights, "it caught up from the store"
    assert max(source.weights) <= CATCH_UP_BYTES
    await stream.aclose()


async def lose_commits_after(store: Any, sequence: int) -> None:
    """The database comes back without its commits after ``sequence`` (a failover
    to a standby that had not received them): their sequences will be reused."""
    db = store._conn
    await db.execute("DELETE FROM lifecycle_events WHERE sequence > ?", (sequence,))
    await db.execute("UPDATE event_sequence SET last_sequence = ?", (sequence,))
    await db.commit()


async def test_a_log_that_went_back_is_followed_from_where_it_is(sqlite_store, tmp_path):
    """The database loses its last commits (a failover to a standby that had not
    received them, a restore) and reuses their sequences. A live stream ends with
    UNAVAILABLE (its cursor is past the log now), and a stream that starts then
    gets the events that reuse those sequences, instead of nothing up to the
    position an earlier tail had reached."""
    other = SqliteDurableStore(f"sqlite:///{tmp_path}/events.db")  # another replica
    await other.open()
    hub = EventHub(sqlite_store, poll_interval=0.05)
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    try:
        live: Any = one_by_one(hub.watch(EventFilter(), None, 0.2))
        assert await anext(live) == 0
        await append(other, 10, ref)
        assert await take_events(live, 10) == list(range(1, 11))
        await lose_commits_after(sqlite_store, 5)
        with pytest.raises(BackendUnavailable, match="went back from sequence 10 to 5"):
            await asyncio.wait_for(anext(live), 10)
        fresh: Any = one_by_one(hub.watch(EventFilter(), None, 0.2))
        assert await anext(fresh) == 5
        await append(other, 3, ref)
        assert await take_events(fresh, 3) == [6, 7, 8]
        await fresh.aclose()
    finally:
        await other.aclose()


async def test_a_log_that_went_back_and_grew_again_ends_the_streams(sqlite_store, tmp_path):
    """The same, but others commit before the tail looks again: the log is past
    the tail's position once more, yet holds other events at its sequences. Taken
    for new ones, the events reusing sequences 6 to 10 would never be delivered."""
    other = SqliteDurableStore(f"sqlite:///{tmp_path}/events.db")  # another replica
    await other.open()
    hub = EventHub(sqlite_store, poll_interval=30)  # only a kick makes the tail read
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    try:
        live: Any = one_by_one(hub.watch(EventFilter(), None, 30))
        assert await anext(live) == 0
        await append(other, 10, ref)
        hub.notify()
        assert await take_events(live, 10) == list(range(1, 11))
        await lose_commits_after(sqlite_store, 5)
        await append(other, 6, ref)  # then takes six commits: 6 to 11
        hub.notify()
        with pytest.raises(BackendUnavailable, match="holds another event at sequence 10"):
            await asyncio.wait_for(anext(live), 10)
    finally:
        await other.aclose()


class CompactingFirst:
    """The store, but the first catch-up read finds the oldest events compacted
    (the retention sweep ran between a stream's bounds and its first read)."""

    def __init__(self, store: Any, up_to: int) -> None:
        self._store, self._up_to, self.compacted = store, up_to, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def read_events_in_bounds(
        self, after: int, limit: int, event_filter: EventFilter, *window: Any
    ) -> Any:
        if not self.compacted:
            self.compacted = True
            await lose_events_up_to(self._store, self._up_to)
        return await self._store.read_events_in_bounds(after, limit, event_filter, *window)


class CompactingAfterFirst:
    """The store, but the retention sweep commits right after a stream's first
    catch-up read, and compacts events that read returned."""

    def __init__(self, store: Any, up_to: int) -> None:
        self._store, self._up_to, self.compacted = store, up_to, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def _compact_once(self) -> None:
        if not self.compacted:
            self.compacted = True
            await lose_events_up_to(self._store, self._up_to)

    # Both reads a catch-up may make: the events, then the log's ends (the
    # compaction falls between them), or both of one snapshot.
    async def read_events(
        self, after: int, limit: int, event_filter: EventFilter, *window: Any
    ) -> Any:
        batch = await self._store.read_events(after, limit, event_filter, *window)
        if event_filter != EventFilter():  # a stream's, not the tail's
            await self._compact_once()
        return batch

    async def read_events_in_bounds(
        self, after: int, limit: int, event_filter: EventFilter, *window: Any
    ) -> Any:
        read = await self._store.read_events_in_bounds(after, limit, event_filter, *window)
        await self._compact_once()
        return read


async def test_compaction_after_a_catch_up_read_loses_nothing_that_read_got(sqlite_store):
    """Found by a review: compaction committing between a catch-up's read and its
    look at the log's ends removed only events the read had got, yet the stream
    ended with OUT_OF_RANGE (its cursor was behind the new oldest). The read and
    the ends are one snapshot now: the stream delivers them all."""
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    await append(sqlite_store, 8, ref)
    source = CompactingAfterFirst(sqlite_store, up_to=4)
    hub = EventHub(source, poll_interval=30)
    stream: Any = one_by_one(hub.watch(EventFilter(project_id=ref.project_id), 0, 30))
    assert await anext(stream) == 0
    assert await take_events(stream, 8) == list(range(1, 9))
    assert source.compacted
    await stream.aclose()


async def test_a_stream_from_the_oldest_follows_compaction_before_its_first_event(
    sqlite_store,
):
    """Asked for the oldest retained event, a stream whose first events are
    compacted before it reads them starts after the new oldest (a progress says
    so) instead of ending with OUT_OF_RANGE for a position it never asked for."""
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    await append(sqlite_store, 6, ref)
    source = CompactingFirst(sqlite_store, up_to=3)
    hub = EventHub(source, poll_interval=0.05)
    stream: Any = one_by_one(hub.watch(EventFilter(), None, 30, from_oldest=True))
    assert await anext(stream) == 0  # the oldest when it started
    assert await anext(stream) == 3  # compacted meanwhile: the stream moves on
    assert await take_events(stream, 3) == [4, 5, 6]
    assert source.compacted
    await stream.aclose()


async def test_a_stream_from_the_oldest_follows_compaction_past_its_catch_up_progress(
    sqlite_store,
):
    """A stream from the oldest that has had no event follows compaction even past
    the progress a long catch-up sent (as docs/api.md says, and as the client's
    watch() takes it): not OUT_OF_RANGE for a position it never chose."""
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    log_size = CATCH_UP_WINDOW + 10
    await append_at_once(sqlite_store, log_size, ref)
    hub = EventHub(sqlite_store, poll_interval=30)
    elsewhere = EventFilter(project_id=str(uuid.uuid4()))  # matches none of them
    stream: Any = one_by_one(hub.watch(elsewhere, None, 0, from_oldest=True))
    assert await anext(stream) == 0
    assert await anext(stream) == CATCH_UP_WINDOW  # one window read, nothing matched
    await lose_events_up_to(sqlite_store, log_size - 5)  # compacted past the progress
    assert await anext(stream) == log_size - 5  # the new oldest
    await stream.aclose()


async def lose_events_up_to(store: Any, sequence: int) -> None:
    """Compaction, as the sweep leaves the log: the events up to ``sequence`` gone."""
    db = store._conn
    await db.execute("DELETE FROM lifecycle_events WHERE sequence <= ?", (sequence,))
    await db.commit()


async def test_a_thousand_connect_cancel_cycles_leave_nothing_behind(sqlite_store):
    hub = EventHub(sqlite_store, poll_interval=0.05)
    before = len(asyncio.all_tasks())
    for _ in range(1000):
        stream: Any = one_by_one(hub.watch(EventFilter(), None, 0.2))
        await anext(stream)
        waiting = asyncio.ensure_future(anext(stream))
        await joined(hub, 1, interval=0)  # cancelled once it waits in the fan-out
        waiting.cancel()
        with pytest.raises((asyncio.CancelledError, StopAsyncIteration)):
            await waiting
        await stream.aclose()

    async def tasks_ended() -> bool:
        return len(asyncio.all_tasks()) <= before

    await eventually(tasks_ended)  # the last cancelled tail's task has finished
    assert hub.watchers == 0
    assert not hub.tailing
    assert len(asyncio.all_tasks()) <= before
    assert progress_timers() == [], "a closed stream leaves its progress timer armed"


def progress_timers() -> list[asyncio.TimerHandle]:
    """Armed timers of watch streams (the loop's private heap: no public view)."""
    scheduled: list[asyncio.TimerHandle] = asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
    return [
        timer
        for timer in scheduled
        if not timer.cancelled()
        and type(getattr(timer._callback, "__self__", None)).__name__ == "_Subscriber"  # type: ignore[attr-defined]
    ]


async def test_progress_comes_once_events_stop_and_carries_the_last_position(sqlite_store):
    hub = EventHub(sqlite_store, poll_interval=0.05)
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    stream: Any = one_by_one(hub.watch(EventFilter(), None, 0.1))
    assert await anext(stream) == 0
    first = asyncio.ensure_future(anext(stream))
    await joined(hub, 1)
    await append(sqlite_store, 3, ref)
    hub.notify()
    delivered = [await asyncio.wait_for(first, 10), *[await anext(stream) for _ in range(2)]]
    assert [item.sequence for item in delivered] == [1, 2, 3]
    assert len(progress_timers()) == 1, "one timer per stream, not one per wait"
    # Nothing more comes: the next item is a progress at the last position.
    assert await asyncio.wait_for(anext(stream), 10) == 3
    other = SessionRef(ref.project_id, ref.agent_instance_id, "other")
    filtered: Any = one_by_one(hub.watch(EventFilter(session_id="s"), None, 0.1))
    assert await anext(filtered) == 3
    waiting = asyncio.ensure_future(anext(filtered))
    await joined(hub, 2)
    await append(sqlite_store, 2, other)
    hub.notify()
    # Events the filter rejects still move a quiet stream's position forward.
    assert await asyncio.wait_for(waiting, 10) == 5
    await stream.aclose()
    await filtered.aclose()
    assert progress_timers() == []


async def test_a_stream_with_no_commits_at_all_gets_progress_periodically(sqlite_store):
    """Nothing is committed while it watches: progress still comes, again and again
    (not only once, or after a commit elsewhere), at the start position."""
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    await append(sqlite_store, 2, ref)
    hub = EventHub(sqlite_store, poll_interval=30)
    stream: Any = one_by_one(hub.watch(EventFilter(), None, 0.1))
    try:
        assert await anext(stream) == 2
        progress = [await asyncio.wait_for(anext(stream), 10) for _ in range(3)]
        assert progress == [2, 2, 2]
    finally:
        await stream.aclose()


@pytest.fixture
def config(tmp_path: Path, database_url: str) -> Config:
    """A server on a free port over each durable store (``database_url``: SQLite, and a
    PostgreSQL database of the test's own)."""
    return Config(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path),
        database_url=database_url,
        health_interval_seconds=5,
        health_listen="",
        metrics_listen="",
    )


async def test_compacted_positions_are_out_of_range_with_the_oldest(config):
    compacting = replace(config, event_keep_last=2, retention_interval_seconds=0.1)
    ids: dict[str, Any] = {"project_id": str(uuid.uuid4()), "agent_instance_id": str(uuid.uuid4())}
    async with (
        Server(compacting) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        life = LifecycleServiceStub(ch)
        for i in range(5):
            await life.Spawn(lc.SpawnRequest(**ids, session_id=f"s{i}"))

        async def compacted() -> bool:
            oldest, latest = await server.durable_store.event_bounds()
            return bool(oldest == latest - 2)

        await eventually(compacted)
        call = life.WatchLifecycle(lc.WatchLifecycleRequest(after_sequence=1))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
        details = details_of(error.value)
        assert details.code == grpc.StatusCode.OUT_OF_RANGE
        assert details.reason == "ERROR_REASON_WATCH_POSITION_COMPACTED"
        assert details.metadata["oldest_sequence"] == "3"
        assert details.metadata["oldest_retained_sequence"] == "4"
        ok = life.WatchLifecycle(lc.WatchLifecycleRequest(after_sequence=3))
        assert (await ok.read()).progress.sequence == 3
        assert (await ok.read()).event.sequence == 4
        ok.cancel()


BULKY_EVENTS = 300


def count_items(hub: EventHub, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count what the hub's streams hand out, the start and each event (one counter
    per stream, in the returned list). The servicer takes a stream's next events
    only once its writes of the last ones returned, so a count that stops short of
    the end while the client reads nothing is a write waiting for the flow-control
    windows."""
    counts: list[int] = []
    watch = hub.watch

    async def counted(*args: Any, **kwargs: Any) -> AsyncIterator[list[StoredEvent] | int]:
        index = len(counts)
        counts.append(0)
        async with contextlib.aclosing(watch(*args, **kwargs)) as stream:
            async for item in stream:
                counts[index] += 1 if isinstance(item, int) else len(item)
                yield item

    monkeypatch.setattr(hub, "watch", counted)
    return counts


async def test_a_client_that_leaves_while_the_server_writes_is_no_error(
    config, caplog, monkeypatch
):
    """A watcher that stops reading (the server's writes wait for it), then goes:
    its stream just ends. Logged as an error and answered INTERNAL, every client
    that disconnects from a busy stream would page someone."""
    ids: dict[str, Any] = {"project_id": str(uuid.uuid4()), "agent_instance_id": str(uuid.uuid4())}
    bulky = struct_pb2.Struct()
    bulky.update({"blob": "x" * 60_000})
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        life = LifecycleServiceStub(ch)
        # 18 MB of events, far more than the flow-control windows (spawned 25 at a time).
        for first in range(0, BULKY_EVENTS, 25):
            await asyncio.gather(
                *(
                    life.Spawn(lc.SpawnRequest(**ids, session_id=f"s{index}", metadata=bulky))
                    for index in range(first, first + 25)
                )
            )
        hub = server.hub
        assert hub is not None
        items = count_items(hub, monkeypatch)
        call = life.WatchLifecycle(
            lc.WatchLifecycleRequest(project_id=ids["project_id"], start=lc.WATCH_START_OLDEST)
        )
        await call.read()
        looked = [-1]

        async def write_waits() -> bool:
            # Time must pass here: a write that waits shows only as a count that
            # stays put between two looks, short of the end (the start and
            # BULKY_EVENTS events), while the client reads nothing.
            (now,), before = items, looked[0]
            looked[0] = now
            return 1 < now == before < 1 + BULKY_EVENTS

        await eventually(write_waits, interval=0.2)
        call.cancel()

        async def released() -> bool:
            return hub.watchers == 0

        await eventually(released)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_too_many_watchers_is_resource_exhausted(config):
    async with (
        Server(replace(config, max_watchers=2)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        life = LifecycleServiceStub(ch)
        open_calls = [life.WatchLifecycle(lc.WatchLifecycleRequest()) for _ in range(2)]
        for call in open_calls:
            await call.read()
        extra = life.WatchLifecycle(lc.WatchLifecycleRequest())
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await extra.read()
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        open_calls[0].cancel()

        async def room_again() -> bool:
            return server.hub is not None and server.hub.watchers < 2

        await eventually(room_again)
        retry = life.WatchLifecycle(lc.WatchLifecycleRequest())
        assert (await retry.read()).HasField("progress")


async def test_shutdown_ends_watch_streams_with_unavailable(config):
    server = Server(config)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        call = LifecycleServiceStub(ch).WatchLifecycle(lc.WatchLifecycleRequest())
        await call.read()
        await asyncio.wait_for(server.stop(grace=30), 10)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "reconnect" in (error.value.details() or "")


REPLICAS = 4
SPAWNS_PER_REPLICA = 15


# How each replica's tail learns of the others' commits: NOTIFY, with a poll far
# slower than any wait in the test (a delivery across replicas within the test
# needs NOTIFY); or, with LISTEN off, a short poll (the fallback delivers too).
WAKE_UPS = [
    pytest.param(("--event-poll-interval-seconds", "3600"), id="notify"),
    pytest.param(
        ("--database-listen-url", "off", "--event-poll-interval-seconds", "0.2"), id="polling"
    ),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("wake_up", WAKE_UPS)
async def test_four_replicas_deliver_one_order_to_every_subscriber(
    tmp_path, fresh_postgres_url, wake_up
):
    """Four memsvc processes on one PostgreSQL, writers and subscribers on each: every
    subscriber sees the same events in the same order, no gap, no duplicate."""
    replicas = []
    for i in range(REPLICAS):
        port = free_port()
        process = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
            [MEMSVC, "serve", "--health-listen=", "--metrics-listen=",
            "--listen", f"127.0.0.1:{port}",
             "--data-dir", str(tmp_path / f"r{i}"), "--database-url", fresh_postgres_url,
             *wake_up],
            stderr=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")},
        )  # fmt: skip
        replicas.append((process, port))
    try:
        for _, port in replicas:
            wait_for_port(port, timeout=30)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _, port in replicas]
        stubs = [LifecycleServiceStub(c) for c in channels]
        project = str(uuid.uuid4())
        request = lc.WatchLifecycleRequest(
            project_id=project, progress_interval=duration_pb2.Duration(seconds=1)
        )
        watches = [stub.WatchLifecycle(request) for stub in stubs for _ in range(2)]
        for call in watches:
            await call.read()

        async def writer(stub: LifecycleServiceStub, name: str) -> None:
            for i in range(SPAWNS_PER_REPLICA):
                await stub.Spawn(
                    lc.SpawnRequest(
                        project_id=project,
                        agent_instance_id=str(uuid.uuid4()),
                        session_id=f"{name}-{i}",
                    )
                )

        await asyncio.gather(*(writer(stub, f"r{i}") for i, stub in enumerate(stubs)))
        total = REPLICAS * SPAWNS_PER_REPLICA

        async def events_of(call: Any) -> list[tuple[int, str]]:
            got: list[tuple[int, str]] = []
            while len(got) < total:
                message = await call.read()
                if message.HasField("event"):
                    got.append((message.event.sequence, message.event.session_id))
            return got

        orders = []
        for call in watches:
            # A bound on all of a stream's events, not on each read: progress
            # messages come every second, events that never come must fail the test.
            orders.append(await asyncio.wait_for(events_of(call), 10))
            call.cancel()
        assert all(order == orders[0] for order in orders)
        sequences = [s for s, _ in orders[0]]
        assert sequences == list(range(sequences[0], sequences[0] + total))
        assert len({session for _, session in orders[0]}) == total
        for channel in channels:
            await channel.close()
    finally:
        for process, _ in replicas:
            process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(process.wait, 30)


CYCLES = 1000
MEMORY_GROWTH_LIMIT = 1 << 20


async def listening_backends(database_url: str) -> int:
    """Backends of the server's PostgreSQL database that LISTEN (the event tail's
    connection: its last statement is the LISTEN until it is quiet for 30 s)."""
    rows = await sql_rows(
        database_url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND starts_with(query, 'LISTEN ')",
    )
    return int(rows[0][0])


async def test_a_thousand_grpc_watch_cancellations_free_everything(config):
    """Watchers that connect, get their start and cancel leave no task, no memory
    and (on PostgreSQL) no LISTEN connection behind: the tail goes with the last."""
    postgres = not config.database_url.startswith("sqlite")
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        life = LifecycleServiceStub(ch)
        hub = server.hub
        assert hub is not None

        async def released() -> bool:
            return hub.watchers == 0 and not hub.tailing

        async def listening() -> bool:
            return await listening_backends(config.database_url) == 1

        async def not_listening() -> bool:
            return await listening_backends(config.database_url) == 0

        baseline = len(asyncio.all_tasks())
        warm = life.WatchLifecycle(lc.WatchLifecycleRequest())
        await warm.read()
        if postgres:  # the query does see the tail's LISTEN while a watcher holds it
            await eventually(listening)
        warm.cancel()
        await eventually(released)
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.take_snapshot()
            for _ in range(CYCLES):
                call = life.WatchLifecycle(lc.WatchLifecycleRequest())
                await call.read()
                call.cancel()
            await eventually(released)

            async def tasks_ended() -> bool:
                return len(asyncio.all_tasks()) <= baseline + 2

            await eventually(tasks_ended)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        grown = after.compare_to(before, "lineno")
        growth = sum(stat.size_diff for stat in grown)
        # A few dozen KB of caches and free lists; a leak of 1 KB per cycle would be 1 MB.
        assert growth < MEMORY_GROWTH_LIMIT, "\n".join(
            [f"memory grew by {growth} B over {CYCLES} cycles:", *map(str, grown[:10])]
        )
        if postgres:
            await eventually(not_listening)


async def test_local_and_foreign_commits_arrive_once_in_order(tmp_path, sqlite_store):
    """Events committed here are offered directly, others read from the store: mixed,
    a watcher still sees every sequence once, in order."""
    hub = EventHub(sqlite_store, poll_interval=0.05)
    sqlite_store.events_committed = hub.publish_committed
    foreign = SqliteDurableStore(f"sqlite:///{sqlite_store.path}")  # another "process"
    await foreign.open()
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    stream: Any = one_by_one(hub.watch(EventFilter(), None, 0.2))
    assert await anext(stream) == 0
    first = asyncio.ensure_future(anext(stream))
    await joined(hub, 1)
    try:
        await asyncio.gather(append(sqlite_store, 20, ref), append(foreign, 20, ref))
        got = await asyncio.wait_for(first, 10)
        assert isinstance(got, StoredEvent)
        assert [got.sequence, *await take_events(stream, 39)] == list(range(1, 41))
    finally:
        await stream.aclose()
        await foreign.aclose()
