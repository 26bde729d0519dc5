"""A call cancelled while SQLite waits for its write lock leaves no transaction open.

BEGIN IMMEDIATE waits up to busy_timeout while another process (a second replica,
`memsvc migrate`) holds SQLite's write lock. aiosqlite runs the statement whether
or not the task that sent it is still waiting, so a deadline that cancels the call
then must not leave the store's connection inside a transaction nobody ends: every
later write would fail ("cannot start a transaction within a transaction").
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

from memsvc.store.sqlite import SqliteDurableStore
from tests.helpers import eventually


async def test_a_write_cancelled_while_waiting_for_the_lock_leaves_the_store_writable(
    tmp_path: Path,
):
    path = tmp_path / "memsvc.db"
    store = SqliteDurableStore(f"sqlite:///{path}")
    await store.open()
    try:
        await store.migrate()
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock

        # Told, on the store's connection thread, of each statement it starts.
        started: list[str] = []
        assert store._db is not None
        await store._db.set_trace_callback(started.append)

        async def write() -> None:
            async with store.transaction():
                pass

        async def begin_waits() -> bool:
            # Started, it cannot end while the other connection holds the lock: it
            # waits for it (busy_timeout: 5 s).
            return "BEGIN IMMEDIATE" in started

        waiting = asyncio.ensure_future(write())
        await eventually(begin_waits)
        assert not waiting.done()
        waiting.cancel()
        await asyncio.sleep(0.2)
        waiting.cancel()  # a second cancellation (a deadline, then the client) as well
        await asyncio.sleep(0.2)
        other.execute("COMMIT")  # the lock is free: the abandoned BEGIN now succeeds
        other.close()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        async with asyncio.timeout(20):
            async with store.transaction():
                pass  # writable: no stray transaction was left open
    finally:
        await store.aclose()
