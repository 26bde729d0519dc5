"""Lifecycle reads: sessions and checkpoints, as the API lists and shows them."""

from __future__ import annotations

import asyncio
import bisect
import zlib
from collections import OrderedDict
from typing import cast

from memsvc.domain._errors import (
    CheckpointNotFound,
    FieldViolation,
    SessionNotFound,
)
from memsvc.domain._ids import (
    SessionRef,
    check_session_id,
    check_session_ref,
    check_uuid,
    raise_if_any,
)
from memsvc.domain._lifecycle_records import (
    MARKER_FOR,
    CheckpointRecord,
    CheckpointRetention,
    LifecycleDatabase,
    SessionRecord,
    SessionState,
    protected_checkpoint,
)
from memsvc.domain._pagination import (
    Page,
    check_page_token,
    decode_page_token,
    encode_page_token,
    fingerprint,
    page_of,
    page_position,
    position_ms,
    position_text,
    position_uuid,
)
from memsvc.domain._session_memory import TRANSITIONAL, Marker, SessionMemoryStore, SnapshotEntry
from memsvc.domain._snapshot import KeyIndex, entries_at, key_index
from memsvc.domain._working_memory import ENTRY_FRAMING_BYTES, WorkingMemoryLimits

# Memory for the key indexes of checkpoints being paged through (about 1 MB each
# at 10,000 keys).
KEY_INDEXES_BYTES = 16 << 20
# GetCheckpoints with entries that read a checkpoint's contents at once (each up to
# max_session_bytes, and a page needs them whole); the others wait their turn within
# their deadlines. Unbounded, 64 calls asking for one entry each of a 15 MiB
# checkpoint held 1.1 GB (a review).
CONTENTS_READS_AT_ONCE = 2


class _KeyIndexes:
    """The sorted key indexes of the checkpoints paged through lately, by their page
    tokens' scope (which names the contents: their CRC) and length: the pages after the first
    decode only their own entries, not the whole snapshot again (42 ms of the event
    loop at 10,000 keys). Least recently used first out, within ``max_weight``."""

    def __init__(self, max_weight: int) -> None:
        self._max_weight = max_weight
        self._weight = 0
        # Each index with its weight, taken once (weighing walks every key).
        self._indexes: OrderedDict[str, tuple[KeyIndex, int]] = OrderedDict()

    def get(self, scope: str) -> KeyIndex | None:
        held = self._indexes.get(scope)
        if held is None:
            return None
        self._indexes.move_to_end(scope)
        return held[0]

    def put(self, scope: str, index: KeyIndex) -> KeyIndex:
        weight = index.weight()
        if scope not in self._indexes and weight <= self._max_weight:
            self._indexes[scope] = (index, weight)
            self._weight += weight
            while self._weight > self._max_weight:
                _, (_, dropped) = self._indexes.popitem(last=False)
                self._weight -= dropped
        return index


class LifecycleReads:
    """Read-only lifecycle queries; none of them takes a lock or changes anything."""

    def __init__(
        self,
        memory: SessionMemoryStore,
        database: LifecycleDatabase,
        limits: WorkingMemoryLimits,
        retention: CheckpointRetention,
    ) -> None:
        self._memory = memory
        self._db = database
        self._limits = limits
        self.retention = retention
        self._key_indexes = _KeyIndexes(KEY_INDEXES_BYTES)
        self._contents_turns = asyncio.Semaphore(CONTENTS_READS_AT_ONCE)

    async def get_checkpoint(
        self,
        session: SessionRef,
        checkpoint_id: str,
        include_entries: bool,
        page_size: int,
        page_token: str,
    ) -> tuple[CheckpointRecord, Page[SnapshotEntry]]:
        """A checkpoint and, on request, one page of its entries in key byte order."""
        violations: list[FieldViolation] = []
        ref = check_session_ref(
            session.project_id, session.agent_instance_id, session.session_id, violations
        )
        if not checkpoint_id:
            violations.append(FieldViolation("checkpoint_id", "is required"))
        else:
            check_session_id(checkpoint_id, "checkpoint_id", violations)
        limit = self._limits.page_size(page_size, violations)
        raise_if_any(violations)
        # Checked with or without entries, as page_size is: a bad one is a client's
        # bug either way. Its scope is checked once the checkpoint is read.
        check_page_token(page_token)
        # Plain reads: showing a checkpoint takes no lock and opens no transaction.
        # The session first: contents are held only as long as the page needs them.
        record = await self._db.get_session(ref)
        if record is None:  # as ListCheckpoints says: a wrong session, not a checkpoint
            raise SessionNotFound(ref.session_id)
        if not include_entries:
            checkpoint, _ = await self._read_checkpoint(record, checkpoint_id, False)
            return checkpoint, Page([], "")
        async with self._contents_turns:
            return await self._checkpoint_page(record, checkpoint_id, limit, page_token)

    async def _read_checkpoint(
        self, record: SessionRecord, checkpoint_id: str, with_contents: bool
    ) -> tuple[CheckpointRecord, bytes | None]:
        """A checkpoint of ``record``'s session (with its expiry) and, if asked, its
        contents; CheckpointNotFound when there is none."""
        ref = record.ref
        found = await self._db.read_checkpoint(ref, checkpoint_id, with_contents=with_contents)
        if found is None:
            raise CheckpointNotFound(ref.session_id, checkpoint_id)
        return self.retention.with_expiry(found[0], protected_checkpoint(record)), found[1]

    async def _checkpoint_page(
        self, record: SessionRecord, checkpoint_id: str, limit: int, page_token: str
    ) -> tuple[CheckpointRecord, Page[SnapshotEntry]]:
        """The checkpoint and a page of its entries, read with its contents."""
        ref = record.ref
        checkpoint, contents = await self._read_checkpoint(record, checkpoint_id, True)
        if contents is None:
            raise RuntimeError(f"checkpoint {checkpoint_id!r} was read without its contents")
        # A token is bound to these contents, not only to the id: one deleted and
        # taken again under the same id must not finish a listing of the old one.
        scope = fingerprint(
            "checkpoint",
            ref.project_id,
            ref.agent_instance_id,
            ref.session_id,
            checkpoint_id,
            str(checkpoint.create_ms),
            str(zlib.crc32(contents)),
        )
        after = decode_page_token(page_token, scope)
        # By the contents' length too: a CRC alone could match other contents.
        cached_as = f"{scope}:{len(contents)}"
        index = self._key_indexes.get(cached_as)
        if index is None:
            index = self._key_indexes.put(cached_as, key_index(contents).sorted())
        start = 0 if after is None else bisect.bisect_right(index.keys, after.encode())
        # The budget counts what a response carries: the checkpoint itself, then
        # each entry's key, value and framing (as ListEntries counts them).
        page: list[SnapshotEntry] = []
        used = checkpoint.size()
        for entry in entries_at(contents, index.offsets[start : start + limit]):
            size = len(entry.value) + len(entry.key.encode()) + ENTRY_FRAMING_BYTES
            if page and used + size > self._limits.response_budget_bytes:
                break
            used += size
            page.append(entry)
        more = start + len(page) < len(index.keys)
        return checkpoint, Page(
            page, encode_page_token(page[-1].key, scope) if more and page else ""
        )

    async def list_sessions(
        self,
        project_id: str,
        agent_instance_id: str,
        state: int,
        page_size: int,
        page_token: str,
    ) -> Page[SessionRecord]:
        """One page of a project's sessions, newest first."""
        violations: list[FieldViolation] = []
        project = check_uuid(project_id, "project_id", violations)
        agent = (
            check_uuid(agent_instance_id, "agent_instance_id", violations)
            if agent_instance_id
            else None
        )
        wanted: SessionState | None = None
        if state:
            try:
                wanted = SessionState(state)
            except ValueError:
                violations.append(FieldViolation("state", f"is not a SessionState value: {state}"))
        limit = self._limits.page_size(page_size, violations)
        raise_if_any(violations)
        scope = fingerprint("sessions", project, agent or "", str(state))
        before = cast(
            tuple[int, str, str] | None,
            page_position(
                decode_page_token(page_token, scope), position_ms, position_uuid, position_text
            ),
        )
        budget = self._limits.response_budget_bytes
        items, cut = await self._db.list_sessions(project, agent, wanted, before, limit + 1, budget)
        return page_of(
            items,
            limit,
            scope,
            lambda last: [last.create_ms, last.ref.agent_instance_id, last.ref.session_id],
            SessionRecord.size,
            budget,
            cut,
        )

    async def get_session(self, session: SessionRef) -> tuple[SessionRecord, bool | None]:
        """The session and whether its working memory is intact (None once terminated)."""
        violations: list[FieldViolation] = []
        ref = check_session_ref(
            session.project_id, session.agent_instance_id, session.session_id, violations
        )
        raise_if_any(violations)
        record = await self._db.get_session(ref)
        if record is None:
            raise SessionNotFound(ref.session_id)
        if record.state == SessionState.TERMINATED:
            return record, None
        record, marker = await self.marker_against(record)
        if record.state == SessionState.TERMINATED:
            return record, None
        return record, marker is not None and left_by_memsvc(record, marker)

    async def marker_against(self, record: SessionRecord) -> tuple[SessionRecord, Marker | None]:
        """The session's marker, and the record to compare it with: ``record`` (read
        before), or the record as it is now when the marker disagrees with it or is
        gone. An operation may have settled the marker after the record was read
        (the record commits first), or a Terminate dropped it with the memory.

        A disagreement counts only when the record stayed the same across the
        marker's read: a record that changed meanwhile (another operation
        committed) is compared with the marker read again. Compared with the
        newer record alone, a marker a Pause settled (paused, epoch E1) met the
        Resume committed just after it (ACTIVE, epoch E2) and read as lost memory
        (a review: GetSession said LOST, writes were refused, in thousands of
        calls racing Pauses and Resumes)."""
        for _ in range(MARKER_READS):
            marker = await self._memory.read_marker(record.ref)
            if marker is not None and left_by_memsvc(record, marker):
                return record, marker
            now = await self._db.get_session(record.ref)
            if now is None or now.version == record.version:
                return record, marker  # the same record before and after: it disagrees
            record = now
        return record, marker

    async def list_checkpoints(
        self, session: SessionRef, page_size: int, page_token: str
    ) -> Page[CheckpointRecord]:
        """One page of the session's checkpoints, newest first."""
        violations: list[FieldViolation] = []
        ref = check_session_ref(
            session.project_id, session.agent_instance_id, session.session_id, violations
        )
        limit = self._limits.page_size(page_size, violations)
        raise_if_any(violations)
        scope = fingerprint("checkpoints", ref.project_id, ref.agent_instance_id, ref.session_id)
        before = cast(
            tuple[int, str] | None,
            page_position(decode_page_token(page_token, scope), position_ms, position_text),
        )
        record = await self._db.get_session(ref)
        if record is None:
            raise SessionNotFound(ref.session_id)
        protected = protected_checkpoint(record)
        budget = self._limits.response_budget_bytes
        read, cut = await self._db.list_checkpoints(ref, before, limit + 1, budget)
        return page_of(
            [self.retention.with_expiry(c, protected) for c in read],
            limit,
            scope,
            lambda last: [last.create_ms, last.checkpoint_id],
            CheckpointRecord.size,
            budget,
            cut,
        )


# Reads of the marker against a record that keeps changing (operations committing
# between the reads) before the last pair is taken as it is.
MARKER_READS = 5


def left_by_memsvc(record: SessionRecord, marker: Marker) -> bool:
    """Whether the marker is what the committed record implies (an operation in
    flight, whose marker is transitional, counts): a store restored from an older
    copy holds a memory of another state or epoch, which is as good as lost."""
    if marker.state in TRANSITIONAL:
        if marker.state in ("spawning", "resuming") and marker.next_epoch == record.memory_epoch:
            # A Spawn or Resume the database shows committed: what memsvc left,
            # unless the database has moved on since (PAUSED): an older copy.
            return record.state == SessionState.ACTIVE
        if marker.state == "spawning":
            # Not committed, yet the session exists: a copy of an earlier Spawn.
            return False
        # In flight (or dead before its commit): the memory is still the one the
        # operation began from, which must be of the committed epoch; a copy taken
        # during an operation of an earlier epoch is not (Lifecycle._heal_locked).
        return marker.epoch is None or marker.epoch == record.memory_epoch
    if marker.state != MARKER_FOR.get(record.state):
        return False
    return marker.epoch is None or marker.epoch == record.memory_epoch
