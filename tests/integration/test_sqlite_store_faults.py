"""The embedded SQLite store under concurrent reads and failing writes.

Reads outside transactions share one reader connection, and a statement left
unfinished on it would pin the snapshot every other read on it sees. A write
whose COMMIT fails must leave no transaction open (the next caller's writes would
join it), and a full disk or an I/O error is UNAVAILABLE with its cause, as on
PostgreSQL, never INTERNAL.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from memsvc.domain import BackendUnavailable, SessionRef
from memsvc.domain._lifecycle_records import EventRecord, EventType
from memsvc.domain._watch import EventFilter
from memsvc.store.sqlite import SqliteDurableStore
from memsvc.store.sqlite._store import READERS
from tests.helpers import eventually, migrated


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteDurableStore]:
    async with migrated(SqliteDurableStore(f"sqlite:///{tmp_path / 'memsvc.db'}")) as opened:
        yield opened


REF = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")


def an_event(metadata: dict[str, str] | None = None) -> EventRecord:
    return EventRecord(
        str(uuid.uuid4()), EventType.SPAWNED, REF, None, 1_700_000_000_000, metadata=metadata or {}
    )


async def append(store: SqliteDurableStore, event: EventRecord) -> int:
    async with store.transaction() as tx:
        await tx.append_event(event)
    sequence: int = cast(Any, tx).appended[0].sequence
    return sequence


async def test_reads_see_every_answered_commit_while_other_reads_run(store):
    """Other reads in flight on the reader (a watcher's bounds, its catch-up,
    a GetSession) never make a read started after a commit miss it."""
    everything = EventFilter()
    stop = asyncio.Event()

    async def other_reads() -> None:
        while not stop.is_set():
            await store.event_bounds()
            await store.read_events(0, 5, everything)

    readers = [asyncio.create_task(other_reads()) for _ in range(4)]
    try:
        for _ in range(200):
            sequence = await append(store, an_event())
            read = await store.read_events(sequence - 1, 10, everything)
            assert [e.sequence for e in read] == [sequence]
            assert (await store.event_bounds())[1] == sequence
    finally:
        stop.set()
        await asyncio.gather(*readers)


async def test_a_commit_that_fails_leaves_no_transaction_open(store):
    """A failed COMMIT (here refused once by an authorizer; SQLITE_BUSY does the
    same) commits nothing, and the next write starts a transaction of its own."""
    refused = False

    def refuse_one_commit(action: int, arg1: str | None, *_: object) -> int:
        nonlocal refused
        if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT" and not refused:
            refused = True
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    assert store._db is not None
    await store._db.set_authorizer(refuse_one_commit)
    lost = an_event()
    with pytest.raises(sqlite3.DatabaseError):
        await append(store, lost)
    kept = an_event()
    async with asyncio.timeout(10):
        sequence = await append(store, kept)
    stored = await store.read_events(0, 10, EventFilter())
    assert [e.event.event_id for e in stored] == [kept.event_id]
    assert sequence == 1  # the failed transaction's counter was rolled back too


async def test_a_full_disk_is_unavailable_with_its_cause_and_writes_nothing(store):
    assert store._db is not None
    (pages,) = next(iter(await store._db.execute_fetchall("PRAGMA page_count")))
    await store._db.execute(f"PRAGMA max_page_count = {pages + 2}")
    big = an_event({"text": "x" * 200_000})
    with pytest.raises(BackendUnavailable, match="full"):
        await append(store, big)
    await store._db.execute("PRAGMA max_page_count = 1073741823")
    assert await store.read_events(0, 10, EventFilter()) == []
    assert await append(store, an_event()) == 1


async def test_a_statement_sqlite_cannot_run_is_not_unavailable(store):
    """Only conditions of the database are UNAVAILABLE (which clients retry): a
    statement SQLite refuses would fail the same way on every retry."""

    async def unknown_column(conn: Any, dialect: Any) -> Any:
        return await (await conn.execute("SELECT no_such_column FROM sessions")).fetchall()

    with pytest.raises(sqlite3.OperationalError, match="no such column"):
        await store._query(unknown_column)


async def test_a_long_read_does_not_hold_up_the_others(store):
    """Reads outside transactions have connections of their own (each a thread): a
    read that takes long (a full-text search ranking thousands of episodes; here one
    the test holds until it lets it go) does not hold up a GetSession or a watcher's
    reads behind it."""
    running, release = threading.Event(), threading.Event()

    def held() -> int:
        # On the reader's thread: the statement lasts until the test releases it.
        running.set()
        release.wait(60)
        return 1

    for reader in store._readers:
        await reader.create_function("held", 0, held)

    async def long_read(conn: Any, dialect: Any) -> Any:
        return await (await conn.execute("SELECT held()")).fetchall()

    long = asyncio.ensure_future(store._query(long_read))
    try:

        async def long_read_running() -> bool:
            return running.is_set()

        await eventually(long_read_running)
        # The long read cannot end meanwhile: one queued behind it would wait for ever.
        try:
            async with asyncio.timeout(10):
                await store.event_bounds()
        except TimeoutError:
            raise AssertionError("the short read waited for the long one") from None
        assert not long.done()
    finally:
        release.set()
    assert await long == [(1,)]


async def test_reads_waiting_for_a_reader_end_when_the_store_closes(tmp_path):
    """Every reader lent (here held by the test), a read waits; closing the store
    ends it with an error instead of leaving it waiting for ever."""
    store = SqliteDurableStore(f"sqlite:///{tmp_path / 'memsvc.db'}")
    await store.open()
    await store.migrate()
    held = [await store._idle_readers.borrow() for _ in range(READERS)]
    waiting = asyncio.ensure_future(store.event_bounds())
    await asyncio.sleep(0)
    assert not waiting.done()
    await store.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.wait_for(waiting, 10)
    assert len(held) == READERS
