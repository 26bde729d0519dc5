"""The gRPC servicer of DataRemovalService."""

from __future__ import annotations

import dataclasses

import grpc

from memsvc.domain._purge import Purger
from memsvc.v1 import data_removal_pb2 as pb
from memsvc.v1 import data_removal_pb2_grpc as pb_grpc


class DataRemovalServicer(pb_grpc.DataRemovalServiceServicer):
    """Serves memsvc.v1.DataRemovalService over a Purger."""

    def __init__(self, purger: Purger) -> None:
        self._purger = purger

    async def PurgeData(
        self, request: pb.PurgeDataRequest, context: grpc.aio.ServicerContext
    ) -> pb.PurgeDataResponse:
        report = await self._purger.purge(
            request.project_id, request.agent_instance_id, request.session_id, request.request_id
        )
        return pb.PurgeDataResponse(**dataclasses.asdict(report))
