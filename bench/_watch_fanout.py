"""The baseline of the watch benchmark: a bare grpc.aio fan-out server.

A naive pub/sub with two methods, registered with a generic handler and identity
(de)serializers, so the server does no protobuf work at all:

* ``/bench.Fanout/Subscribe`` (server streaming): registers an unbounded
  ``asyncio.Queue`` for the stream, sends a first message (the bytes of a
  ``WatchLifecycleResponse`` with a progress, as memsvc's first message), then
  yields whatever lands in the queue.
* ``/bench.Fanout/SubscribeBatched`` (server streaming): the same, but each message
  carries every published message waiting in the queue, up to the number the
  request's bytes spell (ASCII digits; 100 when empty), as one ``batch``: memsvc's
  batched streams, done barely. A ``LifecycleEventBatch`` lists its events under
  the field number a ``WatchLifecycleResponse`` gives its one ``event``, so the
  batch is the published messages' bytes, concatenated and framed once.
* ``/bench.Fanout/Publish`` (unary): puts the request's bytes into every
  subscriber's queue and returns nothing. The publisher sends the bytes of a
  ``WatchLifecycleResponse`` holding an event of memsvc's size, so every
  subscriber receives exactly what a memsvc watcher would.

``bench.watch`` runs it in its own process, as memsvc is::

    python -m bench._watch_fanout PORT

It serves on 127.0.0.1:PORT until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc

from bench._echo_server import identity, serve_until_signalled
from memsvc.v1 import lifecycle_pb2 as lc

FANOUT_SERVICE = "bench.Fanout"
SUBSCRIBE_METHOD = f"/{FANOUT_SERVICE}/Subscribe"
SUBSCRIBE_BATCHED_METHOD = f"/{FANOUT_SERVICE}/SubscribeBatched"
PUBLISH_METHOD = f"/{FANOUT_SERVICE}/Publish"
HELLO = lc.WatchLifecycleResponse(progress=lc.WatchProgress(sequence=0)).SerializeToString()


# WatchLifecycleResponse.batch: field 3, length-delimited.
_BATCH_TAG = b"\x1a"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def batch_of(messages: list[bytes]) -> bytes:
    """WatchLifecycleResponse messages holding one ``event`` each, as one holding
    them all in its ``batch``."""
    events = b"".join(messages)
    return _BATCH_TAG + _varint(len(events)) + events


async def serve(port: int) -> None:
    subscribers: set[asyncio.Queue[bytes]] = set()

    async def subscribe(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        subscribers.add(queue)
        try:
            yield HELLO
            while True:
                yield await queue.get()
        finally:
            subscribers.discard(queue)

    async def subscribe_batched(
        request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        most = int(request or b"100")
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        subscribers.add(queue)
        try:
            yield HELLO
            while True:
                ready = [await queue.get()]
                while len(ready) < most and not queue.empty():
                    ready.append(queue.get_nowait())
                yield batch_of(ready)
        finally:
            subscribers.discard(queue)

    async def publish(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        for queue in subscribers:
            queue.put_nowait(request)
        return b""

    handler = grpc.method_handlers_generic_handler(
        FANOUT_SERVICE,
        {
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                subscribe, request_deserializer=identity, response_serializer=identity
            ),
            "SubscribeBatched": grpc.unary_stream_rpc_method_handler(
                subscribe_batched, request_deserializer=identity, response_serializer=identity
            ),
            "Publish": grpc.unary_unary_rpc_method_handler(
                publish, request_deserializer=identity, response_serializer=identity
            ),
        },
    )
    await serve_until_signalled(port, handler)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
