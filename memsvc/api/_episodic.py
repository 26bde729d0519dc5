"""The gRPC servicer of EpisodicMemoryService."""

from __future__ import annotations

import functools
from typing import Literal

import grpc

from memsvc.api._convert import collected, epoch_ms, plain_struct, seconds_of, timestamp
from memsvc.domain import FieldViolation, SessionRef
from memsvc.domain._episodes import Episodes, EpisodeScope, unpack_embedding
from memsvc.domain._lifecycle_records import EpisodeRecord
from memsvc.domain._storable import MAX_TIME_MS, unsigned_zero
from memsvc.v1 import episodic_pb2 as pb
from memsvc.v1 import episodic_pb2_grpc as pb_grpc
from memsvc.v1 import lifecycle_pb2


def episode_record(message: pb.Episode, violations: list[FieldViolation]) -> EpisodeRecord:
    """The domain form of a request's episode (validated by the domain; what cannot
    be converted goes to ``violations``)."""
    duration = message.duration
    if message.HasField("create_time"):
        # Its presence, not its value: the Unix epoch itself is a time someone set.
        violations.append(
            FieldViolation("episode.create_time", "is assigned by the server; leave it unset")
        )
    return EpisodeRecord(
        episode_id=message.episode_id,
        ref=SessionRef(message.project_id, message.agent_instance_id, message.session_id),
        task_type=message.task_type,
        task_description=message.task_description,
        outcome=int(message.outcome),
        outcome_details=message.outcome_details,
        actions=[
            collected(
                violations, functools.partial(plain_struct, action, f"episode.actions[{i}]"), {}
            )
            for i, action in enumerate(message.actions)
        ],
        context_summary=message.context_summary,
        lessons_learned=list(message.lessons_learned),
        duration_seconds=collected(
            violations, lambda: seconds_of(duration, "episode.duration"), 0.0
        ),
        tokens_used=message.tokens_used,
        importance=unsigned_zero(message.importance),
        metadata=collected(
            violations, lambda: plain_struct(message.metadata, "episode.metadata"), {}
        ),
        create_ms=0,
        embedding_dimensions=message.embedding_dimensions,
    )


def episode_message(record: EpisodeRecord) -> pb.Episode:
    """The API form of an episode (with its embedding when it was read)."""
    message = pb.Episode(
        episode_id=record.episode_id,
        project_id=record.ref.project_id,
        agent_instance_id=record.ref.agent_instance_id,
        session_id=record.ref.session_id,
        task_type=record.task_type,
        task_description=record.task_description,
        outcome=lifecycle_pb2.Outcome.ValueType(record.outcome),
        outcome_details=record.outcome_details,
        context_summary=record.context_summary,
        lessons_learned=record.lessons_learned,
        tokens_used=record.tokens_used,
        importance=record.importance,
        embedding=unpack_embedding(record.embedding),
        embedding_dimensions=record.embedding_dimensions,
    )
    for action in record.actions:
        message.actions.add().update(action)
    message.metadata.update(record.metadata)
    message.duration.FromNanoseconds(round(record.duration_seconds * 1e9))
    message.create_time.CopyFrom(timestamp(record.create_ms))
    return message


def episode_scope(
    project_id: str, request_filter: pb.EpisodeFilter, violations: list[FieldViolation]
) -> EpisodeScope:
    """The domain form of a project and its filters (unset fields match all; what
    cannot be converted goes to ``violations``)."""
    f = request_filter

    def moment(name: Literal["start_time", "end_time"]) -> int | None:
        """Rounded up to the millisecond, as episodes are stamped: an episode of
        millisecond T is at or after a start in (T-1, T] and before an end in
        (T, T+1]. Not past year 9999, though: the latest Timestamp is a common
        "no end" (a time beyond it is refused by the range check as before)."""
        if not f.HasField(name):
            return None
        given, field = getattr(f, name), f"filter.{name}"

        def rounded() -> int:
            up = epoch_ms(given, field, round_up=True)
            return up if up <= MAX_TIME_MS else epoch_ms(given, field)

        return collected(violations, rounded, None)

    return EpisodeScope(
        project_id=project_id,
        agent_instance_id=f.agent_instance_id or None,
        session_id=f.session_id or None,
        outcome=int(f.outcome) or None,
        task_type=f.task_type or None,
        start_ms=moment("start_time"),
        end_ms=moment("end_time"),
        min_importance=f.min_importance or None,
    )


class EpisodicMemoryServicer(pb_grpc.EpisodicMemoryServiceServicer):
    """Serves memsvc.v1.EpisodicMemoryService over an Episodes domain object."""

    def __init__(self, episodes: Episodes) -> None:
        self._episodes = episodes

    async def RecordEpisode(
        self, request: pb.RecordEpisodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordEpisodeResponse:
        violations: list[FieldViolation] = []
        stored = await self._episodes.record(
            episode_record(request.episode, violations),
            list(request.episode.embedding),
            request.request_id,
            violations,
        )
        return pb.RecordEpisodeResponse(episode=episode_message(stored))

    async def GetEpisode(
        self, request: pb.GetEpisodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetEpisodeResponse:
        found = await self._episodes.get(
            request.project_id, request.episode_id, request.include_embedding
        )
        return pb.GetEpisodeResponse(episode=episode_message(found))

    async def ListEpisodes(
        self, request: pb.ListEpisodesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListEpisodesResponse:
        violations: list[FieldViolation] = []
        page = await self._episodes.list_episodes(
            episode_scope(request.project_id, request.filter, violations),
            request.page_size,
            request.page_token,
            request.include_embedding,
            violations,
        )
        return pb.ListEpisodesResponse(
            episodes=[episode_message(e) for e in page.items],
            next_page_token=page.next_page_token,
        )

    async def SearchEpisodes(
        self, request: pb.SearchEpisodesRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchEpisodesResponse:
        violations: list[FieldViolation] = []
        page = await self._episodes.search(
            episode_scope(request.project_id, request.filter, violations),
            request.query,
            list(request.query_embedding),
            request.page_size,
            request.page_token,
            request.include_embedding,
            violations,
        )
        return pb.SearchEpisodesResponse(
            results=[
                pb.SearchResult(episode=episode_message(r.episode), score=r.score)
                for r in page.items
            ],
            next_page_token=page.next_page_token,
        )

    async def DeleteEpisode(
        self, request: pb.DeleteEpisodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteEpisodeResponse:
        await self._episodes.delete(
            request.project_id, request.episode_id, request.allow_missing, request.request_id
        )
        return pb.DeleteEpisodeResponse()
