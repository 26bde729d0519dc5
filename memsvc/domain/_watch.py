"""Watching the lifecycle event log: one tail per process, fanned out to streams.

The log's sequences are gap-free in commit order (the counter row serializes
writers until they commit), so "every event with sequence > N" is a cursor that
never skips a late commit. :class:`EventHub` runs one tail while it has
subscribers: it reads new events from the durable store when woken (a NOTIFY,
an in-process commit, or a poll as a safety net) and offers each to every live
subscriber's bounded queue. A subscriber whose queue is full is not waited
for: it is marked lagging and catches up by reading the store itself, at its
own pace, before it rejoins (etcd's synced and unsynced watchers).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from memsvc.domain._errors import (
    BackendUnavailable,
    FieldViolation,
    OutOfRange,
    ResourceExhausted,
)
from memsvc.domain._ids import SessionRef, check_session_id, check_uuid, raise_if_any
from memsvc.domain._lifecycle_records import (
    KNOWN_EVENT_TYPES,
    EventRecord,
    EventType,
    tombstone,
)

log = logging.getLogger(__name__)

READ_BATCH = 500
# A stream catching up holds what it read until its client has taken it, and a
# thousand streams of slow clients hold a thousand such reads: each takes about
# this many bytes of events at most (at the weight of the events its last read
# found), not READ_BATCH events of 64 KiB of metadata each. The first takes 16.
CATCH_UP_BYTES = 1 << 20
CATCH_UP_FIRST_ROWS = 16
# A live stream's queue holds events of at most this many bytes too (besides its
# count, EventHub's queue_size): one whose client stopped reading holds no more.
QUEUE_BYTES = CATCH_UP_BYTES
# The purges a hub remembers, with their scopes, for the reads they overtook: far
# more than can commit during one read.
RECENT_PURGES = 1000
# The most of the log one catch-up read scans, in sequences. A filtered read finds
# its events by scanning the log in order (no index per scope or type, which every
# commit would pay for), so over a large log a quiet scope's read would run for
# seconds, past its retry budget, and the stream could never catch up; window by
# window, each read is short, and a long catch-up reports its progress.
CATCH_UP_WINDOW = 20_000
# How long the tail retries failing reads before its streams end (UNAVAILABLE).
TAIL_FAILING_SECONDS = 30.0


class EventsCompacted(Exception):
    """The tail's next event is past the next sequence: the ones between are gone."""

    def __init__(self, position: int, found: int) -> None:
        super().__init__(
            f"events {position + 1} to {found - 1} were compacted before the tail read them"
        )


class EventsRewound(Exception):
    """The log's latest sequence is behind the tail's position: the database lost
    its last commits (a failover to a standby that had not received them, a
    restore) and reuses their sequences."""

    def __init__(self, position: int, latest: int | None) -> None:
        went = (
            f"went back from sequence {position} to {latest}"
            if latest is not None
            else f"holds another event at sequence {position}"
        )
        super().__init__(f"the event log {went}: the database lost its last commits")


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event with its position in the log."""

    sequence: int
    event: EventRecord


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a subscriber wants; empty fields match everything."""

    project_id: str = ""
    agent_instance_id: str = ""
    session_id: str = ""
    event_types: frozenset[EventType] = frozenset()

    @property
    def scoped(self) -> bool:
        """Whether it names a project, an agent instance or a session."""
        return bool(self.project_id or self.agent_instance_id or self.session_id)

    def matches(self, event: EventRecord) -> bool:
        if event.purged and self.scoped:
            return False  # a tombstone's ids are not its subject's (nil): it matches none
        return (
            (not self.project_id or event.ref.project_id == self.project_id)
            and (
                not self.agent_instance_id or event.ref.agent_instance_id == self.agent_instance_id
            )
            and (not self.session_id or event.ref.session_id == self.session_id)
            and (not self.event_types or event.event_type in self.event_types)
        )


# What wakes the tail besides its poll: another process committed events (their
# last sequence; 0 when unknown), or purged a scope (its events became tombstones).
Wakeup = int | SessionRef


class EventSource(Protocol):
    """What the hub needs from the durable store."""

    async def read_events(
        self, after: int, limit: int, event_filter: EventFilter, until: int | None = None
    ) -> list[StoredEvent]:
        """Up to ``limit`` matching events with sequence > ``after`` (and <= ``until``,
        when given), in order."""

    async def event_bounds(self) -> tuple[int, int]:
        """(the oldest position a watch may start after, the latest sequence)."""

    async def read_events_in_bounds(
        self, after: int, limit: int, event_filter: EventFilter, until: int | None = None
    ) -> tuple[list[StoredEvent], int, int]:
        """read_events and event_bounds as of one moment (one snapshot of the log)."""

    events_committed: Callable[[list[StoredEvent]], None]
    """Set by the hub: called with the events of each transaction this process commits."""

    def event_wakeups(self) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Wakeup]]:
        """Wake-ups when other processes commit events or purge (PostgreSQL
        LISTEN); an iterator that never yields where there is no such channel."""


class PositionTooOld(OutOfRange):
    """The start position is older than the retained events."""

    reason = "ERROR_REASON_WATCH_POSITION_COMPACTED"

    def __init__(self, asked: int, oldest: int) -> None:
        super().__init__(
            f"events after {asked} are no longer retained; the oldest position to resume "
            f"after is {oldest} (start again from there or from now)",
            metadata={
                "oldest_sequence": str(oldest),
                # The oldest event still retained (the one a resume after
                # oldest_sequence gets first), for clients that want it by name.
                "oldest_retained_sequence": str(oldest + 1),
                "after_sequence": str(asked),
            },
        )


class PositionAhead(OutOfRange):
    """The start position is past the latest event: not a cursor of this log."""

    reason = "ERROR_REASON_WATCH_POSITION_AHEAD"

    def __init__(self, asked: int, latest: int) -> None:
        super().__init__(
            f"after_sequence {asked} is past the latest event, {latest}: it is not a "
            "position of this event log (a cursor from another deployment, or from before "
            "a database restore?); resume after the latest, or start from now",
            metadata={"latest_sequence": str(latest), "after_sequence": str(asked)},
        )


class TooManyWatchers(ResourceExhausted):
    """The process already serves its maximum number of watchers."""

    reason = "ERROR_REASON_TOO_MANY_WATCHERS"
    subject = "watchers"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this memsvc already serves {limit} watchers; retry later or on another replica",
            metadata={"limit": str(limit)},
        )


@dataclass(eq=False)
class _Subscriber:
    """One watch stream's place in the hub: a bounded queue and how it waits.

    Not an asyncio.Queue read with wait_for: on Python 3.11 that costs a new
    task and a timer per delivery. The stream waits on a plain future that an
    offered event resolves, and its progress timer is armed once per interval,
    not once per wait.
    """

    event_filter: EventFilter
    capacity: int
    # Events up to here were delivered (or did not match); the hub skips them.
    cursor: int
    lagging: bool = False
    queue: collections.deque[StoredEvent] = field(default_factory=collections.deque)
    # The size of each queued event (EventRecord.size()), in step with queue.
    weights: collections.deque[int] = field(default_factory=collections.deque)
    queued_bytes: int = 0
    waiter: asyncio.Future[None] | None = None
    timer: asyncio.TimerHandle | None = None
    # Set when the tail that fed this stream failed: the stream ends with it.
    failure: BackendUnavailable | None = None

    def offer(self, stored: StoredEvent, weight: int) -> bool:
        """Queue an event of ``weight`` bytes for the stream; False (lagging from
        now) when its queue is full, by count or by bytes."""
        # An event alone is queued whatever its weight: far under the budget by the
        # limits on metadata, and a stream that could never hold it would lag forever.
        if len(self.queue) >= self.capacity or (
            self.queue and self.queued_bytes + weight > QUEUE_BYTES
        ):
            # It catches up from the store after its cursor, which moves only as it
            # takes events: what it holds goes now. Kept, a stream whose client
            # stopped reading would hold its queue as long as it stays connected,
            # each such stream other events, until the process runs out of memory.
            self.lagging = True
            self.replace_queue(())
            self.wake()
            return False
        self.queue.append(stored)
        self.weights.append(weight)
        self.queued_bytes += weight
        self.wake()
        return True

    def take(self) -> StoredEvent:
        """The oldest queued event, off the queue."""
        self.queued_bytes -= self.weights.popleft()
        return self.queue.popleft()

    def replace_queue(self, events: Iterable[tuple[StoredEvent, int]]) -> None:
        """Queue ``events`` (each with its weight) instead of what is queued, in
        place: _live holds the deque."""
        self.queue.clear()
        self.weights.clear()
        for stored, weight in events:
            self.queue.append(stored)
            self.weights.append(weight)
        self.queued_bytes = sum(self.weights)

    def scrub(self, scope: SessionRef, up_to: int | None) -> None:
        """Its queue as a purge of ``scope`` (up to ``up_to``) left the log; only the
        tombstones made are weighed again (weighing walks an event's metadata: a
        purge weighing every queued event of every stream held the event loop for
        seconds)."""
        kept = []
        for stored, weight in zip(self.queue, self.weights, strict=True):
            scrubbed = _scrub_one(stored, scope, self.event_filter, up_to)
            if scrubbed is not None:
                kept.append((scrubbed, weight if scrubbed is stored else scrubbed.event.size()))
        self.replace_queue(kept)

    def fail(self, cause: BaseException) -> None:
        """The tail is gone: end the stream (UNAVAILABLE) after what it queued."""
        self.failure = BackendUnavailable("event log", cause)
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def ring(self) -> None:
        """The progress timer fired."""
        self.timer = None
        self.wake()


class EventHub:
    """One tail of the event log per process, shared by all its watchers."""

    def __init__(
        self,
        source: EventSource,
        *,
        queue_size: int = 1000,
        poll_interval: float = 1.0,
        max_watchers: int = 1000,
    ) -> None:
        self._source = source
        self._queue_size = queue_size
        self._poll_interval = poll_interval
        self.max_watchers = max_watchers
        self._subscribers: set[_Subscriber] = set()
        self._streams = 0
        # Every event up to here has been offered to the live subscribers.
        self.position = 0
        # The id of the event at the position, when the hub offered it: a log that
        # went back (a database that lost its last commits) and grew again holds
        # another event there.
        self._position_event: str | None = None
        self._tail: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        # Counts the purges this hub was told of, the latest with their scopes: a
        # read that a purge overtook makes tombstones of what it read (see purged).
        self._purges = 0
        self._recent_purges: collections.deque[tuple[int, SessionRef, int | None]] = (
            collections.deque(maxlen=RECENT_PURGES)
        )
        # Told each event as the tail hands it to the watchers, and each time a
        # watcher falls behind (the server's metrics).
        self.event_offered: Callable[[StoredEvent], None] = lambda stored: None
        self.watcher_lagged: Callable[[], None] = lambda: None

    @property
    def watchers(self) -> int:
        """Open watch streams in this process."""
        return self._streams

    @property
    def tailing(self) -> bool:
        """Whether the tail runs (only while someone watches)."""
        return self._tail is not None and not self._tail.done()

    def notify(self) -> None:
        """An event was committed in this process: read the log now."""
        self._kick.set()

    def publish_committed(self, events: Sequence[StoredEvent]) -> None:
        """Events this process just committed: offer them without reading them back.

        Only in sequence order: when another process committed in between (a
        gap), the tail reads the store instead.
        """
        if not self.tailing:
            return
        for stored in sorted(events, key=lambda e: e.sequence):
            if stored.sequence <= self.position:
                continue
            if stored.sequence != self.position + 1:
                self.notify()
                return
            self._offer(stored)
            self._offered_up_to(stored)

    def purged(self, scope: SessionRef, up_to: int | None = None) -> None:
        """A purge of ``scope`` committed (here, or on a replica that announced it):
        the events of that scope this hub holds for its streams become tombstones,
        as they now are in the log, and those a stream's filter no longer matches
        go; so do the reads of the tail and of catch-ups that were under way (see
        _as_purged). What a stream is writing already (the events it took from its
        queue: up to max_events_per_message, or _EVENTS_TAKEN_AT_ONCE without it)
        goes out as it was.

        Only events up to ``up_to`` (None: all), the last the purge can have made
        a tombstone: one of the scope committed after it (the session id spawned
        again) is live, and the purge may be told after this hub queued it.
        """
        self._purges += 1
        self._recent_purges.append((self._purges, scope, up_to))
        for subscriber in self._subscribers:
            subscriber.scrub(scope, up_to)

    def _as_purged(
        self, events: list[StoredEvent], purges: int, event_filter: EventFilter
    ) -> list[StoredEvent] | None:
        """``events``, read when the hub had been told of ``purges`` purges, as the
        purges told since left them (tombstones, or gone where ``event_filter`` no
        longer matches them); None when those purges are no longer all known (more
        than RECENT_PURGES since): the caller reads them again."""
        if self._purges == purges:
            return events
        since = [(scope, up_to) for number, scope, up_to in self._recent_purges if number > purges]
        if len(since) != self._purges - purges:
            return None
        for scope, up_to in since:
            events = list(_scrubbed(events, scope, event_filter, up_to))
        return events

    def _offered_up_to(self, stored: StoredEvent) -> None:
        self.position, self._position_event = stored.sequence, stored.event.event_id

    async def watch(
        self,
        event_filter: EventFilter,
        after: int | None,
        progress_interval: float,
        from_oldest: bool = False,
        max_events: int = 1,
    ) -> AsyncGenerator[list[StoredEvent] | int, None]:
        """Yield matching events after ``after`` (None: now, or the oldest retained
        with ``from_oldest``), and progress positions.

        Events come in lists of 1 to ``max_events``, in sequence order: those ready
        together (read together, or queued while the stream wrote the last ones).
        No list waits to be filled. The first item is the start position; later
        ints are progress positions, sent when nothing matched for
        ``progress_interval`` seconds.
        """
        if self._streams >= self.max_watchers:
            raise TooManyWatchers(self.max_watchers)
        # Counted before the first await: streams arriving together cannot all
        # pass the limit while they wait for the bounds.
        self._streams += 1
        subscriber: _Subscriber | None = None
        try:
            oldest, latest = await self._source.event_bounds()
            cursor = (oldest if from_oldest else latest) if after is None else after
            if cursor < oldest:
                raise PositionTooOld(cursor, oldest)
            if cursor > latest:
                # Taken as the hub's position, it would hide every event up to it.
                raise PositionAhead(cursor, latest)
            subscriber = _Subscriber(event_filter, self._queue_size, cursor)
            if not self._fed() and not self.tailing:
                # The tail this stream will start begins at the latest event; up to
                # there the stream reads the store itself, where compaction is
                # checked (a tail started further back would not check it). The
                # latest, not the higher of it and where an earlier tail stopped: a
                # database that lost its last commits reuses their sequences.
                self.position, self._position_event = latest, None
            yield cursor
            loop = asyncio.get_running_loop()
            sent_at = loop.time()  # of the stream's last message
            # A stream that asked for the oldest event and has had none yet follows
            # compaction instead of failing: the oldest is whatever is kept.
            following_oldest = after is None and from_oldest
            rows = CATCH_UP_FIRST_ROWS
            while True:
                # Catch up from the store until the hub's position...
                while cursor < (target := self.position):
                    until = min(target, cursor + CATCH_UP_WINDOW)
                    purges = self._purges
                    # The read and the log's ends of one snapshot: compaction that
                    # commits after it cannot make what the read got look lost.
                    batch, oldest, _ = await self._source.read_events_in_bounds(
                        cursor, rows, event_filter, until
                    )
                    asked, rows = rows, _next_rows(rows, batch)
                    if cursor < oldest and following_oldest:
                        cursor = oldest
                        yield cursor  # a progress: nothing up to there is kept
                        sent_at = loop.time()
                        continue
                    if cursor < oldest:
                        # Compacted while this stream caught up: what it had not read
                        # yet is gone.
                        raise PositionTooOld(cursor, oldest)
                    pending: list[StoredEvent] | None = batch
                    while pending:
                        # A purge told while this stream read or wrote: what it holds
                        # goes as the log now has it.
                        pending = self._as_purged(pending, purges, event_filter)
                        purges = self._purges
                        if not pending:
                            break
                        ready, pending = pending[:max_events], pending[max_events:]
                        cursor, following_oldest = ready[-1].sequence, False
                        yield ready
                        sent_at = loop.time()
                    if pending is None:
                        continue  # too many purges since to know them all: read again
                    if len(batch) < asked:
                        cursor = until  # nothing else of the window matches
                        if until < target and loop.time() - sent_at >= progress_interval:
                            # A long catch-up reports its progress, as a live stream
                            # does while nothing matches (one from the oldest that has
                            # had no event still follows compaction past it).
                            yield cursor
                            sent_at = loop.time()
                # ...then join it, with no await in between: nothing slips past.
                following_oldest = False
                self._join(subscriber, cursor)
                async for item in self._live(subscriber, progress_interval, max_events):
                    cursor = item if isinstance(item, int) else item[-1].sequence
                    yield item
                # _live returns only when the subscriber lagged: catch up again.
        finally:
            self._streams -= 1
            if subscriber is not None:
                self._leave(subscriber)

    def _join(self, subscriber: _Subscriber, cursor: int) -> None:
        subscriber.cursor = cursor
        subscriber.lagging = False
        alone = not self._fed()
        self._subscribers.add(subscriber)
        if not self.tailing:
            if alone and cursor > self.position:
                # Nobody else waits on the events up to here: the new tail may
                # start where this stream stands. With others, it starts where
                # they stand, and this stream skips what it already has.
                self.position, self._position_event = cursor, None
            # A context of its own: the tail serves every stream, not the call that
            # happened to start it (its deadline, the method its logs name).
            self._tail = asyncio.create_task(
                self._follow(), name="memsvc-event-tail", context=contextvars.Context()
            )

    def _waiting(self) -> Iterator[_Subscriber]:
        """The subscribers that wait on the tail for events. One whose tail failed
        only writes out what it holds: a new tail need not start where it stands
        (where the old one failed, say on events compaction removed)."""
        return (subscriber for subscriber in self._subscribers if subscriber.failure is None)

    def _fed(self) -> bool:
        return next(self._waiting(), None) is not None

    def _leave(self, subscriber: _Subscriber) -> None:
        self._subscribers.discard(subscriber)
        if not self._fed() and self._tail is not None:
            # Release the tail (and its LISTEN connection) with the last watcher it
            # feeds (one whose tail failed only writes out what it holds).
            self._tail.cancel()
            self._tail = None

    async def _live(
        self, subscriber: _Subscriber, progress_interval: float, max_events: int
    ) -> AsyncGenerator[list[StoredEvent] | int, None]:
        """The events offered to ``subscriber``, up to ``max_events`` at a time,
        and a progress position whenever ``progress_interval`` passes without
        one; returns once it lagged (its queue was emptied then; what it had
        already taken goes out first)."""
        loop = asyncio.get_running_loop()
        queue = subscriber.queue
        quiet_since = loop.time()
        try:
            while True:
                while queue:
                    ready: list[StoredEvent] = []
                    while queue and len(ready) < max_events:
                        stored = subscriber.take()
                        if stored.sequence > subscriber.cursor:
                            subscriber.cursor = stored.sequence
                            ready.append(stored)
                    if ready:
                        yield ready
                        quiet_since = loop.time()
                if subscriber.failure is not None:
                    raise subscriber.failure
                if subscriber.lagging:
                    self._subscribers.discard(subscriber)
                    return
                due = quiet_since + progress_interval
                if loop.time() >= due:
                    # Everything up to the hub's position was offered and taken.
                    subscriber.cursor = max(subscriber.cursor, self.position)
                    yield subscriber.cursor
                    quiet_since = loop.time()
                    continue
                if subscriber.timer is None:
                    # Left armed while events flow: when it fires early, the
                    # stream finds its new due time and arms it again.
                    subscriber.timer = loop.call_at(due, subscriber.ring)
                subscriber.waiter = loop.create_future()
                try:
                    await subscriber.waiter
                finally:
                    subscriber.waiter = None
        finally:
            if subscriber.timer is not None:
                subscriber.timer.cancel()
                subscriber.timer = None

    async def _follow(self) -> None:
        """The tail: read new events and offer them to the live subscribers.

        Should it fail (it retries reads; the store falls back to polling when
        notifications fail), its subscribers end with UNAVAILABLE, so that their
        clients reconnect with their cursors: a stream never waits, receiving
        progress at a stale position, on a tail that is gone.
        """
        try:
            async with self._source.event_wakeups() as wakeups:
                listener = asyncio.create_task(self._listen(wakeups), name="memsvc-event-listen")
                try:
                    await self._read_while_watched()
                except Exception as error:
                    # Before letting go (no await in between): a stream that joins
                    # while this tail closes starts another from its own position,
                    # not from where this one failed (a gap would fail it too).
                    self._fail_subscribers(error)
                    raise
                finally:
                    self._let_go()
                    listener.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await listener
        except Exception as error:
            self._let_go()
            if not self.tailing:  # unless a stream that joined since started another
                self._fail_subscribers(error)
        finally:
            self._let_go()

    def _fail_subscribers(self, error: BaseException) -> None:
        """End the streams this tail fed (UNAVAILABLE: they reconnect with their cursors)."""
        fed = list(self._waiting())
        if fed:
            log.error(
                "the event tail failed: its %d watchers must reconnect",
                len(fed),
                exc_info=(type(error), error, error.__traceback__),
            )
        for subscriber in fed:
            subscriber.fail(error)

    def _let_go(self) -> None:
        """From here this tail serves nobody: a stream that (re)joins while it
        closes must start another, not count on this one."""
        if self._tail is asyncio.current_task():
            self._tail = None

    async def _read_while_watched(self) -> None:
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        # Only while it is the hub's tail: a tail let go (cancelled) ends, even if a
        # cancellation was lost (see below) and streams joined a new tail since.
        while self._fed() and self._tail is asyncio.current_task():
            self._kick.clear()
            # Where the log was known to reach before reading: publish_committed may
            # move the position on during the reads, past what they see.
            reached, known = self.position, self._position_event
            # With the event at the position (when its id is known): the log must not
            # have gone back behind this tail and grown again, which would make it
            # skip the events that reuse those sequences.
            start = reached - 1 if known is not None else reached
            oldest: int | None = None
            latest: int | None = None
            replaced = False
            purges = self._purges
            try:
                batch = await self._source.read_events(start, READ_BATCH, EventFilter())
                full = len(batch) == READ_BATCH
                verified = False
                if start < reached and batch and batch[0].sequence == reached:
                    replaced = batch[0].event.event_id != known
                    batch, verified = batch[1:], True
                if not verified and (start < reached or not batch):
                    # The event at the position is gone (compacted, or the log went
                    # back), or not known and nothing new: compare with the log's ends.
                    oldest, latest = await self._source.event_bounds()
                failing_since = None
            except Exception as error:
                # Retried (a database that restarts comes back): streams wait and
                # get progress meanwhile. Past TAIL_FAILING_SECONDS the tail gives
                # up, and its streams end with UNAVAILABLE and reconnect.
                now = loop.time()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since >= TAIL_FAILING_SECONDS:
                    raise
                log.warning("event tail read failed: %s", error)
                batch, full = [], False
            if replaced:
                raise EventsRewound(reached, None)
            # A purge told during the read (its commit came after it): tombstones.
            as_purged = self._as_purged(batch, purges, EventFilter())
            if as_purged is None:
                continue  # too many purges since to know them all: read again
            batch = as_purged
            for stored in batch:
                if stored.sequence <= self.position:
                    continue  # already offered by publish_committed meanwhile
                if stored.sequence != self.position + 1:
                    # Sequences have no gaps (purges leave tombstones): compaction
                    # removed events this tail had not read (it fell behind by more
                    # than event_keep_last). Its streams end and reconnect from their
                    # cursors, which the catch-up refuses with OUT_OF_RANGE.
                    raise EventsCompacted(self.position, stored.sequence)
                self._offer(stored)
                self._offered_up_to(stored)
            if full:
                continue
            if latest is not None and latest < reached:
                raise EventsRewound(reached, latest)
            if oldest is not None and oldest > self.position:
                # Compaction removed every event after this tail's position (a tail
                # behind by more than the retention): no later event shows the gap.
                raise EventsCompacted(self.position, oldest + 1)
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally
            # when a cancellation arrives as the kick completes, losing it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._kick.wait()

    async def _listen(self, wakeups: AsyncIterator[Wakeup]) -> None:
        """Turn commit notifications into kicks of the tail: one read for however
        many arrived while it was reading, and none for an event already offered
        (this process's own commits, which publish_committed handed over); and
        another replica's purges into tombstones of what this hub holds."""
        # The last sequence an append announced on this connection; None when
        # unknown (0: none yet, or since it was made again).
        announced: int | None = None
        async for wakeup in wakeups:
            if isinstance(wakeup, SessionRef):
                # On one channel, in commit order: every event the purge made a
                # tombstone was announced before it, and later ones after.
                self.purged(wakeup, announced)
                continue
            announced = None if wakeup == 0 else max(announced or 0, wakeup)
            if wakeup == 0 or wakeup > self.position:
                self._kick.set()

    def _offer(self, stored: StoredEvent) -> None:
        self.event_offered(stored)
        weight: int | None = None  # weighed once, for the first stream that takes it
        for subscriber in self._subscribers:
            if (
                subscriber.lagging
                or subscriber.failure is not None  # its tail failed: it ends, gets no more
                or stored.sequence <= subscriber.cursor
                or not subscriber.event_filter.matches(stored.event)
            ):
                continue
            if weight is None:
                weight = stored.event.size()
            if not subscriber.offer(stored, weight):
                # Never wait for a slow reader: it catches up from the store.
                self.watcher_lagged()


def _next_rows(rows: int, batch: Sequence[StoredEvent]) -> int:
    """How many events the next catch-up read may take: twice as many as the last
    while they stay within CATCH_UP_BYTES at its events' weight, READ_BATCH at most."""
    if not batch:
        return rows
    weight = sum(stored.event.size() for stored in batch) / len(batch)
    return max(1, min(READ_BATCH, 2 * rows, int(CATCH_UP_BYTES // weight)))


def _scrubbed(
    events: Iterable[StoredEvent],
    scope: SessionRef,
    event_filter: EventFilter,
    up_to: int | None = None,
) -> Iterator[StoredEvent]:
    """``events`` as a purge of ``scope`` (up to ``up_to``) left them: tombstones of
    its events, dropped where ``event_filter`` no longer matches them."""
    for stored in events:
        scrubbed = _scrub_one(stored, scope, event_filter, up_to)
        if scrubbed is not None:
            yield scrubbed


def _scrub_one(
    stored: StoredEvent, scope: SessionRef, event_filter: EventFilter, up_to: int | None
) -> StoredEvent | None:
    """``stored`` itself, or its tombstone if it is of ``scope`` and not after
    ``up_to`` (None: any); None when ``event_filter`` no longer matches that."""
    if (
        stored.event.purged
        or not stored.event.ref.within(scope)
        or (up_to is not None and stored.sequence > up_to)
    ):
        return stored
    scrubbed = StoredEvent(stored.sequence, tombstone(stored.event))
    return scrubbed if event_filter.matches(scrubbed.event) else None


MIN_PROGRESS_SECONDS = 0.1
# A quiet subscriber's cursor must stay current: at least one progress an hour.
MAX_PROGRESS_SECONDS = 3600.0
DEFAULT_PROGRESS_SECONDS = 10.0
# The most events a stream may ask to get in one message (max_events_per_message).
MAX_EVENTS_PER_MESSAGE = 1000


# WatchStart's values: UNSPECIFIED (as NOW), NOW, OLDEST.
WATCH_STARTS = range(3)
# Entries a watch's event_types filter may list (each type once needs far fewer).
MAX_WATCH_EVENT_TYPES = 64


def check_watch_request(
    project_id: str,
    agent_instance_id: str,
    session_id: str,
    event_types: Sequence[int],
    after_sequence: int,
    start: int,
    progress_seconds: float | None,
    max_events_per_message: int = 0,
    found: Sequence[FieldViolation] = (),
) -> tuple[EventFilter, float]:
    """Validate a watch request: its filter, start position, progress interval and
    batch size (with the violations ``found`` before, by the API)."""
    violations = list(found)
    if project_id:
        project_id = check_uuid(project_id, "project_id", violations)
    if agent_instance_id:
        agent_instance_id = check_uuid(agent_instance_id, "agent_instance_id", violations)
    if session_id:
        check_session_id(session_id, "session_id", violations)
    types = set()
    if len(event_types) > MAX_WATCH_EVENT_TYPES:
        # A stream keeps its request for as long as it runs: 4 MB of one type
        # repeated held 7.5 MB a stream (a review).
        violations.append(
            FieldViolation(
                "event_types",
                f"has {len(event_types)} entries, over {MAX_WATCH_EVENT_TYPES}: list each"
                " type once",
            )
        )
        event_types = ()
    for index, value in enumerate(event_types):
        if value in KNOWN_EVENT_TYPES:
            types.add(EventType(value))
        elif value == 0:
            violations.append(
                FieldViolation(
                    f"event_types[{index}]",
                    "is EVENT_TYPE_UNSPECIFIED, which no event has: list the types to"
                    " watch, or none to watch every type",
                )
            )
        else:
            violations.append(
                FieldViolation(f"event_types[{index}]", f"is not an EventType value: {value}")
            )
    if after_sequence < 0:
        violations.append(FieldViolation("after_sequence", "must not be negative"))
    if start not in WATCH_STARTS:
        violations.append(
            FieldViolation("start", f"is not a WatchStart value (0, 1 or 2): {start}")
        )
    # Zero as unset, as every other Duration of the API: a client's empty Duration.
    interval = progress_seconds or DEFAULT_PROGRESS_SECONDS
    if not MIN_PROGRESS_SECONDS <= interval <= MAX_PROGRESS_SECONDS:
        violations.append(
            FieldViolation(
                "progress_interval",
                f"must be from {MIN_PROGRESS_SECONDS}s to {MAX_PROGRESS_SECONDS:.0f}s",
            )
        )
    if not 0 <= max_events_per_message <= MAX_EVENTS_PER_MESSAGE:
        violations.append(
            FieldViolation(
                "max_events_per_message",
                f"must be from 1 to {MAX_EVENTS_PER_MESSAGE:,}, or 0 for one event per message",
            )
        )
    raise_if_any(violations)
    return EventFilter(project_id, agent_instance_id, session_id, frozenset(types)), interval
