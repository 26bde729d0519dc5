"""Optional OpenTelemetry tracing of the gRPC API (``--otel-tracing``).

The tracing packages are an extra (``memsvc[tracing]``), imported only when
tracing is switched on. Spans go to an OTLP exporter configured by the
standard ``OTEL_EXPORTER_OTLP_*`` and ``OTEL_SERVICE_NAME`` variables; the
provider is this server's own (not the process-global one), so it can be
flushed when the server stops. Unary calls are traced, streams are not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from memsvc.config import StartupError


class TracingUnavailable(StartupError):
    """Tracing was asked for, but the tracing extra is not installed (a start-up
    failure that says what to fix: one line, not a traceback)."""


_NEEDS_EXTRA = "otel_tracing needs the tracing extra: pip install 'memsvc[tracing]'"


def check_installed() -> None:
    """Raise TracingUnavailable unless the tracing extra imports: asked before the
    server opens any backend (else a sidecar ran its migrations, then exited)."""
    try:
        import opentelemetry.exporter.otlp.proto.grpc.trace_exporter
        import opentelemetry.instrumentation.grpc
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as error:
        raise TracingUnavailable(_NEEDS_EXTRA) from error


def make_tracer_provider() -> Any:
    """An SDK tracer provider that batches spans to OTLP over gRPC."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        raise TracingUnavailable(_NEEDS_EXTRA) from error
    # memsvc's name unless the environment names the service (OTEL_SERVICE_NAME, or
    # service.name in OTEL_RESOURCE_ATTRIBUTES), which Resource.create() reads.
    found = Resource.create({})  # with what the environment says
    unnamed = str(found.attributes.get("service.name", "")).startswith("unknown_service")
    resource = found.merge(Resource({"service.name": "memsvc"})) if unnamed else found
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def server_interceptor(tracer_provider: Any) -> grpc.aio.ServerInterceptor:
    """The grpc.aio server interceptor that makes one span per unary call."""
    try:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
    except ImportError as error:
        raise TracingUnavailable(_NEEDS_EXTRA) from error
    spans = aio_server_interceptor(tracer_provider=tracer_provider)  # type: ignore[no-untyped-call]
    return _UnaryOnly(spans)


class _UnaryOnly(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """``inner`` for unary calls; a streaming call's handler goes untouched.

    OpenTelemetry's aio interceptor iterates a stream handler's result with
    ``async for``: memsvc's stream handlers (WatchLifecycle) and grpc's health Watch
    write with ``context.write`` instead, and every such stream failed with UNKNOWN
    under it. Streams are not traced.
    """

    def __init__(self, inner: grpc.aio.ServerInterceptor) -> None:
        self._inner = inner

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler

        async def found(_: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            return handler

        return await self._inner.intercept_service(found, handler_call_details)
