"""The server interceptor that counts and times memsvc's RPCs for Prometheus."""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from memsvc.api._intercept import HandlerWrapper
from memsvc.metrics import Metrics

# A client ends its call at its own deadline, a little before the server's: gRPC
# sends the time left rounded up (to three significant figures), taken after the
# client's clock started. A call cancelled this close to the server's deadline ran
# out of time (its client saw DEADLINE_EXCEEDED): a fixed part and a share of the
# call's whole timeout.
_DEADLINE_SLACK_SECONDS = 0.05
_DEADLINE_SLACK_SHARE = 0.01


def _past_deadline(
    context: grpc.aio.ServicerContext, cancelled: bool, timeout: float | None
) -> bool:
    """Whether the client saw DEADLINE_EXCEEDED, whatever the handler did after it
    (ended with an error, or was cancelled). ``timeout``: the time the call had
    left when it started."""
    remaining = context.time_remaining()
    if remaining is None:
        return False
    if remaining <= 0:
        return True
    return (
        cancelled
        and timeout is not None
        and remaining <= _DEADLINE_SLACK_SECONDS + timeout * _DEADLINE_SLACK_SHARE
    )


def _code(
    context: grpc.aio.ServicerContext, interrupted: bool = False, timeout: float | None = None
) -> str:
    """The status the call ended with; ``interrupted``: its handler was cancelled
    or raised past the error mapping (CANCELLED, unless its deadline passed). A
    call its client cancelled is CANCELLED too when the handler ended quietly (a
    stream whose write failed as its client left returns without an error).
    ``timeout``: the time the call had left when it started."""
    cancelled = interrupted or context.cancelled()
    if _past_deadline(context, cancelled, timeout):
        return "DEADLINE_EXCEEDED"
    if cancelled:
        return "CANCELLED"
    code = context.code()
    if code is None:
        return "OK"
    # grpc.aio reports the code set by abort() as a StatusCode or its int value.
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


class MetricsInterceptor(HandlerWrapper):
    """Counts started and handled RPCs by method and code, and times unary ones.

    Install it before the ErrorInterceptor, so it sees the status that one sets.
    """

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        service, _, name = method.lstrip("/").rpartition("/")
        if handler.unary_unary is not None:
            labels = ("unary", service, name)
            return grpc.unary_unary_rpc_method_handler(
                self._call(handler.unary_unary, labels, timed=True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            labels = ("server_stream", service, name)
            behavior = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(
                # A stream that writes with context.write() is one awaited call.
                self._stream(behavior, labels)
                if inspect.isasyncgenfunction(behavior)
                else self._call(behavior, labels, timed=False),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _call(
        self,
        behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
        labels: Any,
        timed: bool,
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        """Count a unary call (and time it), or a stream written with context.write()."""
        metrics = self._metrics
        started_counter = metrics.rpc_started.labels(*labels)
        latency = metrics.rpc_seconds.labels(*labels) if timed else None

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started_counter.inc()
            started = time.perf_counter()
            timeout = context.time_remaining()
            code = "UNKNOWN"
            try:
                response = await behavior(request, context)
                code = _code(context, timeout=timeout)
                return response
            except grpc.aio.AbortError:
                code = _code(context, timeout=timeout)
                raise
            except BaseException:
                code = _code(context, interrupted=True, timeout=timeout)
                raise
            finally:
                if latency is not None:
                    latency.observe(time.perf_counter() - started)
                metrics.rpc_handled.labels(*labels, code).inc()

        return call

    def _stream(
        self, behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]], labels: Any
    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        metrics = self._metrics

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            metrics.rpc_started.labels(*labels).inc()
            timeout = context.time_remaining()
            code = "UNKNOWN"
            try:
                async for response in behavior(request, context):
                    yield response
                code = _code(context, timeout=timeout)
            except grpc.aio.AbortError:
                code = _code(context, timeout=timeout)
                raise
            except BaseException:
                code = _code(context, interrupted=True, timeout=timeout)
                raise
            finally:
                metrics.rpc_handled.labels(*labels, code).inc()

        return stream
