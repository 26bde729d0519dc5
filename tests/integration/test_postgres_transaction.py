"""How a PostgreSQL transaction ends: no BEGIN or COMMIT, its writes batched.

The pipeline's Sync commits the implicit transaction, so a block that fails must
commit nothing of what it sent; and the writes a batch carries into the event
append must run before that statement locks the event counter, which every
writer waits for until COMMIT.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from memsvc.domain import InvalidArgument, SessionRef
from memsvc.domain._lifecycle_records import (
    CheckpointRecord,
    EventRecord,
    EventType,
    SessionRecord,
    SessionState,
)
from memsvc.domain._lifecycle_results import uuid7
from memsvc.store.postgres import PostgresDurableStore
from tests.helpers import migrated


@pytest.fixture
async def store(fresh_postgres_url: str) -> AsyncIterator[PostgresDurableStore]:
    # One connection: every transaction of a test runs on the same one.
    async with migrated(PostgresDurableStore(fresh_postgres_url, max_connections=1)) as store:
        yield store


def session(ref: SessionRef) -> SessionRecord:
    now = int(time.time() * 1000)
    return SessionRecord(ref, None, SessionState.ACTIVE, {}, 1, uuid7(), None, now, now)


def new_ref() -> SessionRef:
    return SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")


class Refused(Exception):
    """What a domain check raises inside a transaction."""


async def written_then_failed(
    store: PostgresDurableStore, ref: SessionRef, failure: str, written: asyncio.Event
) -> None:
    """A transaction that sends a write (the session's INSERT, read at once),
    leaves another waiting in the batch (its UPDATE), sets ``written``, then fails."""
    async with store.transaction() as tx:
        assert await tx.insert_session(session(ref))
        await tx.update_session(dataclasses.replace(session(ref), version=2))
        written.set()
        if failure == "refusal":
            raise Refused
        await asyncio.Event().wait()  # until cancelled


@pytest.mark.parametrize("failure", ["refusal", "cancellation"])
async def test_a_failed_block_commits_nothing_and_keeps_postgres_quiet(
    store: PostgresDurableStore, failure: str
) -> None:
    notices: list[str] = []
    async with store._connections.connection() as conn:
        conn.add_notice_handler(lambda notice: notices.append(str(notice.message_primary)))
    ref = new_ref()
    written = asyncio.Event()
    if failure == "refusal":
        with pytest.raises(Refused):
            await written_then_failed(store, ref, failure, written)
    else:
        task = asyncio.create_task(written_then_failed(store, ref, failure, written))
        await asyncio.wait_for(written.wait(), 10)  # the INSERT has run; the block waits
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await store.get_session(ref) is None
    # The connection (or the pool's new one) still serves transactions.
    async with store.transaction() as tx:
        assert await tx.insert_session(session(ref))
    stored = await store.get_session(ref)
    assert stored is not None and stored.version == 1
    # Not PostgreSQL's "there is no transaction in progress" warning.
    assert notices == []


async def test_a_failed_block_on_a_lost_connection_raises_its_own_error(
    store: PostgresDurableStore, fresh_postgres_url: str
) -> None:
    """When the connection died meanwhile, the error that failed the block (here a
    refusal; a replayed answer travels the same way) is still what the caller sees."""
    ref = new_ref()
    with pytest.raises(Refused):
        async with store.transaction() as tx:
            assert await tx.insert_session(session(ref))
            await tx.update_session(dataclasses.replace(session(ref), version=2))
            async with await psycopg.AsyncConnection.connect(
                fresh_postgres_url, autocommit=True
            ) as other:
                others = (
                    " FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid()"
                )
                await other.execute("SELECT pg_terminate_backend(pid)" + others)
                for _ in range(500):  # until the transaction's backend is gone
                    cursor = await other.execute("SELECT count(*)" + others)
                    if (await cursor.fetchone()) == (0,):
                        break
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # its goodbye reaches the client's socket
            raise Refused
    assert await store.get_session(ref) is None


async def test_writes_of_one_table_never_share_a_statement(store: PostgresDurableStore) -> None:
    """The parts of one statement see one snapshot, not each other's effects: a
    second write of a table already waiting sends the first on its own."""
    ref = new_ref()
    async with store.transaction() as tx:
        assert await tx.insert_session(session(ref))
    now = session(ref).update_ms
    async with store.transaction() as tx:
        checkpoint = CheckpointRecord(ref, uuid7(), now, 0, 0, {})
        await tx.insert_checkpoint(checkpoint, b"MSN1\x00\x00\x00\x00", 0)
        await tx.delete_checkpoints(ref)  # must see the INSERT before it
        await tx.update_session(dataclasses.replace(session(ref), version=2))
        await tx.update_session(dataclasses.replace(session(ref), version=3))
        await tx.append_event(EventRecord(uuid7(), EventType.RESUMED, ref, None, now))
    assert await store.list_checkpoints(ref, None, 10, 1 << 20) == ([], False)
    stored = await store.get_session(ref)
    assert stored is not None and stored.version == 3


async def test_a_block_that_succeeds_commits_the_writes_left_waiting(
    store: PostgresDurableStore,
) -> None:
    """A write still in the batch at the end of the block (no event carried it)
    is sent before the Sync commits."""
    ref = new_ref()
    async with store.transaction() as tx:
        assert await tx.insert_session(session(ref))
        await tx.update_session(dataclasses.replace(session(ref), version=7))
    stored = await store.get_session(ref)
    assert stored is not None and stored.version == 7


async def test_batched_writes_run_before_the_event_counter_is_locked(
    store: PostgresDurableStore, fresh_postgres_url: str
) -> None:
    """A batched write that waits (here for a row lock) must not hold up every
    other writer of events: the counter row is locked only once it is done."""
    ref = new_ref()
    async with store.transaction() as tx:
        assert await tx.insert_session(session(ref))
    key = (ref.project_id, ref.agent_instance_id, ref.session_id)
    async with await psycopg.AsyncConnection.connect(fresh_postgres_url) as holder:
        await holder.execute(
            "SELECT 1 FROM sessions WHERE project_id = %s AND agent_instance_id = %s"
            " AND session_id = %s FOR UPDATE",
            key,
        )

        async def update_and_announce() -> None:
            async with store.transaction() as tx:
                await tx.update_session(dataclasses.replace(session(ref), version=2))
                event = EventRecord(uuid7(), EventType.RESUMED, ref, None, session(ref).update_ms)
                await tx.append_event(event)

        writer = asyncio.create_task(update_and_announce())
        async with await psycopg.AsyncConnection.connect(
            fresh_postgres_url, autocommit=True
        ) as other:
            await wait_until_blocked(other, writer)
            # Another writer of events takes the counter row at once (it would wait
            # for the blocked statement's COMMIT if that held it already).
            await other.execute("SET lock_timeout = '5s'")
            await other.execute("UPDATE event_sequence SET last_sequence = last_sequence")
        assert not writer.done()
        await holder.rollback()
        await writer
    stored = await store.get_session(ref)
    assert stored is not None and stored.version == 2


async def wait_until_blocked(
    conn: psycopg.AsyncConnection[Any], writer: asyncio.Task[None]
) -> None:
    """Until the batched statement waits for a lock."""
    for _ in range(500):
        assert not writer.done(), writer
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND datname = current_database()"  # another run's database is not ours
            " AND query LIKE 'WITH w0 AS (UPDATE sessions%%'"
        )
        row = await cursor.fetchone()
        if row is not None and row[0] == 1:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the batched statement never waited for the row lock")


# PostgreSQL refuses these with SQLSTATE class 54: 54000 (program limit exceeded,
# as an index row or a tsvector past its size) and 54001 (statement too complex).
_PAST_A_LIMIT = {
    "54000": "SELECT ('a' || repeat('b', 3000))::tsvector",
    "54001": "SELECT " + " + ".join(["1"] * 100_000),
}


@pytest.mark.parametrize("sqlstate", sorted(_PAST_A_LIMIT))
async def test_a_statement_past_a_postgres_limit_is_the_request_to_change(
    store: PostgresDurableStore, sqlstate: str
) -> None:
    """Class 54 is not transient: the same request fails the same way every time,
    so it is INVALID_ARGUMENT at once, not retried and told to retry (UNAVAILABLE)."""
    attempts = 0

    async def read(conn: Any, dialect: Any) -> None:
        nonlocal attempts
        attempts += 1
        await conn.execute(_PAST_A_LIMIT[sqlstate])

    with pytest.raises(InvalidArgument, match=r"beyond a limit of the database"):
        await store._query(read)
    assert attempts == 1
    ref = new_ref()
    with pytest.raises(InvalidArgument, match="beyond a limit of the database"):
        async with store.transaction() as tx:
            assert await tx.insert_session(session(ref))
            await tx._one(_PAST_A_LIMIT[sqlstate], ())  # type: ignore[attr-defined]
    assert await store.get_session(ref) is None
