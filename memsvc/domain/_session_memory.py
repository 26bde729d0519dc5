"""The lifecycle's view of working memory: markers, snapshots, staged restores.

ADR 0004 describes the protocol: step 1 (``begin_*``) sets a transitional
marker and reads or stages data in one atomic step, the caller commits its
database transaction, and step 3 (``finish``) or ``abort`` settles the marker,
each guarded by the operation id so a stale caller can never undo a newer one.

Marker states: ``active`` (writes allowed), ``paused``, and the transitional
``spawning``, ``pausing``, ``resuming``, ``terminating``; ``missing`` stands
for "no marker" (never spawned, terminated, or lost by the store).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from memsvc.domain._ids import SessionRef
from memsvc.domain._markers import MISSING, READ_BLOCKING, STALE, TRANSITIONAL, NoSession
from memsvc.domain._purge import ForgettingStore
from memsvc.domain._snapshot import SnapshotEntry, decode_snapshot
from memsvc.domain._working_memory import EntryWrite, WorkingMemoryStore

# Re-exported: the stores import these from here with the lifecycle steps.
__all__ = [
    "MISSING",
    "READ_BLOCKING",
    "STALE",
    "TRANSITIONAL",
    "ContentsNeeded",
    "LostOperation",
    "Marker",
    "MarkerStateError",
    "MemoryStore",
    "NoSession",
    "ResumePoint",
    "SessionMemoryStore",
    "Snapshot",
    "SnapshotEntry",
]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A whole working memory read in one atomic step, and the marker state it had.

    ``blob`` is the stored checkpoint format (memsvc/domain/_snapshot.py), built
    by the store itself so that no per-key work happens in Python on the way to
    the database.
    """

    prior_state: str
    blob: bytes
    key_count: int
    size_bytes: int
    timed_keys: int = 0  # how many keys have a TTL

    def entries(self) -> list[SnapshotEntry]:
        """The entries, decoded (only when they are needed one by one)."""

        return decode_snapshot(self.blob)


@dataclass(frozen=True, slots=True)
class Marker:
    """The session marker as the working-memory store holds it."""

    state: str
    epoch: str | None = None
    op: str | None = None
    prior: str | None = None
    next_epoch: str | None = None
    clear: bool = False
    # The checkpoint the Pause that set ``paused`` took (ResumePoint).
    snapshot: str | None = None


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """The checkpoint a PAUSED session resumes from, as its Pause took it.

    A paused working memory refuses writes and, without keys that expire, cannot
    change: while its marker still names this checkpoint and its key count and
    size match, it holds exactly these contents, so a Resume keeps it as it is
    instead of moving every entry back in (no contents read, nothing staged).
    """

    checkpoint_id: str
    key_count: int
    size_bytes: int
    # The session's memory epoch: a store restored from an older copy may hold a
    # paused memory of the same checkpoint id and size (a Pause after the id was
    # deleted and used again), which is not the one to keep.
    epoch: str = ""


class ContentsNeeded(Exception):
    """begin_restore got no contents, and the working memory does not hold the
    checkpoint (lost, changed, or keys with a TTL): nothing changed; call again
    with the contents."""


class MarkerStateError(Exception):
    """The marker is in a state the operation does not allow (``state``)."""

    def __init__(self, state: str) -> None:
        super().__init__(f"session marker is {state}")
        self.state = state


class LostOperation(Exception):
    """The marker no longer belongs to this operation (another one took over)."""

    def __init__(self, state: str) -> None:
        super().__init__(f"session marker now belongs to another operation ({state})")
        self.state = state


class SessionMemoryStore(Protocol):
    """The lifecycle steps every working-memory store performs atomically."""

    async def read_marker(self, session: SessionRef) -> Marker | None:
        """The session's marker, or None when there is none."""

    async def begin_spawn(
        self, session: SessionRef, op: str, epoch: str, writes: Sequence[EntryWrite]
    ) -> None:
        """Replace whatever is stored with the initial entries, marker ``spawning``."""

    async def begin_snapshot(
        self,
        session: SessionRef,
        op: str,
        new_state: str | None,
        clear_on_finish: bool,
        allowed: Collection[str],
        with_contents: bool = True,
        checkpoint_id: str = "",
        epoch: str | None = None,
    ) -> Snapshot:
        """Read everything at once; set ``new_state`` unless None, recording
        ``checkpoint_id``, the checkpoint this snapshot becomes (a Pause's, for
        ResumePoint). Without ``with_contents`` only the key count and size are
        read (the blob is empty): a Terminate that records no episode moves no values.

        Raises MarkerStateError when the marker's state is not in ``allowed``,
        or (state STALE) when it holds another epoch than ``epoch``.
        """

    async def begin_restore(
        self,
        session: SessionRef,
        op: str,
        next_epoch: str,
        snapshot: bytes | None,
        merge: bool,
        allowed: Collection[str],
        held: ResumePoint | None = None,
    ) -> int:
        """Stage the resumed working memory, marker ``resuming``; return its key count.

        When the memory still holds ``held`` exactly (a paused session resuming
        from its Pause's checkpoint, see ResumePoint), nothing is staged and it
        is kept as it is; otherwise the checkpoint's contents, ``snapshot``, are
        staged, and ContentsNeeded is raised when they were not given.

        Raises MarkerStateError, or SessionLimitExceeded when the result would
        pass the session limits (nothing is staged then).
        """

    async def finish(
        self, session: SessionRef, op: str, final_state: str | None, swap: bool, clear: bool
    ) -> None:
        """Settle after commit: swap staging in (if a restore staged any), clear,
        set the final marker (None removes it). Raises LostOperation when ``op``
        no longer owns it."""

    async def abort(self, session: SessionRef, op: str) -> str:
        """Undo step 1 of ``op``; return the restored state (``missing`` for a spawn).

        Raises LostOperation when ``op`` no longer owns the marker.
        """


class MemoryStore(WorkingMemoryStore, SessionMemoryStore, ForgettingStore, Protocol):
    """A working-memory store with the lifecycle steps: what the server runs on."""
