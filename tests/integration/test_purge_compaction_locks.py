"""A purge and the event log's compaction lock the events they share in one order.

A purge turns its scope's events into tombstones; compaction deletes the oldest
events. Old events of a purged scope are in both. The purge found them by a scan
of the table (no index serves a scope), in the table's order, and compaction in
the order of its delete's plan: PostgreSQL then found each waiting for a row the
other held, and aborted one of them (deadlock detected, after a second). Both now
lock in sequence order, so whichever comes first goes first.

The test makes the interleaving certain: event 1 is stored after event 2 in the
table (rewritten by an UPDATE), a third connection holds event 1, both statements
queue behind it, and it lets go. Before the fix the two orders differed only on the
large log's plan (compaction through the primary key); on the small log's both
followed the table, so that case covers the plans rather than the old deadlock.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import psycopg.sql
import pytest

from memsvc.domain import SessionRef
from memsvc.domain._lifecycle_records import EventRecord, EventType
from memsvc.domain._watch import EventFilter
from tests.helpers import durable_store_at, eventually, migrated, waiting_for_locks

OLD_MS = 1_700_000_000_000


@pytest.fixture(params=["small log", "large log"])
async def store(request: pytest.FixtureRequest, fresh_postgres_url: str) -> AsyncIterator[Any]:
    """A store on a database of its own. On a large log, compaction's delete finds
    its events through the primary key (in sequence order) while a purge still
    scans the table: the planner is made to choose so on these few rows."""
    if request.param == "large log":
        async with await psycopg.AsyncConnection.connect(
            fresh_postgres_url, autocommit=True
        ) as conn:
            await conn.execute(
                psycopg.sql.SQL("ALTER DATABASE {} SET enable_seqscan = off").format(
                    psycopg.sql.Identifier(fresh_postgres_url.rsplit("/", 1)[1])
                )
            )
    async with migrated(durable_store_at(fresh_postgres_url)) as opened:
        yield opened


@pytest.mark.parametrize("first", ["compaction", "purge"])
async def test_a_purge_and_compaction_of_the_same_events_do_not_deadlock(
    store: Any, fresh_postgres_url: str, first: str
) -> None:
    scope = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    async with store.transaction() as tx:
        for kind in (EventType.SPAWNED, EventType.TERMINATED):
            await tx.append_event(EventRecord(str(uuid.uuid4()), kind, scope, None, OLD_MS))
    # Event 1 rewritten: stored after event 2, a scan of the table meets 2 first.
    async with await psycopg.AsyncConnection.connect(fresh_postgres_url) as holder:
        await holder.execute("UPDATE lifecycle_events SET metadata = metadata WHERE sequence = 1")
        await holder.commit()
        await holder.execute("SELECT 1 FROM lifecycle_events WHERE sequence = 1 FOR UPDATE")

        async def compact() -> int:
            async with store.transaction() as tx:
                return int(await tx.compact_events(int(time.time() * 1000), 0, 100))

        async def tombstone() -> int:
            async with store.transaction() as tx:
                count, _ = await tx.tombstone_events(scope)
                return int(count)

        steps: dict[str, Callable[[], Awaitable[int]]] = {
            "compaction": compact,
            "purge": tombstone,
        }
        order = [first, *(name for name in steps if name != first)]
        running: dict[str, asyncio.Task[int]] = {}
        for waiting, name in enumerate(order, start=1):
            running[name] = asyncio.ensure_future(steps[name]())

            async def queued(count: int = waiting) -> bool:
                return await waiting_for_locks(fresh_postgres_url) >= count

            await eventually(queued)  # behind the holder (and the other)
        await holder.rollback()  # lets go of event 1
        done = {name: await asyncio.wait_for(task, 30) for name, task in running.items()}
    # Both went through, one after the other: compaction deleted both events, or
    # the purge made them tombstones first and compaction then deleted them.
    assert done["compaction"] == 2
    assert done["purge"] in (0, 2)
    assert await store.read_events(0, 10, EventFilter()) == []
