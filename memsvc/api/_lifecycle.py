"""The gRPC servicer of LifecycleService."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import struct_pb2

from memsvc.api._convert import (
    collected,
    encode_value,
    plain_struct,
    seconds_of,
    timestamp,
    ttl_of,
)

# The SDK's reading of a Value: episode summaries show values as SDK users see them.
from memsvc.client._values import from_value
from memsvc.domain import FieldViolation, SessionRef
from memsvc.domain._lifecycle import Lifecycle
from memsvc.domain._lifecycle_records import CheckpointRecord, SessionRecord
from memsvc.domain._storable import metadata_problem
from memsvc.domain._watch import EventHub, StoredEvent, check_watch_request
from memsvc.v1 import lifecycle_pb2 as pb
from memsvc.v1 import lifecycle_pb2_grpc as pb_grpc

# The watch messages kept: recent events, at most this many and about this many
# bytes (an event's metadata may be 64 KiB: 4,096 of those would be 256 MiB).
_RESPONSE_CACHE = 4096
_RESPONSE_CACHE_BYTES = 16 << 20
# The events a stream without max_events_per_message takes from the hub at once,
# each then written in a message of its own: fewer trips through the hub's
# generators when several are ready (a burst), and no more held than this.
_EVENTS_TAKEN_AT_ONCE = 64
# A watch batch ends before this many bytes (or 3/4 of max_message_bytes, if less):
# far below gRPC clients' default receive limit (4 MiB), which a client that asks for
# batches may keep, while one message already carries thousands of typical events.
_BATCH_BYTES = 1 << 20
# An event's tag and length in a batch (and the batch's own, counted once per event).
_EVENT_FRAMING_BYTES = 10
# Room for what a session, checkpoint or event message holds beside its metadata
# (ids of up to 128 characters, times, counts): over 1 KiB at most.
_RECORD_FIELDS_BYTES = 2048


def render_value(stored: bytes) -> Any:
    """A stored value as plain JSON-like Python (for episode summaries), as the
    Python SDK reads it: a whole number is an int (JSON has one number type, so
    the 2 an agent stored reads "2" in the summary, as in the reference's, not
    "2.0"). A Value may hold NaN or an infinity (working memory stores any Value),
    which json_format.MessageToDict refuses: here it stays a float, and the
    summary's json.dumps spells it NaN or Infinity, as the reference's json.dumps did.
    """
    return from_value(struct_pb2.Value.FromString(stored))


def metadata_of(request: Any, violations: list[FieldViolation], room_bytes: int) -> dict[str, Any]:
    """The request's metadata Struct as a dict ({} when unset, or bad: then in
    ``violations``). ``room_bytes``: the most its encoding may take, so that the
    session, checkpoint or event that carries it fits one response."""
    if not request.HasField("metadata"):
        return {}
    encoded = request.metadata.ByteSize()
    if encoded > room_bytes:
        # Else the call would commit, then its answer, and every watch stream
        # reaching its event, fail with RESOURCE_EXHAUSTED (a Struct of numbers
        # encodes to 2.75 times its JSON as memsvc measures it: a number is 0.0 there).
        violations.append(
            FieldViolation(
                "metadata",
                f"is {encoded} bytes encoded, over the {room_bytes} that one response or"
                " event can carry with it (half of 3/4 of max_message_bytes, less"
                f" {_RECORD_FIELDS_BYTES} for its other fields: a Pause's answer carries"
                " the session's metadata and the checkpoint's): shorten it, or raise"
                " max_message_bytes",
            )
        )
        return {}
    metadata = collected(violations, lambda: plain_struct(request.metadata, "metadata"), None)
    if metadata is None:
        return {}
    if problem := metadata_problem(metadata):
        violations.append(FieldViolation("metadata", problem))
    return metadata


def _session_ref(request: Any) -> SessionRef:
    return SessionRef(request.project_id, request.agent_instance_id, request.session_id)


def session_message(record: SessionRecord, intact: bool | None = None) -> pb.Session:
    """The API form of a session."""
    message = pb.Session(
        project_id=record.ref.project_id,
        agent_instance_id=record.ref.agent_instance_id,
        session_id=record.ref.session_id,
        agent_type_id=record.agent_type_id or "",
        state=pb.SessionState.ValueType(int(record.state)),
        version=record.version,
        resume_checkpoint_id=record.resume_checkpoint_id or "",
    )
    message.metadata.update(record.metadata)
    message.create_time.CopyFrom(timestamp(record.create_ms))
    message.update_time.CopyFrom(timestamp(record.update_ms))
    if intact is not None:
        message.working_memory_status = (
            pb.WORKING_MEMORY_STATUS_INTACT if intact else pb.WORKING_MEMORY_STATUS_LOST
        )
    return message


def checkpoint_message(record: CheckpointRecord) -> pb.Checkpoint:
    """The API form of a checkpoint's metadata."""
    message = pb.Checkpoint(
        checkpoint_id=record.checkpoint_id,
        project_id=record.ref.project_id,
        agent_instance_id=record.ref.agent_instance_id,
        session_id=record.ref.session_id,
        key_count=record.key_count,
        size_bytes=record.size_bytes,
    )
    message.metadata.update(record.metadata)
    message.create_time.CopyFrom(timestamp(record.create_ms))
    if record.expire_ms is not None:
        message.expire_time.CopyFrom(timestamp(record.expire_ms))
    return message


@dataclass
class _EventMessages:
    """One event's watch messages: alone in ``event``, and as a batch of one (built
    when a stream that asks for batches first needs it)."""

    single: pb.WatchLifecycleResponse
    size: int  # of the event, serialized
    alone: pb.WatchLifecycleResponse | None = None

    @property
    def held(self) -> int:
        """About the bytes its messages hold."""
        return self.size * (1 if self.alone is None else 2)


class LifecycleServicer(pb_grpc.LifecycleServiceServicer):
    """Serves memsvc.v1.LifecycleService over a Lifecycle domain object.

    RPCs not overridden here answer UNIMPLEMENTED (the generated base class).
    """

    def __init__(
        self, lifecycle: Lifecycle, hub: EventHub, response_budget_bytes: int = 3 << 20
    ) -> None:
        self._lifecycle = lifecycle
        self._hub = hub
        self._batch_bytes = min(response_budget_bytes, _BATCH_BYTES)
        # Half the budget: a Pause's or Resume's answer carries two metadata, the
        # session's (its Spawn's) and the new checkpoint's.
        self._metadata_room = max(0, response_budget_bytes // 2 - _RECORD_FIELDS_BYTES)
        # One event goes to many watchers: build its message once (recent ones kept).
        # An event changes only when a purge makes it a tombstone (on any replica),
        # so the key includes that flag and a tombstone read back is never served
        # from its earlier message. It includes the event's id too: a database
        # failed over to a standby that lost the last commits (or restored) gives
        # their sequences to other events, which must never get their messages.
        self._responses: OrderedDict[tuple[int, str, bool], _EventMessages] = OrderedDict()
        self._responses_bytes = 0

    def _event_response(self, stored: StoredEvent) -> _EventMessages:
        """The messages of one event (built once for every watcher)."""
        key = (stored.sequence, stored.event.event_id, stored.event.purged)
        cached = self._responses.get(key)
        if cached is not None:
            return cached
        event = event_message(stored)
        built = _EventMessages(pb.WatchLifecycleResponse(event=event), event.ByteSize())
        self._responses[key] = built
        self._responses_bytes += built.held
        self._trim_responses()
        return built

    def _trim_responses(self) -> None:
        """Forget the oldest messages past the cache's bounds (never the newest)."""
        while len(self._responses) > 1 and (
            len(self._responses) > _RESPONSE_CACHE or self._responses_bytes > _RESPONSE_CACHE_BYTES
        ):
            self._responses_bytes -= self._responses.popitem(last=False)[1].held

    def _alone(self, stored: StoredEvent) -> pb.WatchLifecycleResponse:
        """The batch of ``stored`` alone (built once for every watcher)."""
        messages = self._event_response(stored)  # in the cache, the newest at worst
        if messages.alone is None:
            batch = pb.LifecycleEventBatch(events=[messages.single.event])
            messages.alone = pb.WatchLifecycleResponse(batch=batch)
            self._responses_bytes += messages.size
            self._trim_responses()
        return messages.alone

    def _batches(self, ready: list[StoredEvent]) -> Iterator[pb.WatchLifecycleResponse]:
        """``ready`` in batch messages, each ending before the batch budget (one
        event at least, whatever its size)."""
        if len(ready) == 1:
            yield self._alone(ready[0])  # most batches, when events are not many
            return
        batch = pb.WatchLifecycleResponse(batch=pb.LifecycleEventBatch())
        size = 0
        for stored in ready:
            messages = self._event_response(stored)
            framed = messages.size + _EVENT_FRAMING_BYTES
            if size and size + framed > self._batch_bytes:
                yield batch
                batch = pb.WatchLifecycleResponse(batch=pb.LifecycleEventBatch())
                size = 0
            batch.batch.events.append(messages.single.event)
            size += framed
        yield batch

    async def Spawn(
        self, request: pb.SpawnRequest, context: grpc.aio.ServicerContext
    ) -> pb.SpawnResponse:
        violations: list[FieldViolation] = []
        initial = [
            (
                item.key,
                encode_value(item.value, item.HasField("value")),
                ttl_of(item, f"initial_entries[{index}].ttl", violations),
            )
            for index, item in enumerate(request.initial_entries)
        ]
        result = await self._lifecycle.spawn(
            _session_ref(request),
            request.agent_type_id,
            initial,
            metadata_of(request, violations, self._metadata_room),
            request.request_id,
            violations,
        )
        return pb.SpawnResponse(
            session=session_message(result.session, True),
            initial_entries_written=result.initial_entries_written,
        )

    async def Pause(
        self, request: pb.PauseRequest, context: grpc.aio.ServicerContext
    ) -> pb.PauseResponse:
        violations: list[FieldViolation] = []
        metadata = metadata_of(request, violations, self._metadata_room)
        result = await self._lifecycle.pause(
            _session_ref(request), request.checkpoint_id, metadata, request.request_id, violations
        )
        return pb.PauseResponse(
            session=session_message(result.session, True),
            checkpoint=checkpoint_message(result.checkpoint),
        )

    async def Resume(
        self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResumeResponse:
        violations: list[FieldViolation] = []
        result = await self._lifecycle.resume(
            _session_ref(request),
            request.checkpoint_id,
            request.merge_with_current,
            metadata_of(request, violations, self._metadata_room),
            request.request_id,
            violations,
        )
        return pb.ResumeResponse(
            session=session_message(result.session, True),
            checkpoint=checkpoint_message(result.checkpoint),
            entries_restored=result.entries_restored,
        )

    async def Terminate(
        self, request: pb.TerminateRequest, context: grpc.aio.ServicerContext
    ) -> pb.TerminateResponse:
        violations: list[FieldViolation] = []
        result = await self._lifecycle.terminate(
            _session_ref(request),
            request.task_description,
            int(request.outcome),
            list(request.lessons_learned),
            consolidate=not request.skip_consolidation,
            cleanup=not request.keep_working_memory,
            metadata=metadata_of(request, violations, self._metadata_room),
            request_id=request.request_id,
            found=violations,
        )
        return pb.TerminateResponse(
            session=session_message(result.session),
            episode_id=result.episode_id or "",
            entries_consolidated=result.entries_consolidated,
            entries_cleared=result.entries_cleared,
            outcome=pb.Outcome.ValueType(result.outcome),
        )

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSessionResponse:
        record, intact = await self._lifecycle.reads.get_session(_session_ref(request))
        return pb.GetSessionResponse(session=session_message(record, intact))

    async def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCheckpointsResponse:
        page = await self._lifecycle.reads.list_checkpoints(
            _session_ref(request), request.page_size, request.page_token
        )
        return pb.ListCheckpointsResponse(
            checkpoints=[checkpoint_message(c) for c in page.items],
            next_page_token=page.next_page_token,
        )

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        page = await self._lifecycle.reads.list_sessions(
            request.project_id,
            request.agent_instance_id,
            int(request.state),
            request.page_size,
            request.page_token,
        )
        return pb.ListSessionsResponse(
            sessions=[session_message(s) for s in page.items],
            next_page_token=page.next_page_token,
        )

    async def CreateCheckpoint(
        self, request: pb.CreateCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateCheckpointResponse:
        violations: list[FieldViolation] = []
        checkpoint = await self._lifecycle.create_checkpoint(
            _session_ref(request),
            request.checkpoint_id,
            metadata_of(request, violations, self._metadata_room),
            request.request_id,
            violations,
        )
        return pb.CreateCheckpointResponse(checkpoint=checkpoint_message(checkpoint))

    async def GetCheckpoint(
        self, request: pb.GetCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCheckpointResponse:
        checkpoint, page = await self._lifecycle.reads.get_checkpoint(
            _session_ref(request),
            request.checkpoint_id,
            request.include_entries,
            request.page_size,
            request.page_token,
        )
        response = pb.GetCheckpointResponse(
            checkpoint=checkpoint_message(checkpoint), next_page_token=page.next_page_token
        )
        for entry in page.items:
            item = response.entries.add(key=entry.key)
            item.value.ParseFromString(entry.value)
            if entry.remaining_ttl_ms is not None:
                item.remaining_ttl.FromMilliseconds(entry.remaining_ttl_ms)
        return response

    async def DeleteCheckpoint(
        self, request: pb.DeleteCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteCheckpointResponse:
        violations: list[FieldViolation] = []
        metadata = metadata_of(request, violations, self._metadata_room)
        await self._lifecycle.delete_checkpoint(
            _session_ref(request), request.checkpoint_id, metadata, request.request_id, violations
        )
        return pb.DeleteCheckpointResponse()

    # Written with context.write(), not yielded: the interceptors around it then wrap
    # one awaited call instead of adding an async generator layer to every message.
    async def WatchLifecycle(  # type: ignore[override]
        self, request: pb.WatchLifecycleRequest, context: grpc.aio.ServicerContext
    ) -> None:
        violations: list[FieldViolation] = []
        interval = (
            collected(
                violations,
                lambda: seconds_of(request.progress_interval, "progress_interval"),
                None,
            )
            if request.HasField("progress_interval")
            else None
        )
        event_filter, progress_seconds = check_watch_request(
            request.project_id,
            request.agent_instance_id,
            request.session_id,
            list(request.event_types),
            request.after_sequence,
            request.start,
            interval,
            request.max_events_per_message,
            violations,
        )
        after = request.after_sequence if request.HasField("after_sequence") else None
        oldest = after is None and request.start == pb.WATCH_START_OLDEST
        batched = request.max_events_per_message > 0
        taken = request.max_events_per_message if batched else _EVENTS_TAKEN_AT_ONCE
        # Closed as the handler ends, however it ends: the stream's place in the hub
        # is freed then, not whenever the generator is collected.
        stream = self._hub.watch(event_filter, after, progress_seconds, oldest, taken)
        async with contextlib.aclosing(stream):
            async for item in stream:
                if isinstance(item, int):
                    await context.write(
                        pb.WatchLifecycleResponse(progress=pb.WatchProgress(sequence=item))
                    )
                elif batched:
                    for batch in self._batches(item):
                        await context.write(batch)
                else:
                    for stored in item:
                        await context.write(self._event_response(stored).single)


def event_message(stored: StoredEvent) -> pb.LifecycleEvent:
    """The API form of a stored event."""
    event = stored.event
    if event.purged:
        tombstone = pb.LifecycleEvent(
            sequence=stored.sequence,
            event_id=event.event_id,
            event_type=pb.EventType.ValueType(int(event.event_type)),
            purged=True,
        )
        tombstone.event_time.CopyFrom(timestamp(event.time_ms))
        return tombstone
    message = pb.LifecycleEvent(
        sequence=stored.sequence,
        event_id=event.event_id,
        event_type=pb.EventType.ValueType(int(event.event_type)),
        project_id=event.ref.project_id,
        agent_instance_id=event.ref.agent_instance_id,
        session_id=event.ref.session_id,
        agent_type_id=event.agent_type_id or "",
        checkpoint_id=event.checkpoint_id or "",
        episode_id=event.episode_id or "",
        request_id=event.request_id or "",
    )
    message.metadata.update(event.metadata)
    message.event_time.CopyFrom(timestamp(event.time_ms))
    return message
