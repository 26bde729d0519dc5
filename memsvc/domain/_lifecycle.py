"""The session lifecycle: spawn, pause, resume, terminate (ADR 0004).

Every operation runs inside one database transaction that holds the session's
row lock. Within it: step 1 in the working-memory store (transitional marker
plus snapshot or staged restore), then the database writes (checkpoint,
status, episode, event, remembered answer); after the commit, step 3 settles
the marker. If anything fails before the commit, step 1 is undone; if the
process dies, the transitional marker is healed by the next operation that
meets it (:meth:`Lifecycle.heal`), which reads the committed truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from memsvc.domain._background import BackgroundWork
from memsvc.domain._episodes import MAX_ACTIONS_BYTES, OUTCOMES, check_story
from memsvc.domain._errors import (
    CheckpointAlreadyExists,
    CheckpointLimitExceeded,
    CheckpointNotFound,
    CheckpointProtected,
    FieldViolation,
    InvalidTransition,
    MemsvcError,
    Rollback,
    SessionAlreadyExists,
    SessionNotFound,
    SessionNotWritable,
    WorkingMemoryLost,
)
from memsvc.domain._ids import (
    SessionRef,
    check_request_id,
    check_session_id,
    check_session_ref,
    check_uuid,
    raise_if_any,
)
from memsvc.domain._lifecycle_reads import LifecycleReads, left_by_memsvc
from memsvc.domain._lifecycle_records import (
    MARKER_FOR,
    REQUEST_ID_CLOCK_MARGIN,
    CheckpointLock,
    CheckpointRecord,
    CheckpointRetention,
    EndLock,
    EpisodeRecord,
    EventRecord,
    EventType,
    LifecycleDatabase,
    LifecycleTransaction,
    LockedWithCheckpoint,
    SessionRecord,
    SessionState,
)
from memsvc.domain._lifecycle_results import (
    CheckpointResult,
    DeleteResult,
    PauseResult,
    ResumeResult,
    SpawnResult,
    TerminateResult,
    answer_of,
    arguments_hash,
    decode_result,
    encode_result,
    uuid7,
)
from memsvc.domain._markers import SETTLED
from memsvc.domain._session_memory import (
    MISSING,
    STALE,
    TRANSITIONAL,
    ContentsNeeded,
    LostOperation,
    MarkerStateError,
    ResumePoint,
    SessionMemoryStore,
    Snapshot,
    SnapshotEntry,
)
from memsvc.domain._snapshot import decode_snapshot, encode_snapshot
from memsvc.domain._working_memory import WorkingMemory
from memsvc.failpoints import Failpoints

log = logging.getLogger(__name__)

T = TypeVar("T")
L = TypeVar("L")

OUTCOME_SUCCESS = 1

# A step 3 that failed after its commit is retried in the background (as heals),
# from the first delay doubling to the longest, for at most the whole span: a
# Terminate has no next call to heal its marker, and its memory would stay.
SETTLE_RETRY_FIRST_SECONDS = 0.5
SETTLE_RETRY_LONGEST_SECONDS = 30.0
SETTLE_RETRY_SPAN_SECONDS = 600.0


@dataclass
class _Steps:
    """What an operation did to working memory, to settle or undo after the transaction."""

    op: str
    started: bool = False
    final_state: str | None = None
    swap: bool = False
    clear: bool = False
    # Settle after the answer instead of before it (a Pause, see _run).
    after_answer: bool = False


class Lifecycle:
    """Runs lifecycle operations over a session-memory store and a database."""

    def __init__(
        self,
        memory: SessionMemoryStore,
        database: LifecycleDatabase,
        working_memory: WorkingMemory,
        render_value: Callable[[bytes], Any],
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        failpoints: Failpoints | None = None,
        retention: CheckpointRetention | None = None,
        max_checkpoints: int = 1000,
    ) -> None:
        self._failpoints = failpoints or Failpoints()
        self.retention = retention or CheckpointRetention()
        self.max_checkpoints = max_checkpoints
        # Run inside a Terminate's transaction, after the session is TERMINATED: the
        # graph threads linked to the session end with it, atomically. Run only when
        # the Terminate's lock found such a thread (EndLock.linked_threads).
        self.session_end_hooks: list[Callable[[Any, SessionRef], Awaitable[None]]] = []
        self._memory = memory
        self._db = database
        self._wm = working_memory
        self._render_value = render_value
        self._clock_ms = clock_ms
        # Step 3 of the operations (or the undo of a failed one), run past their
        # calls (_finish_past_the_call), and
        # heals (at most one running a session, shared by every call that needs it).
        self._after_calls = BackgroundWork[bool]("a lifecycle step after its commit")
        # The latest step 3 a session, for the calls that meet its marker meanwhile.
        self._finishing: dict[SessionRef, asyncio.Task[bool]] = {}
        self._heals = BackgroundWork[None]("healing a session's marker")
        # Heals tried again after a step 3 failed (one a session; see _finish).
        self._settling = BackgroundWork[None]("settling a session's marker again")
        self.reads = LifecycleReads(memory, database, working_memory.limits, self.retention)

    # Spawn ------------------------------------------------------------------

    async def spawn(
        self,
        session: SessionRef,
        agent_type_id: str,
        initial: Sequence[tuple[str, bytes | None, int | None]],
        metadata: dict[str, Any],
        request_id: str,
        found: Sequence[FieldViolation] = (),
    ) -> SpawnResult:
        """``found``: the request's violations found before (by the API): one
        INVALID_ARGUMENT names them all."""
        violations = list(found)
        ref = check_session_ref(
            session.project_id, session.agent_instance_id, session.session_id, violations
        )
        agent_type = (
            check_uuid(agent_type_id, "agent_type_id", violations) if agent_type_id else None
        )
        writes = self._wm.check_entries(initial, "initial_entries", violations, allow_empty=True)
        request_id = check_request_id(request_id, violations)
        raise_if_any(violations)
        arguments = (ref, agent_type, [dataclasses.astuple(w) for w in writes], metadata)
        self._wm.check_fits_session(writes)
        steps = _Steps(op=uuid7())

        async def insert(tx: LifecycleTransaction) -> SessionRecord | None:
            now = self._clock_ms()
            record = SessionRecord(
                ref, agent_type, SessionState.ACTIVE, metadata, 1, uuid7(), None, now, now
            )
            return record if await tx.insert_session(record) else None

        async def body(tx: LifecycleTransaction, record: SessionRecord | None) -> SpawnResult:
            if record is None:
                existing = await tx.lock_session(ref)
                state = existing.state.name if existing else "unknown"
                raise SessionAlreadyExists(ref.session_id, state)
            steps.started = True
            await self._memory.begin_spawn(ref, steps.op, record.memory_epoch, writes)
            steps.final_state = "active"
            event = self._event(EventType.SPAWNED, record, record.create_ms, request_id)
            await tx.append_event(event)
            return SpawnResult(record, len(writes))

        return await self._run(
            "Spawn", ref, request_id, arguments, SpawnResult, steps, insert, body
        )

    # Pause and checkpoints ----------------------------------------------------

    async def pause(
        self,
        session: SessionRef,
        checkpoint_id: str,
        metadata: dict[str, Any],
        request_id: str,
        found: Sequence[FieldViolation] = (),
    ) -> PauseResult:
        ref, request_id = self._check(session, checkpoint_id, request_id, found)
        arguments = (ref, checkpoint_id, metadata)
        steps = _Steps(op=uuid7())

        async def body(tx: LifecycleTransaction, locked: CheckpointLock | None) -> PauseResult:
            record = self._admit_checkpoint(ref, locked, "pause", checkpoint_id)
            new_id = checkpoint_id or uuid7()
            snapshot = await self._begin(
                record,
                steps,
                lambda: self._memory.begin_snapshot(
                    ref,
                    steps.op,
                    "pausing",
                    False,
                    {"active"},
                    checkpoint_id=new_id,
                    epoch=record.memory_epoch,
                ),
            )
            # Answered before its marker settles: 'pausing' and 'paused' both refuse
            # writes and serve reads, and whatever meets 'pausing' first waits for
            # the step or heals it by the committed state (see _heal_shared).
            steps.final_state, steps.after_answer = "paused", True
            now = self._clock_ms()
            checkpoint = await self._store_checkpoint(
                tx, record, new_id, snapshot, metadata, now, request_id
            )
            paused = await self._transition(
                tx,
                record,
                EventType.PAUSED,
                now,
                request_id,
                state=SessionState.PAUSED,
                resume_checkpoint_id=checkpoint.checkpoint_id,
                checkpoint_id=checkpoint.checkpoint_id,
                metadata=metadata,
            )
            return PauseResult(
                paused, self.retention.with_expiry(checkpoint, checkpoint.checkpoint_id)
            )

        return await self._run(
            "Pause", ref, request_id, arguments, PauseResult, steps,
            self._lock_for_checkpoint(ref, checkpoint_id), body,
        )  # fmt: skip

    async def _store_checkpoint(
        self,
        tx: LifecycleTransaction,
        record: SessionRecord,
        checkpoint_id: str,
        snapshot: Snapshot,
        metadata: dict[str, Any],
        now: int,
        request_id: str,
    ) -> CheckpointRecord:
        """Insert the checkpoint; the checkpoints ``keep_last`` prunes then are
        announced as the call's events (its request id, the session's agent type)."""
        ref = record.ref
        checkpoint = CheckpointRecord(
            ref, checkpoint_id, now, snapshot.key_count, snapshot.size_bytes, metadata
        )
        await tx.insert_checkpoint(checkpoint, snapshot.blob, snapshot.timed_keys)
        if self.retention.keep_last:
            # Never the checkpoint just made, even when stamped before the newest
            # (a replica whose clock is behind): the call must not answer with one
            # it deleted. Nor the resume point a Pause makes it.
            pruned = await tx.prune_checkpoints(ref, self.retention.keep_last, checkpoint_id)
            await tx.append_events([
                self._event(EventType.CHECKPOINT_DELETED, record, now, request_id,
                            checkpoint_id=old_id, metadata=RETENTION)
                for old_id in pruned
            ])  # fmt: skip
        return checkpoint

    async def create_checkpoint(
        self,
        session: SessionRef,
        checkpoint_id: str,
        metadata: dict[str, Any],
        request_id: str,
        found: Sequence[FieldViolation] = (),
    ) -> CheckpointRecord:
        """Snapshot an ACTIVE session without pausing it."""
        ref, request_id = self._check(session, checkpoint_id, request_id, found)
        arguments = (ref, checkpoint_id, metadata)
        # No marker change: the snapshot is one atomic read, nothing to settle after.
        steps = _Steps(op=uuid7())

        async def body(tx: LifecycleTransaction, locked: CheckpointLock | None) -> CheckpointResult:
            record = self._admit_checkpoint(ref, locked, "checkpoint", checkpoint_id)
            snapshot = await self._begin(
                record,
                None,
                lambda: self._memory.begin_snapshot(
                    ref, steps.op, None, False, {"active"}, epoch=record.memory_epoch
                ),
            )
            now = self._clock_ms()
            checkpoint = await self._store_checkpoint(
                tx, record, checkpoint_id or uuid7(), snapshot, metadata, now, request_id
            )
            await tx.append_event(
                self._event(
                    EventType.CHECKPOINT_CREATED,
                    record,
                    now,
                    request_id,
                    checkpoint_id=checkpoint.checkpoint_id,
                    metadata=metadata,
                )
            )
            return CheckpointResult(record, self.retention.with_expiry(checkpoint, None))

        result = await self._run(
            "CreateCheckpoint", ref, request_id, arguments, CheckpointResult, steps,
            self._lock_for_checkpoint(ref, checkpoint_id), body,
        )  # fmt: skip
        return result.checkpoint

    async def delete_checkpoint(
        self,
        session: SessionRef,
        checkpoint_id: str,
        metadata: dict[str, Any],
        request_id: str,
        found: Sequence[FieldViolation] = (),
    ) -> None:
        """Delete a checkpoint, unless a PAUSED session will resume from it."""
        required = [] if checkpoint_id else [FieldViolation("checkpoint_id", "is required")]
        ref, request_id = self._check(session, checkpoint_id, request_id, [*found, *required])
        # Metadata in the request's hash only when given: a retry of a call that a
        # replica from before it existed answered must still match.
        arguments = (ref, checkpoint_id, metadata) if metadata else (ref, checkpoint_id)
        steps = _Steps(op=uuid7())

        async def body(tx: LifecycleTransaction, record: SessionRecord | None) -> DeleteResult:
            if record is None:
                raise SessionNotFound(ref.session_id)
            if record.state == SessionState.PAUSED and record.resume_checkpoint_id == checkpoint_id:
                raise CheckpointProtected(ref.session_id, checkpoint_id)
            if not await tx.delete_checkpoint(ref, checkpoint_id):
                raise CheckpointNotFound(ref.session_id, checkpoint_id)
            now = self._clock_ms()
            await tx.append_event(
                self._event(
                    EventType.CHECKPOINT_DELETED,
                    record,
                    now,
                    request_id,
                    checkpoint_id=checkpoint_id,
                    metadata=metadata,
                )
            )
            return DeleteResult(record)

        await self._run(
            "DeleteCheckpoint", ref, request_id, arguments, DeleteResult, steps,
            _locking(ref), body,
        )  # fmt: skip

    # Resume -----------------------------------------------------------------

    async def resume(
        self,
        session: SessionRef,
        checkpoint_id: str,
        merge: bool,
        metadata: dict[str, Any],
        request_id: str,
        found: Sequence[FieldViolation] = (),
    ) -> ResumeResult:
        ref, request_id = self._check(session, checkpoint_id, request_id, found)
        arguments = (ref, checkpoint_id, merge, metadata)
        steps = _Steps(op=uuid7())

        async def lock(tx: LifecycleTransaction) -> LockedWithCheckpoint:
            return await tx.lock_session_reading_checkpoint(ref, checkpoint_id or None)

        async def body(tx: LifecycleTransaction, locked: LockedWithCheckpoint) -> ResumeResult:
            record, found = locked
            record = _admit(ref, record, "resume", {SessionState.ACTIVE, SessionState.PAUSED})
            wanted = checkpoint_id or record.resume_checkpoint_id
            if not wanted:
                # Only a PAUSED session has a resume checkpoint to default to.
                raise InvalidTransition(
                    ref.session_id,
                    record.state.name,
                    "resume",
                    ", with no checkpoint to resume from: name one in checkpoint_id",
                )
            if found is None:
                raise CheckpointNotFound(ref.session_id, wanted)
            checkpoint, contents = found
            merging = merge
            if merging and record.state == SessionState.PAUSED:
                # A PAUSED session's entries are its resume checkpoint's (each with
                # the TTL it had left, as a plain Resume gives them back), whatever
                # the store holds meanwhile: keys whose TTL ran out since, or
                # nothing, if it lost them. The merge goes over those.
                contents = await self._merged_over_paused(tx, record, checkpoint, contents)
                merging = False
            epoch = uuid7()
            # A resume that replaces the memory takes it in any settled state: one
            # that disagrees with the database (a store restored from an older
            # copy) is replaced like a lost one. A merge keeps what is there, so
            # it must be what memsvc left, and there: a merge over a lost memory
            # would answer OK with the current entries gone.
            allowed = {*SETTLED, MISSING} if not merging else {MARKER_FOR[record.state]}
            held = ResumePoint(
                checkpoint.checkpoint_id,
                checkpoint.key_count,
                checkpoint.size_bytes,
                record.memory_epoch,
            )

            def restore() -> Awaitable[int]:
                return self._memory.begin_restore(
                    ref, steps.op, epoch, contents, merging, allowed, held=held
                )

            if merging:
                # A merge keeps what is there: it must be what memsvc left, of the
                # epoch the database records (not a Redis copy from before the
                # last Resume). The row lock keeps every other operation's marker
                # out until this one commits.
                # (A transitional marker is healed by the step, to its epoch.)
                marker = await self._memory.read_marker(ref)
                if marker is None or not left_by_memsvc(record, marker):
                    raise WorkingMemoryLost(ref.session_id)

            try:
                await self._begin(record, steps, restore)
            except ContentsNeeded:
                # The database left the contents out because the paused memory
                # most likely held them; it did not (lost, or evicted): read them.
                contents = await tx.read_contents(ref, checkpoint.checkpoint_id)
                if contents is None:
                    raise CheckpointNotFound(ref.session_id, checkpoint.checkpoint_id) from None
                await self._begin(record, steps, restore)
            # Answered before its marker settles, as a Pause: a call that meets
            # 'resuming' (reads too: the memory is swapped in by step 3) waits for
            # the step in this process, or heals it by the committed state.
            steps.final_state, steps.swap, steps.after_answer = "active", True, True
            now = self._clock_ms()
            resumed = await self._transition(
                tx,
                record,
                EventType.RESUMED,
                now,
                request_id,
                state=SessionState.ACTIVE,
                memory_epoch=epoch,
                resume_checkpoint_id=None,
                checkpoint_id=checkpoint.checkpoint_id,
                metadata=metadata,
            )
            # The checkpoint's entries, all written back (as the reference counted
            # them), not what a merge leaves in the memory.
            restored = checkpoint.key_count
            return ResumeResult(resumed, self.retention.with_expiry(checkpoint, None), restored)

        return await self._run(
            "Resume", ref, request_id, arguments, ResumeResult, steps, lock, body
        )

    async def _merged_over_paused(
        self,
        tx: LifecycleTransaction,
        record: SessionRecord,
        checkpoint: CheckpointRecord,
        contents: bytes | None,
    ) -> bytes | None:
        """What a merge Resume of the PAUSED session ``record`` leaves: the
        checkpoint's entries over its resume checkpoint's, as one snapshot (None:
        the checkpoint is the resume checkpoint itself, over which it changes nothing)."""
        paused_at = record.resume_checkpoint_id
        if paused_at is None or checkpoint.checkpoint_id == paused_at:
            return contents
        # Only the resume checkpoint's contents are left out of the lock's read.
        assert contents is not None
        paused = await tx.read_contents(record.ref, paused_at)
        if paused is None:  # never deleted while the session is PAUSED
            raise CheckpointNotFound(record.ref.session_id, paused_at)
        # The store's restore checks the result against the session's limits.
        entries = {entry.key: entry for entry in decode_snapshot(paused)}
        entries.update((entry.key, entry) for entry in decode_snapshot(contents))
        return encode_snapshot(entries.values())

    # Terminate --------------------------------------------------------------

    async def terminate(
        self,
        session: SessionRef,
        task_description: str,
        outcome: int,
        lessons_learned: Sequence[str],
        consolidate: bool,
        cleanup: bool,
        metadata: dict[str, Any],
        request_id: str,
        found: Sequence[FieldViolation] = (),
    ) -> TerminateResult:
        outcome = outcome or OUTCOME_SUCCESS
        violations = list(found)
        check_story(
            lambda name, problem: violations.append(FieldViolation(name, problem)),
            task_description,
            outcome,
            lessons_learned,
            metadata,
            limits=False,
            lesson_limits=consolidate,
        )
        if consolidate and not violations:
            # Refused before anything changes, whatever the session holds, as
            # RecordEpisode refuses it: stored, the episode would fail every read
            # and every page of episodes that reached it.
            largest = (
                self._episode(
                    session, 0, (), task_description, outcome, list(lessons_learned), metadata, 0
                ).size()
                + _SUMMARY_BOUND_BYTES
                + _KEYS_LEAST_BYTES
            )
            if largest > (budget := self._wm.limits.response_budget_bytes):
                violations.append(
                    FieldViolation(
                        "lessons_learned",
                        f"make the episode this Terminate records up to {largest} bytes with"
                        f" its metadata and description, over the {budget} bytes one"
                        " response carries (3/4 of max_message_bytes): shorten them, or"
                        " set skip_consolidation",
                    )
                )
        ref, request_id = self._check(session, "", request_id, violations)
        arguments = (
            ref,
            task_description,
            outcome,
            list(lessons_learned),
            consolidate,
            cleanup,
            metadata,
        )
        steps = _Steps(op=uuid7())

        async def lock(tx: LifecycleTransaction) -> EndLock | None:
            return await tx.lock_session_to_end(
                ref, checkpoints=cleanup, resume_contents=consolidate
            )

        async def body(tx: LifecycleTransaction, locked: EndLock | None) -> TerminateResult:
            record = _admit(
                ref,
                locked.record if locked else None,
                "terminate",
                {SessionState.ACTIVE, SessionState.PAUSED},
            )
            own = {MARKER_FOR[record.state], MISSING}
            # A PAUSED session is consolidated as paused, from its resume checkpoint:
            # its memory may have lost keys since (their TTLs run on while paused),
            # which a Resume would bring back, and the cleanup deletes that checkpoint.
            paused_state = locked.resume_contents if locked else None
            read_memory = consolidate and paused_state is None

            def begin(allowed: set[str], epoch: str | None, clear: bool) -> Awaitable[Snapshot]:
                return self._memory.begin_snapshot(
                    ref,
                    steps.op,
                    "terminating",
                    clear,
                    allowed,
                    with_contents=read_memory,
                    epoch=epoch,
                )

            # A memory memsvc did not leave (lost, or an older copy) is neither
            # consolidated nor kept as the session's final memory. Without an
            # episode, though, the session still ends: whatever the memory holds is
            # dropped, so a session always has a way to end.
            clear = cleanup
            snapshot: Snapshot | None = None
            if read_memory or not cleanup:  # the memory is read or kept: it must be memsvc's
                try:
                    snapshot = await self._begin(
                        record, steps, lambda: begin(own, record.memory_epoch, cleanup)
                    )
                except WorkingMemoryLost:
                    if read_memory:
                        raise
                    clear = True
            if snapshot is None:
                snapshot = await self._begin(
                    record, steps, lambda: begin({*SETTLED, MISSING}, None, clear)
                )
            if snapshot.prior_state == MISSING:
                if read_memory:
                    # An episode of an empty memory would pass for the session's
                    # record, and a cleanup would then delete its only copy (the
                    # checkpoints).
                    raise WorkingMemoryLost(ref.session_id)
                clear = True  # nothing to keep: reads then say the session ended
            steps.final_state = None if clear else "terminated"
            steps.clear = clear
            now = self._clock_ms()
            episode_id = None
            consolidated = 0
            if consolidate:
                entries = (
                    snapshot.entries() if paused_state is None else decode_snapshot(paused_state)
                )
                consolidated = len(entries)
                episode = self._episode(
                    record.ref,
                    record.create_ms,
                    entries,
                    task_description,
                    outcome,
                    list(lessons_learned),
                    metadata,
                    now,
                )
                await tx.insert_episode(episode)
                episode_id = episode.episode_id
            if cleanup:
                await tx.delete_checkpoints(ref)

            async def before_the_events() -> None:
                # Looking the threads up is a round trip of its own, so only when
                # the lock saw one. A thread linked since is ended by the sweep.
                if locked is not None and locked.linked_threads:
                    for hook in self.session_end_hooks:
                        await hook(tx, ref)
                # The deleted checkpoints are announced one by one, as DeleteCheckpoint
                # and retention do, so a watcher that mirrors checkpoints never keeps
                # one; after the hooks, whose locks must come before the event counter.
                if cleanup and locked:
                    await tx.append_events([
                        self._event(EventType.CHECKPOINT_DELETED, record, now, request_id,
                                    checkpoint_id=checkpoint_id, metadata=ENDED)
                        for checkpoint_id in locked.checkpoint_ids
                    ])  # fmt: skip

            ended = await self._transition(
                tx,
                record,
                EventType.TERMINATED,
                now,
                request_id,
                before_event=before_the_events,
                state=SessionState.TERMINATED,
                resume_checkpoint_id=None,
                episode_id=episode_id,
                metadata=metadata,
            )
            cleared = snapshot.key_count if clear else 0
            return TerminateResult(ended, episode_id, consolidated, cleared, outcome)

        return await self._run(
            "Terminate", ref, request_id, arguments, TerminateResult, steps, lock, body
        )

    def _episode(
        self,
        ref: SessionRef,
        began_ms: int,
        entries: Sequence[SnapshotEntry],
        task_description: str,
        outcome: int,
        lessons: list[str],
        metadata: dict[str, Any],
        now: int,
    ) -> EpisodeRecord:
        """The reference consolidation: one episode summarising the session's state.

        Its action lists the state's keys, as many as an episode's actions may hold
        and one response can carry with the rest of the episode (10,000 keys of
        512 bytes would not); when they are cut, the action says so and counts them.
        """
        keys = sorted(e.key for e in entries)
        description = (task_description or f"Session {ref.session_id} completed")[:500]
        action: dict[str, Any] = {
            "type": "session_completion",
            "state_keys": [],
            "outcome": OUTCOMES[outcome],
        }
        episode = EpisodeRecord(
            episode_id=uuid7(),
            ref=ref,
            task_type="session_completion",
            task_description=description,
            outcome=outcome,
            outcome_details=f"Session terminated with {len(entries)} state items",
            actions=[action],
            context_summary=state_summary(entries, self._render_value, SUMMARY_CHARS),
            lessons_learned=lessons,
            duration_seconds=max(0.0, (now - began_ms) / 1000),
            tokens_used=0,
            importance=0.6,
            metadata=metadata,
            create_ms=now,
        )
        # Room for the keys: what is left of the response budget (and of an
        # episode's actions), less what a cut list adds.
        room = (
            min(MAX_ACTIONS_BYTES, self._wm.limits.response_budget_bytes - episode.size())
            - _KEYS_LEAST_BYTES
        )
        listed = keys_within(keys, room)
        action["state_keys"] = listed
        if len(listed) < len(keys):
            action.update(state_keys_truncated=True, state_key_count=len(keys))
        return episode

    # Reads ------------------------------------------------------------------

    async def sweep(
        self, limit: int = 1000, *, holder: str | None = None, lease_ms: int = 0
    ) -> tuple[int, int, int] | None:
        """Delete expired checkpoints, forgotten request ids and old events; return
        how many of each, or None when another replica holds the background lease.

        With a ``holder``, only the replica holding the ``background`` lease runs
        the jobs (it renews the lease each time; another takes over once it has
        expired for ``lease_ms``). Each job is a short transaction of its own,
        also guarded by ``try_lead``: the checkpoint job holds the event counter
        only while it appends its CHECKPOINT_DELETED events, and compaction never
        holds it. The resume checkpoint of a PAUSED session is never deleted.
        """
        now = self._clock_ms()
        if holder is not None:
            async with self._db.transaction() as tx:
                if not await tx.acquire_lease("background", holder, now, lease_ms):
                    return None
        expired: list[tuple[SessionRef, str, str | None]] = []
        forgotten = compacted = 0
        async with self._db.transaction() as tx:
            if await tx.try_lead("checkpoint-retention"):
                cutoff = now - self.retention.max_age_ms
                expired = await tx.delete_expired_checkpoints(cutoff, limit)
                await tx.append_events([
                    EventRecord(uuid7(), EventType.CHECKPOINT_DELETED, ref, agent_type_id,
                                now, checkpoint_id=checkpoint_id, metadata=RETENTION)
                    for ref, checkpoint_id, agent_type_id in expired
                ])  # fmt: skip
        async with self._db.transaction() as tx:
            if await tx.try_lead("request-retention"):
                ttl = self.retention.request_id_ttl_ms * (1 + REQUEST_ID_CLOCK_MARGIN)
                forgotten = await tx.forget_requests(now - int(ttl), limit)
        async with self._db.transaction() as tx:
            if await tx.try_lead("event-compaction"):
                compacted = await tx.compact_events(
                    now - self.retention.event_max_age_ms, self.retention.event_keep_last, limit
                )
        return len(expired), forgotten, compacted

    async def release_background(self, holder: str) -> None:
        """Give up the background lease (at shutdown), so another replica takes over now."""
        async with self._db.transaction() as tx:
            await tx.release_lease("background", holder)

    async def refusal(self, session: SessionRef, state: str, write: bool) -> MemsvcError | None:
        """Why working memory refused a call on ``session`` (SessionGuard).

        A transitional marker is healed first and None returned: the caller
        tries once more. This runs only on refused calls, never on the hot path.
        """
        if state in TRANSITIONAL:
            await self._heal_shared(session)
            return None
        record = await self._db.get_session(session)
        if record is None:
            return (
                SessionNotWritable(session.session_id, "not spawned")
                if write
                else SessionNotFound(session.session_id)
            )
        if record.state == SessionState.TERMINATED:
            return _terminated(session, write)
        # The marker as it is now, not as the store found it: an operation may have
        # settled in between (a Resume of the PAUSED session, say, or a Spawn that
        # wrote its marker and committed after the store found none); or a
        # Terminate committed since the record was read and dropped it.
        record, marker = await self.reads.marker_against(record)
        if record.state == SessionState.TERMINATED:
            return _terminated(session, write)
        if marker is None:
            return WorkingMemoryLost(session.session_id)
        if marker.state in TRANSITIONAL:
            await self._heal_shared(session)
            return None
        if marker.state != state:
            # Settled differently since (the record read above may be older still):
            # the caller tries once more.
            return None
        if not left_by_memsvc(record, marker):
            # Not what the database says memsvc left (a store restored from an
            # older copy): lost, as GetSession reports it.
            return WorkingMemoryLost(session.session_id)
        return SessionNotWritable(session.session_id, state)

    # Shared machinery ---------------------------------------------------------

    def _check(
        self,
        session: SessionRef,
        checkpoint_id: str,
        request_id: str,
        found: Sequence[FieldViolation] = (),
    ) -> tuple[SessionRef, str]:
        """The canonical session and request id of a call on a session; raises one
        InvalidArgument for these and the violations ``found`` before."""
        violations = list(found)
        ref = check_session_ref(
            session.project_id, session.agent_instance_id, session.session_id, violations
        )
        if checkpoint_id:
            check_session_id(checkpoint_id, "checkpoint_id", violations)
        request_id = check_request_id(request_id, violations)
        raise_if_any(violations)
        return ref, request_id

    def _lock_for_checkpoint(
        self, ref: SessionRef, checkpoint_id: str
    ) -> Callable[[LifecycleTransaction], Awaitable[CheckpointLock | None]]:
        """Lock the session's row for an operation that takes a checkpoint, with
        what _admit_checkpoint needs (counted only when ``keep_last`` does not
        bound the count already: at or below the limit, the prune after the
        insert keeps it there)."""
        keep_last = self.retention.keep_last
        count = not (keep_last and keep_last <= self.max_checkpoints)

        async def lock(tx: LifecycleTransaction) -> CheckpointLock | None:
            return await tx.lock_session_for_checkpoint(ref, checkpoint_id or None, count)

        return lock

    def _admit_checkpoint(
        self, ref: SessionRef, locked: CheckpointLock | None, operation: str, checkpoint_id: str
    ) -> SessionRecord:
        """Check the transition, the checkpoint limit and the requested id, before
        step 1, so that a refusal needs no undoing."""
        if locked is None:
            raise SessionNotFound(ref.session_id)
        record = _admit(ref, locked.record, operation, {SessionState.ACTIVE})
        if locked.checkpoints >= self.max_checkpoints:
            raise CheckpointLimitExceeded(ref.session_id, self.max_checkpoints)
        if locked.id_taken:
            raise CheckpointAlreadyExists(ref.session_id, checkpoint_id)
        return record

    async def _begin(
        self,
        record: SessionRecord,
        steps: _Steps | None,
        step: Callable[[], Awaitable[T]],
    ) -> T:
        """Run step 1; heal a transitional marker left by a dead operation first.

        ``steps`` records that there is a marker to settle after the commit (None
        for a step that changes no marker, such as CreateCheckpoint's snapshot).
        """
        for attempt in range(2):
            try:
                result = await step()
            except MarkerStateError as error:
                if error.state in TRANSITIONAL and attempt == 0:
                    await self._heal_locked(record)
                    if steps is not None:
                        # The healed operation may be this call's own first attempt
                        # (its reply lost): its id is settled now, and step 1 refuses
                        # a settled id (the fence against late copies). A new one.
                        steps.op = uuid7()
                    continue
                if error.state in (MISSING, STALE) or error.state in SETTLED:
                    # Settled in a state (or an epoch) the database contradicts: the
                    # step allows the one the committed state implies. Not what
                    # memsvc left.
                    raise WorkingMemoryLost(record.ref.session_id) from None
                raise InvalidTransition(record.ref.session_id, error.state, "change") from None
            if steps is not None:
                steps.started = True
            return result
        raise AssertionError("unreachable")

    async def heal(self, session: SessionRef) -> None:
        """Settle a transitional marker left by an operation that died, if any."""
        marker = await self._memory.read_marker(session)
        if marker is None or marker.state not in TRANSITIONAL:
            return
        async with self._db.transaction() as tx:
            # A 'spawning' marker may belong to a Spawn still committing, whose row
            # no other transaction sees yet: wait for it, never abort a live Spawn.
            record = await tx.lock_session_after_spawn(session)
            if record is None:
                if marker.op is not None:
                    with contextlib.suppress(LostOperation):
                        await self._memory.abort(session, marker.op)
                return
            await self._heal_locked(record)

    async def _heal_locked(self, record: SessionRecord) -> None:
        """Settle a transitional marker by the committed truth (caller holds the row lock)."""
        marker = await self._memory.read_marker(record.ref)
        if marker is None or marker.state not in TRANSITIONAL or marker.op is None:
            return
        committed = {
            "spawning": record.memory_epoch == marker.next_epoch,
            "pausing": record.state == SessionState.PAUSED,
            "resuming": record.memory_epoch == marker.next_epoch,
            "terminating": record.state == SessionState.TERMINATED,
        }[marker.state]
        try:
            if not left_by_memsvc(record, marker):
                # An older copy (taken during an operation of an earlier epoch, or a
                # Spawn or Resume the database has moved on from): undone, it would
                # pass for the memory. Dropped, it reads as lost (Resume restores it).
                await self._memory.finish(record.ref, marker.op, None, swap=False, clear=True)
            elif not committed:
                await self._memory.abort(record.ref, marker.op)
            elif marker.state == "terminating":
                # A Terminate that kept a lost memory keeps nothing (see terminate).
                clear = marker.clear or marker.prior == MISSING
                final = None if clear else "terminated"
                await self._memory.finish(record.ref, marker.op, final, swap=False, clear=clear)
            else:
                final = MARKER_FOR.get(record.state, "active")
                swap = marker.state == "resuming"
                await self._memory.finish(record.ref, marker.op, final, swap=swap, clear=False)
            log.info("healed %s marker of session %s", marker.state, record.ref.session_id)
        except LostOperation:
            pass

    async def _run(
        self,
        method: str,
        ref: SessionRef,
        request_id: str,
        arguments: tuple[Any, ...],
        kind: type[T],
        steps: _Steps,
        lock: Callable[[LifecycleTransaction], Awaitable[L]],
        body: Callable[[LifecycleTransaction, L], Awaitable[T]],
    ) -> T:
        """One operation's transaction: claim the request id, ``lock`` the
        session (the claim travels with it, one round trip on PostgreSQL), then
        either return the first answer of a retried request (changing nothing)
        or run ``body`` on what ``lock`` read, remember its answer and commit."""
        committing = False
        try:
            async with self._db.transaction() as tx:
                pending = None
                if request_id:
                    # What a retry must repeat; hashed only when a request id asks.
                    hashed = arguments_hash(method, *arguments)
                    pending = await tx.send_claim(ref, request_id, method, hashed)
                locked = await lock(tx)
                previous = await answer_of(pending, request_id) if pending else None
                if previous is not None:
                    raise _Replayed(decode_result(kind, previous))
                result = await body(tx, locked)
                if steps.started:
                    self._failpoints.hit(f"{method.lower()}.after_prepare")
                if request_id:
                    await tx.remember_response(ref.project_id, request_id, encode_result(result))
                # From here the failure of COMMIT leaves its outcome unknown.
                committing = True
        except _Replayed as replayed:
            # A retry of a call that committed and then died before its step 3 is
            # the one call sure to come: it settles the marker. (Else a Terminate's
            # memory would stay: every other call on a TERMINATED session is
            # refused before it meets the marker, and nothing else looks.) After
            # the answer: the answer is the database's, and needs no Redis.
            if method in _MARKER_STEPS:
                self._heal_after_answer(ref)
            return cast(T, replayed.result)
        except BaseException as error:
            if steps.started:
                # As work of its own, without the call's deadline (often what failed
                # the call: under it these would not even try) and not cut short by
                # the call's cancellation (the same deadline's, from gRPC, a moment
                # later): either would leave the marker transitional.
                recovery = (
                    self._settle_by_truth(ref, "a COMMIT whose outcome is unknown")
                    if committing
                    else self._undo(ref, steps)
                )
                await self._after_calls.wait(self._finish_past_the_call(ref, recovery))
            elif isinstance(error, InvalidTransition) and error.metadata.get("state") == (
                SessionState.TERMINATED.name
            ):
                self._heal_after_answer(ref)  # a retry without its id, or another call
            raise
        if steps.started:
            self._failpoints.hit(f"{method.lower()}.before_finish")
            finishing = self._finish_past_the_call(ref, self._finish(method, ref, steps))
            if not steps.after_answer:
                # Before the answer, but not cut short when the call is cancelled
                # (its deadline, a client gone): a Terminate's memory would stay in
                # the store for good, as no later call meets its marker.
                await self._after_calls.wait(finishing)
        return result

    def _finish_past_the_call(
        self, ref: SessionRef, settling: Coroutine[Any, Any, bool]
    ) -> asyncio.Task[bool]:
        """Run ``settling``, the step 3 of an operation on ``ref`` (or the undo or
        settling of one that failed), as work of its own (awaited at shutdown:
        settled): bounded by the backends' own retry budget, not by the call's
        deadline, and not stopped by the call's end. Whether it settled the marker:
        a call on ``ref`` that meets the marker meanwhile waits for it, and heals
        only if not."""
        task = self._after_calls.start(None, settling)
        self._finishing[ref] = task

        def done(finished: asyncio.Task[bool]) -> None:
            if self._finishing.get(ref) is finished:
                del self._finishing[ref]

        task.add_done_callback(done)
        return task

    def _heal_after_answer(self, ref: SessionRef) -> None:
        """Heal the session's marker in the background (see _heal_shared)."""
        self._heals.start(ref, self.heal(ref))

    async def _heal_shared(self, ref: SessionRef) -> None:
        """Heal the session's marker and wait for it, raising what the heal raised.
        One heal a session at a time, which later calls join: a burst of refused or
        retried calls must not queue a transaction each on the row lock (each
        holding a pooled connection while it waits, which would starve every other
        session's calls), nor hold a Redis connection each while Redis is away. The
        caller's deadline ends its wait, not the heal. A heal that fails leaves the
        marker transitional: the next call on the session heals it.

        A step 3 that this process runs after its answer settles the marker itself:
        the call waits for it first (the heal then only reads the settled marker),
        rather than queue a transaction on the row lock as it commits."""
        finishing = self._finishing.get(ref)
        if finishing is not None:
            # Not its failure (_finish logs it) nor its cancellation (a shutdown):
            # only whether it settled the marker; if not, the heal does.
            await asyncio.wait((finishing,))
            if not finishing.cancelled() and finishing.result():
                return
        await self._heals.wait(self._heals.start(ref, self.heal(ref)))

    async def _finish(self, method: str, ref: SessionRef, steps: _Steps) -> bool:
        """Step 3: settle the marker after the commit. Whether this step settled it;
        False when another caller had (the marker may belong to a later operation
        by now, which a call waiting for this step must heal) or after a failure."""
        try:
            await self._memory.finish(ref, steps.op, steps.final_state, steps.swap, steps.clear)
            return True
        except LostOperation:
            return False  # another caller already settled it from the committed state
        except MemsvcError as error:
            # Committed: the answer stands, the marker stays transitional.
            log.warning("%s committed but settling working memory failed: %s", method, error)
        except Exception:
            # The same, for a failure nobody expected.
            log.exception("%s committed but settling working memory failed", method)
        # The next call on the session would heal it, but a Terminate has none: its
        # memory would stay in the store, though the client was told it was cleared.
        self._settling.start(ref, self._heal_until_settled(ref))
        return False

    async def _heal_until_settled(self, ref: SessionRef) -> None:
        """Heal the session's marker, trying again after each failure (the backend
        away) for SETTLE_RETRY_SPAN_SECONDS; then the next call on it heals it."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + SETTLE_RETRY_SPAN_SECONDS
        delay = SETTLE_RETRY_FIRST_SECONDS
        while True:
            try:
                await asyncio.sleep(delay)
                await self._heal_shared(ref)
                return
            except asyncio.CancelledError:
                # What happened first, the session after: one kind of warning
                # (memsvc.log.RepeatLimit), however many sessions it concerns.
                log.warning(
                    "a marker's settling stopped before it settled (session %s); the next"
                    " call on it or a purge settles it", ref.session_id,
                )  # fmt: skip
                raise
            except Exception as error:
                if loop.time() + delay > give_up_at:
                    log.error(
                        "session %s: its marker is still transitional after %.0f s of"
                        " retries (%s); the next call on it or a purge settles it",
                        ref.session_id, SETTLE_RETRY_SPAN_SECONDS, error,
                    )  # fmt: skip
                    return
            delay = min(delay * 2, SETTLE_RETRY_LONGEST_SECONDS)

    async def settled(self) -> None:
        """Wait for the markers still settling after their answer (at shutdown). Both
        kinds together: a shutdown that stops waiting cancels them all, not only the
        first kind (the heals would run on while the stores close). Heals waiting to
        be tried again are cancelled: a backend failed them already (a step 3 that
        fails meanwhile starts one more: the loop cancels it too)."""
        while self._settling or self._after_calls or self._heals:
            await asyncio.gather(
                self._settling.cancelled(), self._after_calls.finished(), self._heals.finished()
            )

    async def _settle_by_truth(self, ref: SessionRef, after: str) -> bool:
        """Settle a transitional marker by what the database holds, not by guessing
        (``after``: what left the doubt, for the log); whether it is settled. When
        that cannot be done now, it is tried again in the background (a Terminate
        that committed has no next call to heal it)."""
        try:
            await self.heal(ref)
            return True
        except Exception as error:
            log.warning("after %s, %s: settling later: %s", after, ref.session_id, error)
            self._settling.start(ref, self._heal_until_settled(ref))
            return False

    async def _undo(self, ref: SessionRef, steps: _Steps) -> bool:
        """Undo the step 1 of an operation that did not commit; whether this did
        (not when another caller had settled the marker, or after a failure: a
        call that waits for this heals then)."""
        try:
            await self._memory.abort(ref, steps.op)
            return True
        except LostOperation:
            return False
        except Exception as error:
            # The error's kind first: the kind of warning (memsvc.log.RepeatLimit).
            log.warning(
                "could not undo a working-memory step (%s) of session %s: %s",
                type(error).__name__,
                ref.session_id,
                error,
            )
            return False

    async def _transition(
        self,
        tx: LifecycleTransaction,
        record: SessionRecord,
        kind: EventType,
        now: int,
        request_id: str,
        *,
        checkpoint_id: str | None = None,
        episode_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        before_event: Callable[[], Awaitable[None]] | None = None,
        **changes: Any,
    ) -> SessionRecord:
        """Store the session's next version and append the event announcing it.

        ``before_event`` runs in between: it sees the new version, and whatever
        it locks or waits for, it does so before the append locks the event
        counter, which every writer of the deployment waits for until COMMIT
        (events it appends itself come last in it, and before this one).
        """
        changed = dataclasses.replace(record, version=record.version + 1, update_ms=now, **changes)
        await tx.update_session(changed)
        if before_event is not None:
            await before_event()
        await tx.append_event(
            self._event(
                kind,
                changed,
                now,
                request_id,
                checkpoint_id=checkpoint_id,
                episode_id=episode_id,
                metadata=metadata,
            )
        )
        return changed

    def _event(
        self,
        kind: EventType,
        record: SessionRecord,
        now: int,
        request_id: str,
        *,
        checkpoint_id: str | None = None,
        episode_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> EventRecord:
        return EventRecord(
            event_id=uuid7(),
            event_type=kind,
            ref=record.ref,
            agent_type_id=record.agent_type_id,
            time_ms=now,
            checkpoint_id=checkpoint_id,
            episode_id=episode_id,
            request_id=request_id or None,
            metadata=record.metadata if metadata is None else metadata,
        )


# The calls whose step 1 changes a marker: a replay of one heals what it may have left.
_MARKER_STEPS = frozenset({"Spawn", "Pause", "Resume", "Terminate"})

SUMMARY_CHARS = 1000
# What a summary of SUMMARY_CHARS characters takes at most (4 bytes a character in
# UTF-8), and the count in the episode's outcome details; and the least a key list
# takes, cut or not (with state_keys_truncated and state_key_count).
_SUMMARY_BOUND_BYTES = 4 * SUMMARY_CHARS + 16
_KEYS_LEAST_BYTES = 64
# The metadata of the CHECKPOINT_DELETED events of retention (keep_last, max age),
# and of a Terminate's cleanup.
RETENTION: dict[str, Any] = {"reason": "retention"}
ENDED: dict[str, Any] = {"reason": "terminate"}


def keys_within(keys: list[str], room: int) -> list[str]:
    """The first ``keys`` whose list takes at most ``room`` bytes, as JSON or as a
    protobuf ListValue (each key quoted and escaped, or framed: 12 bytes at most)."""
    # At most 6 bytes a character (a JSON escape, \u0001), so most lists need no
    # character-by-character count.
    if sum(12 + 6 * len(key) for key in keys) <= room:
        return keys
    used = 0
    for count, key in enumerate(keys):
        used += 12 + len(json.dumps(key, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        if used > room:
            return keys[:count]
    return keys


def state_summary(
    entries: Sequence[SnapshotEntry], render: Callable[[bytes], Any], limit: int
) -> str:
    """``json.dumps({key: render(value)}, sort_keys=True, default=str,
    ensure_ascii=False)[:limit]``, the reference's context summary, rendering only
    the values the prefix shows: a session of 10,000 keys summarises the first
    few, not all of them. Unlike the reference, text outside ASCII stays as it is
    (not \\u escapes), so a search finds its words ("Müller", "東京"), and a
    character takes one of the ``limit``, not six; control characters, NUL
    among them, are still escaped (PostgreSQL's text holds no NUL)."""
    parts = ["{"]
    size = 1
    for index, entry in enumerate(sorted(entries, key=lambda e: e.key)):
        if size >= limit:
            break
        item = (
            ("" if index == 0 else ", ")
            + json.dumps(entry.key, ensure_ascii=False)
            + ": "
            + json.dumps(render(entry.value), sort_keys=True, default=str, ensure_ascii=False)
        )
        parts.append(item)
        size += len(item)
    else:
        parts.append("}")
    return "".join(parts)[:limit]


class _Replayed(Rollback):
    """A retried request's first answer: the transaction rolls back, changing nothing."""

    def __init__(self, result: object) -> None:
        super().__init__()
        self.result = result


def _locking(
    ref: SessionRef,
) -> Callable[[LifecycleTransaction], Awaitable[SessionRecord | None]]:
    async def lock(tx: LifecycleTransaction) -> SessionRecord | None:
        return await tx.lock_session(ref)

    return lock


def _admit(
    ref: SessionRef, record: SessionRecord | None, operation: str, allowed: set[SessionState]
) -> SessionRecord:
    """The locked session, if it exists and ``operation`` may run in its state."""
    if record is None:
        raise SessionNotFound(ref.session_id)
    if record.state not in allowed:
        raise InvalidTransition(ref.session_id, record.state.name, operation)
    return record


def _terminated(ref: SessionRef, write: bool) -> MemsvcError:
    """Why working memory refuses a call on a terminated session."""
    if write:
        return SessionNotWritable(ref.session_id, "terminated")
    return SessionNotFound(ref.session_id, terminated=True)
