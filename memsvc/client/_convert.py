"""Protobuf messages of memsvc.v1 to the SDK's dataclasses, and enums both ways."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from google.protobuf.message import Message

from memsvc.client._types import (
    Checkpoint,
    CheckpointEntry,
    Entry,
    Episode,
    EventType,
    EventTypeLike,
    KeyInfo,
    LifecycleEvent,
    Outcome,
    OutcomeLike,
    PurgeReport,
    SearchResult,
    Session,
    SessionState,
    SessionStateLike,
    SetResult,
    WorkingMemoryStatus,
)
from memsvc.client._values import from_duration, from_struct, from_timestamp, from_value
from memsvc.v1 import data_removal_pb2, episodic_pb2, lifecycle_pb2, working_memory_pb2

Request = TypeVar("Request", bound=Message)


def page_request(request: Request, page_token: str) -> Request:
    """A copy of a list request for one page (a pager may be iterated more than once,
    and by two iterations at a time)."""
    page = type(request)()
    page.CopyFrom(request)
    page.page_token = page_token  # type: ignore[attr-defined]
    return page


_SESSION_STATES = {
    lifecycle_pb2.SESSION_STATE_ACTIVE: SessionState.ACTIVE,
    lifecycle_pb2.SESSION_STATE_PAUSED: SessionState.PAUSED,
    lifecycle_pb2.SESSION_STATE_TERMINATED: SessionState.TERMINATED,
}
_WM_STATUSES = {
    lifecycle_pb2.WORKING_MEMORY_STATUS_INTACT: WorkingMemoryStatus.INTACT,
    lifecycle_pb2.WORKING_MEMORY_STATUS_LOST: WorkingMemoryStatus.LOST,
}
_OUTCOMES = {
    lifecycle_pb2.OUTCOME_SUCCESS: Outcome.SUCCESS,
    lifecycle_pb2.OUTCOME_FAILURE: Outcome.FAILURE,
    lifecycle_pb2.OUTCOME_PARTIAL: Outcome.PARTIAL,
}
_EVENT_TYPES = {
    lifecycle_pb2.EVENT_TYPE_SESSION_SPAWNED: EventType.SESSION_SPAWNED,
    lifecycle_pb2.EVENT_TYPE_SESSION_PAUSED: EventType.SESSION_PAUSED,
    lifecycle_pb2.EVENT_TYPE_SESSION_RESUMED: EventType.SESSION_RESUMED,
    lifecycle_pb2.EVENT_TYPE_SESSION_TERMINATED: EventType.SESSION_TERMINATED,
    lifecycle_pb2.EVENT_TYPE_CHECKPOINT_CREATED: EventType.CHECKPOINT_CREATED,
    lifecycle_pb2.EVENT_TYPE_CHECKPOINT_DELETED: EventType.CHECKPOINT_DELETED,
}
_OUTCOME_WIRE = {python: wire for wire, python in _OUTCOMES.items()}
_STATE_WIRE = {python: wire for wire, python in _SESSION_STATES.items()}
_EVENT_TYPE_WIRE = {python: wire for wire, python in _EVENT_TYPES.items()}


E = TypeVar("E", Outcome, SessionState, EventType)


def _parse(enum_type: type[E], value: str, what: str) -> E:
    """The enum member for a member or its string value; ValueError for anything else."""
    try:
        member = enum_type(value)
    except ValueError:
        member = enum_type.UNKNOWN
    if member is enum_type.UNKNOWN:
        choices = ", ".join(repr(m.value) for m in enum_type if m is not enum_type.UNKNOWN)
        raise ValueError(f"{what}: {value!r} is not one of {choices}")
    return member


def outcome_wire(value: OutcomeLike) -> lifecycle_pb2.Outcome.ValueType:
    return _OUTCOME_WIRE[_parse(Outcome, value, "outcome")]


def state_wire(value: SessionStateLike) -> lifecycle_pb2.SessionState.ValueType:
    return _STATE_WIRE[_parse(SessionState, value, "state")]


def event_types_wire(types: Iterable[EventTypeLike]) -> list[lifecycle_pb2.EventType.ValueType]:
    given: Iterable[str] = [types] if isinstance(types, str) else types
    return [_EVENT_TYPE_WIRE[_parse(EventType, t, "event_types")] for t in given]


def _optional(text: str) -> str | None:
    return text or None


def entry(message: working_memory_pb2.Entry) -> Entry:
    return Entry(
        key=message.key,
        value=from_value(message.value),
        expire_time=from_timestamp(message.expire_time)
        if message.HasField("expire_time")
        else None,
    )


def key_info(message: working_memory_pb2.KeyInfo) -> KeyInfo:
    return KeyInfo(
        key=message.key,
        expire_time=from_timestamp(message.expire_time)
        if message.HasField("expire_time")
        else None,
        value_size_bytes=message.value_size_bytes,
    )


def set_result(message: working_memory_pb2.SetResponse | working_memory_pb2.SetResult) -> SetResult:
    return SetResult(
        key=message.key,
        expire_time=from_timestamp(message.expire_time)
        if message.HasField("expire_time")
        else None,
        created=message.created,
    )


def session(message: lifecycle_pb2.Session) -> Session:
    return Session(
        project_id=message.project_id,
        agent_instance_id=message.agent_instance_id,
        session_id=message.session_id,
        agent_type_id=_optional(message.agent_type_id),
        state=_SESSION_STATES.get(message.state, SessionState.UNKNOWN),
        metadata=from_struct(message.metadata),
        create_time=from_timestamp(message.create_time),
        update_time=from_timestamp(message.update_time),
        version=message.version,
        resume_checkpoint_id=_optional(message.resume_checkpoint_id),
        working_memory_status=None
        if message.working_memory_status == lifecycle_pb2.WORKING_MEMORY_STATUS_UNSPECIFIED
        else _WM_STATUSES.get(message.working_memory_status, WorkingMemoryStatus.UNKNOWN),
    )


def checkpoint(message: lifecycle_pb2.Checkpoint) -> Checkpoint:
    return Checkpoint(
        checkpoint_id=message.checkpoint_id,
        project_id=message.project_id,
        agent_instance_id=message.agent_instance_id,
        session_id=message.session_id,
        create_time=from_timestamp(message.create_time),
        key_count=message.key_count,
        size_bytes=message.size_bytes,
        metadata=from_struct(message.metadata),
        expire_time=from_timestamp(message.expire_time)
        if message.HasField("expire_time")
        else None,
    )


def checkpoint_entry(message: lifecycle_pb2.CheckpointEntry) -> CheckpointEntry:
    return CheckpointEntry(
        key=message.key,
        value=from_value(message.value),
        remaining_ttl=from_duration(message.remaining_ttl)
        if message.HasField("remaining_ttl")
        else None,
    )


def outcome(value: lifecycle_pb2.Outcome.ValueType) -> Outcome:
    return _OUTCOMES.get(value, Outcome.UNKNOWN)


def episode(message: episodic_pb2.Episode) -> Episode:
    return Episode(
        episode_id=message.episode_id,
        project_id=message.project_id,
        agent_instance_id=message.agent_instance_id,
        session_id=message.session_id,
        task_type=message.task_type,
        task_description=message.task_description,
        outcome=outcome(message.outcome),
        outcome_details=message.outcome_details,
        actions=tuple(from_struct(action) for action in message.actions),
        context_summary=message.context_summary,
        lessons_learned=tuple(message.lessons_learned),
        duration=from_duration(message.duration),
        tokens_used=message.tokens_used,
        importance=message.importance,
        metadata=from_struct(message.metadata),
        create_time=from_timestamp(message.create_time),
        embedding=tuple(message.embedding) if len(message.embedding) else None,
        embedding_dimensions=message.embedding_dimensions,
    )


def search_result(message: episodic_pb2.SearchResult) -> SearchResult:
    return SearchResult(episode=episode(message.episode), score=message.score)


def purge_report(message: data_removal_pb2.PurgeDataResponse) -> PurgeReport:
    return PurgeReport(
        sessions_deleted=message.sessions_deleted,
        working_memories_deleted=message.working_memories_deleted,
        checkpoints_deleted=message.checkpoints_deleted,
        episodes_deleted=message.episodes_deleted,
        request_answers_deleted=message.request_answers_deleted,
        events_tombstoned=message.events_tombstoned,
        graph_checkpoints_deleted=message.graph_checkpoints_deleted,
    )


def lifecycle_event(message: lifecycle_pb2.LifecycleEvent) -> LifecycleEvent:
    return LifecycleEvent(
        sequence=message.sequence,
        event_id=message.event_id,
        event_type=_EVENT_TYPES.get(message.event_type, EventType.UNKNOWN),
        project_id=message.project_id,
        agent_instance_id=message.agent_instance_id,
        session_id=message.session_id,
        agent_type_id=_optional(message.agent_type_id),
        event_time=from_timestamp(message.event_time),
        metadata=from_struct(message.metadata),
        checkpoint_id=_optional(message.checkpoint_id),
        episode_id=_optional(message.episode_id),
        request_id=_optional(message.request_id),
        purged=message.purged,
    )
