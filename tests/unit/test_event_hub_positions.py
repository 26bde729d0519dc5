"""Start positions the log cannot serve end a watch with OUT_OF_RANGE, and never
disturb the other watchers; the tail is there for a stream that rejoins while
the last one closes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from memsvc.domain import BackendUnavailable, SessionRef
from memsvc.domain import _watch as watch_module
from memsvc.domain._watch import (
    EventFilter,
    EventHub,
    PositionAhead,
    PositionTooOld,
    StoredEvent,
    TooManyWatchers,
    Wakeup,
)
from tests.helpers import one_by_one, take_events
from tests.unit.test_event_hub_wakeups import NotifyingLog, settle


class CompactingLog(NotifyingLog):
    """A log whose retention drops events up to ``compact_to`` just before the
    next read (as a sweep running during it would); ``closing`` holds a tail's
    notification channel open while it shuts down, until set."""

    def __init__(self) -> None:
        super().__init__()
        self.oldest = 0
        self.compact_to: int | None = None
        self.closing = asyncio.Event()
        self.closing.set()

    async def read_events(
        self, after: int, limit: int, event_filter: EventFilter, until: int | None = None
    ) -> list[StoredEvent]:
        if self.compact_to is not None:
            self.events = [e for e in self.events if e.sequence > self.compact_to]
            self.oldest, self.compact_to = self.compact_to, None
        return await super().read_events(after, limit, event_filter, until)

    async def event_bounds(self) -> tuple[int, int]:
        latest = self.events[-1].sequence if self.events else self.oldest
        return self.oldest, latest

    @contextlib.asynccontextmanager
    async def event_wakeups(self) -> AsyncIterator[AsyncIterator[Wakeup]]:
        try:
            async with super().event_wakeups() as wakeups:
                yield wakeups
        finally:
            await self.closing.wait()  # however the tail ends


async def joined_stream(
    log: CompactingLog, committed: int, **hub_options: Any
) -> tuple[EventHub, Any, asyncio.Future[list[int]]]:
    """A hub over ``log`` after ``committed`` events, a stream from now, and its
    wait for its next event (which has joined it to the hub's tail)."""
    log.commit(committed)
    hub = EventHub(log, poll_interval=30, **hub_options)
    stream: Any = one_by_one(hub.watch(EventFilter(), None, 30))
    assert await anext(stream) == committed
    waiting = asyncio.ensure_future(take_events(stream, 1))
    await settle()
    return hub, stream, waiting


async def test_a_position_past_the_latest_is_refused_and_hides_nothing():
    log = CompactingLog()
    hub, watcher, first = await joined_stream(log, 5)
    ahead: Any = one_by_one(hub.watch(EventFilter(), 10**9, 30))
    with pytest.raises(PositionAhead) as refused:
        await anext(ahead)
    assert refused.value.metadata == {"latest_sequence": "5", "after_sequence": str(10**9)}
    log.commit(1)
    assert await first == [6], "the refused position moved the tail"
    assert hub.position == 6
    await watcher.aclose()


@pytest.mark.parametrize("others", [False, True], ids=["first watcher", "tail running"])
async def test_compaction_overtaking_a_catch_up_ends_the_stream(others: bool):
    log = CompactingLog()
    log.commit(10)
    hub = EventHub(log, poll_interval=30)
    other: Any = one_by_one(hub.watch(EventFilter(), None, 30))
    if others:  # a live watcher: the tail runs, at the latest event
        assert await anext(other) == 10
        pending = asyncio.ensure_future(anext(other))
        await settle()
        assert hub.tailing
    behind: Any = one_by_one(hub.watch(EventFilter(), 0, 30))
    assert await anext(behind) == 0  # events 1-10 retained when it started
    log.compact_to = 5  # ...and 1-5 gone before it reads them
    with pytest.raises(PositionTooOld) as ended:
        await take_events(behind, 10)
    assert ended.value.metadata["oldest_sequence"] == "5"
    if others:
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pending
    await other.aclose()


async def test_a_lagging_stream_that_rejoins_while_the_tail_closes_gets_a_new_tail():
    log = CompactingLog()
    _, stream, first = await joined_stream(log, 0, queue_size=1)
    log.commit(3)  # the queue holds 1: the stream lags
    assert await first == [1]
    log.closing.clear()  # the next tail to stop stays in its shutdown
    # The stream leaves the hub to catch up from the store; the event committed
    # meanwhile wakes the tail, which finds nobody and shuts down.
    catching_up = asyncio.ensure_future(take_events(stream, 3))
    await asyncio.sleep(0.005)
    log.commit(1)
    assert await catching_up == [2, 3, 4]  # read from the store; rejoined
    log.closing.set()
    log.commit(1)
    assert await take_events(stream, 1) == [5], "no tail delivers to the rejoined stream"
    await stream.aclose()


async def test_streams_arriving_together_cannot_pass_the_watcher_limit_together():
    class SlowBounds(CompactingLog):
        async def event_bounds(self) -> tuple[int, int]:
            await asyncio.sleep(0.05)  # every arrival waits here at the same time
            return await super().event_bounds()

    hub = EventHub(SlowBounds(), poll_interval=30, max_watchers=2)
    streams: list[Any] = [one_by_one(hub.watch(EventFilter(), None, 30)) for _ in range(5)]
    started = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
    refused = [r for r in started if isinstance(r, TooManyWatchers)]
    assert len(refused) == 3, started
    assert hub.watchers == 2
    for stream in streams:
        await stream.aclose()
    assert hub.watchers == 0


class FailingWakeupsLog(NotifyingLog):
    """A log whose commit notifications cannot be set up, ``failures`` times."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    @contextlib.asynccontextmanager
    async def event_wakeups(self) -> AsyncIterator[AsyncIterator[Wakeup]]:
        if self.failures:
            self.failures -= 1
            raise OSError("LISTEN failed")
        async with super().event_wakeups() as wakeups:
            yield wakeups


async def test_a_failed_tail_ends_its_streams_and_a_reconnect_loses_nothing():
    """A stream fed by a tail that died must not wait on it (it would get progress
    at a stale position, and a cursor past events it never saw): it ends with
    UNAVAILABLE, and reconnecting after its cursor delivers every event."""
    log = FailingWakeupsLog(failures=1)
    log.commit(3)
    hub = EventHub(log, poll_interval=30)
    stream: Any = one_by_one(hub.watch(EventFilter(), None, 30))
    assert await anext(stream) == 3
    log.commit(5)  # 4 to 8, committed while the tail fails
    with pytest.raises(BackendUnavailable, match="event log"):
        await take_events(stream, 1)
    assert not hub.tailing
    again: Any = one_by_one(hub.watch(EventFilter(), 3, 30))
    assert await anext(again) == 3
    assert await take_events(again, 5) == [4, 5, 6, 7, 8]
    log.commit(2)
    assert await take_events(again, 2) == [9, 10]
    await again.aclose()
    await settle()
    assert not hub.tailing


class BrokenLog(NotifyingLog):
    """A log whose reads past ``good`` fail (a database that stays down)."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good

    async def read_events(
        self, after: int, limit: int, event_filter: EventFilter, until: int | None = None
    ) -> list[StoredEvent]:
        if after >= self.good:
            raise OSError("the database is down")
        return await super().read_events(after, limit, event_filter, until)


async def test_a_tail_whose_reads_keep_failing_ends_its_streams(monkeypatch):
    """Retried for a while (a restart comes back), then given up: the streams end
    with UNAVAILABLE instead of waiting on a tail that reads nothing."""
    monkeypatch.setattr(watch_module, "TAIL_FAILING_SECONDS", 0.3)
    log = BrokenLog(good=2)
    log.commit(2)
    hub = EventHub(log, poll_interval=0.05)
    stream: Any = one_by_one(hub.watch(EventFilter(), None, 30))
    assert await anext(stream) == 2
    log.commit(1)
    with pytest.raises(BackendUnavailable, match="event log"):
        await take_events(stream, 1)
    assert not hub.tailing


async def test_a_tail_that_fell_behind_compaction_ends_its_streams():
    """A tail that falls behind by more than event_keep_last (its reads failed a while,
    or the process stalled) finds its next events compacted: its streams end with
    UNAVAILABLE instead of going on past the gap, and a reconnect with their
    cursor is refused with OUT_OF_RANGE."""
    log = CompactingLog()
    hub, stream, reading = await joined_stream(log, 3)
    log.compact_to = 6  # 4 to 6 go before the tail reads them
    log.commit(5)
    with pytest.raises(BackendUnavailable, match="event log"):
        await reading
    again: Any = one_by_one(hub.watch(EventFilter(), 3, 30))
    with pytest.raises(PositionTooOld):
        await anext(again)
    await stream.aclose()


async def test_a_tail_whose_every_next_event_was_compacted_ends_its_streams():
    """Compaction (keep_last 0 and a maximum age) may remove every event after the
    tail's position: no later event then shows the gap, and the streams must not
    wait on, receiving progress at a position the log has left behind."""
    log = CompactingLog()
    hub, stream, reading = await joined_stream(log, 3)
    log.compact_to = 6
    log.commit(3)  # 4 to 6, gone with 1 to 3 before the tail reads them
    with pytest.raises(BackendUnavailable, match="event log"):
        await asyncio.wait_for(reading, 10)
    assert not hub.tailing
    await stream.aclose()


@pytest.mark.parametrize("closing", [False, True], ids=["after", "while the tail closes"])
async def test_a_new_stream_is_not_failed_by_the_gap_that_ended_the_others(closing: bool):
    """A stream still writing out what it held when its tail hit a gap stays
    subscribed a while; a stream that joins meanwhile starts a tail from its own
    position, not from the gap, which would end it too."""
    log = CompactingLog()
    hub, failed, reading = await joined_stream(log, 3)
    log.commit(1)
    assert await reading == [4]  # subscribed, and not read any further for now
    if closing:
        log.closing.clear()  # the failed tail stays in its shutdown meanwhile
    log.compact_to = 7
    log.commit(5)  # 5 to 7 go before the tail reads them
    await settle()
    assert not hub.tailing
    fresh: Any = one_by_one(hub.watch(EventFilter(), None, 30))
    assert await anext(fresh) == 9
    joined = asyncio.ensure_future(take_events(fresh, 2))
    await settle()
    log.closing.set()
    await settle()
    log.commit(2)
    assert await joined == [10, 11]
    await fresh.aclose()
    await settle()
    # A stream whose tail failed is fed by no tail: none runs for it alone.
    assert not hub.tailing
    with pytest.raises(BackendUnavailable, match="event log"):
        await take_events(failed, 1)


class ScopedLog(CompactingLog):
    """A log that filters as the store does, and records each read's window."""

    def __init__(self) -> None:
        super().__init__()
        self.windows: list[tuple[int, int | None]] = []

    async def read_events(
        self, after: int, limit: int, event_filter: EventFilter, until: int | None = None
    ) -> list[StoredEvent]:
        self.windows.append((after, until))
        found = await super().read_events(after, 10**9, EventFilter(), until)
        return [e for e in found if event_filter.matches(e.event)][:limit]


@pytest.mark.parametrize("interval", [0.0, 30.0], ids=["progress due", "progress not due"])
async def test_a_filtered_catch_up_reads_the_log_window_by_window(monkeypatch, interval):
    """A filtered read scans the log in order: over a large log a quiet scope's
    read would run past its budget. Each read covers a window of the log, and a
    window without a match moves the stream on with a progress, once the progress
    interval has passed since its last message (as a live stream's)."""
    monkeypatch.setattr(watch_module, "CATCH_UP_WINDOW", 10)
    log = ScopedLog()
    log.commit(34)
    wanted = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "wanted")
    log.events[30] = StoredEvent(31, replace(log.events[30].event, ref=wanted))
    hub = EventHub(log, poll_interval=30)
    stream: Any = one_by_one(hub.watch(EventFilter(project_id=wanted.project_id), 0, interval))
    progress = [10, 20, 30] if interval == 0 else []
    items = [await anext(stream) for _ in range(2 + len(progress))]
    # The start, a progress after each quiet window when due, then the one event.
    assert items[:-1] == [0, *progress]
    assert isinstance(items[-1], StoredEvent) and items[-1].sequence == 31
    assert log.windows == [(0, 10), (10, 20), (20, 30), (30, 34)]
    await stream.aclose()
