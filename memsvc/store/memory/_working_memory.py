"""In-process working memory: the embedded default and the reference semantics.

Each session is a dict of key -> (value, expiry), a sorted list of its keys for
stable pagination, and a heap of expiries so that expired keys are purged in
O(log n) each. Every method runs without awaiting, so on the event loop each
one is atomic, as the Redis store's scripts are.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from sortedcontainers import SortedList

from memsvc.domain import (
    BatchRead,
    EntryWrite,
    KeyMeta,
    SessionLimitExceeded,
    SessionNotWritable,
    SessionRef,
    StoredEntry,
    WriteResult,
)
from memsvc.domain._session_memory import (
    MISSING,
    READ_BLOCKING,
    STALE,
    ContentsNeeded,
    LostOperation,
    Marker,
    MarkerStateError,
    NoSession,
    ResumePoint,
    Snapshot,
    SnapshotEntry,
)
from memsvc.domain._snapshot import decode_snapshot, encode_snapshot
from memsvc.domain._working_memory import ENTRY_FRAMING_BYTES

log = logging.getLogger(__name__)


def wall_clock_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass
class _Session:
    values: dict[str, tuple[bytes, int | None]] = field(default_factory=dict)
    order: SortedList = field(default_factory=SortedList)
    expiries: list[tuple[int, str]] = field(default_factory=list)
    total_bytes: int = 0
    # Lifecycle marker (ADR 0004); None until the lifecycle sets one. Writes are
    # refused when it is in any state but "active".
    marker: Marker | None = None
    # The working memory a Resume is building, swapped in by finish().
    staged: _Session | None = None

    @property
    def state(self) -> str | None:
        return None if self.marker is None else self.marker.state

    def purge(self, now_ms: int) -> None:
        """Drop every key whose expiry has passed."""
        while self.expiries and self.expiries[0][0] <= now_ms:
            at, key = heapq.heappop(self.expiries)
            current = self.values.get(key)
            if current is not None and current[1] == at:
                self.remove(key)

    def put(self, key: str, value: bytes, expire_at: int | None) -> bool:
        old = self.values.get(key)
        if old is None:
            self.order.add(key)
        else:
            self.total_bytes -= _entry_size(key, old[0])
        self.values[key] = (value, expire_at)
        self.total_bytes += _entry_size(key, value)
        if expire_at is not None:
            heapq.heappush(self.expiries, (expire_at, key))
            if len(self.expiries) > 2 * len(self.values) + 64:
                # Overwritten TTLs leave stale heap items; rebuild before they pile up.
                self.expiries = [(at, k) for k, (_, at) in self.values.items() if at is not None]
                heapq.heapify(self.expiries)
        return old is None

    def remove(self, key: str) -> bool:
        old = self.values.pop(key, None)
        if old is None:
            return False
        self.order.remove(key)
        self.total_bytes -= _entry_size(key, old[0])
        return True

    def copy_data(self) -> _Session:
        """A new session holding the same entries (no marker)."""
        clone = _Session()
        for key, (value, expire_at) in self.values.items():
            clone.put(key, value, expire_at)
        return clone


def _entry_size(key: str, value: bytes) -> int:
    return len(key.encode("utf-8")) + len(value)


class InMemoryWorkingMemoryStore:
    """Working memory held in this process; lost when the process stops."""

    backend_name = "working memory (in-process)"

    def __init__(
        self,
        *,
        max_session_keys: int,
        max_session_bytes: int,
        clock_ms: Callable[[], int] = wall_clock_ms,
        sweep_interval_seconds: float = 5.0,
    ) -> None:
        self._max_keys = max_session_keys
        self._max_bytes = max_session_bytes
        self._clock_ms = clock_ms
        self._sweep_interval = sweep_interval_seconds
        self._sessions: dict[SessionRef, _Session] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="memsvc-wm-sweeper")

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        self._sessions.clear()

    async def ping(self) -> None:
        return None

    async def set_entries(
        self, session: SessionRef, writes: Sequence[EntryWrite]
    ) -> list[WriteResult]:
        now = self._clock_ms()
        state = self._session(session, now, create=True)
        assert state is not None
        if state.state != "active":
            self._drop_if_empty(session, state)
            raise SessionNotWritable(session.session_id, state.state or MISSING)
        new_keys = state_count = len(state.values)
        new_bytes = current_bytes = state.total_bytes
        for write in writes:
            old = state.values.get(write.key)
            if old is None:
                new_keys += 1
            else:
                new_bytes -= _entry_size(write.key, old[0])
            new_bytes += _entry_size(write.key, write.value)
        # Only a write that grows the session past a limit (as in Redis's script).
        if new_keys > self._max_keys and new_keys > state_count:
            self._drop_if_empty(session, state)
            raise SessionLimitExceeded(
                what="keys", limit=self._max_keys, current=state_count, requested=new_keys
            )
        if new_bytes > self._max_bytes and new_bytes > current_bytes:
            self._drop_if_empty(session, state)
            raise SessionLimitExceeded(
                what="bytes", limit=self._max_bytes, current=current_bytes, requested=new_bytes
            )
        results = []
        for write in writes:
            expire_at = None if not write.ttl_ms else now + write.ttl_ms
            created = state.put(write.key, write.value, expire_at)
            results.append(WriteResult(write.key, expire_at, created))
        return results

    async def get_entries(
        self, session: SessionRef, keys: Sequence[str], budget_bytes: int
    ) -> BatchRead:
        state = self._live(session)
        found: list[StoredEntry] = []
        missing: list[str] = []
        used = 0
        for index, key in enumerate(keys):
            entry = state.values.get(key)
            if entry is None:
                missing.append(key)
                continue
            if found and used + len(entry[0]) > budget_bytes:
                return BatchRead(found, missing, list(keys[index:]))
            used += len(entry[0])
            found.append(StoredEntry(key, entry[0], entry[1]))
        return BatchRead(found, missing, [])

    async def delete_entries(self, session: SessionRef, keys: Sequence[str]) -> list[bool]:
        state = self._session(session, self._clock_ms())
        if state is None or state.state != "active":
            raise SessionNotWritable(
                session.session_id, (state.state if state else None) or MISSING
            )
        existed = [state.remove(key) for key in keys]
        self._drop_if_empty(session, state)
        return existed

    async def list_keys(
        self, session: SessionRef, after: str | None, limit: int
    ) -> tuple[list[KeyMeta], bool]:
        state = self._live(session)
        keys = self._keys_after(state, after, limit + 1)
        items = [KeyMeta(k, len(state.values[k][0]), state.values[k][1]) for k in keys[:limit]]
        return items, len(keys) > limit

    async def list_entries(
        self, session: SessionRef, after: str | None, limit: int, budget_bytes: int
    ) -> tuple[list[StoredEntry], bool]:
        state = self._live(session)
        keys = self._keys_after(state, after, limit + 1)
        items: list[StoredEntry] = []
        used = 0
        for key in keys[:limit]:
            value, expire_at = state.values[key]
            size = len(value) + len(key.encode()) + ENTRY_FRAMING_BYTES
            if items and used + size > budget_bytes:
                return items, True
            used += size
            items.append(StoredEntry(key, value, expire_at))
        return items, len(keys) > limit

    def _session(self, session: SessionRef, now_ms: int, create: bool = False) -> _Session | None:
        state = self._sessions.get(session)
        if state is None:
            if not create:
                return None
            state = self._sessions[session] = _Session()
        state.purge(now_ms)
        return state

    def _live(self, session: SessionRef) -> _Session:
        """The session for a read; NoSession when it has no marker, or one that
        blocks reads."""
        state = self._session(session, self._clock_ms())
        if state is None or state.marker is None:
            raise NoSession(session.session_id)
        if state.marker.state in READ_BLOCKING:
            raise NoSession(session.session_id, state.marker.state)
        return state

    def _drop_if_empty(self, session: SessionRef, state: _Session) -> None:
        if not state.values and state.marker is None:
            self._sessions.pop(session, None)

    # Lifecycle steps (SessionMemoryStore, ADR 0004); each runs without awaiting.

    async def read_marker(self, session: SessionRef) -> Marker | None:
        state = self._sessions.get(session)
        return None if state is None else state.marker

    async def begin_spawn(
        self, session: SessionRef, op: str, epoch: str, writes: Sequence[EntryWrite]
    ) -> None:
        now = self._clock_ms()
        fresh = _Session()
        for write in writes:
            fresh.put(write.key, write.value, now + write.ttl_ms if write.ttl_ms else None)
        fresh.marker = Marker("spawning", op=op, next_epoch=epoch)
        self._sessions[session] = fresh

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
        now = self._clock_ms()
        state, current = self._marked(session, now, allowed)
        held = state.marker.epoch if state.marker else None
        if epoch and held and held != epoch:
            raise MarkerStateError(STALE)
        if new_state is not None:
            marker = state.marker
            state.marker = Marker(
                new_state,
                epoch=marker.epoch if marker else None,
                op=op,
                prior=current,
                clear=clear_on_finish,
                snapshot=checkpoint_id or (marker.snapshot if marker else None),
            )
        entries = [
            SnapshotEntry(key, value, None if at is None else max(1, at - now))
            for key, (value, at) in state.values.items()
        ]
        self._drop_if_empty(session, state)
        size = sum(len(e.key.encode()) + len(e.value) for e in entries)
        blob = encode_snapshot(entries if with_contents else [])
        timed = sum(1 for entry in entries if entry.remaining_ttl_ms is not None)
        return Snapshot(current, blob, len(entries), size, timed)

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
        now = self._clock_ms()
        state, current = self._marked(session, now, allowed)
        if held is not None and self._holds(state, held):
            # Writes are refused until finish(): staging may share the containers.
            staged = _Session(state.values, state.order, state.expiries, state.total_bytes)
            return self._stage(state, staged, op, current, next_epoch)
        if snapshot is None:
            self._drop_if_empty(session, state)
            raise ContentsNeeded()
        entries = decode_snapshot(snapshot)
        staged = state.copy_data() if merge else _Session()
        for entry in entries:
            ttl = entry.remaining_ttl_ms
            staged.put(entry.key, entry.value, None if ttl is None else now + max(1, ttl))
        if len(staged.values) > self._max_keys or staged.total_bytes > self._max_bytes:
            self._drop_if_empty(session, state)
            over_keys = len(staged.values) > self._max_keys
            raise SessionLimitExceeded(
                what="keys" if over_keys else "bytes",
                limit=self._max_keys if over_keys else self._max_bytes,
                current=len(state.values) if over_keys else state.total_bytes,
                requested=len(staged.values) if over_keys else staged.total_bytes,
            )
        return self._stage(state, staged, op, current, next_epoch)

    def _holds(self, state: _Session, held: ResumePoint) -> bool:
        """Whether the paused memory is still exactly the checkpoint its Pause took."""
        marker = state.marker
        return (
            marker is not None
            and marker.state == "paused"
            and marker.snapshot == held.checkpoint_id
            and (not held.epoch or marker.epoch is None or marker.epoch == held.epoch)
            and len(state.values) == held.key_count
            and state.total_bytes == held.size_bytes
            and all(at is None for _, at in state.values.values())
            and held.key_count <= self._max_keys
            and held.size_bytes <= self._max_bytes
        )

    @staticmethod
    def _stage(state: _Session, staged: _Session, op: str, current: str, next_epoch: str) -> int:
        marker = state.marker
        state.staged = staged
        state.marker = Marker(
            "resuming",
            epoch=marker.epoch if marker else None,
            op=op,
            prior=current,
            next_epoch=next_epoch,
            snapshot=marker.snapshot if marker else None,
        )
        return len(staged.values)

    async def finish(
        self, session: SessionRef, op: str, final_state: str | None, swap: bool, clear: bool
    ) -> None:
        state = self._owned(session, op)
        marker = state.marker
        assert marker is not None
        if swap:
            replacement = state.staged or _Session()
            replacement.marker, replacement.staged = marker, None
            self._sessions[session] = state = replacement
        if clear:
            self._sessions[session] = state = _Session(marker=marker)
        if final_state is None:
            del self._sessions[session]
            return
        state.marker = _settled(marker, final_state, marker.next_epoch or marker.epoch)

    async def abort(self, session: SessionRef, op: str) -> str:
        state = self._owned(session, op)
        marker = state.marker
        assert marker is not None
        state.staged = None
        if marker.state == "spawning" or marker.prior in (None, MISSING):
            del self._sessions[session]
            return MISSING
        assert marker.prior is not None
        state.marker = _settled(marker, marker.prior, marker.epoch)
        return marker.prior

    async def forget(self, sessions: Sequence[SessionRef]) -> int:
        return sum(1 for session in sessions if self._sessions.pop(session, None) is not None)

    async def sessions_in(self, scope: SessionRef) -> list[SessionRef]:
        return [session for session in self._sessions if session.within(scope)]

    def _marked(
        self, session: SessionRef, now_ms: int, allowed: Collection[str]
    ) -> tuple[_Session, str]:
        """The session and its marker state, when that state is in ``allowed``."""
        state = self._session(session, now_ms, create=True)
        assert state is not None
        current = state.state or MISSING
        if current not in allowed:
            self._drop_if_empty(session, state)
            raise MarkerStateError(current)
        return state, current

    def _owned(self, session: SessionRef, op: str) -> _Session:
        state = self._sessions.get(session)
        if state is None or state.marker is None or state.marker.op != op:
            raise LostOperation(state.state or MISSING if state else MISSING)
        return state

    @staticmethod
    def _keys_after(state: _Session, after: str | None, count: int) -> list[str]:
        start = 0 if after is None else state.order.bisect_right(after)
        return list(state.order.islice(start, start + count))

    async def _sweep_forever(self) -> None:
        # Sessions nobody touches again would otherwise keep their expired keys.
        while True:
            await asyncio.sleep(self._sweep_interval)
            now = self._clock_ms()
            for ref, state in list(self._sessions.items()):
                state.purge(now)
                self._drop_if_empty(ref, state)


def _settled(marker: Marker, state: str, epoch: str | None) -> Marker:
    """The marker once ``marker``'s operation ends in ``state`` (the scripts'
    settle_marker): the checkpoint a Pause took stays only while paused."""
    return Marker(state, epoch=epoch, snapshot=marker.snapshot if state == "paused" else None)
