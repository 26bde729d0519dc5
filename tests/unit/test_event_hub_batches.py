"""A stream that asks for several events at a time gets those ready together, in
order, never more than it asked, whether they wait in its queue or it reads them
from the store (catching up after it lagged)."""

from __future__ import annotations

import asyncio
from typing import Any

from memsvc.domain._watch import EventFilter, EventHub
from tests.unit.test_event_hub_wakeups import NotifyingLog, settle


async def next_sequences(stream: Any) -> list[int]:
    """The sequences of the stream's next list of events (progress skipped)."""
    while True:
        item = await asyncio.wait_for(anext(stream), 10)
        if isinstance(item, list):
            return [stored.sequence for stored in item]


async def test_events_queued_together_come_together_up_to_the_maximum():
    log = NotifyingLog()
    hub = EventHub(log, poll_interval=30)
    stream: Any = hub.watch(EventFilter(), None, 30, max_events=3)
    assert await anext(stream) == 0
    waiting = asyncio.ensure_future(next_sequences(stream))
    await settle()  # joined, the tail started and read nothing
    log.commit(7)  # another replica's commits: the tail reads them at once
    assert await waiting == [1, 2, 3]
    assert [await next_sequences(stream), await next_sequences(stream)] == [[4, 5, 6], [7]]
    # A quiet stream's next event comes alone, as soon as it is offered.
    waiting = asyncio.ensure_future(next_sequences(stream))
    await settle()
    log.commit(1)
    assert await waiting == [8]
    await stream.aclose()


async def test_a_stream_that_lagged_catches_up_in_lists_of_at_most_the_maximum():
    log = NotifyingLog()
    hub = EventHub(log, poll_interval=30, queue_size=4)
    stream: Any = hub.watch(EventFilter(), None, 30, max_events=3)
    assert await anext(stream) == 0
    waiting = asyncio.ensure_future(next_sequences(stream))
    await settle()
    log.commit(10)  # offered at once: 4 fit the queue, the stream lags
    got = [await waiting]
    while sum(map(len, got)) < 10:
        got.append(await next_sequences(stream))
    assert all(1 <= len(sequences) <= 3 for sequences in got), got
    assert [s for sequences in got for s in sequences] == list(range(1, 11))
    # All read from the store: the four queued went when it lagged.
    assert got == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]
    log.commit(2)
    assert await next_sequences(stream) == [11, 12]  # live again
    await stream.aclose()


async def test_an_event_over_the_byte_budget_alone_is_still_delivered_live(monkeypatch):
    """The queue's byte bound never refuses an event to an empty queue: a stream that
    takes each event as it comes stays live (no lag, no read of the store)."""
    monkeypatch.setattr("memsvc.domain._watch.QUEUE_BYTES", 1)  # every event is over it
    log = NotifyingLog()
    hub = EventHub(log, poll_interval=30)
    lags: list[None] = []
    hub.watcher_lagged = lambda: lags.append(None)
    stream: Any = hub.watch(EventFilter(), None, 30)
    assert await anext(stream) == 0
    for sequence in range(1, 4):
        waiting = asyncio.ensure_future(next_sequences(stream))
        await settle()
        log.commit(1)
        assert await waiting == [sequence]
    assert not lags
    await stream.aclose()
