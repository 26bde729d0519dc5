"""The gRPC servicer of WorkingMemoryService: messages in, domain calls, messages out."""

from __future__ import annotations

import grpc

from memsvc.api._convert import check_readable, encode_value, timestamp, ttl_of
from memsvc.domain import (
    FieldViolation,
    KeyNotFound,
    SessionRef,
    StoredEntry,
    WorkingMemory,
    WriteResult,
)
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1 import working_memory_pb2_grpc as pb_grpc


def _session(request: pb.GetRequest | pb.SetRequest | pb.DeleteRequest | pb.ListKeysRequest
             | pb.ListEntriesRequest | pb.BatchGetRequest | pb.BatchSetRequest
             | pb.BatchDeleteRequest) -> SessionRef:  # fmt: skip
    return SessionRef(request.project_id, request.agent_instance_id, request.session_id)


def _fill_entry(target: pb.Entry, entry: StoredEntry) -> None:
    target.key = entry.key
    # Parse the stored encoding straight into the response: no intermediate copy.
    target.value.ParseFromString(entry.value)
    if entry.expire_at_ms is not None:
        target.expire_time.CopyFrom(timestamp(entry.expire_at_ms))


def _fill_result(target: pb.SetResponse | pb.SetResult, result: WriteResult) -> None:
    target.key = result.key
    target.created = result.created
    if result.expire_at_ms is not None:
        target.expire_time.CopyFrom(timestamp(result.expire_at_ms))


class WorkingMemoryServicer(pb_grpc.WorkingMemoryServiceServicer):
    """Serves memsvc.v1.WorkingMemoryService over a WorkingMemory domain object."""

    def __init__(self, memory: WorkingMemory) -> None:
        self._memory = memory

    async def Set(
        self, request: pb.SetRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetResponse:
        violations: list[FieldViolation] = []
        encoded = encode_value(request.value, request.HasField("value"))
        check_readable(encoded, "value", violations)
        result = await self._memory.set(
            _session(request),
            request.key,
            encoded,
            ttl_of(request, "ttl", violations),
            violations,
        )
        response = pb.SetResponse()
        _fill_result(response, result)
        return response

    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetResponse:
        session = _session(request)
        entry = await self._memory.get(session, request.key)
        if entry is None:
            raise KeyNotFound(request.session_id, request.key)
        response = pb.GetResponse()
        _fill_entry(response.entry, entry)
        return response

    async def Delete(
        self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteResponse:
        existed = await self._memory.delete(_session(request), request.key)
        return pb.DeleteResponse(existed=existed)

    async def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListKeysResponse:
        page = await self._memory.list_keys(
            _session(request), request.page_size, request.page_token
        )
        response = pb.ListKeysResponse(next_page_token=page.next_page_token)
        for meta in page.items:
            info = response.keys.add(key=meta.key, value_size_bytes=meta.value_size)
            if meta.expire_at_ms is not None:
                info.expire_time.CopyFrom(timestamp(meta.expire_at_ms))
        return response

    async def ListEntries(
        self, request: pb.ListEntriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListEntriesResponse:
        page = await self._memory.list_entries(
            _session(request), request.page_size, request.page_token
        )
        response = pb.ListEntriesResponse(next_page_token=page.next_page_token)
        for entry in page.items:
            _fill_entry(response.entries.add(), entry)
        return response

    async def BatchGet(
        self, request: pb.BatchGetRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchGetResponse:
        read = await self._memory.get_many(_session(request), list(request.keys))
        response = pb.BatchGetResponse(missing_keys=read.missing, unprocessed_keys=read.unprocessed)
        for entry in read.found:
            _fill_entry(response.entries.add(), entry)
        return response

    async def BatchSet(
        self, request: pb.BatchSetRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchSetResponse:
        violations: list[FieldViolation] = []
        entries = [
            (
                item.key,
                encode_value(item.value, item.HasField("value")),
                ttl_of(item, f"entries[{index}].ttl", violations),
            )
            for index, item in enumerate(request.entries)
        ]
        results = await self._memory.set_many(_session(request), entries, violations)
        response = pb.BatchSetResponse()
        for result in results:
            _fill_result(response.results.add(), result)
        return response

    async def BatchDelete(
        self, request: pb.BatchDeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchDeleteResponse:
        keys = list(request.keys)
        existed = await self._memory.delete_many(_session(request), keys)
        return pb.BatchDeleteResponse(
            deleted_keys=[k for k, e in zip(keys, existed, strict=True) if e],
            absent_keys=[k for k, e in zip(keys, existed, strict=True) if not e],
        )
