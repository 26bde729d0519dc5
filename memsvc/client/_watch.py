"""``watch()``: a lifecycle event stream that reconnects and resumes on its own.

The cursor is the last sequence seen, from an event or a progress message. On
UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED, CANCELLED from the server's side (a proxy
resetting the stream), a stream that ends, or a stream silent for longer than three
progress intervals, the watch reconnects with backoff and ``after_sequence`` = the
cursor: every matching event arrives once, in order. OUT_OF_RANGE (the cursor's
events were compacted away) ends it with :class:`WatchPositionCompacted`, except for
a watch from the oldest event that has had no event yet: it starts from the oldest
again.

``reconnect_timeout`` bounds each time without a working stream, from the loss of the
last one (or from the start, for a watch that never had one): each stream gets what is
left of it for its first message, no backoff is slept past it, and then the watch
raises :class:`Unavailable` chained to the last error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Generic, NoReturn, Protocol, TypeVar

import grpc

from memsvc.client import _convert
from memsvc.client._errors import (
    Cancelled,
    MemsvcError,
    TooManyWatchers,
    Unavailable,
    WatchPositionCompacted,
    from_rpc_error,
)
from memsvc.client._retry import RetryPolicy, being_cancelled, log
from memsvc.client._types import LifecycleEvent, WatchProgress
from memsvc.v1 import lifecycle_pb2

Item = TypeVar("Item")

RECONNECT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        # Read as a status, CANCELLED came from the other side (a proxy such as
        # Envoy resetting the stream): a cancel of this client's own (aclose(), a
        # close of the client, a cancelled read) surfaces as asyncio.CancelledError.
        grpc.StatusCode.CANCELLED,
    }
)
# The server's progress interval when the request does not set one.
SERVER_PROGRESS_INTERVAL = 10.0
# The events a watch asks the server to put in one message (max_events_per_message).
# The watch still hands them out one at a time; batches only save messages (the
# server's and this process's CPU) when events come faster than they are written.
EVENTS_PER_MESSAGE = 100


def _described(error: BaseException) -> str:
    """An error's message, or its kind when it has none."""
    return str(error) or type(error).__name__


class _StreamEnded(Exception):
    """The server ended the stream without a status: reconnect."""

    def __init__(self) -> None:
        super().__init__("the server ended the stream without a status")


class _Silent(Exception):
    """Nothing arrived for longer than the watch tolerates: reconnect."""

    def __init__(self, waited: float, unconnected: bool = False) -> None:
        # A stream that waited for a connection the whole time (wait_for_ready)
        # says so: a wrong address or a TLS error reads as no connection, not as a
        # server that does not answer.
        why = " (no connection to memsvc)" if unconnected else ""
        super().__init__(f"nothing arrived within {waited:.3g} s{why}")


# A stream that delivered its first message and stayed up this long worked:
# its failure starts a new count of reconnections.
STREAM_WORKED_SECONDS = 1.0


class Closing(Protocol):
    """What a watch knows of its client's close (the client's Invoker)."""

    @property
    def closed(self) -> bool: ...

    @property
    def connected(self) -> bool: ...

    async def closed_within(self, delay: float) -> bool: ...

    def track(self, call: object) -> None: ...  # the client's close cancels the call

    def untrack(self, call: object) -> None: ...


class _Stream:
    """A watch's current gRPC stream, kept apart from the watch so that a watch
    dropped without being closed can cancel it from its finalizer (which must not
    hold the watch). Nothing else would: grpc.aio keeps a call in flight alive by
    itself, and with it the server's stream and one of its watcher slots, until
    the client closes."""

    def __init__(self, closing: Closing | None) -> None:
        self.call: Any = None
        self._closing = closing
        self._loop: asyncio.AbstractEventLoop | None = None

    def opened(self, call: Any) -> None:
        """``call`` is the current stream (from the loop it runs on)."""
        self.call = call
        self._loop = asyncio.get_running_loop()
        if self._closing is not None:
            # The client's close cancels it, over a channel it does not own too.
            self._closing.track(call)

    def drop(self) -> None:
        """Cancel the current stream, if any (on its loop)."""
        call, self.call = self.call, None
        if call is not None:
            call.cancel()
            if self._closing is not None:
                self._closing.untrack(call)

    def release(self) -> None:
        """The watch was collected: drop its stream, from whatever thread the
        collection ran in (grpc.aio calls belong to their loop)."""
        if self.call is None or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed, its calls with it
            self._loop.call_soon_threadsafe(self.drop)


class AsyncWatch(Generic[Item]):
    """An async iterator of lifecycle events (and, if asked, progress messages).

    Use it as ``async with client.watch(...) as events: async for event in events``:
    entering connects and waits for the server's first message, so the start position
    ("now") is fixed before the block runs; leaving closes the stream. ``sequence`` is
    the cursor (save it and pass it back as ``after_sequence`` to resume later). A
    watch dropped without being closed cancels its stream when it is collected.
    """

    def __init__(
        self,
        open_stream: Callable[
            [lifecycle_pb2.WatchLifecycleRequest, Sequence[tuple[str, str]]], Any
        ],
        request: lifecycle_pb2.WatchLifecycleRequest,
        *,
        include_progress: bool,
        policy: RetryPolicy,
        reconnect: bool,
        reconnect_timeout: float | None,
        grpc_metadata: Sequence[tuple[str, str]] | Callable[[], Sequence[tuple[str, str]]],
        token_rotated: Callable[[Sequence[tuple[str, str]]], bool] | None = None,
        closing: Closing | None = None,
    ) -> None:
        self._open_stream = open_stream
        # The client's close: it ends a wait to reconnect, and no stream opens after it.
        self._closing = closing
        self._request = request
        self._include_progress = include_progress
        self._policy = policy
        self._reconnect = reconnect
        self._reconnect_timeout = reconnect_timeout
        # The metadata of each new stream (a callable: the token may have rotated).
        if callable(grpc_metadata):
            self._metadata = grpc_metadata
        else:
            fixed = tuple(grpc_metadata)
            self._metadata = lambda: fixed
        self._token_rotated = token_rotated
        self._connected_with: Sequence[tuple[str, str]] = ()
        # Zero, as unset, is the server's default (as the server takes it).
        interval = (
            request.progress_interval.ToTimedelta().total_seconds()
            if request.HasField("progress_interval")
            else 0.0
        ) or SERVER_PROGRESS_INTERVAL
        # Never below a second: a bad interval (the server refuses it) must not
        # make every read time out before the refusal arrives.
        self._silence_limit = 3 * max(interval, 0.0) + 1.0
        self._cursor: int | None = (
            request.after_sequence if request.HasField("after_sequence") else None
        )
        self._stream = _Stream(closing)
        # A watch dropped unclosed still ends its stream (close it all the same:
        # collection may come late, or never for a watch caught in a cycle).
        weakref.finalize(self, self._stream.release).atexit = False
        self._closed = False
        self._failures = 0
        self._connections = 0
        # When the watch last had no working stream (its start, or the loss of its
        # last working stream): reconnect_timeout counts from there. None while a
        # stream works.
        self._failing_since: float | None = None
        self._on_call = 0  # messages received on the current stream
        self._first_message_at = 0.0  # when the current stream's first message came
        # A watch from the oldest event that has had no event yet follows
        # compaction: a reconnection refused because the events after its cursor
        # were compacted starts from the oldest again (it had none of them, and
        # asked for what is kept). Progress moves the cursor without ending this:
        # the server sends one when compaction overtakes such a stream, to say where
        # the oldest now is. Once an event was handed out, a refusal is a real loss
        # and ends the watch.
        self._following_oldest = (
            request.start == lifecycle_pb2.WATCH_START_OLDEST and self._cursor is None
        )
        self._restart_from_oldest = False
        self._started = False
        self._received = 0
        self._pending: LifecycleEvent | WatchProgress | None = None
        # The rest of a batch, not handed out yet: the cursor moves as each is.
        self._batched: collections.deque[lifecycle_pb2.LifecycleEvent] = collections.deque()
        self._stopped = asyncio.Event()  # set by aclose()

    @property
    def sequence(self) -> int | None:
        """The last sequence seen (event or progress); None before the first message."""
        return self._cursor

    @property
    def connections(self) -> int:
        """How many streams this watch opened (1 + reconnections)."""
        return self._connections

    async def start(self) -> AsyncWatch[Item]:
        """Connect and wait for the server's first message (once; later calls return).

        Errors of the first connection that are not worth a reconnection (a bad
        filter, a compacted ``after_sequence``) are raised here.
        """
        if not self._started:
            self._started = True
            while not self._closed and self._received == 0:
                item = await self._next_message()
                if item is not None:
                    self._pending = item
        return self

    async def __aenter__(self) -> AsyncWatch[Item]:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncWatch[Item]:
        return self

    async def __anext__(self) -> Item:
        self._started = True
        while True:
            item: LifecycleEvent | WatchProgress | None
            if self._pending is not None:
                item, self._pending = self._pending, None
            else:
                if self._closed:
                    raise StopAsyncIteration
                item = await self._next_message()
            if item is None:
                continue
            if isinstance(item, WatchProgress) and not self._include_progress:
                continue
            return item  # type: ignore[return-value]

    async def aclose(self) -> None:
        """End the stream; iteration stops (at once, even while it waits to reconnect)."""
        self._closed = True
        self._stopped.set()
        self._stream.drop()

    async def _next_message(self) -> LifecycleEvent | WatchProgress | None:
        """The next new item, or None when the message was old or a reconnect happened."""
        if self._batched:
            return self._hand_out(self._batched.popleft())
        if self._stream.call is None:
            self._connect()
        try:
            message = await self._read()
        except asyncio.CancelledError as error:
            # A cancelled read cancels the stream; the next read reconnects from the cursor.
            self._stream.drop()
            if being_cancelled():
                raise
            if self._closed:
                return None  # aclose() (from another task or thread) ended it: iteration stops
            # Only the stream was cancelled: the client closed its channel.
            self._client_closed(error)
        except (grpc.RpcError, _StreamEnded, _Silent) as error:
            self._stream.drop()
            if self._on_call and self._lived() >= STREAM_WORKED_SECONDS:
                self._stream_worked()  # a failure after a while is a new one
            if not self._closed:
                await self._after_failure(error)
            return None
        self._received += 1
        if self._on_call == 0:
            self._first_message_at = asyncio.get_running_loop().time()
        self._on_call += 1
        item: LifecycleEvent | WatchProgress | None = None
        if message.HasField("progress"):
            sequence = message.progress.sequence
            if self._cursor is None or sequence > self._cursor:
                self._cursor = sequence
                item = WatchProgress(sequence)
        else:
            # One event alone, or a batch: those past the cursor are handed out one
            # at a time (one at or before it was delivered already, never expected).
            last = self._cursor
            for event in (message.event,) if message.HasField("event") else message.batch.events:
                if last is None or event.sequence > last:
                    last = event.sequence
                    self._batched.append(event)
            if self._batched:
                item = self._hand_out(self._batched.popleft())
        if item is not None:
            self._stream_worked()
        return item

    def _hand_out(self, event: lifecycle_pb2.LifecycleEvent) -> LifecycleEvent:
        """``event``, now the cursor: a cursor saved after it resumes after it."""
        self._cursor = event.sequence
        self._following_oldest = False
        return _convert.lifecycle_event(event)

    def _lived(self) -> float:
        """How long the current stream has been up since its first message."""
        return asyncio.get_running_loop().time() - self._first_message_at

    def _stream_worked(self) -> None:
        """The stream moved the cursor, or failed only after STREAM_WORKED_SECONDS.
        Its first message alone proves nothing (it repeats the cursor): a server
        that accepts and then fails every stream keeps backing off, and
        reconnect_timeout still runs."""
        self._failures = 0
        self._failing_since = None

    def _budget_left(self) -> float | None:
        """Seconds left of reconnect_timeout without a working stream (None: no limit)."""
        if self._reconnect_timeout is None or self._failing_since is None or not self._reconnect:
            return None
        spent = asyncio.get_running_loop().time() - self._failing_since
        return max(self._reconnect_timeout - spent, 0.0)

    async def _read(self) -> lifecycle_pb2.WatchLifecycleResponse:
        limit = self._silence_limit
        left = self._budget_left()
        if self._on_call == 0 and left is not None:
            # A stream that has not answered yet is no connection: it may not hold
            # the watch past its reconnect_timeout (a server that accepts streams
            # and never writes would, by a silence limit each time).
            limit = min(limit, left)
        try:
            async with asyncio.timeout(limit):
                message = await self._stream.call.read()
        except TimeoutError:
            unconnected = (
                self._on_call == 0 and self._closing is not None and not self._closing.connected
            )
            raise _Silent(limit, unconnected) from None
        if message is grpc.aio.EOF:
            raise _StreamEnded
        result: lifecycle_pb2.WatchLifecycleResponse = message
        return result

    def _connect(self) -> None:
        if self._closing is not None and self._closing.closed:
            self._client_closed()
        if self._connections == 0:
            # The start: reconnect_timeout counts from here until a stream works.
            # (Later, from the loss of a working stream, in _after_failure; not from
            # a stream dropped because its reader cancelled a read, which is no
            # failure, and on a quiet log no message would ever stop that count.)
            self._failing_since = asyncio.get_running_loop().time()
        request = lifecycle_pb2.WatchLifecycleRequest()
        request.CopyFrom(self._request)
        if self._cursor is not None and not self._restart_from_oldest:
            # 0 included: the log was empty at the cursor, so every event is after it.
            request.after_sequence = self._cursor
        self._restart_from_oldest = False
        self._connections += 1
        self._on_call = 0
        self._connected_with = self._metadata()
        self._stream.opened(self._open_stream(request, self._connected_with))

    def _give_up(self, cause: BaseException) -> NoReturn:
        self._closed = True
        raise Unavailable(
            f"the watch had no working stream for its reconnect_timeout "
            f"({self._reconnect_timeout:g} s); last error: {_described(cause)}"
        ) from cause

    def _client_closed(self, cause: BaseException | None = None) -> NoReturn:
        self._closed = True
        raise Cancelled("the watch was cancelled: its client was closed") from cause

    async def _after_failure(self, error: BaseException) -> None:
        """Raise a final error, or wait before the next reconnection."""
        failure: MemsvcError | None = None
        if isinstance(error, grpc.RpcError):
            failure = from_rpc_error(error)
            if isinstance(failure, WatchPositionCompacted) and self._following_oldest:
                # No event yet: it moves on to the new oldest, as asked.
                log.info("memsvc watch: compacted before its first event; starting from the oldest")
                self._restart_from_oldest = True
                return
            if (
                failure.code == grpc.StatusCode.UNAUTHENTICATED
                and self._token_rotated is not None
                and self._token_rotated(self._connected_with)
            ):
                # The token file holds a new token: reconnect with it at once.
                log.info("memsvc watch: the token was refused; reconnecting with the new one")
                return
            # A replica at its watcher limit says to retry later or elsewhere (a
            # load balancer may pick another): a resuming watch backs off and does.
            reconnectable = failure.code in RECONNECT_CODES or isinstance(failure, TooManyWatchers)
            if not reconnectable or not self._reconnect:
                self._closed = True
                raise failure from error
        elif not self._reconnect:
            self._closed = True
            raise Unavailable(f"watch stream ended: {_described(error)}") from error
        if self._failing_since is None:
            # A working stream was lost: reconnect_timeout counts from now.
            self._failing_since = asyncio.get_running_loop().time()
        self._failures += 1
        delay = self._policy.backoff(
            self._failures, failure.retry_delay if failure is not None else None
        )
        left = self._budget_left()
        if left is not None and delay >= left:
            # Spent, or no reconnection could start before it is: give up now
            # rather than sleep past it.
            self._give_up(failure if failure is not None else error)
        log.info(
            "memsvc watch disconnected (%s); reconnecting after sequence %s in %.2fs",
            failure.code.name if failure is not None else type(error).__name__,
            self._cursor,
            delay,
        )
        waits: set[asyncio.Future[bool]] = {asyncio.ensure_future(self._stopped.wait())}
        client_closed = None
        if self._closing is not None:
            client_closed = asyncio.ensure_future(self._closing.closed_within(delay))
            waits.add(client_closed)
        try:
            # The backoff ends early when aclose() or the client's close ends the watch.
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        closed_by_client = (
            client_closed is not None
            and client_closed.done()
            and not client_closed.cancelled()
            and client_closed.result()
        )
        if closed_by_client and not self._closed:
            self._client_closed()
