"""The gRPC servicer of GraphCheckpointService."""

from __future__ import annotations

import json
from typing import Any

import grpc

from memsvc.api._convert import timestamp, ttl_of
from memsvc.domain import FieldViolation, SessionRef
from memsvc.domain._graph_checkpoints import (
    MAX_FILTER_BYTES,
    MAX_METADATA_BYTES,
    GraphCheckpointRecord,
    GraphCheckpoints,
    GraphCheckpointTooLarge,
    GraphListScope,
    GraphThreadOptions,
    GraphValue,
    GraphWrite,
    parse_json_object,
)
from memsvc.v1 import graph_checkpoint_pb2 as pb
from memsvc.v1 import graph_checkpoint_pb2_grpc as pb_grpc


def checkpoint_record(
    project_id: str, message: pb.GraphCheckpoint, violations: list[FieldViolation]
) -> tuple[GraphCheckpointRecord, list[GraphValue]]:
    """The domain form of a put's checkpoint and its new values."""
    if message.pending_writes:
        violations.append(
            FieldViolation("checkpoint.pending_writes", "is output only; leave it empty")
        )
    if message.HasField("create_time"):
        violations.append(FieldViolation("checkpoint.create_time", "is output only"))
    metadata = parse_json_object(
        message.metadata_json, "checkpoint.metadata_json", MAX_METADATA_BYTES, violations
    )
    record = GraphCheckpointRecord(
        project_id=project_id,
        thread_id=message.thread_id,
        checkpoint_ns=message.checkpoint_ns,
        checkpoint_id=message.checkpoint_id,
        parent_checkpoint_id=message.parent_checkpoint_id or None,
        doc_type=message.checkpoint.type,
        doc=message.checkpoint.data,
        metadata=metadata,
        channel_versions=dict(message.channel_versions),
    )
    values = [
        GraphValue(v.channel, v.version, v.value.type, v.value.data) for v in message.channel_values
    ]
    return record, values


def checkpoint_message(record: GraphCheckpointRecord) -> pb.GraphCheckpoint:
    """The API form of a stored checkpoint, with values and writes."""
    return pb.GraphCheckpoint(
        thread_id=record.thread_id,
        checkpoint_ns=record.checkpoint_ns,
        checkpoint_id=record.checkpoint_id,
        parent_checkpoint_id=record.parent_checkpoint_id or "",
        checkpoint=pb.TypedValue(type=record.doc_type, data=record.doc),
        metadata_json=json.dumps(record.metadata, separators=(",", ":"), ensure_ascii=False),
        channel_versions=record.channel_versions,
        channel_values=[
            pb.ChannelValue(
                channel=v.channel, version=v.version, value=pb.TypedValue(type=v.type, data=v.data)
            )
            for v in record.values
        ],
        pending_writes=[
            pb.GraphWrite(
                task_id=w.task_id,
                task_path=w.task_path,
                idx=w.idx,
                channel=w.channel,
                value=pb.TypedValue(type=w.type, data=w.data),
            )
            for w in record.writes
        ],
        create_time=timestamp(record.create_ms),
    )


def thread_options(
    project_id: str, message: pb.GraphThreadOptions, violations: list[FieldViolation]
) -> GraphThreadOptions:
    """The domain form of a thread's options (validated by the domain; a malformed
    TTL goes to ``violations``)."""
    session = None
    if message.HasField("session"):
        session = SessionRef(
            project_id, message.session.agent_instance_id, message.session.session_id
        )
    return GraphThreadOptions(
        ttl_ms=ttl_of(message, "options.ttl", violations),
        keep_last=message.keep_last,
        session=session,
        on_session_end=int(message.session.on_session_end) if session else 0,
    )


class GraphCheckpointServicer(pb_grpc.GraphCheckpointServiceServicer):
    """Serves memsvc.v1.GraphCheckpointService over a GraphCheckpoints domain object."""

    def __init__(self, graphs: GraphCheckpoints, max_response_bytes: int) -> None:
        self._graphs = graphs
        # grpc's own refusal of a larger response says only "Sent message larger than max".
        self._max_response_bytes = max_response_bytes

    def _fits(self, response: Any, checkpoint: pb.GraphCheckpoint) -> None:
        """A response carries a checkpoint with all its values: one too large for a
        response (a thread whose state grew past it, put by put) is refused by name.
        The store refuses it before reading its values when their stored lengths
        alone are too many; this exact check is the final word on the rest.
        List pages stop at a byte budget below the limit, so only a page of one
        checkpoint can be too large."""
        size = response.ByteSize()
        if size > self._max_response_bytes:
            raise GraphCheckpointTooLarge(
                checkpoint.thread_id,
                checkpoint.checkpoint_ns,
                checkpoint.checkpoint_id,
                size,
                self._max_response_bytes,
            )

    async def PutGraphCheckpoint(
        self, request: pb.PutGraphCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutGraphCheckpointResponse:
        violations: list[FieldViolation] = []
        record, values = checkpoint_record(request.project_id, request.checkpoint, violations)
        options = (
            thread_options(request.project_id, request.options, violations)
            if request.HasField("options")
            else None
        )
        stored = await self._graphs.put(
            record,
            values,
            require_latest_parent=request.require_latest_parent,
            options=options,
            violations=violations,
        )
        return pb.PutGraphCheckpointResponse(values_stored=stored)

    async def PutGraphWrites(
        self, request: pb.PutGraphWritesRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutGraphWritesResponse:
        await self._graphs.put_writes(
            request.project_id,
            request.thread_id,
            request.checkpoint_ns,
            request.checkpoint_id,
            [
                GraphWrite(w.task_id, w.task_path, w.idx, w.channel, w.value.type, w.value.data)
                for w in request.writes
            ],
            request.replace,
        )
        return pb.PutGraphWritesResponse()

    async def GetGraphCheckpoint(
        self, request: pb.GetGraphCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetGraphCheckpointResponse:
        found = await self._graphs.get(
            request.project_id,
            request.thread_id,
            request.checkpoint_ns,
            request.checkpoint_id,
            self._max_response_bytes,
            request.channels,
        )
        response = pb.GetGraphCheckpointResponse(checkpoint=checkpoint_message(found))
        self._fits(response, response.checkpoint)
        return response

    async def ListGraphCheckpoints(
        self, request: pb.ListGraphCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListGraphCheckpointsResponse:
        violations: list[FieldViolation] = []
        metadata_filter = parse_json_object(
            request.metadata_filter_json, "metadata_filter_json", MAX_FILTER_BYTES, violations
        )
        scope = GraphListScope(
            project_id=request.project_id,
            thread_id=request.thread_id or None,
            checkpoint_ns=request.checkpoint_ns if request.HasField("checkpoint_ns") else None,
            metadata_filter=metadata_filter,
            before_checkpoint_id=request.before_checkpoint_id or None,
            checkpoint_id=request.checkpoint_id or None,
            channels=tuple(request.channels),
        )
        page = await self._graphs.list_checkpoints(
            scope,
            request.page_size,
            request.page_token,
            violations,
            max_bytes=self._max_response_bytes,
        )
        response = pb.ListGraphCheckpointsResponse(
            checkpoints=[checkpoint_message(c) for c in page.items],
            next_page_token=page.next_page_token,
        )
        if response.checkpoints:
            self._fits(response, response.checkpoints[0])
        return response

    async def DeleteGraphThread(
        self, request: pb.DeleteGraphThreadRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteGraphThreadResponse:
        deleted = await self._graphs.delete_thread(request.project_id, request.thread_id)
        return pb.DeleteGraphThreadResponse(checkpoints_deleted=deleted)

    async def DeleteGraphRuns(
        self, request: pb.DeleteGraphRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteGraphRunsResponse:
        deleted = await self._graphs.delete_runs(request.project_id, list(request.run_ids))
        return pb.DeleteGraphRunsResponse(checkpoints_deleted=deleted)

    async def CopyGraphThread(
        self, request: pb.CopyGraphThreadRequest, context: grpc.aio.ServicerContext
    ) -> pb.CopyGraphThreadResponse:
        copied = await self._graphs.copy_thread(
            request.project_id, request.source_thread_id, request.target_thread_id
        )
        return pb.CopyGraphThreadResponse(checkpoints_copied=copied)

    async def PruneGraphThreads(
        self, request: pb.PruneGraphThreadsRequest, context: grpc.aio.ServicerContext
    ) -> pb.PruneGraphThreadsResponse:
        pruned = await self._graphs.prune(
            request.project_id,
            list(request.thread_ids),
            int(request.strategy),
            list(request.refuse_metadata_keys),
        )
        return pb.PruneGraphThreadsResponse(
            checkpoints_deleted=pruned.checkpoints_deleted,
            refused_thread_ids=pruned.refused_thread_ids,
        )
