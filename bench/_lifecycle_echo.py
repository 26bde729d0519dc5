"""The gRPC baseline of the lifecycle benchmark: a bare grpc.aio server moving a state.

Three unary methods on ``bench.LifecycleEcho``, registered with a generic
handler and identity (de)serializers, so no message is parsed on either side:

* ``Pause``: the request is the whole state (the bytes of the session's entries),
  the answer is a small fixed message. The state crosses the wire once, client
  to server, as a client handing memsvc a state to keep would send it.
* ``Resume``: the request is small, the answer is the state last loaded. The
  state crosses the wire once, server to client.
* ``Load``: keeps the request's bytes as the state that Resume answers (set-up,
  not measured); answers the small message.

``bench.lifecycle`` runs it in its own process, as memsvc is::

    python -m bench._lifecycle_echo PORT

It serves on 127.0.0.1:PORT until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from bench._echo_server import identity, serve_until_signalled

ECHO_SERVICE = "bench.LifecycleEcho"
PAUSE_METHOD = f"/{ECHO_SERVICE}/Pause"
RESUME_METHOD = f"/{ECHO_SERVICE}/Resume"
LOAD_METHOD = f"/{ECHO_SERVICE}/Load"
# Large enough for a 10,000-key state (about 2.4 MB) on both sides of the wire.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# The small side of each call: about the size of a PauseRequest or ResumeRequest.
SMALL = b"s" * 100


async def serve(port: int) -> None:
    state = b""

    async def pause(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return SMALL

    async def resume(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return state

    async def load(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal state
        state = request
        return SMALL

    def method(handler: object) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            handler, request_deserializer=identity, response_serializer=identity
        )

    generic = grpc.method_handlers_generic_handler(
        ECHO_SERVICE, {"Pause": method(pause), "Resume": method(resume), "Load": method(load)}
    )
    await serve_until_signalled(port, generic, CHANNEL_OPTIONS)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
