"""The baseline of the working-memory benchmark: a bare grpc.aio server.

One unary method, ``/bench.Echo/Get``, registered with a generic handler and
identity (de)serializers: it does no work and answers every call with the bytes
of a memsvc ``GetResponse`` for the benchmark's value, so the wire payload is
exactly what memsvc's Get returns. ``bench.working_memory`` runs it in its own
process, as memsvc is::

    python -m bench._echo_server PORT VALUE_BYTES

It serves on 127.0.0.1:PORT until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import struct_pb2

from memsvc.v1 import working_memory_pb2 as pb

ECHO_SERVICE = "bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Get"
GET_KEY = "k"


def identity(data: bytes) -> bytes:
    """The (de)serializer of raw bytes."""
    return data


def bench_value(value_bytes: int) -> struct_pb2.Value:
    """The stored value: a JSON string of ``value_bytes`` ASCII characters."""
    return struct_pb2.Value(string_value="x" * value_bytes)


def get_response_bytes(value_bytes: int) -> bytes:
    """What memsvc's Get of GET_KEY returns once the benchmark has set it."""
    entry = pb.Entry(key=GET_KEY, value=bench_value(value_bytes))
    return pb.GetResponse(entry=entry).SerializeToString()


async def serve(port: int, response: bytes) -> None:
    async def get(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    handler = grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {
            "Get": grpc.unary_unary_rpc_method_handler(
                get, request_deserializer=identity, response_serializer=identity
            )
        },
    )
    await serve_until_signalled(port, handler)


async def serve_until_signalled(
    port: int, handler: grpc.GenericRpcHandler, options: Sequence[tuple[str, Any]] = ()
) -> None:
    """Serve ``handler`` on 127.0.0.1:port until SIGTERM or SIGINT (every bench server)."""
    server = grpc.aio.server(options=list(options))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), get_response_bytes(int(sys.argv[2]))))
