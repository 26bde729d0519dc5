"""Where a WatchLifecycle delivery's time goes, without gRPC (for docs/performance.md).

In one process, 1,000 consumers (``--watchers``) each wait for events; one event
at a time is offered to all of them, and the time until every consumer has
taken it is divided by the number of consumers (median over ``--events``
events). The variants add memsvc's per-delivery work step by step:

* ``queue``: a naive ``await queue.get()`` per consumer (what bench/_watch_fanout.py does);
* ``queue + wait_for``: the same get inside ``asyncio.wait_for(..., 10)``, as
  ``EventHub._live`` waits with the progress interval;
* ``queue + message``: the naive get, then ``event_message()`` and serialization;
* ``EventHub``: memsvc's hub (memsvc/domain/_watch.py) with a store stub, its
  ``watch()`` iterated as the servicer does, yielding no message;
* ``EventHub + message``: the same, building and serializing the response per
  consumer, as ``LifecycleServicer.WatchLifecycle`` and grpc do.

It also times ``event_message()`` and its serialization alone. Rerun::

    .venv/bin/python -m bench._watch_probe [--watchers 1000] [--events 40]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from memsvc.api._lifecycle import event_message
from memsvc.domain._ids import SessionRef
from memsvc.domain._lifecycle_records import EventRecord, EventType
from memsvc.domain._watch import EventFilter, EventHub, StoredEvent
from memsvc.v1 import lifecycle_pb2 as lc

PROJECT = str(uuid.uuid4())
REF = SessionRef(PROJECT, str(uuid.uuid4()), "w-01")


def stored(sequence: int) -> StoredEvent:
    """A CHECKPOINT_CREATED event like the benchmark's."""
    record = EventRecord(
        str(uuid.uuid4()),
        EventType.CHECKPOINT_CREATED,
        REF,
        None,
        int(time.time() * 1000),
        checkpoint_id=str(uuid.uuid4()),
        metadata={"sent": time.time()},
    )
    return StoredEvent(sequence, record)


def respond(event: StoredEvent) -> bytes:
    return lc.WatchLifecycleResponse(event=event_message(event)).SerializeToString()


class _Source:
    """An in-memory event log for EventHub."""

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []
        # Part of EventSource; the probe offers events through the read path only.
        self.events_committed: Callable[[list[StoredEvent]], None] = lambda events: None

    async def read_events(
        self, after: int, limit: int, event_filter: EventFilter, until: int | None = None
    ) -> list[StoredEvent]:
        last = until if until is not None else float("inf")
        return [e for e in self.events if after < e.sequence <= last][:limit]

    async def event_bounds(self) -> tuple[int, int]:
        return 0, len(self.events)

    async def read_events_in_bounds(
        self, after: int, limit: int, event_filter: EventFilter, until: int | None = None
    ) -> tuple[list[StoredEvent], int, int]:
        return (await self.read_events(after, limit, event_filter, until), 0, len(self.events))

    @contextlib.asynccontextmanager
    async def event_wakeups(self) -> AsyncIterator[AsyncIterator[int]]:
        async def never() -> AsyncIterator[int]:
            await asyncio.Event().wait()
            yield 0

        yield never()


class _Countdown:
    def __init__(self) -> None:
        self.left = 0
        self.done = asyncio.Event()

    def arm(self, count: int) -> None:
        self.left = count
        self.done.clear()

    def tick(self) -> None:
        self.left -= 1
        if not self.left:
            self.done.set()


async def _per_delivery_us(
    watchers: int, events: int, offer: Callable[[StoredEvent], None], countdown: _Countdown
) -> float:
    times: list[float] = []
    for sequence in range(1, events + 1):
        event = stored(sequence)
        countdown.arm(watchers)
        started = time.perf_counter()
        offer(event)
        await countdown.done.wait()
        times.append(time.perf_counter() - started)
    return statistics.median(times) / watchers * 1e6


async def queue_variant(watchers: int, events: int, with_wait_for: bool, message: bool) -> float:
    queues = [asyncio.Queue[StoredEvent]() for _ in range(watchers)]
    countdown = _Countdown()

    async def consume(queue: asyncio.Queue[StoredEvent]) -> None:
        while True:
            if with_wait_for:
                event = await asyncio.wait_for(queue.get(), 10)
            else:
                event = await queue.get()
            if message:
                respond(event)
            countdown.tick()

    def offer(event: StoredEvent) -> None:
        for queue in queues:
            queue.put_nowait(event)

    tasks = [asyncio.create_task(consume(queue)) for queue in queues]
    await asyncio.sleep(0.01)
    try:
        return await _per_delivery_us(watchers, events, offer, countdown)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def hub_variant(watchers: int, events: int, message: bool) -> float:
    source = _Source()
    hub = EventHub(source, max_watchers=watchers + 1)
    countdown = _Countdown()
    ready = _Countdown()
    ready.arm(watchers)

    async def consume() -> None:
        async for item in hub.watch(EventFilter(project_id=PROJECT), None, 10.0):
            if isinstance(item, int):
                ready.tick()
                continue
            for stored in item:
                if message:
                    respond(stored)
                countdown.tick()

    def offer(event: StoredEvent) -> None:
        source.events.append(event)
        hub.notify()

    tasks = [asyncio.create_task(consume()) for _ in range(watchers)]
    await ready.done.wait()
    await asyncio.sleep(0.05)
    try:
        return await _per_delivery_us(watchers, events, offer, countdown)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def main(watchers: int, events: int) -> None:
    variants: list[tuple[str, Callable[[], Awaitable[float]]]] = [
        ("queue", lambda: queue_variant(watchers, events, False, False)),
        ("queue + wait_for", lambda: queue_variant(watchers, events, True, False)),
        ("queue + message", lambda: queue_variant(watchers, events, False, True)),
        ("EventHub", lambda: hub_variant(watchers, events, False)),
        ("EventHub + message", lambda: hub_variant(watchers, events, True)),
    ]
    for attempt in range(2):
        for name, run in variants:
            print(f"try {attempt + 1}  {name:20} {await run():6.1f} µs/delivery")
    event, count = stored(5000), 20_000
    started = time.perf_counter()
    for _ in range(count):
        response = lc.WatchLifecycleResponse(event=event_message(event))
    built = time.perf_counter()
    for _ in range(count):
        response.SerializeToString()
    ended = time.perf_counter()
    print(
        f"event_message + WatchLifecycleResponse: {(built - started) / count * 1e6:.2f} µs; "
        f"SerializeToString: {(ended - built) / count * 1e6:.2f} µs; {response.ByteSize()} bytes"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=40)
    args = parser.parse_args()
    asyncio.run(main(args.watchers, args.events))
