"""GraphCheckpointService is first-class: counted by the metrics, in health and reflection."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memsvc.config import Config
from memsvc.server import Server
from memsvc.v1 import graph_checkpoint_pb2 as pb
from memsvc.v1.graph_checkpoint_pb2_grpc import GraphCheckpointServiceStub
from tests.helpers import expect_error, metric

SERVICE = "memsvc.v1.GraphCheckpointService"


async def test_graph_calls_are_counted_and_the_service_is_served(tmp_path: Path):
    config = Config(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path / "data"),
        working_memory_url="memory://",
        health_listen="",
        metrics_listen="127.0.0.1:0",
    )
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        graphs = GraphCheckpointServiceStub(channel)
        request = pb.GetGraphCheckpointRequest(project_id=str(uuid.uuid4()), thread_id="t")
        await expect_error(graphs.GetGraphCheckpoint(request), grpc.StatusCode.NOT_FOUND)
        handled = metric(
            server,
            "grpc_server_handled_total",
            grpc_service=SERVICE,
            grpc_method="GetGraphCheckpoint",
            grpc_code="NOT_FOUND",
        )
        assert handled == 1
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await call.read()
        await call.done_writing()
        names = {s.name for s in listed.list_services_response.service}
        assert SERVICE in names
