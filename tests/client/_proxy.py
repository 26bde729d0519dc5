"""A gRPC proxy in front of memsvc that injects faults, for the SDK's retry tests.

It forwards every call as raw bytes (status details included), records each
request (method, request_id, after_sequence), and can:

- fail a call with a chosen status AFTER forwarding it to memsvc, so the first
  attempt took effect but its caller never saw the answer (``fail_after``);
- cut every open stream with UNAVAILABLE (``cut_streams``) and refuse new calls
  with UNAVAILABLE until ``accept()`` (``refuse``): a network outage; or cut them
  with another status (CANCELLED: a proxy such as Envoy resetting them);
- stall every open stream: it stays open but forwards nothing more
  (``stall_streams``), as a dead peer behind a silent network would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory

from memsvc.v1 import data_removal_pb2, episodic_pb2, lifecycle_pb2, working_memory_pb2

_REQUEST_TYPES: dict[str, Any] = {}
for _module in (working_memory_pb2, lifecycle_pb2, episodic_pb2, data_removal_pb2):
    for _service in _module.DESCRIPTOR.services_by_name.values():
        for _method in _service.methods:
            _REQUEST_TYPES[f"/{_service.full_name}/{_method.name}"] = (
                message_factory.GetMessageClass(_method.input_type)
            )


@dataclass(frozen=True)
class Seen:
    """One call that reached the proxy."""

    method: str
    request: Any

    @property
    def name(self) -> str:
        return self.method.rsplit("/", 1)[-1]

    @property
    def request_id(self) -> str | None:
        return getattr(self.request, "request_id", None) or None


class FaultProxy:
    """``async with FaultProxy(upstream) as proxy``: listens on ``proxy.target``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.seen: list[Seen] = []
        self._faults: dict[str, deque[grpc.StatusCode]] = defaultdict(deque)
        self._refusing = False
        self._cut_code = grpc.StatusCode.UNAVAILABLE
        self._streams: set[asyncio.Event] = set()
        self._stalls: set[asyncio.Event] = set()
        self._channel: Any = None
        self._server: Any = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def fail_after(self, rpc: str, *codes: grpc.StatusCode) -> None:
        """The next calls of ``rpc`` (say "CreateCheckpoint") are forwarded, then fail
        with ``codes`` in turn."""
        self._faults[rpc].extend(codes)

    def calls(self, rpc: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.name == rpc]

    def refuse(self) -> None:
        self._refusing = True

    def accept(self) -> None:
        self._refusing = False

    def cut_streams(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> int:
        """End every open stream with ``code``; return how many there were."""
        self._cut_code = code
        for cut in self._streams:
            cut.set()
        return len(self._streams)

    def stall_streams(self) -> int:
        """Stop forwarding on every open stream (they stay open); return how many."""
        for stall in self._stalls:
            stall.set()
        return len(self._stalls)

    async def __aenter__(self) -> FaultProxy:
        self._channel = grpc.aio.insecure_channel(self.upstream)
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((_Handler(self),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cut_streams()
        await self._server.stop(0)
        await self._channel.close()

    def _record(self, method: str, raw: bytes) -> None:
        request_type = _REQUEST_TYPES.get(method)
        request = request_type.FromString(raw) if request_type is not None else raw
        self.seen.append(Seen(method, request))

    async def unary(self, method: str, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._record(method, raw)
        if self._refusing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "proxy: refusing connections")
        upstream = self._channel.unary_unary(method)
        try:
            response: bytes = await upstream(
                raw, timeout=context.time_remaining(), metadata=_forwarded(context)
            )
        except grpc.aio.AioRpcError as error:
            await context.abort(
                error.code(), error.details(), tuple(error.trailing_metadata() or ())
            )
        faults = self._faults[method.rsplit("/", 1)[-1]]
        if faults:
            await context.abort(faults.popleft(), "proxy: injected after forwarding")
        return response

    async def stream(
        self, method: str, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self._record(method, raw)
        if self._refusing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "proxy: refusing connections")
        call = self._channel.unary_stream(method)(raw, metadata=_forwarded(context))
        cut, stall = asyncio.Event(), asyncio.Event()
        self._streams.add(cut)
        self._stalls.add(stall)
        cut_wait = asyncio.ensure_future(cut.wait())
        try:
            while True:
                read = asyncio.ensure_future(call.read())
                await asyncio.wait({read, cut_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    call.cancel()
                    await context.abort(self._cut_code, "proxy: stream cut")
                try:
                    message = read.result()
                except grpc.aio.AioRpcError as error:
                    await context.abort(
                        error.code(), error.details(), tuple(error.trailing_metadata() or ())
                    )
                if message is grpc.aio.EOF:
                    return
                if stall.is_set():
                    call.cancel()
                    await asyncio.Event().wait()  # silent until the client gives up
                yield message
        finally:
            self._streams.discard(cut)
            self._stalls.discard(stall)
            cut_wait.cancel()
            with contextlib.suppress(BaseException):
                call.cancel()


def _forwarded(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if not key.startswith((":", "grpc-")) and key not in ("user-agent", "te", "content-type")
    )


class _Handler(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, proxy: FaultProxy) -> None:
        self._proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method
        proxy = self._proxy
        if method.endswith("/WatchLifecycle"):

            async def stream(raw: bytes, context: Any) -> AsyncIterator[bytes]:
                async for message in proxy.stream(method, raw, context):
                    yield message

            return grpc.unary_stream_rpc_method_handler(stream)

        async def unary(raw: bytes, context: Any) -> bytes:
            return await proxy.unary(method, raw, context)

        return grpc.unary_unary_rpc_method_handler(unary)
