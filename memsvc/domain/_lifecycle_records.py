"""Lifecycle records as the durable store keeps them, and its transaction port."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from memsvc.domain._ids import SessionRef
from memsvc.domain._pagination import wire_size


class SessionState(IntEnum):
    """Numbered as memsvc.v1.SessionState."""

    ACTIVE = 1
    PAUSED = 2
    TERMINATED = 3


# The settled marker (memsvc.domain._markers) each live state leaves in working memory.
MARKER_FOR = {SessionState.ACTIVE: "active", SessionState.PAUSED: "paused"}


class EventType(IntEnum):
    """Kinds of lifecycle event (the watch issue exposes them as an enum)."""

    SPAWNED = 1
    PAUSED = 2
    RESUMED = 3
    TERMINATED = 4
    CHECKPOINT_CREATED = 5
    CHECKPOINT_DELETED = 6

    @classmethod
    def _missing_(cls, value: object) -> EventType | None:
        """A type a newer memsvc wrote to the shared log (a rolling upgrade): kept
        as its number, which the API sends as it is (protobuf enums are open).
        Refused, a row would stop every event tail that reads it."""
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return None
        member = int.__new__(cls, value)
        member._name_ = f"UNKNOWN_{value}"
        member._value_ = value
        return member


# The event types this memsvc writes (and that a watch filter may name).
KNOWN_EVENT_TYPES = frozenset(EventType.__members__.values())

# What a session or checkpoint takes in a response besides its texts and metadata
# (ids, numbers, times, framing), an episode besides its texts and JSON, and each
# text's framing. The stores weigh rows alike in SQL.
RECORD_BYTES = 256
EPISODE_RECORD_BYTES = 512
TEXT_FRAMING_BYTES = 6


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session row; times are Unix milliseconds."""

    ref: SessionRef
    agent_type_id: str | None
    state: SessionState
    metadata: dict[str, Any]
    version: int
    memory_epoch: str
    resume_checkpoint_id: str | None
    create_ms: int
    update_ms: int

    def size(self) -> int:
        """An upper bound of its bytes in a response (pages end within a budget;
        the stores weigh a listed row alike: store/_lifecycle_sql.py, _SESSION_WEIGHT)."""
        texts = (self.ref.session_id, self.resume_checkpoint_id or "")
        return RECORD_BYTES + _texts_size(texts) + wire_size(self.metadata)


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """A checkpoint row without its contents."""

    ref: SessionRef
    checkpoint_id: str
    create_ms: int
    key_count: int
    size_bytes: int
    metadata: dict[str, Any] = field(default_factory=dict)
    # When retention deletes it at the latest; None while it is protected (the
    # resume point of a PAUSED session). Computed, not stored.
    expire_ms: int | None = None

    def size(self) -> int:
        """An upper bound of its bytes in a response (pages end within a budget;
        the stores weigh a listed row alike: store/_lifecycle_sql.py, _CHECKPOINT_WEIGHT)."""
        texts = (self.ref.session_id, self.checkpoint_id)
        return RECORD_BYTES + _texts_size(texts) + wire_size(self.metadata)


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One lifecycle event to append; the store assigns its sequence."""

    event_id: str
    event_type: EventType
    ref: SessionRef
    agent_type_id: str | None
    time_ms: int
    checkpoint_id: str | None = None
    episode_id: str | None = None
    request_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # A tombstone: its subject was purged, so only sequence, id, type and time remain.
    purged: bool = False

    def size(self) -> int:
        """An upper bound of its bytes in a response."""
        texts = (self.ref.session_id, self.checkpoint_id or "")
        return RECORD_BYTES + _texts_size(texts) + wire_size(self.metadata)


# What a tombstone's ids become (the store's columns are NOT NULL UUIDs).
NIL_UUID = "00000000-0000-0000-0000-000000000000"


def tombstone(event: EventRecord) -> EventRecord:
    """The event as a purge leaves it in the log (store/_purge_sql.py writes the
    same form): its id, type and time, nothing of its subject."""
    return EventRecord(
        event.event_id,
        event.event_type,
        SessionRef(NIL_UUID, NIL_UUID, ""),
        None,
        event.time_ms,
        purged=True,
    )


@dataclass(frozen=True, slots=True)
class EpisodeRecord:
    """An episode row, with the fields of the reference lifecycle."""

    episode_id: str
    ref: SessionRef
    task_type: str
    task_description: str
    outcome: int
    outcome_details: str
    actions: list[dict[str, Any]]
    context_summary: str
    lessons_learned: list[str]
    duration_seconds: float
    tokens_used: int
    importance: float
    metadata: dict[str, Any]
    create_ms: int
    # Little-endian float32 values; None without an embedding (or when not read).
    embedding: bytes | None = None
    embedding_dimensions: int = 0

    def size(self) -> int:
        """An upper bound of its bytes in a response (pages end within a budget)."""
        return self.size_without_embedding() + (
            len(self.embedding) + EMBEDDING_FRAMING_BYTES if self.embedding else 0
        )

    def size_without_embedding(self) -> int:
        """:meth:`size` of the episode read without its embedding (stored with it,
        so that a page's budget is applied in the database)."""
        texts = (self.task_type, self.task_description, self.outcome_details,
                 self.context_summary, self.ref.session_id, *self.lessons_learned)  # fmt: skip
        return (
            EPISODE_RECORD_BYTES
            + _texts_size(texts)
            + wire_size(self.actions)
            + wire_size(self.metadata)
            + 6 * len(self.lessons_learned)
        )


# An embedding's framing in a response, beside its packed values.
EMBEDDING_FRAMING_BYTES = 6


def _texts_size(texts: tuple[str, ...]) -> int:
    """Bytes of these strings in a message, with their framing."""
    return sum(TEXT_FRAMING_BYTES + len(text.encode("utf-8", "surrogatepass")) for text in texts)


class RequestIdReused(Exception):
    """A request id came back with different arguments."""


# What a purge leaves of a remembered answer in its scope: the request id stays
# claimed (a retry must not run again), its answer and data are gone.
PURGED_ANSWER = b"\x00memsvc:purged"


class AnswerPurged(Exception):
    """A request id's answer was forgotten by a purge."""


@dataclass(frozen=True, slots=True)
class CheckpointLock:
    """A locked session about to take a checkpoint (one round trip)."""

    record: SessionRecord
    checkpoints: int  # how many the session has (0 when not counted)
    id_taken: bool  # whether the requested checkpoint id exists already


@dataclass(frozen=True)
class EndLock:
    """A locked session about to end (one round trip)."""

    record: SessionRecord
    # Whether a graph thread linked to the session waits for its end (an action
    # other than none): only then does the Terminate look the threads up.
    linked_threads: bool
    # The session's checkpoints, oldest first (read when asked: a Terminate that
    # deletes them announces each).
    checkpoint_ids: tuple[str, ...] = ()
    # The contents of a PAUSED session's resume checkpoint (read when asked):
    # the state as paused, which its working memory may have lost keys of since,
    # their TTLs running on, though a Resume would bring them back.
    resume_contents: bytes | None = None


# A locked session (None: none) and a checkpoint (None: none) with its contents
# (None: not read, see lock_session_reading_checkpoint).
LockedWithCheckpoint = tuple[SessionRecord | None, tuple[CheckpointRecord, bytes | None] | None]


class PendingClaim(Protocol):
    """A request id claimed by a statement that may not have been answered yet."""

    async def answer(self) -> bytes | None:
        """None when this call claimed the id; the first answer when it was
        already served. Raises RequestIdReused when the id was used with other
        arguments."""


class RequestLog(Protocol):
    """Remembered answers of calls that carried a request id (in a transaction)."""

    async def send_claim(
        self, scope: SessionRef, request_id: str, method: str, arguments_hash: str
    ) -> PendingClaim:
        """Record the request id (remembered within ``scope``, which a purge
        forgets; its agent and session may be empty). Its answer, read later,
        is the first answer if the id was already served; on PostgreSQL the
        claim travels in one round trip with the statement read next."""

    async def remember_response(self, project_id: str, request_id: str, response: bytes) -> None:
        """Store the answer to return for a retry with the same request id."""


class LifecycleTransaction(RequestLog, Protocol):
    """One database transaction of a lifecycle operation (ADR 0004)."""

    async def lock_session(self, ref: SessionRef) -> SessionRecord | None:
        """Read the session row and hold its lock until the transaction ends."""

    async def lock_session_after_spawn(self, ref: SessionRef) -> SessionRecord | None:
        """As lock_session, once a Spawn of the session still in flight has ended:
        its row, invisible until it commits, would read as none (one round trip)."""

    async def insert_session(self, record: SessionRecord) -> bool:
        """Create the row; False when one exists (or existed) already. Until the
        transaction ends, lock_session_after_spawn waits for it."""

    async def update_session(self, record: SessionRecord) -> None:
        """Overwrite the (locked) row's mutable fields."""

    async def insert_checkpoint(
        self, record: CheckpointRecord, contents: bytes, timed_keys: int
    ) -> None:
        """Store a checkpoint whose id lock_session_for_checkpoint found free;
        ``timed_keys`` of its keys have a TTL."""

    async def lock_session_for_checkpoint(
        self, ref: SessionRef, checkpoint_id: str | None, count: bool
    ) -> CheckpointLock | None:
        """As lock_session, with whether ``checkpoint_id`` is taken and, when
        ``count``, the number of the session's checkpoints (one round trip)."""

    async def lock_session_to_end(
        self, ref: SessionRef, *, checkpoints: bool, resume_contents: bool
    ) -> EndLock | None:
        """As lock_session, with whether a graph thread linked to the session
        has an end action, the ids of its ``checkpoints`` and, when
        ``resume_contents``, the contents of a PAUSED session's resume checkpoint
        (one round trip)."""

    async def lock_session_reading_checkpoint(
        self, ref: SessionRef, checkpoint_id: str | None
    ) -> LockedWithCheckpoint:
        """As lock_session, with the checkpoint ``checkpoint_id`` (None: the
        session's resume checkpoint) and its contents in the snapshot format
        (one round trip). The contents are not read (None) when the checkpoint
        is the resume checkpoint of the PAUSED session and none of its keys has
        a TTL: the paused working memory most likely holds it still."""

    async def read_contents(self, ref: SessionRef, checkpoint_id: str) -> bytes | None:
        """A checkpoint's contents, or None when it does not exist."""

    async def delete_checkpoint(self, ref: SessionRef, checkpoint_id: str) -> bool:
        """Delete one checkpoint; False when it did not exist."""

    async def prune_checkpoints(
        self, ref: SessionRef, keep_last: int, protected: str | None
    ) -> list[str]:
        """Delete all but the ``keep_last`` newest checkpoints (never ``protected``
        nor a PAUSED session's resume point); return the deleted ids."""

    async def delete_expired_checkpoints(
        self, cutoff_ms: int, limit: int
    ) -> list[tuple[SessionRef, str, str | None]]:
        """Delete up to ``limit`` checkpoints created before ``cutoff_ms``, except
        resume points of PAUSED sessions; return what was deleted, each with its
        session's agent type (for the event)."""

    async def forget_requests(self, cutoff_ms: int, limit: int) -> int:
        """Delete up to ``limit`` remembered request ids older than ``cutoff_ms``."""

    async def acquire_lease(self, job: str, holder: str, now_ms: int, lease_ms: int) -> bool:
        """Take or renew ``job``'s lease for ``holder`` until ``now_ms + lease_ms``;
        False while another holder's lease has not expired."""

    async def release_lease(self, job: str, holder: str) -> None:
        """Give up ``job``'s lease if ``holder`` has it."""

    async def try_lead(self, job: str) -> bool:
        """Whether this transaction may run ``job``: one process at a time."""

    async def compact_events(self, before_ms: int, keep_last: int, limit: int) -> int:
        """Delete up to ``limit`` of the oldest events older than ``before_ms`` or
        beyond the newest ``keep_last``; return how many."""

    async def delete_checkpoints(self, ref: SessionRef) -> None:
        """Delete every checkpoint of the session."""

    async def insert_episode(self, record: EpisodeRecord) -> None:
        """Store an episode."""

    async def append_event(self, event: EventRecord) -> None:
        """Append an event. Call it last: it holds the event counter to commit.
        Its gap-free sequence is known once committed (the store's ``appended``)."""

    async def append_events(self, events: Sequence[EventRecord]) -> None:
        """Append events, in order, as :meth:`append_event` does, in as few
        statements as the database allows (not one per event)."""


class LifecycleDatabase(Protocol):
    """The durable store's lifecycle side."""

    def transaction(self) -> AbstractAsyncContextManager[LifecycleTransaction]:
        """A transaction that commits when the block ends normally."""

    async def get_session(self, ref: SessionRef) -> SessionRecord | None:
        """Read a session without locking it."""

    async def read_checkpoint(
        self, ref: SessionRef, checkpoint_id: str, with_contents: bool = True
    ) -> tuple[CheckpointRecord, bytes | None] | None:
        """Read a checkpoint and, ``with_contents``, its contents (else None),
        without locking anything."""

    async def list_checkpoints(
        self, ref: SessionRef, before: tuple[int, str] | None, limit: int, byte_budget: int
    ) -> tuple[list[CheckpointRecord], bool]:
        """Up to ``limit`` checkpoints newest first, strictly before (create_ms, id)
        when given, ending once they pass ``byte_budget`` by their ``size`` (the
        one that crosses it comes), and whether that budget left any out."""

    async def list_sessions(
        self,
        project_id: str,
        agent_instance_id: str | None,
        state: SessionState | None,
        before: tuple[int, str, str] | None,
        limit: int,
        byte_budget: int,
    ) -> tuple[list[SessionRecord], bool]:
        """Sessions newest first, strictly before (create_ms, agent, session) when
        given, within ``byte_budget`` as :meth:`list_checkpoints` reads."""


# A request id is stamped by the replica that claims it and forgotten by the one
# that sweeps, by their own clocks: forgetting it 1% past its TTL (14.4 minutes
# of 24 hours) keeps "remembered at least the TTL" under that much clock skew.
REQUEST_ID_CLOCK_MARGIN = 0.01


@dataclass(frozen=True, slots=True)
class CheckpointRetention:
    """How long checkpoints live (the resume point of a PAUSED session always stays)."""

    max_age_ms: int = 7 * 24 * 3600 * 1000
    keep_last: int = 0  # 0: no limit on the number per session
    request_id_ttl_ms: int = 24 * 3600 * 1000
    event_max_age_ms: int = 7 * 24 * 3600 * 1000
    event_keep_last: int = 0  # 0: no limit on the number of events

    def with_expiry(self, checkpoint: CheckpointRecord, protected: str | None) -> CheckpointRecord:
        """The checkpoint with its expire_ms: unset while it is ``protected``."""
        expire = (
            None
            if checkpoint.checkpoint_id == protected
            else checkpoint.create_ms + self.max_age_ms
        )
        return dataclasses.replace(checkpoint, expire_ms=expire)


def protected_checkpoint(record: SessionRecord) -> str | None:
    """The checkpoint retention must keep: a PAUSED session's resume point."""
    return record.resume_checkpoint_id if record.state == SessionState.PAUSED else None
