"""The plain Python values the SDK takes and returns: enums and frozen dataclasses.

No protobuf type appears here. Times are timezone-aware ``datetime`` objects in UTC,
durations are ``timedelta``, working-memory values and metadata are JSON-like Python
(``dict``, ``list``, ``str``, ``int``, ``float``, ``bool``, ``None``).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Literal, TypeAlias, TypeVar

JSONValue: TypeAlias = Any
"""A JSON-like Python value: dict (str keys), list, str, int, float, bool or None."""

Seconds: TypeAlias = float | timedelta
"""A duration, as seconds (``int`` or ``float``) or a ``timedelta``."""

T = TypeVar("T")


class SessionState(enum.StrEnum):
    """Where a session is in its lifecycle."""

    ACTIVE = "active"
    PAUSED = "paused"
    TERMINATED = "terminated"
    UNKNOWN = "unknown"
    """A state this SDK release does not know (a newer server)."""


class WorkingMemoryStatus(enum.StrEnum):
    """Whether a session's working memory is as memsvc left it."""

    INTACT = "intact"
    LOST = "lost"
    """The working-memory store lost it; resume from a checkpoint to restore it."""
    UNKNOWN = "unknown"


class Outcome(enum.StrEnum):
    """How the work of a session ended."""

    SUCCESS = "success"
    FAILURE = "failure"
    PARTIAL = "partial"
    UNKNOWN = "unknown"


class EventType(enum.StrEnum):
    """The kind of a lifecycle event."""

    SESSION_SPAWNED = "session_spawned"
    SESSION_PAUSED = "session_paused"
    SESSION_RESUMED = "session_resumed"
    SESSION_TERMINATED = "session_terminated"
    CHECKPOINT_CREATED = "checkpoint_created"
    CHECKPOINT_DELETED = "checkpoint_deleted"
    UNKNOWN = "unknown"


OutcomeLike: TypeAlias = Outcome | Literal["success", "failure", "partial"]
SessionStateLike: TypeAlias = SessionState | Literal["active", "paused", "terminated"]
EventTypeLike: TypeAlias = (
    EventType
    | Literal[
        "session_spawned",
        "session_paused",
        "session_resumed",
        "session_terminated",
        "checkpoint_created",
        "checkpoint_deleted",
    ]
)
WatchStart: TypeAlias = Literal["now", "oldest"]


@dataclass(frozen=True)
class WithTTL:
    """A value with its own time to live, for ``set_many`` and ``spawn(initial=...)``.

    ``await s.set_many({"plan": plan, "scratch": WithTTL(notes, ttl=60)})``. ``ttl``:
    seconds or a timedelta, more than 0 (a call given 0 raises ValueError); None:
    no expiry.
    """

    value: JSONValue
    ttl: Seconds | None


@dataclass(frozen=True)
class Entry:
    """One key of a session's working memory with its value."""

    key: str
    value: JSONValue
    expire_time: datetime | None
    """When the key expires; None when it has no TTL."""


@dataclass(frozen=True)
class KeyInfo:
    """One key of a session's working memory, without its value."""

    key: str
    expire_time: datetime | None
    value_size_bytes: int


@dataclass(frozen=True)
class SetResult:
    """What a write did to one key."""

    key: str
    expire_time: datetime | None
    created: bool
    """True when the key did not exist (or had expired) before the write."""


@dataclass(frozen=True)
class DeleteManyResult:
    """What ``delete_many`` removed."""

    deleted_keys: tuple[str, ...]
    absent_keys: tuple[str, ...]


@dataclass(frozen=True)
class Session:
    """One agent session and its lifecycle status."""

    project_id: str
    agent_instance_id: str
    session_id: str
    agent_type_id: str | None
    state: SessionState
    metadata: dict[str, JSONValue]
    create_time: datetime
    update_time: datetime
    version: int
    """Increases by one with every state change."""
    resume_checkpoint_id: str | None
    """For a PAUSED session: the checkpoint its Pause created."""
    working_memory_status: WorkingMemoryStatus | None
    """None when the server does not report it (for example, TERMINATED sessions)."""


@dataclass(frozen=True)
class Checkpoint:
    """A durable snapshot of a session's working memory."""

    checkpoint_id: str
    project_id: str
    agent_instance_id: str
    session_id: str
    create_time: datetime
    key_count: int
    size_bytes: int
    metadata: dict[str, JSONValue]
    expire_time: datetime | None
    """When retention deletes it; None while it is protected (a paused session's resume point)."""


@dataclass(frozen=True)
class CheckpointEntry:
    """One key of a checkpoint."""

    key: str
    value: JSONValue
    remaining_ttl: timedelta | None
    """The time the key had left when the checkpoint was taken; None without a TTL."""


@dataclass(frozen=True)
class PauseResult:
    session: Session
    checkpoint: Checkpoint


@dataclass(frozen=True)
class ResumeResult:
    session: Session
    checkpoint: Checkpoint
    entries_restored: int


@dataclass(frozen=True)
class TerminateResult:
    session: Session
    episode_id: str | None
    """The episode recorded; None when consolidation was skipped."""
    entries_consolidated: int
    entries_cleared: int
    outcome: Outcome


@dataclass(frozen=True)
class Episode:
    """A durable record of what an agent did."""

    episode_id: str
    project_id: str
    agent_instance_id: str
    session_id: str
    task_type: str
    task_description: str
    outcome: Outcome
    outcome_details: str
    actions: tuple[dict[str, JSONValue], ...]
    context_summary: str
    lessons_learned: tuple[str, ...]
    duration: timedelta
    tokens_used: int
    importance: float
    metadata: dict[str, JSONValue]
    create_time: datetime
    embedding: tuple[float, ...] | None
    """Only when asked for with ``include_embedding=True`` (and the episode has one)."""
    embedding_dimensions: int


@dataclass(frozen=True)
class SearchResult:
    """One ranked episode of a search."""

    episode: Episode
    score: float
    """Higher is better; full-text scores compare only within one search, similarity
    scores are cosine similarities from -1 to 1."""


@dataclass(frozen=True)
class PurgeReport:
    """What a purge removed."""

    sessions_deleted: int
    working_memories_deleted: int
    checkpoints_deleted: int
    episodes_deleted: int
    request_answers_deleted: int
    events_tombstoned: int
    graph_checkpoints_deleted: int = 0


@dataclass(frozen=True)
class LifecycleEvent:
    """One durable lifecycle event.

    A tombstone (``purged`` true: its subject was purged) keeps only ``sequence``,
    ``event_id``, ``event_type`` and ``event_time``; its ids are empty strings.
    """

    sequence: int
    event_id: str
    event_type: EventType
    project_id: str
    agent_instance_id: str
    session_id: str
    agent_type_id: str | None
    event_time: datetime
    metadata: dict[str, JSONValue]
    checkpoint_id: str | None
    episode_id: str | None
    request_id: str | None
    purged: bool


@dataclass(frozen=True)
class WatchProgress:
    """Every event up to ``sequence`` was delivered or did not match the filter."""

    sequence: int


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing, with the token of the next (None on the last page)."""

    items: tuple[T, ...]
    next_page_token: str | None


class AsyncPager(Generic[T]):
    """A paginated listing: ``async for item in pager`` reads every page as needed.

    ``pager.pages()`` iterates whole pages (``Page``, with ``next_page_token`` to save
    and pass back as ``page_token=``); ``await pager.collect()`` reads everything into
    a list. Each page is one call, with its own deadline and retries.
    """

    def __init__(
        self, fetch: Callable[[str], Awaitable[Page[T]]], page_token: str | None = None
    ) -> None:
        self._fetch = fetch
        self._page_token = page_token or ""

    async def fetch_page(self, page_token: str | None = None) -> Page[T]:
        """One page: the first (or the one ``page_token`` names)."""
        return await self._fetch(page_token if page_token is not None else self._page_token)

    async def pages(self) -> AsyncIterator[Page[T]]:
        token: str | None = self._page_token
        while token is not None:
            page = await self._fetch(token)
            yield page
            token = page.next_page_token

    async def collect(self, limit: int | None = None) -> list[T]:
        """Every item (or the first ``limit``), reading only the pages needed."""
        items: list[T] = []
        token: str | None = self._page_token
        while token is not None and (limit is None or len(items) < limit):
            page = await self._fetch(token)
            items.extend(page.items)
            token = page.next_page_token
        return items if limit is None else items[:limit]

    async def __aiter__(self) -> AsyncIterator[T]:
        async for page in self.pages():
            for item in page.items:
                yield item
