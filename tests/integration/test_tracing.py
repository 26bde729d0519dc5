"""With --otel-tracing, every gRPC call becomes an OpenTelemetry span."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from memsvc.config import Config
from memsvc.server import Server
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import expect_error


async def test_calls_are_traced(base_config: Config, scope: dict[str, Any]):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = replace(base_config, otel_tracing=True)
    async with (
        Server(config, tracer_provider=provider) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        await LifecycleServiceStub(channel).Spawn(lc.SpawnRequest(**scope))
        await expect_error(
            WorkingMemoryServiceStub(channel).Get(pb.GetRequest(**scope, key="absent")),
            grpc.StatusCode.NOT_FOUND,
        )
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert "/memsvc.v1.LifecycleService/Spawn" in spans, list(spans)
    get = spans["/memsvc.v1.WorkingMemoryService/Get"]
    assert get.attributes is not None
    assert get.attributes.get("rpc.grpc.status_code") == grpc.StatusCode.NOT_FOUND.value[0]
    # OpenTelemetry's server conventions: NOT_FOUND is the caller's error, not the span's.
    assert get.status.status_code == StatusCode.UNSET


async def test_streams_work_with_tracing_on(base_config: Config, scope: dict[str, Any]):
    """OpenTelemetry's aio interceptor takes only async-generator stream handlers:
    memsvc's watch and grpc's health Watch write with context.write, and failed with
    UNKNOWN under it. Streams pass untraced; their first message arrives."""
    provider = TracerProvider()
    config = replace(base_config, otel_tracing=True)
    async with (
        Server(config, tracer_provider=provider) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        watch = LifecycleServiceStub(channel).WatchLifecycle(
            lc.WatchLifecycleRequest(project_id=scope["project_id"])
        )
        first = await asyncio.wait_for(watch.read(), 10)
        assert first.HasField("progress"), first
        watch.cancel()
        health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        status = await asyncio.wait_for(health.read(), 10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        health.cancel()
