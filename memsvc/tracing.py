"""Optional OpenTelemetry tracing of the gRPC API (``--otel-tracing``).

The tracing packages are an extra (``memsvc[tracing]``), imported only when
tracing is switched on. Spans go to an OTLP exporter configured by the
standard ``OTEL_EXPORTER_OTLP_*`` and ``OTEL_SERVICE_NAME`` variables; the
provider is this server's own (not the process-global one), so it can be
flushed when the server stops.
"""

from __future__ import annotations

from typing import Any

from memsvc.config import StartupError


class TracingUnavailable(StartupError):
    """Tracing was asked for, but the tracing extra is not installed (a start-up
    failure that says what to fix: one line, not a traceback)."""


def make_tracer_provider() -> Any:
    """An SDK tracer provider that batches spans to OTLP over gRPC."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        raise TracingUnavailable(
            "otel_tracing needs the tracing extra: pip install 'memsvc[tracing]'"
        ) from error
    provider = TracerProvider(resource=Resource.create({"service.name": "memsvc"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def server_interceptor(tracer_provider: Any) -> Any:
    """The grpc.aio server interceptor that makes one span per call."""
    try:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
    except ImportError as error:
        raise TracingUnavailable(
            "otel_tracing needs the tracing extra: pip install 'memsvc[tracing]'"
        ) from error
    return aio_server_interceptor(tracer_provider=tracer_provider)  # type: ignore[no-untyped-call]
