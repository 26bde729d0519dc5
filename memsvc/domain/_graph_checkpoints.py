"""Graph checkpoints: what a LangGraph checkpointer stores, served to any language.

Per project, thread and checkpoint namespace: checkpoints (an opaque document,
its parent, JSON metadata and channel versions), channel values stored once per
(channel, version) and shared by every checkpoint that holds that version, and
pending writes per (checkpoint, task, index). Values are the client
serializer's (type, bytes) pairs; memsvc never reads them.

Each write locks the thread's row first (``graph_threads``), so a put, a prune
and a retention sweep of one thread never interleave: the writer fence (a put
naming a parent that is no longer the latest checkpoint is refused) and the
collection of values no checkpoint refers to any more are both exact.
Retention (a TTL per thread, most-recent-N per namespace, the end of a linked
session) runs in the background sweep; see docs/langgraph.md.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import IntEnum
from typing import Any, Protocol, cast

from memsvc.domain._errors import (
    FailedPrecondition,
    FieldViolation,
    NotFound,
    ResourceExhausted,
)
from memsvc.domain._ids import SessionRef, check_session_id, check_uuid, raise_if_any
from memsvc.domain._pagination import (
    Page,
    check_page_size,
    decode_page_token,
    fingerprint,
    page_of,
    page_position,
    position_text,
)
from memsvc.domain._storable import check_ttl, json_problem, unsigned_zero

# Every key column at its maximum must fit one PostgreSQL btree entry (2,704
# bytes): graph_values' key is project, thread, namespace, channel and version,
# 16 + 512 + 1,024 + 512 + 128 bytes plus headers.
MAX_THREAD_ID_BYTES = 512
MAX_NAMESPACE_BYTES = 1024
# Namespaces put before that bound (up to 2,048 bytes, stored on SQLite) stay
# readable, and their checkpoints writable: reads and writes take them.
MAX_STORED_NAMESPACE_BYTES = 2048
MAX_CHANNEL_BYTES = 512
MAX_VERSION_BYTES = 128
MAX_TYPE_BYTES = 64
MAX_TASK_ID_BYTES = 256
MAX_TASK_PATH_BYTES = 2048
MAX_RUN_ID_BYTES = 256
MAX_CHANNELS = 10_000
# Channel names one read may ask for: as many as a checkpoint may have (LangGraph
# asks for all of a graph's DeltaChannels at once).
MAX_SELECTED_CHANNELS = MAX_CHANNELS
MAX_WRITES = 10_000
MAX_METADATA_BYTES = 1 << 20
MAX_FILTER_BYTES = 64 << 10
MAX_THREADS_PER_CALL = 1_000
MAX_RUN_IDS = 1_000
MAX_REFUSE_KEYS = 16
MAX_METADATA_KEY_BYTES = 256
MAX_KEEP_LAST = 1_000_000
LIST_PAGE = (100, 1_000)  # (default, maximum) page size
LIST_PAGE_BYTES = 3 << 20  # a List page at most (the server passes 3/4 of max_message_bytes)
SWEEP_BATCH = 100  # threads of each kind a retention sweep takes per batch

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class SessionEndAction(IntEnum):
    """Numbered as memsvc.v1.GraphSessionEndAction."""

    NONE = 0
    KEEP_LATEST = 1
    DELETE = 2


class PruneStrategy(IntEnum):
    """Numbered as memsvc.v1.GraphPruneStrategy (0 is KEEP_LATEST)."""

    KEEP_LATEST = 1
    DELETE = 2


@dataclass(frozen=True, slots=True)
class GraphValue:
    """A channel's value at one version (or a pending write's value)."""

    channel: str
    version: str
    type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class GraphWrite:
    """One pending write of a task."""

    task_id: str
    task_path: str
    idx: int
    channel: str
    type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class GraphThreadOptions:
    """Retention and session link of a thread; None or 0 turns each off."""

    ttl_ms: int | None = None
    keep_last: int = 0
    session: SessionRef | None = None
    on_session_end: int = SessionEndAction.NONE


@dataclass(frozen=True, slots=True)
class GraphCheckpointRecord:
    """A checkpoint; ``values`` and ``writes`` are filled on reads."""

    project_id: str
    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    parent_checkpoint_id: str | None
    doc_type: str
    doc: bytes
    metadata: dict[str, Any]
    channel_versions: dict[str, str]
    create_ms: int = 0
    values: tuple[GraphValue, ...] = ()
    writes: tuple[GraphWrite, ...] = ()

    @property
    def run_id(self) -> str | None:
        run_id = self.metadata.get("run_id")
        return run_id if isinstance(run_id, str) and run_id else None

    def size(self) -> int:
        """An upper bound of its bytes in a response: every field, with 6 bytes of
        framing per field and per message (what page budgets count; metadata too,
        up to 1 MiB, and task paths, up to 2 KiB per write)."""
        texts = (self.thread_id, self.checkpoint_ns, self.checkpoint_id,
                 self.parent_checkpoint_id or "", self.doc_type)  # fmt: skip
        return (
            64  # times and the message's own framing
            + sum(6 + _utf8(text) for text in texts)
            + 6 + len(self.doc)
            + 6 + _utf8(json.dumps(self.metadata, separators=(",", ":"), ensure_ascii=False))
            + sum(12 + _utf8(channel) + _utf8(version)
                  for channel, version in self.channel_versions.items())
            + sum(30 + _utf8(v.channel) + _utf8(v.version) + _utf8(v.type) + len(v.data)
                  for v in self.values)
            + sum(40 + _utf8(w.task_id) + _utf8(w.task_path) + _utf8(w.channel) + _utf8(w.type)
                  + len(w.data) for w in self.writes)
        )  # fmt: skip


def _utf8(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True)
class GraphListScope:
    """Which checkpoints of a project a List covers; None matches all."""

    project_id: str
    thread_id: str | None = None
    checkpoint_ns: str | None = None
    metadata_filter: dict[str, Any] = field(default_factory=dict)
    before_checkpoint_id: str | None = None
    checkpoint_id: str | None = None
    # Only these channels' values and writes come with each checkpoint (empty: all).
    channels: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        return fingerprint(
            self.project_id,
            repr(self.thread_id),
            repr(self.checkpoint_ns),
            json.dumps(self.metadata_filter, sort_keys=True),
            repr(self.before_checkpoint_id),
            repr(self.checkpoint_id),
            # Only when named: the tokens of listings without it stay those of the
            # release before it (a rolling update moves a listing across both).
            *([repr(sorted(set(self.channels)))] if self.channels else []),
        )


@dataclass(frozen=True, slots=True)
class PendingThreadWork:
    """What retention still has to do to a thread, read under its row lock: the
    sweep's list was read earlier, and a put may have changed the options since."""

    keep_last: int
    prune_pending: bool
    # The linked session's end action, once that session is TERMINATED (0: none).
    end_action: int


@dataclass(frozen=True, slots=True)
class GraphPrune:
    """What PruneGraphThreads did."""

    checkpoints_deleted: int = 0
    # Threads left unpruned: a checkpoint's metadata holds a key the call refused.
    refused_thread_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GraphSweep:
    """What one retention sweep of graph checkpoints removed."""

    threads_expired: int = 0
    checkpoints_pruned: int = 0
    threads_ended: int = 0
    # A kind of work filled its batch: another sweep right away may find more.
    more: bool = False
    # The keep_last walk went past a full batch (its flags cleared, if nothing else):
    # progress, which the next sweep goes on from.
    walked: bool = False


class GraphCheckpointConflict(FailedPrecondition):
    """The writer fence refused a put: its parent is no longer the latest checkpoint,
    or another put stored the latest under its id."""

    reason = "ERROR_REASON_GRAPH_CHECKPOINT_CONFLICT"

    def __init__(
        self, thread_id: str, ns: str, checkpoint_id: str, parent: str | None, latest: str | None
    ) -> None:
        where = f"of thread {thread_id!r} namespace {ns!r}"
        if checkpoint_id == latest:
            message = (
                f"checkpoint {checkpoint_id!r} is the latest {where}, stored by another put "
                "(another parent, state, metadata or versions): another writer took this "
                "id; read the latest checkpoint and decide"
            )
        elif parent == latest:
            # The parent is the latest, but the new id sorts before it: the put
            # would not become the latest (the greatest id is), forking the thread.
            message = (
                f"checkpoint id {checkpoint_id!r} sorts before the latest checkpoint "
                f"{latest!r} {where}: a checkpoint that extends the latest must have a "
                "greater id (LangGraph's ids are time-ordered; is this writer's clock behind?)"
            )
        else:
            message = (
                f"checkpoint {parent or '(none)'!s} is not the latest {where} (the latest "
                f"is {latest or '(none)'!s}): another writer moved the thread on; read the "
                "latest checkpoint and decide"
            )
        super().__init__(
            message,
            metadata={
                "thread_id": thread_id,
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint_id,
                "parent_checkpoint_id": parent or "",
                "latest_checkpoint_id": latest or "",
            },
        )


class GraphCheckpointTooLarge(ResourceExhausted):
    """A checkpoint with all its values does not fit in one response. ``size``: what
    it takes at least (weighed before its values are read, or exactly, once read)."""

    reason = "ERROR_REASON_GRAPH_CHECKPOINT_TOO_LARGE"
    subject = "response size"

    def __init__(self, thread_id: str, ns: str, checkpoint_id: str, size: int, limit: int) -> None:
        super().__init__(
            f"checkpoint {checkpoint_id!r} of graph thread {thread_id!r} namespace {ns!r} "
            f"takes at least {size} bytes with its values, over the {limit} one response may "
            "carry: raise max_message_bytes on memsvc (its clients too, if they limit what "
            "they receive), or delete the thread",
            metadata={
                "thread_id": thread_id,
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint_id,
                "limit": str(limit),
                "size": str(size),
            },
        )


class GraphCheckpointNotFound(NotFound):
    """No such graph checkpoint (or the thread and namespace have none)."""

    reason = "ERROR_REASON_GRAPH_CHECKPOINT_NOT_FOUND"

    def __init__(self, thread_id: str, ns: str, checkpoint_id: str | None) -> None:
        what = f"checkpoint {checkpoint_id!r}" if checkpoint_id else "no checkpoint"
        super().__init__(
            f"{what} not found in graph thread {thread_id!r} namespace {ns!r}"
            if checkpoint_id
            else f"graph thread {thread_id!r} namespace {ns!r} has no checkpoint",
            metadata={
                "thread_id": thread_id,
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint_id or "",
            },
        )


class GraphTransaction(Protocol):
    """Graph-checkpoint writes inside one durable-store transaction."""

    async def lock_project(self, project_id: str, exclusive: bool) -> None:
        """Hold the project's lock to the end of the transaction: shared by the
        writes that may add a thread, exclusive for a purge, which then never
        sees a put commit between its statements."""

    async def lock_graph_thread(
        self, project_id: str, thread_id: str, now_ms: int, options: GraphThreadOptions | None
    ) -> None:
        """Create or touch the thread's row (locking it), replacing its options if given."""

    async def lock_graph_thread_row(self, project_id: str, thread_id: str) -> int | None:
        """Lock the thread's row without touching it; its expiry (-1: none), or
        None when the thread has no row."""

    async def lock_graph_thread_work(
        self, project_id: str, thread_id: str
    ) -> PendingThreadWork | None:
        """As lock_graph_thread_row, with what retention has to do to the thread now."""

    async def latest_graph_checkpoint_id(
        self, project_id: str, thread_id: str, ns: str
    ) -> str | None: ...

    async def holds_graph_checkpoint(self, record: GraphCheckpointRecord) -> bool:
        """Whether ``record``'s checkpoint is stored as ``record`` has it: its parent
        (unless the stored one was cleared, as a prune clears a deleted parent),
        state, metadata and versions (compared as the database stores them)."""

    async def graph_checkpoint_versions(
        self, project_id: str, thread_id: str, ns: str, checkpoint_id: str
    ) -> dict[str, str] | None:
        """The stored checkpoint's channel versions (None: not stored)."""

    async def collect_graph_values(
        self, project_id: str, thread_id: str, ns: str, freed: dict[str, str]
    ) -> None:
        """Delete the values of these (channel, version) pairs that no checkpoint of
        the namespace holds any more."""

    async def insert_graph_values(
        self, project_id: str, thread_id: str, ns: str, values: Sequence[GraphValue]
    ) -> int:
        """Store values not stored yet; return how many were new."""

    async def upsert_graph_checkpoint(self, record: GraphCheckpointRecord) -> None: ...

    async def insert_graph_writes(
        self,
        project_id: str,
        thread_id: str,
        ns: str,
        checkpoint_id: str,
        writes: Sequence[GraphWrite],
        replace: bool,
    ) -> None: ...

    async def delete_graph_thread(self, project_id: str, thread_id: str) -> int:
        """Delete every row of the thread; return how many checkpoints."""

    async def graph_run_threads(
        self, project_id: str, run_ids: Sequence[str]
    ) -> list[tuple[str, str, str]]:
        """(thread_id, ns, checkpoint_id) of the runs' checkpoints."""

    async def delete_graph_checkpoints(
        self, project_id: str, thread_id: str, ns: str, checkpoint_ids: Sequence[str]
    ) -> int:
        """Delete these checkpoints, their writes, and the values no other
        checkpoint of the namespace holds; return how many checkpoints."""

    async def keep_latest_graph_checkpoints(
        self, project_id: str, thread_id: str, keep: int
    ) -> int:
        """Keep the ``keep`` newest checkpoints of each namespace (at least 1;
        delete_graph_thread deletes them all), with what they need; return how
        many checkpoints were deleted. Pending writes of a checkpoint that is not
        stored go as that checkpoint would: once ``keep`` newer ones are."""

    async def graph_threads_with_metadata_keys(
        self, project_id: str, thread_ids: Sequence[str], keys: Sequence[str]
    ) -> list[str]:
        """The threads, sorted, with a checkpoint whose metadata has one of ``keys``
        at its top level."""

    async def copy_graph_thread(
        self, project_id: str, source: str, target: str, now_ms: int
    ) -> int:
        """Copy every row of ``source`` into ``target``; return how many
        checkpoints were new there."""

    async def expired_graph_threads(self, now_ms: int, limit: int) -> list[tuple[str, str]]:
        """(project_id, thread_id) of threads whose TTL ran out."""

    async def graph_threads_to_prune(
        self, limit: int, after: tuple[str, str] | None = None
    ) -> list[tuple[str, str]]:
        """(project_id, thread_id) of threads written since their last prune, in that
        order, after ``after`` when given."""

    async def graph_threads_prune_done(self, project_id: str, thread_id: str) -> None: ...

    async def graph_threads_of_ended_sessions(
        self, limit: int, session: SessionRef | None = None
    ) -> list[tuple[str, str]]:
        """(project_id, thread_id) of threads with an end action linked to terminated
        sessions (to ``session`` only, when given)."""

    async def graph_thread_session_done(self, project_id: str, thread_id: str) -> None:
        """Forget the thread's session link (its action has been applied)."""

    async def purge_graph(self, scope: SessionRef) -> int:
        """Delete the project's threads, or those linked to the agent instance or
        session; return how many checkpoints."""


class GraphDatabase(Protocol):
    """The durable store's graph-checkpoint side."""

    def transaction(self) -> AbstractAsyncContextManager[GraphTransaction]: ...

    async def get_graph_checkpoint(
        self,
        project_id: str,
        thread_id: str,
        ns: str,
        checkpoint_id: str | None,
        max_bytes: int,
        channels: frozenset[str] | None = None,
    ) -> GraphCheckpointRecord | None:
        """One checkpoint (the latest without an id) with its values and writes
        (only those of ``channels``, unless None). GraphCheckpointTooLarge, before
        its values are read, when they are sure to take more than ``max_bytes`` in
        a response."""

    async def list_graph_checkpoints(
        self,
        scope: GraphListScope,
        after: tuple[str, str, str] | None,
        limit: int,
        byte_budget: int,
        max_bytes: int,
    ) -> tuple[list[GraphCheckpointRecord], bool]:
        """Up to ``limit`` checkpoints newest first by (checkpoint_id, thread_id, ns),
        strictly after ``after`` in that order, with values and writes, and whether the
        byte budget ended the read early: the first checkpoint always comes (unless,
        as get_graph_checkpoint's, it is refused for ``max_bytes``), the others only
        while their values and writes stay within ``byte_budget``. Checkpoints are
        weighed before their values are read, and those left out are not read."""

    async def put_graph_checkpoint_at_once(
        self,
        record: GraphCheckpointRecord,
        values: Sequence[GraphValue],
        options: GraphThreadOptions | None,
    ) -> int | None:
        """An unfenced put in one atomic step, where the store can: the thread's row
        touched, new values and the checkpoint stored. Returns how many values were
        new, or None when it cannot (then a transaction puts it): on SQLite, and for
        a put that replaces a stored checkpoint's versions, whose freed values the
        transaction collects."""


class GraphCheckpoints:
    """Graph checkpoints over a durable store."""

    def __init__(
        self,
        database: GraphDatabase,
        *,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        page_bytes: int = LIST_PAGE_BYTES,
    ) -> None:
        self._db = database
        self._clock_ms = clock_ms
        # Values and writes a List page carries at most (its first checkpoint aside).
        self._page_bytes = page_bytes
        # The last thread the sweep's keep_last pruning reached: the next sweep goes
        # on after it (None: from the first).
        self._pruned_up_to: tuple[str, str] | None = None

    async def put(
        self,
        record: GraphCheckpointRecord,
        new_values: Sequence[GraphValue],
        *,
        require_latest_parent: bool,
        options: GraphThreadOptions | None,
        prefix: str = "checkpoint",
        violations: list[FieldViolation] | None = None,
    ) -> int:
        """Validate and store a checkpoint with its new values; return how many
        values were new. ``violations`` found before (by the API) join those found here."""
        violations = list(violations or [])
        record = check_checkpoint(record, new_values, prefix, violations)
        if options is not None:
            options = check_options(options, "options", violations)
        raise_if_any(violations)
        now = self._clock_ms()
        record = replace(record, create_ms=now)
        if not require_latest_parent:
            stored = await self._db.put_graph_checkpoint_at_once(record, new_values, options)
            if stored is not None:
                return stored
        async with self._db.transaction() as tx:
            project, thread, ns = record.project_id, record.thread_id, record.checkpoint_ns
            await tx.lock_project(project, exclusive=False)
            await tx.lock_graph_thread(project, thread, now, options)
            replaced: dict[str, str] | None = None
            if require_latest_parent:
                latest = await tx.latest_graph_checkpoint_id(project, thread, ns)
                # A retry of the put that made the latest (its reply lost) is the same
                # put; another writer's under the same id (ids such as "step-0002" that
                # two writers both choose) is a conflict, not an overwrite.
                retry = latest == record.checkpoint_id and await tx.holds_graph_checkpoint(record)
                # Extending the latest also means becoming it: an id that sorts before
                # it (a writer whose clock runs behind) would fork the thread unseen.
                extends = latest == record.parent_checkpoint_id and (
                    not latest or record.checkpoint_id > latest
                )
                if not (retry or extends):
                    raise GraphCheckpointConflict(
                        thread, ns, record.checkpoint_id, record.parent_checkpoint_id, latest
                    )
                if retry:
                    # The same put, stored with its values (the latest holds its
                    # versions): nothing to write. Written again, it would bring back
                    # a parent that a prune has deleted (and cleared) since.
                    return 0
            else:
                # What the put replaces, read under the thread's lock, so exactly (the
                # fence lets through only a retry, same versions, or a new id).
                replaced = await tx.graph_checkpoint_versions(
                    project, thread, ns, record.checkpoint_id
                )
            stored = await tx.insert_graph_values(project, thread, ns, new_values)
            await tx.upsert_graph_checkpoint(record)
            if replaced:
                # Put again with other versions: the values only the replaced ones
                # named would stay, unreachable, and no prune would ever collect them
                # (it collects what the checkpoints it deletes name).
                freed = {
                    channel: version
                    for channel, version in replaced.items()
                    if record.channel_versions.get(channel) != version
                }
                if freed:
                    await tx.collect_graph_values(project, thread, ns, freed)
        return stored

    async def put_writes(
        self,
        project_id: str,
        thread_id: str,
        ns: str,
        checkpoint_id: str,
        writes: Sequence[GraphWrite],
        replace_existing: bool,
    ) -> None:
        violations: list[FieldViolation] = []
        project = check_uuid(project_id, "project_id", violations)
        check_thread_id(thread_id, "thread_id", violations)
        check_namespace(ns, "checkpoint_ns", violations, MAX_STORED_NAMESPACE_BYTES)
        check_session_id(checkpoint_id, "checkpoint_id", violations)
        check_writes(writes, "writes", violations)
        raise_if_any(violations)
        async with self._db.transaction() as tx:
            await tx.lock_project(project, exclusive=False)
            await tx.lock_graph_thread(project, thread_id, self._clock_ms(), None)
            if len(ns.encode("utf-8", "surrogatepass")) > MAX_NAMESPACE_BYTES and (
                await tx.latest_graph_checkpoint_id(project, thread_id, ns) is None
            ):
                # Past the bound of new namespaces, only one that holds checkpoints
                # (stored before the bound) takes writes: anywhere else they could
                # never be read with a checkpoint (and PostgreSQL's index refuses
                # such keys with an error that names no field).
                check_namespace(ns, "checkpoint_ns", violations)
                raise_if_any(violations)
            await tx.insert_graph_writes(
                project, thread_id, ns, checkpoint_id, writes, replace_existing
            )

    async def get(
        self,
        project_id: str,
        thread_id: str,
        ns: str,
        checkpoint_id: str,
        max_bytes: int,
        channels: Sequence[str] = (),
    ) -> GraphCheckpointRecord:
        """The checkpoint with its values and writes (only those of ``channels``,
        unless empty). ``max_bytes``: what one response may carry; a checkpoint sure
        to take more is refused (GraphCheckpointTooLarge) before its values are read."""
        violations: list[FieldViolation] = []
        project = check_uuid(project_id, "project_id", violations)
        check_thread_id(thread_id, "thread_id", violations)
        check_namespace(ns, "checkpoint_ns", violations, MAX_STORED_NAMESPACE_BYTES)
        if checkpoint_id:
            check_session_id(checkpoint_id, "checkpoint_id", violations)
        selected = check_channel_selection(channels, "channels", violations)
        raise_if_any(violations)
        found = await self._db.get_graph_checkpoint(
            project, thread_id, ns, checkpoint_id or None, max_bytes, selected
        )
        if found is None:
            raise GraphCheckpointNotFound(thread_id, ns, checkpoint_id or None)
        return found

    async def list_checkpoints(
        self,
        scope: GraphListScope,
        page_size: int,
        page_token: str,
        found: Sequence[FieldViolation] = (),
        *,
        max_bytes: int,
    ) -> Page[GraphCheckpointRecord]:
        """``found``: violations found before (by the API), reported with these.
        ``max_bytes``: as get's, for the page's first checkpoint."""
        violations = list(found)
        project = check_uuid(scope.project_id, "project_id", violations)
        if scope.thread_id is not None:
            check_thread_id(scope.thread_id, "thread_id", violations)
        if scope.checkpoint_ns is not None:
            check_namespace(
                scope.checkpoint_ns, "checkpoint_ns", violations, MAX_STORED_NAMESPACE_BYTES
            )
        if scope.before_checkpoint_id is not None:
            check_session_id(scope.before_checkpoint_id, "before_checkpoint_id", violations)
        if scope.checkpoint_id is not None:
            check_session_id(scope.checkpoint_id, "checkpoint_id", violations)
        check_channel_selection(scope.channels, "channels", violations)
        limit = check_page_size(
            page_size, default=LIST_PAGE[0], maximum=LIST_PAGE[1], violations=violations
        )
        raise_if_any(violations)
        scope = replace(scope, project_id=project)
        token_scope = scope.fingerprint()
        after = cast(
            tuple[str, str, str] | None,
            page_position(
                decode_page_token(page_token, token_scope),
                position_text,
                position_text,
                position_text,
            ),
        )
        items, cut = await self._db.list_graph_checkpoints(
            scope, after, limit + 1, self._page_bytes, max_bytes
        )
        return page_of(
            items,
            limit,
            token_scope,
            lambda c: [c.checkpoint_id, c.thread_id, c.checkpoint_ns],
            cut=cut,
        )

    async def delete_thread(self, project_id: str, thread_id: str) -> int:
        violations: list[FieldViolation] = []
        project = check_uuid(project_id, "project_id", violations)
        check_thread_id(thread_id, "thread_id", violations)
        raise_if_any(violations)
        async with self._db.transaction() as tx:
            # As a put does, the project's lock (shared) and then the thread's row,
            # made if absent: a first put of the thread still in flight has made it
            # and holds it, so the delete waits for its commit, then deletes all of
            # it. Deleting an absent row locks nothing, and that put could commit
            # between the delete's statements: its checkpoint kept, its values not.
            await tx.lock_project(project, exclusive=False)
            await tx.lock_graph_thread(project, thread_id, self._clock_ms(), None)
            return await tx.delete_graph_thread(project, thread_id)

    async def delete_runs(self, project_id: str, run_ids: Sequence[str]) -> int:
        violations: list[FieldViolation] = []
        project = check_uuid(project_id, "project_id", violations)
        if len(run_ids) > MAX_RUN_IDS:
            violations.append(
                FieldViolation("run_ids", f"has {len(run_ids)} ids, over {MAX_RUN_IDS}")
            )
        for index, run_id in enumerate(run_ids):
            _check_text(run_id, f"run_ids[{index}]", MAX_RUN_ID_BYTES, True, violations)
        raise_if_any(violations)
        if not run_ids:
            return 0
        deleted = 0
        async with self._db.transaction() as tx:
            found = await tx.graph_run_threads(project, run_ids)
            groups: dict[tuple[str, str], list[str]] = {}
            for thread_id, ns, checkpoint_id in found:
                groups.setdefault((thread_id, ns), []).append(checkpoint_id)
            for thread_id in sorted({thread_id for thread_id, _ in groups}):
                await tx.lock_graph_thread_row(project, thread_id)
            for (thread_id, ns), ids in sorted(groups.items()):
                deleted += await tx.delete_graph_checkpoints(project, thread_id, ns, ids)
        return deleted

    async def copy_thread(self, project_id: str, source: str, target: str) -> int:
        violations: list[FieldViolation] = []
        project = check_uuid(project_id, "project_id", violations)
        check_thread_id(source, "source_thread_id", violations)
        check_thread_id(target, "target_thread_id", violations)
        if source and source == target:
            violations.append(
                FieldViolation("target_thread_id", "must differ from source_thread_id")
            )
        raise_if_any(violations)
        now = self._clock_ms()
        async with self._db.transaction() as tx:
            await tx.lock_project(project, exclusive=False)  # it may add a thread
            # Both rows locked in one order, so two opposite copies cannot deadlock.
            locked = {
                t: await tx.lock_graph_thread_row(project, t) for t in sorted({source, target})
            }
            if locked[source] is None:
                return 0  # nothing to copy, and no empty thread made
            await tx.lock_graph_thread(project, target, now, None)
            return await tx.copy_graph_thread(project, source, target, now)

    async def prune(
        self,
        project_id: str,
        thread_ids: Sequence[str],
        strategy: int,
        refuse_metadata_keys: Sequence[str] = (),
    ) -> GraphPrune:
        """Keep each namespace's latest checkpoint (or delete the threads whole),
        except in threads with a checkpoint whose metadata holds one of
        ``refuse_metadata_keys``: when any thread has one, none is pruned."""
        violations: list[FieldViolation] = []
        project = check_uuid(project_id, "project_id", violations)
        if len(thread_ids) > MAX_THREADS_PER_CALL:
            violations.append(
                FieldViolation(
                    "thread_ids", f"has {len(thread_ids)} threads, over {MAX_THREADS_PER_CALL}"
                )
            )
        for index, thread_id in enumerate(thread_ids):
            check_thread_id(thread_id, f"thread_ids[{index}]", violations)
        if strategy not in (0, *PruneStrategy):
            violations.append(FieldViolation("strategy", f"unknown strategy {strategy}"))
        if len(refuse_metadata_keys) > MAX_REFUSE_KEYS:
            violations.append(
                FieldViolation(
                    "refuse_metadata_keys",
                    f"has {len(refuse_metadata_keys)} keys, over {MAX_REFUSE_KEYS}",
                )
            )
        for index, key in enumerate(refuse_metadata_keys):
            _check_text(
                key, f"refuse_metadata_keys[{index}]", MAX_METADATA_KEY_BYTES, True, violations
            )
        raise_if_any(violations)
        threads = sorted(set(thread_ids))
        # DELETE leaves no state that older checkpoints would have to rebuild.
        keys = sorted(set(refuse_metadata_keys)) if strategy != PruneStrategy.DELETE else []
        if keys and threads:
            # Decided in the store on the checkpoints' metadata: whatever the threads'
            # size, nothing of them travels, as LangGraph's PostgreSQL saver decides.
            async with self._db.transaction() as tx:
                refused = await tx.graph_threads_with_metadata_keys(project, threads, keys)
            if refused:
                return GraphPrune(refused_thread_ids=tuple(refused))
        deleted, skipped = 0, []
        for thread_id in threads:
            async with self._db.transaction() as tx:
                if await tx.lock_graph_thread_row(project, thread_id) is None:
                    continue
                if strategy == PruneStrategy.DELETE:
                    # Whole, as DeleteGraphThread: its settings too (TTL, keep_last, a
                    # session link), which a later thread of the same id must not inherit.
                    deleted += await tx.delete_graph_thread(project, thread_id)
                elif keys and await tx.graph_threads_with_metadata_keys(project, [thread_id], keys):
                    # Such a checkpoint was put since the check above: asked again
                    # under the thread's lock, which every put takes.
                    skipped.append(thread_id)
                else:
                    deleted += await tx.keep_latest_graph_checkpoints(project, thread_id, 1)
        return GraphPrune(deleted, tuple(skipped))

    async def sweep(self, limit: int | None = None) -> GraphSweep:
        """Apply retention: expired threads go, threads over their keep_last are
        pruned, threads of terminated linked sessions get their end action.
        Each thread is a short transaction of its own; batches of ``limit`` threads
        (SWEEP_BATCH by default), one of each kind per call, but for keep_last (see
        _prune_flagged); ``more`` says whether another call may find more."""
        limit = limit or SWEEP_BATCH
        now = self._clock_ms()
        async with self._db.transaction() as tx:
            expired = await tx.expired_graph_threads(now, limit)
        deleted = 0
        for project, thread_id in expired:
            async with self._db.transaction() as tx:
                # Checked again under the lock: a put may have renewed it.
                expire_ms = await tx.lock_graph_thread_row(project, thread_id)
                if expire_ms is not None and 0 <= expire_ms <= now:
                    await tx.delete_graph_thread(project, thread_id)
                    deleted += 1
        pruned, more_to_prune = await self._prune_flagged(limit)
        # Terminate applies these itself (session_ended); this catches what a crash
        # between the two left, and sessions terminated before the link was made.
        async with self._db.transaction() as tx:
            ended = await tx.graph_threads_of_ended_sessions(limit)
        for project, thread_id in ended:
            async with self._db.transaction() as tx:
                pruned += await _apply_session_end(tx, project, thread_id)
        more = more_to_prune or limit in (len(expired), len(ended))
        return GraphSweep(deleted, pruned, len(ended), more=more, walked=more_to_prune)

    async def _prune_flagged(self, limit: int) -> tuple[int, bool]:
        """Prune one batch of the threads written since their last prune to their
        keep_last, in key order from where the last call stopped; return the
        checkpoints pruned and whether flagged threads may remain after it.

        Every put flags its thread again, so under steady puts the first threads in
        key order would fill every batch, with nothing to prune, and the threads
        after them would wait for ever. So the walk goes on from where it stopped,
        and a batch that only cleared flags counts as progress: the caller calls
        again (GraphSweep.walked), within its time budget."""
        pruned = 0
        async with self._db.transaction() as tx:
            batch = await tx.graph_threads_to_prune(limit, self._pruned_up_to)
        for project, thread_id in batch:
            async with self._db.transaction() as tx:
                # Read again under the lock: a put may have changed keep_last.
                work = await tx.lock_graph_thread_work(project, thread_id)
                if work is None or not work.prune_pending:
                    continue
                if work.keep_last > 0:
                    pruned += await tx.keep_latest_graph_checkpoints(
                        project, thread_id, work.keep_last
                    )
                await tx.graph_threads_prune_done(project, thread_id)
        if len(batch) < limit:
            self._pruned_up_to = None  # the last one: the next call starts again
            return pruned, False
        self._pruned_up_to = batch[-1]
        return pruned, True

    async def session_ended(self, tx: GraphTransaction, session: SessionRef) -> None:
        """Apply the end action of every thread linked to ``session``, inside the
        transaction that terminates it (so both commit, or neither)."""
        for project, thread_id in await tx.graph_threads_of_ended_sessions(
            _SESSION_THREADS_LIMIT, session
        ):
            await _apply_session_end(tx, project, thread_id)


# Threads one Terminate ends itself; the sweep ends any beyond (a session is
# rarely linked to more than a few).
_SESSION_THREADS_LIMIT = 1000


async def _apply_session_end(tx: GraphTransaction, project_id: str, thread_id: str) -> int:
    """Delete or prune one thread of an ended session; return checkpoints pruned.

    The action is read under the thread's lock: since the threads were listed, a
    put may have linked the thread to another session or changed its action."""
    work = await tx.lock_graph_thread_work(project_id, thread_id)
    action = work.end_action if work is not None else 0
    if not action:
        return 0
    if action == SessionEndAction.DELETE:
        await tx.delete_graph_thread(project_id, thread_id)
        return 0
    pruned = 0
    if action == SessionEndAction.KEEP_LATEST:
        pruned = await tx.keep_latest_graph_checkpoints(project_id, thread_id, 1)
    await tx.graph_thread_session_done(project_id, thread_id)
    return pruned


def check_channel_selection(
    channels: Iterable[str], field: str, violations: list[FieldViolation]
) -> frozenset[str] | None:
    """The channels a read asks for (None: every channel, when none is named)."""
    names = list(channels)
    if len(names) > MAX_SELECTED_CHANNELS:
        violations.append(
            FieldViolation(field, f"names {len(names)} channels, over {MAX_SELECTED_CHANNELS}")
        )
        return None
    for index, name in enumerate(names):
        _check_text(name, f"{field}[{index}]", MAX_CHANNEL_BYTES, True, violations)
    return frozenset(names) or None


def _check_text(
    value: str, field: str, max_bytes: int, required: bool, violations: list[FieldViolation]
) -> None:
    if not value:
        if required:
            violations.append(FieldViolation(field, "is required"))
        return
    if value.isascii() and value.isprintable() and len(value) <= max_bytes:
        return  # the common case, without a regular expression
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        violations.append(
            FieldViolation(field, f"is {size} bytes of UTF-8, over the maximum of {max_bytes}")
        )
    elif _CONTROL.search(value):
        violations.append(FieldViolation(field, "must not contain control characters"))
    else:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            violations.append(FieldViolation(field, "must be valid UTF-8"))


def check_thread_id(value: str, field: str, violations: list[FieldViolation]) -> None:
    """A thread id: 1 to 512 bytes of UTF-8, no control characters."""
    _check_text(value, field, MAX_THREAD_ID_BYTES, True, violations)


def check_namespace(
    value: str, field: str, violations: list[FieldViolation], max_bytes: int = MAX_NAMESPACE_BYTES
) -> None:
    """A checkpoint namespace: at most ``max_bytes`` of UTF-8 (1,024 for a new
    checkpoint), no control characters."""
    _check_text(value, field, max_bytes, False, violations)


def _check_type(value: str, field: str, violations: list[FieldViolation]) -> None:
    _check_text(value, field, MAX_TYPE_BYTES, True, violations)


def parse_json_object(
    text: str, field: str, max_bytes: int, violations: list[FieldViolation]
) -> dict[str, Any]:
    """A JSON object of at most ``max_bytes``, finite numbers, no NUL characters."""
    if not text:
        return {}
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        violations.append(FieldViolation(field, f"is {size} bytes, over {max_bytes}"))
        return {}

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not a finite number")

    try:
        value = json.loads(
            text, parse_constant=refuse, parse_float=lambda number: unsigned_zero(float(number))
        )
    except (ValueError, RecursionError) as error:
        violations.append(FieldViolation(field, f"is not valid JSON: {str(error)[:200]}"))
        return {}
    if not isinstance(value, dict):
        violations.append(FieldViolation(field, "must be a JSON object"))
        return {}
    problem = json_problem(value)
    if problem:
        violations.append(FieldViolation(field, problem))
        return {}
    served = served_json_size(value)
    if served > max_bytes:
        violations.append(
            FieldViolation(
                field,
                f"is {served} bytes as reads send it back (numbers of 1 and above in plain "
                f"decimal form, as PostgreSQL writes them: 1e300 takes 301 digits), "
                f"over {max_bytes}",
            )
        )
        return {}
    return value


def served_json_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON as reads send it back, from either
    database: PostgreSQL's jsonb prints a number without an exponent, and a large
    one comes back as an integer of that many digits (1e300: 301); a small one
    comes back as a float, which JSON writes short again (1e-300)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return len(text.encode("utf-8", "surrogatepass")) + sum(
        max(0, len(format(Decimal(repr(number)), "f")) - len(repr(number)))
        for number in _floats(value)
        if abs(number) >= 1
    )


def _floats(value: Any) -> Iterator[float]:
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _floats(item)
    elif isinstance(value, list):
        for item in value:
            yield from _floats(item)


def check_checkpoint(
    record: GraphCheckpointRecord,
    new_values: Sequence[GraphValue],
    prefix: str,
    violations: list[FieldViolation],
) -> GraphCheckpointRecord:
    """Every violation of the put rules; the record with its project canonical."""
    project = check_uuid(record.project_id, "project_id", violations)
    check_thread_id(record.thread_id, f"{prefix}.thread_id", violations)
    check_namespace(record.checkpoint_ns, f"{prefix}.checkpoint_ns", violations)
    check_session_id(record.checkpoint_id, f"{prefix}.checkpoint_id", violations)
    parent = record.parent_checkpoint_id
    if parent:
        check_session_id(parent, f"{prefix}.parent_checkpoint_id", violations)
        if parent == record.checkpoint_id:
            violations.append(
                FieldViolation(f"{prefix}.parent_checkpoint_id", "must differ from checkpoint_id")
            )
    _check_type(record.doc_type, f"{prefix}.checkpoint.type", violations)
    run_id = record.metadata.get("run_id")
    if isinstance(run_id, str):
        # DeleteGraphRuns must be able to name it: the same rule as its run_ids.
        found: list[FieldViolation] = []
        _check_text(run_id, f"{prefix}.metadata_json", MAX_RUN_ID_BYTES, False, found)
        violations += [replace(v, description=f"run_id {v.description}") for v in found]
    if len(record.channel_versions) > MAX_CHANNELS:
        violations.append(
            FieldViolation(
                f"{prefix}.channel_versions",
                f"has {len(record.channel_versions)} channels, over {MAX_CHANNELS}",
            )
        )
    else:
        for channel, version in record.channel_versions.items():
            field = f"{prefix}.channel_versions[{channel[:64]!r}]"
            _check_text(channel, field, MAX_CHANNEL_BYTES, True, violations)
            _check_text(version, field, MAX_VERSION_BYTES, True, violations)
    if len(new_values) > MAX_CHANNELS:
        violations.append(
            FieldViolation(
                f"{prefix}.channel_values", f"has {len(new_values)} values, over {MAX_CHANNELS}"
            )
        )
    else:
        seen: set[str] = set()
        for index, value in enumerate(new_values):
            field = f"{prefix}.channel_values[{index}]"
            if value.channel in seen:
                violations.append(FieldViolation(f"{field}.channel", "appears twice"))
            seen.add(value.channel)
            if record.channel_versions.get(value.channel) != value.version:
                violations.append(
                    FieldViolation(
                        f"{field}.version",
                        "must be the channel's version in channel_versions",
                    )
                )
            _check_type(value.type, f"{field}.value.type", violations)
    return replace(record, project_id=project, parent_checkpoint_id=parent or None)


def check_writes(
    writes: Sequence[GraphWrite], field: str, violations: list[FieldViolation]
) -> None:
    if not writes:
        violations.append(FieldViolation(field, "needs at least one write"))
        return
    if len(writes) > MAX_WRITES:
        violations.append(FieldViolation(field, f"has {len(writes)} writes, over {MAX_WRITES}"))
        return
    seen: set[tuple[str, int]] = set()
    for index, write in enumerate(writes):
        name = f"{field}[{index}]"
        _check_text(write.task_id, f"{name}.task_id", MAX_TASK_ID_BYTES, True, violations)
        _check_text(write.task_path, f"{name}.task_path", MAX_TASK_PATH_BYTES, False, violations)
        _check_text(write.channel, f"{name}.channel", MAX_CHANNEL_BYTES, True, violations)
        _check_type(write.type, f"{name}.value.type", violations)
        if (write.task_id, write.idx) in seen:
            violations.append(FieldViolation(f"{name}.idx", "repeats a (task_id, idx) pair"))
        seen.add((write.task_id, write.idx))


def check_options(
    options: GraphThreadOptions, field: str, violations: list[FieldViolation]
) -> GraphThreadOptions:
    check_ttl(options.ttl_ms, f"{field}.ttl", violations)
    if not 0 <= options.keep_last <= MAX_KEEP_LAST:
        violations.append(
            FieldViolation(
                f"{field}.keep_last", f"must be from 0 to {MAX_KEEP_LAST}, got {options.keep_last}"
            )
        )
    if options.on_session_end not in tuple(SessionEndAction):
        violations.append(
            FieldViolation(
                f"{field}.session.on_session_end", f"unknown action {options.on_session_end}"
            )
        )
    session = options.session
    if session is not None:
        agent = check_uuid(
            session.agent_instance_id, f"{field}.session.agent_instance_id", violations
        )
        check_session_id(session.session_id, f"{field}.session.session_id", violations)
        session = SessionRef(session.project_id.lower(), agent, session.session_id)
    elif options.on_session_end:
        violations.append(
            FieldViolation(f"{field}.session.on_session_end", "needs a session to link")
        )
    return replace(options, session=session)
