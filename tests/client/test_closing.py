"""Closing a watch or a client while something waits on it ends the wait the
documented way, and a watch facing a server that accepts and then fails every
stream keeps backing off until ``reconnect_timeout``.

A stub grpc.aio server plays the server that behaves this way (memsvc itself
neither holds a call forever nor fails every stream on purpose).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal, Self

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from memsvc.client import (
    AsyncClient,
    Cancelled,
    Client,
    RetryPolicy,
    Unavailable,
    WatchPositionCompacted,
)
from memsvc.client._watch import STREAM_WORKED_SECONDS
from memsvc.testing import free_port
from memsvc.v1 import lifecycle_pb2 as lc
from tests.helpers import eventually

SERVICE = "memsvc.v1.LifecycleService"
SCOPE = (str(uuid.uuid4()), str(uuid.uuid4()), "s")
NO_RETRY = RetryPolicy(max_attempts=1)


class StubServer:
    """WatchLifecycle sends a progress at sequence 5, then stays open, or fails
    with UNAVAILABLE ``fail_after`` seconds later; GetSession never answers."""

    def __init__(self, fail_after: float | None, first_after: float = 0.0) -> None:
        self.fail_after = fail_after
        self.first_after = first_after  # the wait before each stream's first message
        self.streams = 0
        self.server = grpc.aio.server()
        self.port = 0

    async def watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        self.streams += 1
        await asyncio.sleep(self.first_after)
        yield lc.WatchLifecycleResponse(progress=lc.WatchProgress(sequence=5))
        if self.fail_after is not None:
            await asyncio.sleep(self.fail_after)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "failing on purpose")
        await asyncio.Event().wait()

    async def get_session(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await asyncio.Event().wait()

    async def __aenter__(self) -> Self:
        handlers = {
            "WatchLifecycle": grpc.unary_stream_rpc_method_handler(
                self.watch,
                request_deserializer=lc.WatchLifecycleRequest.FromString,
                response_serializer=lc.WatchLifecycleResponse.SerializeToString,
            ),
            "GetSession": grpc.unary_unary_rpc_method_handler(
                self.get_session,
                request_deserializer=lc.GetSessionRequest.FromString,
                response_serializer=lc.GetSessionResponse.SerializeToString,
            ),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.server.stop(0)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def spawned(sequence: int) -> lc.WatchLifecycleResponse:
    return lc.WatchLifecycleResponse(
        event=lc.LifecycleEvent(
            sequence=sequence,
            event_id=str(uuid.uuid4()),
            event_type=lc.EVENT_TYPE_SESSION_SPAWNED,
            project_id=SCOPE[0],
            agent_instance_id=SCOPE[1],
            session_id=SCOPE[2],
        )
    )


class CompactedOnReconnect(StubServer):
    """A watch from the oldest event: its first stream reports position 5, then
    ``moved_by`` 7 (a progress: it caught up that far; an event), then fails.
    Resuming is refused: the events up to 8 were compacted. A stream from the
    oldest (no after_sequence) reports 8, then sends event 9."""

    def __init__(self, moved_by: Literal["progress", "event"] | None = None) -> None:
        super().__init__(fail_after=None)
        self.moved_by = moved_by
        self.requests: list[Any] = []

    async def watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        self.requests.append(request)
        if len(self.requests) == 1:
            yield lc.WatchLifecycleResponse(progress=lc.WatchProgress(sequence=5))
            if self.moved_by == "progress":
                yield lc.WatchLifecycleResponse(progress=lc.WatchProgress(sequence=7))
            elif self.moved_by == "event":
                yield spawned(7)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        if request.HasField("after_sequence"):
            info = error_details_pb2.ErrorInfo(
                reason="ERROR_REASON_WATCH_POSITION_COMPACTED",
                domain="memsvc",
                metadata={"oldest_sequence": "8", "after_sequence": "5"},
            )
            detail = any_pb2.Any()
            detail.Pack(info)
            compacted = status_pb2.Status(
                code=code_pb2.OUT_OF_RANGE, message="compacted", details=[detail]
            )
            await context.abort_with_status(rpc_status.to_status(compacted))
        yield lc.WatchLifecycleResponse(progress=lc.WatchProgress(sequence=8))
        yield spawned(9)
        await asyncio.Event().wait()


@pytest.mark.parametrize("moved_by", [None, "progress"])
async def test_a_watch_from_the_oldest_follows_compaction_until_its_first_event(
    moved_by: Literal["progress"] | None,
):
    """Reconnecting before its first event, an "oldest" watch whose position was
    compacted meanwhile starts from the oldest again (it never asked for that
    position; nothing it had not seen is lost), as its stream on the server does;
    also when progress moved its cursor (the server sends one when compaction
    overtakes such a stream, to say where the oldest now is)."""
    async with (
        CompactedOnReconnect(moved_by) as stub,
        AsyncClient(stub.target, retry=RetryPolicy(initial_backoff=0.01)) as client,
    ):
        async with client.watch(SCOPE[0], start="oldest") as events:
            event = await asyncio.wait_for(anext(events), 10)
        assert event.sequence == 9
        assert [r.HasField("after_sequence") for r in stub.requests] == [False, True, False]
        assert stub.requests[-1].start == lc.WATCH_START_OLDEST


async def test_a_watch_from_the_oldest_that_had_an_event_ends_when_compacted_past_it():
    """Once it handed out an event (7), a compaction past the cursor may have taken
    events the watch would have had: WatchPositionCompacted, never a silent start
    from the oldest."""
    async with (
        CompactedOnReconnect("event") as stub,
        AsyncClient(stub.target, retry=RetryPolicy(initial_backoff=0.01)) as client,
    ):
        with pytest.raises(WatchPositionCompacted):
            async with client.watch(SCOPE[0], start="oldest") as events:
                assert (await asyncio.wait_for(anext(events), 10)).sequence == 7
                await asyncio.wait_for(anext(events), 10)
        assert len(stub.requests) == 2


@pytest.fixture
async def holding() -> AsyncIterator[StubServer]:
    async with StubServer(fail_after=None) as stub:
        yield stub


async def test_closing_a_watch_that_another_task_reads_ends_its_loop(holding: StubServer):
    async with AsyncClient(holding.target, retry=NO_RETRY) as client:
        watch = await client.watch(SCOPE[0]).start()
        seen: list[Any] = []

        async def consume() -> str:
            async for event in watch:
                seen.append(event)
            return "ended"

        reader = asyncio.ensure_future(consume())
        await asyncio.sleep(0.2)  # the reader waits in read()
        await watch.aclose()
        assert await asyncio.wait_for(reader, 10) == "ended"
        assert seen == []


async def test_closing_a_blocking_watch_from_another_thread_ends_its_loop(holding: StubServer):
    def blocking() -> str:
        with Client(holding.target, retry=NO_RETRY) as client:
            watch = client.watch(SCOPE[0]).start()
            closer = threading.Timer(0.3, watch.close)
            closer.start()
            try:
                for _ in watch:
                    return "an event"
                return "ended"
            finally:
                closer.cancel()

    assert await asyncio.wait_for(asyncio.to_thread(blocking), 20) == "ended"


async def test_a_call_in_flight_when_the_client_closes_raises_cancelled(holding: StubServer):
    client = AsyncClient(holding.target, retry=NO_RETRY)
    call = asyncio.ensure_future(client.session(*SCOPE).describe())
    await asyncio.sleep(0.2)  # the call is in flight
    await client.close()
    with pytest.raises(Cancelled):
        await asyncio.wait_for(call, 10)


async def given_up_watch(wait: float, reconnect_timeout: float = 1.0, **stub: float) -> Any:
    """A watch of a server whose streams fail right after their hello (``stub``:
    more StubServer options), once it ended with Unavailable."""
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.05, max_backoff=1.0)
    async with (
        StubServer(fail_after=0, **stub) as failing,
        AsyncClient(failing.target, retry=policy) as client,
    ):
        watch = client.watch(SCOPE[0], reconnect_timeout=reconnect_timeout)
        with pytest.raises(Unavailable):
            await asyncio.wait_for(watch.start(), wait)
            async for _ in watch:
                pass
        return watch


async def test_streams_that_fail_after_their_first_message_back_off_until_the_timeout():
    watch = await given_up_watch(wait=20)
    # Each stream said hello and failed: that is no working stream, so the
    # pauses grew (0.05, 0.1, 0.2, ... s) and the timeout ran out, instead of
    # a reconnection every 50 ms for ever.
    assert watch.connections < 12, watch.connections


async def test_streams_slow_to_their_first_message_still_back_off_until_the_timeout():
    """A stream counts as working from its first message on, not from its
    connection: each of these takes longer than STREAM_WORKED_SECONDS to say hello,
    then fails at once, and the watch gives up after its reconnect_timeout (long
    enough for a few hellos: a shorter one would end the wait for the first)."""
    await given_up_watch(wait=20, reconnect_timeout=3.0, first_after=STREAM_WORKED_SECONDS + 0.2)


async def test_streams_that_work_for_a_while_before_failing_keep_the_watch_going():
    """A stream that stayed up past STREAM_WORKED_SECONDS worked: its failure starts
    a new count, even before the first event or progress that moves the cursor."""
    async with (
        StubServer(fail_after=STREAM_WORKED_SECONDS + 0.3) as flaky,
        AsyncClient(flaky.target, retry=RetryPolicy(initial_backoff=0.05)) as client,
    ):
        watch = await client.watch(SCOPE[0], reconnect_timeout=0.5).start()
        reading = asyncio.ensure_future(anext(watch))

        async def reconnected_twice() -> bool:
            return watch.connections >= 3 or reading.done()

        # Two streams failed, each after longer than the reconnect_timeout: a watch
        # that did not count them as working would have given up on the second.
        await eventually(reconnected_twice, timeout=30)
        assert not reading.done(), reading.result()  # no error: still reconnecting
        assert watch.connections >= 3
        reading.cancel()
        await watch.aclose()


async def test_a_call_waiting_to_retry_when_the_client_closes_raises_cancelled():
    """Nothing listens: the call fails, waits a long backoff, and the close ends the
    wait at once with Cancelled (not grpc's UsageError from the closed channel)."""
    slow = RetryPolicy(max_attempts=5, initial_backoff=30, max_backoff=30)
    client = AsyncClient(f"127.0.0.1:{free_port()}", retry=slow, timeout=None)
    call = asyncio.ensure_future(client.session(*SCOPE).describe())
    await asyncio.sleep(0.5)  # the first attempt failed; the call waits to retry
    assert not call.done()
    await client.close()
    with pytest.raises(Cancelled) as raised:
        await asyncio.wait_for(call, 5)
    assert raised.value.attempts == 1


async def test_wait_ready_when_the_client_closes_raises_cancelled():
    """Nothing listens, so wait_ready() waits; the close ends it with Cancelled, as
    it ends calls in flight: not grpc's UsageError from the closed channel, nor, for
    a client over a channel it does not own (which stays open), never."""
    target = f"127.0.0.1:{free_port()}"
    channel = grpc.aio.insecure_channel(target)
    try:
        for client in (AsyncClient(target), AsyncClient.from_channel(channel)):
            waiting = asyncio.ensure_future(client.wait_ready())
            await asyncio.sleep(0.3)
            assert not waiting.done()
            await client.close()
            with pytest.raises(Cancelled):
                await asyncio.wait_for(waiting, 5)
    finally:
        await channel.close()


@pytest.mark.parametrize("timeout", [None, 10.0])
async def test_a_blocking_wait_ready_when_the_client_closes_raises_cancelled(
    timeout: float | None,
):
    """Closed from another thread. Repeated: the close races with the wait."""

    def blocking() -> str:
        client = Client(f"127.0.0.1:{free_port()}")
        closer = threading.Timer(0.2, client.close)
        closer.start()
        try:
            client.wait_ready(timeout)
        except Cancelled:
            return "cancelled"
        finally:
            closer.join()
        return "ready"

    for _ in range(5):
        assert await asyncio.wait_for(asyncio.to_thread(blocking), 20) == "cancelled"


async def reading(client: AsyncClient) -> asyncio.Future[None]:
    """A task reading a started watch of ``client`` to its end."""
    watch = await client.watch(SCOPE[0]).start()

    async def consume() -> None:
        async for _ in watch:
            pass

    return asyncio.ensure_future(consume())


async def test_a_watch_read_when_its_client_closes_raises_cancelled(holding: StubServer):
    """The reading task gets the SDK's Cancelled, not a bare CancelledError that would
    mark the task itself cancelled."""
    client = AsyncClient(holding.target, retry=NO_RETRY)
    reader = await reading(client)
    await asyncio.sleep(0.2)  # the reader waits in read()
    await client.close()
    with pytest.raises(Cancelled):
        await asyncio.wait_for(reader, 10)
    assert not reader.cancelled()


async def test_closing_a_blocking_client_ends_its_watch_and_calls_in_other_threads(
    holding: StubServer,
):
    """Closed from the main thread while another thread reads a watch and a third
    waits on a call: both end (Cancelled, or the watch just stops), none hangs.
    Repeated, since the close races with the threads."""

    def round_trip() -> tuple[str, str]:
        client = Client(holding.target, retry=NO_RETRY)
        watch = client.watch(SCOPE[0]).start()
        outcomes: dict[str, str] = {}

        def read() -> None:
            try:
                with watch:
                    for _ in watch:
                        pass
                outcomes["watch"] = "ended"
            except Cancelled:
                outcomes["watch"] = "cancelled"

        def call() -> None:
            try:
                client.session(*SCOPE).describe()
            except Cancelled:
                outcomes["call"] = "cancelled"

        threads = [threading.Thread(target=read), threading.Thread(target=call)]
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        client.close()
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive(), "a thread still waits on the closed client"
        return outcomes["watch"], outcomes["call"]

    for _ in range(8):
        watch, call = await asyncio.to_thread(round_trip)
        assert watch in ("ended", "cancelled")
        assert call == "cancelled"


async def test_a_watch_waiting_to_reconnect_when_its_client_closes_raises_cancelled():
    """The stream failed and the watch waits a long backoff: the close ends the wait at
    once with Cancelled (not a RuntimeError from reconnecting on the closed client)."""
    slow = RetryPolicy(initial_backoff=30, max_backoff=30)
    async with StubServer(fail_after=0.1) as failing:
        client = AsyncClient(failing.target, retry=slow)
        reader = await reading(client)
        await asyncio.sleep(0.6)  # the stream failed; the watch waits to reconnect
        assert not reader.done()
        await client.close()
        with pytest.raises(Cancelled):
            await asyncio.wait_for(reader, 5)
        assert failing.streams == 1


async def test_reconnect_timeout_bounds_the_wait_for_a_first_message():
    """A server that accepts the stream and never writes: the watch gives up after
    its reconnect_timeout (counted from start()), not after one or two silence
    limits (3 progress intervals + 1 s, 16 s here), with Unavailable."""
    async with (
        StubServer(fail_after=None, first_after=3600) as mute,
        AsyncClient(mute.target, retry=RetryPolicy(initial_backoff=0.05)) as client,
    ):
        watch = client.watch(SCOPE[0], progress_interval=5, reconnect_timeout=1.0)
        with pytest.raises(Unavailable) as raised:
            await asyncio.wait_for(watch.start(), 10)
        assert "reconnect_timeout" in str(raised.value)
        assert raised.value.__cause__ is not None  # what went wrong last
        assert watch.connections == 1  # no time was left for another stream


async def test_a_watch_without_reconnection_ends_a_silent_stream_with_unavailable():
    """reconnect=False: a stream that goes silent (or ends without a status) ends the
    watch with Unavailable, which callers catch as they catch a server's, not with
    a bare MemsvcError of code UNKNOWN."""
    async with (
        StubServer(fail_after=None) as silent,
        AsyncClient(silent.target, retry=NO_RETRY) as client,
    ):
        watch = await client.watch(SCOPE[0], progress_interval=0.1, reconnect=False).start()
        with pytest.raises(Unavailable, match="watch stream ended"):
            await asyncio.wait_for(anext(watch), 10)
        assert silent.streams == 1


async def test_reads_cancelled_by_their_reader_never_exhaust_reconnect_timeout():
    """A reader that bounds each read with a timeout drops the stream each time (the
    next read reconnects from the cursor): no failure, however long it goes on,
    even on a quiet log where no message moves the cursor."""
    async with (
        StubServer(fail_after=None) as quiet,
        AsyncClient(quiet.target, retry=RetryPolicy(initial_backoff=0.05)) as client,
    ):
        watch = await client.watch(SCOPE[0], progress_interval=5, reconnect_timeout=0.3).start()
        for _ in range(6):  # 1.2 s of reads, four times the reconnect_timeout
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await anext(watch)
        assert quiet.streams >= 2
        await watch.aclose()


class AnswersOnce(StubServer):
    """Its first stream says hello and fails with UNAVAILABLE ``fail_after`` seconds
    later; later streams are accepted and never written to (a server that hangs)."""

    async def watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if self.streams:
            self.streams += 1
            await asyncio.Event().wait()
        async for message in super().watch(request, context):
            yield message


async def test_reconnect_timeout_counts_from_the_loss_of_the_stream():
    """The first stream worked, then failed; the next one never answers: the watch
    gives up a reconnect_timeout after the loss, not after a silence limit (16 s)."""
    async with (
        AnswersOnce(fail_after=0.2) as server,
        AsyncClient(server.target, retry=RetryPolicy(initial_backoff=0.05)) as client,
    ):
        watch = await client.watch(SCOPE[0], progress_interval=5, reconnect_timeout=1.0).start()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(anext(watch), 10)
        assert watch.connections == 2


async def test_a_backoff_longer_than_what_is_left_of_reconnect_timeout_is_not_slept():
    """The stream failed and the next attempt could only start after 24-30 s: the
    watch gives up at once, chained to the server's error, instead of sleeping past
    its reconnect_timeout."""
    slow = RetryPolicy(initial_backoff=30, max_backoff=30)
    async with (
        StubServer(fail_after=0) as failing,
        AsyncClient(failing.target, retry=slow) as client,
    ):
        watch = await client.watch(SCOPE[0], reconnect_timeout=1.0).start()
        with pytest.raises(Unavailable) as raised:
            await asyncio.wait_for(anext(watch), 10)
        assert isinstance(raised.value.__cause__, Unavailable)
        assert "failing on purpose" in str(raised.value.__cause__)
        assert failing.streams == 1


async def test_closing_a_client_over_a_given_channel_cancels_its_watches_and_calls(
    holding: StubServer,
):
    """close() of a client from from_channel leaves the channel open (it is the
    caller's), yet its watch being read and its call in flight raise Cancelled."""
    async with grpc.aio.insecure_channel(holding.target) as channel:
        client = AsyncClient.from_channel(channel, retry=NO_RETRY, timeout=None)
        reader = await reading(client)
        call = asyncio.ensure_future(client.session(*SCOPE).describe())
        await asyncio.sleep(0.2)  # the reader waits in read(), the call for its answer
        await client.close()
        for pending in (reader, call):
            with pytest.raises(Cancelled):
                await asyncio.wait_for(pending, 10)
        # The channel still serves its other users.
        other = AsyncClient.from_channel(channel, retry=NO_RETRY)
        watch = await asyncio.wait_for(other.watch(SCOPE[0]).start(), 10)
        assert watch.sequence == 5
        await watch.aclose()
        await other.close()
