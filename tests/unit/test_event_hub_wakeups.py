"""The event hub's tail reads the log once per burst of commit notifications, and not
at all for events this process already offered (its own commits)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from memsvc.domain import EventRecord, EventType, SessionRef
from memsvc.domain._watch import EventFilter, EventHub, StoredEvent, Wakeup
from tests.helpers import one_by_one, take_events

REF = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")


def event(sequence: int) -> StoredEvent:
    return StoredEvent(sequence, EventRecord(str(uuid.uuid4()), EventType.SPAWNED, REF, None, 0))


class NotifyingLog:
    """An event log whose reads are counted and slow, and whose commit
    notifications the test sends (as PostgreSQL's LISTEN would)."""

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []
        self.reads = 0
        self.notifications: asyncio.Queue[Wakeup] = asyncio.Queue()  # and purges' scopes
        self.events_committed: Any = lambda events: None

    async def read_events(
        self, after: int, limit: int, event_filter: EventFilter, until: int | None = None
    ) -> list[StoredEvent]:
        self.reads += 1
        await asyncio.sleep(0.01)  # long enough for notifications to pile up
        last = until if until is not None else float("inf")
        return [e for e in self.events if after < e.sequence <= last][:limit]

    async def event_bounds(self) -> tuple[int, int]:
        return 0, len(self.events)

    async def read_events_in_bounds(
        self, after: int, limit: int, event_filter: EventFilter, until: int | None = None
    ) -> tuple[list[StoredEvent], int, int]:
        # One moment for both: nothing changes the log between them (no await
        # but the read's own, before which a subclass compacts).
        found = await self.read_events(after, limit, event_filter, until)
        return (found, *await self.event_bounds())

    @contextlib.asynccontextmanager
    async def event_wakeups(self) -> AsyncIterator[AsyncIterator[Wakeup]]:
        async def notified() -> AsyncIterator[Wakeup]:
            while True:
                yield await self.notifications.get()

        yield notified()

    def commit(self, count: int) -> list[StoredEvent]:
        """Append ``count`` events and notify each, as ``count`` transactions would."""
        last = self.events[-1].sequence if self.events else 0  # compaction keeps numbering
        new = [event(last + i + 1) for i in range(count)]
        self.events += new
        for stored in new:
            self.notifications.put_nowait(stored.sequence)
        return new


async def settle() -> None:
    """Long enough for the tail to take every notification and finish its reads."""
    await asyncio.sleep(0.1)


async def watching(log: NotifyingLog, count: int) -> tuple[EventHub, Any, Any]:
    """A hub over ``log`` (polling out of the way) with one live stream whose next
    ``count`` events are awaited; the tail has done its first read."""
    hub = EventHub(log, poll_interval=30)
    stream: Any = one_by_one(hub.watch(EventFilter(), None, 30))
    assert await anext(stream) == 0
    first = asyncio.ensure_future(take_events(stream, count))
    await settle()
    return hub, stream, first


async def test_a_burst_of_notifications_costs_a_read_or_two_not_one_each():
    log = NotifyingLog()
    _, stream, first = await watching(log, 50)
    reads = log.reads
    log.commit(50)  # 50 commits by another replica, notified at once
    assert await first == list(range(1, 51))
    await settle()
    assert log.reads - reads <= 3, f"{log.reads - reads} reads for one burst of 50"
    await stream.aclose()


async def test_notifications_of_events_already_offered_cause_no_read():
    log = NotifyingLog()
    hub, stream, first = await watching(log, 5)
    reads = log.reads
    # This process's own commits: handed over directly, then notified by the log.
    committed = log.commit(5)
    hub.publish_committed(committed)
    assert await first == [1, 2, 3, 4, 5]
    await settle()
    assert log.reads == reads, "the tail read the log again for its own commits"
    # A commit by another replica still wakes it.
    log.commit(1)
    assert await take_events(stream, 1) == [6]
    assert log.reads == reads + 1
    await stream.aclose()


def running_tails() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "memsvc-event-tail" and not t.done()]


async def test_a_kick_in_the_tick_the_last_watcher_leaves_leaves_one_tail():
    """The last watcher leaves (its tail is cancelled) in the same tick as a kick,
    and another stream joins: on Python 3.11 asyncio.wait_for lost that
    cancellation, and two tails ran (two readers, two LISTEN connections)."""
    hub = EventHub(NotifyingLog(), poll_interval=30)
    first: Any = one_by_one(hub.watch(EventFilter(), None, 30))
    await anext(first)
    first_next = asyncio.ensure_future(anext(first))
    await asyncio.sleep(0.1)  # joined: its tail waits for a kick
    second: Any = one_by_one(hub.watch(EventFilter(), None, 30))
    await anext(second)  # its start position; not joined yet
    hub.notify()  # all in one tick: a kick, the first leaves, the second joins
    first_next.cancel()
    second_next = asyncio.ensure_future(anext(second))
    await asyncio.sleep(0.1)
    assert running_tails() == [hub._tail]
    second_next.cancel()
    await asyncio.sleep(0.1)
    assert running_tails() == [] and not hub.tailing
    for stream in (first, second):
        await stream.aclose()


class ContextRecordingLog(NotifyingLog):
    """Records the call deadline and logged method its reads run under."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float | None, str | None]] = []

    async def read_events(
        self, after: int, limit: int, event_filter: EventFilter, until: int | None = None
    ) -> list[StoredEvent]:
        from memsvc.domain._call_deadline import current_deadline
        from memsvc.log import rpc_method

        self.seen.append((current_deadline(), rpc_method.get()))
        return await super().read_events(after, limit, event_filter, until)


async def test_the_tail_does_not_inherit_the_watch_call_that_started_it():
    """Found by a review: the tail, shared by every stream, ran in the context of
    the watch call that started it: its logs named that call (and, had the stream
    a call deadline set, which only unary calls have today, its reads would have
    been bounded by it)."""
    from memsvc.domain._call_deadline import call_deadline
    from memsvc.log import rpc_method

    log = ContextRecordingLog()
    hub = EventHub(log, poll_interval=0.05)
    token = rpc_method.set("/memsvc.v1.LifecycleService/WatchLifecycle")
    try:
        with call_deadline(60):
            stream: Any = one_by_one(hub.watch(EventFilter(), None, 30))
            assert await anext(stream) == 0
            log.commit(1)
            assert isinstance(await asyncio.wait_for(anext(stream), 5), StoredEvent)
    finally:
        rpc_method.reset(token)
    await stream.aclose()
    assert log.seen and all(seen == (None, None) for seen in log.seen), log.seen
