"""Purge: forget a session, an agent instance or a project in every store.

One durable-store transaction deletes the scope's sessions (holding their row
locks, so no lifecycle operation on them runs meanwhile), checkpoints, episodes
(with their search entries), graph checkpoints (every thread of a project, the
threads linked to an agent instance or session) and remembered answers; the
scope's events become tombstones that keep their sequence, type and time, so
the log stays gap-free. Last, before the commit, the sessions' working memory
goes. If that step succeeds and the commit fails, the working memory is gone
while the rows remain: a purge is meant to forget, and running it again
finishes the job.

A purge runs to its end whatever the client's deadline: a large scope may take
longer than a client waits, and a purge cut short rolls back, so a retry would
start over and be cut short again. A retry with the same request id joins the
one running (or, once it ended, answers what it did). Purges run one at a time
in a process, waiting for their turn before they take a pooled connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from typing import Protocol

from memsvc.domain._background import BackgroundWork
from memsvc.domain._errors import FieldViolation
from memsvc.domain._ids import (
    SessionRef,
    check_request_id,
    check_session_id,
    check_uuid,
    raise_if_any,
)
from memsvc.domain._lifecycle_records import RequestLog
from memsvc.domain._lifecycle_results import arguments_hash, claim


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """What one purge removed."""

    sessions_deleted: int = 0
    working_memories_deleted: int = 0
    checkpoints_deleted: int = 0
    episodes_deleted: int = 0
    request_answers_deleted: int = 0
    events_tombstoned: int = 0
    graph_checkpoints_deleted: int = 0


class PurgeTransaction(RequestLog, Protocol):
    """The purge's writes, inside one durable-store transaction. ``scope`` is a
    SessionRef whose empty agent instance or session id matches every one."""

    async def lock_project(self, project_id: str, exclusive: bool) -> None:
        """Hold the project's lock until the transaction ends (exclusive: no
        Spawn or RecordEpisode in the project commits meanwhile)."""

    async def purge_sessions(self, scope: SessionRef) -> tuple[list[SessionRef], int]:
        """Delete the scope's sessions and checkpoints; return the deleted
        sessions and the number of checkpoints."""

    async def purge_episodes(self, scope: SessionRef) -> int:
        """Delete the scope's episodes and their search entries; return how many."""

    async def purge_requests(self, scope: SessionRef, keep_request_id: str) -> int:
        """Delete the scope's remembered answers except ``keep_request_id``'s."""

    async def tombstone_events(self, scope: SessionRef) -> tuple[int, int]:
        """Strip ids and metadata from the scope's events; return how many, and
        the last one's sequence (0 with none)."""

    async def purge_graph(self, scope: SessionRef) -> int:
        """Delete the project's graph threads, or those linked to the agent
        instance or session; return how many checkpoints."""


class PurgeDatabase(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[PurgeTransaction]: ...

    async def erase_deleted(self) -> None:
        """After a purge (or its replay): leave no copy of what it deleted where the
        store keeps them for a while (SQLite's write-ahead log); best effort."""


class ForgettingStore(Protocol):
    """The working-memory side of a purge."""

    async def forget(self, sessions: Sequence[SessionRef]) -> int:
        """Remove everything of these sessions (entries, marker, staging);
        return how many held anything."""

    async def sessions_in(self, scope: SessionRef) -> list[SessionRef]:
        """The sessions of ``scope`` (empty ids match all) that this store may hold
        working memory of, whether the durable store knows them or not."""


class Purger:
    """Runs purges over a working-memory store and the durable store."""

    def __init__(self, memory: ForgettingStore, database: PurgeDatabase) -> None:
        self._memory = memory
        self._db = database
        # At error level: its client stopped waiting, and this line is the only
        # record that a data removal did not complete.
        self._purges = BackgroundWork[PurgeReport]("a purge", failure_level=logging.ERROR)
        # Told each scope whose events a purge made tombstones of, once committed
        # (the watch hub drops their old form from what it holds for its streams).
        self.events_purged: Callable[[SessionRef, int], None] = lambda scope, up_to: None
        # One purge at a time in a process, taken before a pooled connection: purges
        # that wait (for the one running, on its project's lock) hold none.
        self._one_at_a_time = asyncio.Lock()

    async def purge(
        self, project_id: str, agent_instance_id: str, session_id: str, request_id: str
    ) -> PurgeReport:
        scope, request_id = check_purge_scope(project_id, agent_instance_id, session_id, request_id)
        # Not the call's task, nor its deadline: a client that stops waiting leaves
        # the purge running to its end (see the module's docstring), and its retry
        # (the same request id) waits for that one instead of starting another.
        key = (scope, request_id) if request_id else None
        return await self._purges.wait(self._purges.start(key, self._purge(scope, request_id)))

    async def finished(self) -> None:
        """Wait for the purges still running (at shutdown, before the stores close)."""
        await self._purges.finished()

    async def _purge(self, scope: SessionRef, request_id: str) -> PurgeReport:
        async with self._one_at_a_time:
            report = await self._purge_now(scope, request_id)
            # Its replay too: a retry after a purge stopped before this step.
            await self._db.erase_deleted()
            return report

    async def _purge_now(self, scope: SessionRef, request_id: str) -> PurgeReport:
        arguments = arguments_hash("PurgeData", scope)
        # Looked for before the transaction: on Redis this walks the whole keyspace,
        # which no lock should wait for.
        held = await self._memory.sessions_in(scope)
        async with self._db.transaction() as tx:
            # Each statement below sees what committed before it: a session spawned
            # or an episode recorded between two of them would be half purged.
            await tx.lock_project(scope.project_id, exclusive=True)
            if request_id:
                project = SessionRef(scope.project_id, "", "")
                previous = await claim(tx, project, request_id, "PurgeData", arguments)
                if previous is not None:
                    return PurgeReport(**json.loads(previous))
            sessions, checkpoints = await tx.purge_sessions(scope)
            # Under the project's lock no Spawn is between its first step and its
            # commit: working memory of a session without a row is an orphan, left by
            # a Spawn that died after its first step. (One left after the search
            # waits for a later purge.)
            known = set(sessions)
            orphans = [session for session in held if session not in known]
            episodes = await tx.purge_episodes(scope)
            answers = await tx.purge_requests(scope, request_id)
            events, last_tombstoned = await tx.tombstone_events(scope)
            graph_checkpoints = await tx.purge_graph(scope)
            report = PurgeReport(
                sessions_deleted=len(sessions),
                # Last: a purge that fails before (a database error) leaves the
                # working memory as it was, with the rows that it belongs to.
                working_memories_deleted=await self._memory.forget([*sessions, *orphans]),
                checkpoints_deleted=checkpoints,
                episodes_deleted=episodes,
                request_answers_deleted=answers,
                events_tombstoned=events,
                graph_checkpoints_deleted=graph_checkpoints,
            )
            if request_id:
                await tx.remember_response(
                    scope.project_id, request_id, json.dumps(asdict(report)).encode()
                )
        if report.events_tombstoned:
            self.events_purged(scope, last_tombstoned)
        return report


def check_purge_scope(
    project_id: str, agent_instance_id: str, session_id: str, request_id: str
) -> tuple[SessionRef, str]:
    """The canonical scope (empty agent instance or session ids mean "all") and
    request id."""
    violations: list[FieldViolation] = []
    project = check_uuid(project_id, "project_id", violations)
    agent = (
        check_uuid(agent_instance_id, "agent_instance_id", violations) if agent_instance_id else ""
    )
    if session_id:
        check_session_id(session_id, "session_id", violations)
        if not agent_instance_id:
            violations.append(FieldViolation("session_id", "requires agent_instance_id"))
    request_id = check_request_id(request_id, violations)
    raise_if_any(violations)
    return SessionRef(project, agent, session_id), request_id
