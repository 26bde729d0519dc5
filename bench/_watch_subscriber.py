"""A subscriber process of the watch benchmark: many streams, driven over stdin.

``bench.watch`` starts several of these (``--processes``) so that 1,000
subscribers do not all share the benchmark's own event loop. Each one holds
streams to one server at a time, spread over a few grpc.aio channels (each with
a connection of its own), and parses every message as a memsvc
``WatchLifecycleResponse``, whichever server sent it. For every event it takes
the wall-clock time of delivery minus the writer's send time, which the writer
put into the event's metadata (``"sent"``, seconds since the epoch), and minus the
event's own ``event_time`` (memsvc stamps it in the writer's transaction, before
its commit; the bare server sends a copy of one memsvc event, whose time is old).

Commands arrive as JSON lines on stdin; each gets one JSON line on stdout:

* ``{"op": "subscribe", "target", "method", "request" (base64), "streams",
  "channels"}``: open the streams and wait for each one's first message.
* ``{"op": "expect", "events"}``: forget what was counted; each stream should
  now receive ``events`` events.
* ``{"op": "collect", "timeout"}``: wait until they have (or the timeout), then
  answer the deliveries, the first and last delivery times, the latencies (µs)
  from the send and from the event's time,
  and how many streams got other than exactly the events expected, and how many
  deliveries came out of sequence order or repeated a sequence the stream had
  already received.
* ``{"op": "close"}``: cancel the streams and close the channels.

End of input ends the process::

    python -m bench._watch_subscriber
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench._echo_server import identity
from memsvc.v1 import lifecycle_pb2 as lc

# A connection of its own per channel, not one shared subchannel per target.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class _Tally:
    expected: int = 0
    deliveries: int = 0
    # Per stream: its deliveries, the sequence of its last event and every sequence
    # it received; deliveries whose sequence was lower than the stream's previous
    # one (out of order), or one it had received before (a repeat, in any order:
    # bare's concurrent publishers may reach its server out of order).
    per_stream: list[int] = field(default_factory=list)
    last_sequence: list[int] = field(default_factory=list)
    seen: list[set[int]] = field(default_factory=list)
    disordered: int = 0
    repeated: int = 0
    first: float = 0.0
    last: float = 0.0
    message_bytes: int = 0
    messages: int = 0  # fewer than deliveries when events come in batches
    latencies_us: list[int] = field(default_factory=list)
    stamped_us: list[int] = field(default_factory=list)  # from each event's event_time
    errors: list[str] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Subscriber:
    def __init__(self) -> None:
        self.channels: list[grpc.aio.Channel] = []
        self.calls: list[Any] = []
        self.readers: list[asyncio.Task[None]] = []
        self.tally = _Tally()
        self.events = 0  # expected on each stream

    async def subscribe(
        self, target: str, method: str, request: bytes, streams: int, channels: int
    ) -> dict[str, Any]:
        started = time.perf_counter()
        self.tally, self.events = _Tally(), 0  # nothing counted until expect()
        self.channels = [
            grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            for _ in range(max(1, min(channels, streams)))
        ]
        self.calls = [
            self.channels[i % len(self.channels)].unary_stream(
                method,
                request_serializer=identity,
                response_deserializer=lc.WatchLifecycleResponse.FromString,
            )(request)
            for i in range(streams)
        ]
        # The first message (a progress) says the stream is registered.
        await asyncio.gather(*(call.read() for call in self.calls))
        self.readers = [
            asyncio.create_task(self._read(call, index)) for index, call in enumerate(self.calls)
        ]
        return {"ok": True, "seconds": time.perf_counter() - started}

    async def _read(self, call: Any, index: int) -> None:
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    return
                now = time.time()
                kind = message.WhichOneof("kind")
                if kind == "event":
                    events: Any = (message.event,)
                elif kind == "batch":
                    events = message.batch.events
                else:
                    continue
                tally = self.tally
                if index >= len(tally.per_stream):
                    continue  # before expect(): nothing is counted
                if not tally.deliveries:
                    tally.first = now
                    tally.message_bytes = message.ByteSize()
                seen = tally.seen[index]
                for event in events:
                    sent = event.metadata.fields["sent"].number_value
                    tally.latencies_us.append(round((now - sent) * 1e6))
                    stamped = event.event_time.seconds + event.event_time.nanos / 1e9
                    tally.stamped_us.append(round((now - stamped) * 1e6))
                    tally.deliveries += 1
                    tally.per_stream[index] += 1
                    sequence = event.sequence
                    if sequence in seen:
                        tally.repeated += 1
                    elif sequence < tally.last_sequence[index]:
                        tally.disordered += 1
                    seen.add(sequence)
                    tally.last_sequence[index] = sequence
                tally.messages += 1
                tally.last = now
                if tally.deliveries >= tally.expected:
                    tally.done.set()
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.tally.errors.append(f"{error.code().name}: {error.details()}")

    def expect(self, events: int) -> dict[str, Any]:
        streams = len(self.calls)
        self.tally = _Tally(
            expected=events * streams,
            per_stream=[0] * streams,
            last_sequence=[-1] * streams,
            seen=[set() for _ in range(streams)],
        )
        self.events = events
        return {"ok": True}

    async def collect(self, wait_seconds: float) -> dict[str, Any]:
        tally = self.tally
        if tally.deliveries < tally.expected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tally.done.wait(), wait_seconds)
        return {
            "deliveries": tally.deliveries,
            "expected": tally.expected,
            # Streams that did not get exactly the events expected (a loss on one
            # and a repeat on another would leave the total right).
            "streams_off": sum(1 for count in tally.per_stream if count != self.events),
            "disordered": tally.disordered,
            "repeated": tally.repeated,
            "first": tally.first,
            "last": tally.last,
            "message_bytes": tally.message_bytes,
            "messages": tally.messages,
            "latencies_us": tally.latencies_us,
            "stamped_us": tally.stamped_us,
            "errors": tally.errors[:5],
        }

    async def close(self) -> dict[str, Any]:
        for call in self.calls:
            call.cancel()
        for reader in self.readers:
            reader.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        for channel in self.channels:
            await channel.close()
        self.channels, self.calls, self.readers = [], [], []
        return {"ok": True}


async def main() -> None:
    loop = asyncio.get_running_loop()
    subscriber = Subscriber()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        op = command["op"]
        reply: dict[str, Any]
        if op == "subscribe":
            reply = await subscriber.subscribe(
                command["target"],
                command["method"],
                base64.b64decode(command["request"]),
                command["streams"],
                command["channels"],
            )
        elif op == "expect":
            reply = subscriber.expect(command["events"])
        elif op == "collect":
            reply = await subscriber.collect(command["timeout"])
        elif op == "close":
            reply = await subscriber.close()
        else:
            reply = {"error": f"unknown op {op!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    await subscriber.close()


if __name__ == "__main__":
    asyncio.run(main())
