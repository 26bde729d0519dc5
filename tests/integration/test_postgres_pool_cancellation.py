"""A call cancelled while its PostgreSQL connection goes back to the pool loses no
connection.

psycopg_pool's ``connection()`` awaits the return in the caller, under the pool's
lock: a call cancelled there (its client's deadline, while other calls held the
lock) dropped the connection the pool still counted as out. Found by a review:
about one slot in a thousand such calls, until no call got a connection and the
replica answered every database call UNAVAILABLE while its probe said ready.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from memsvc.domain import BackendUnavailable
from memsvc.store.postgres import PostgresDurableStore
from tests.helpers import migrated
from tests.integration.test_postgres_pool_after_loss import fill_the_pool, insert_a_session

POOL_SIZE = 4


@pytest.fixture
async def store(fresh_postgres_url: str) -> AsyncIterator[PostgresDurableStore]:
    async with migrated(
        PostgresDurableStore(fresh_postgres_url, max_connections=POOL_SIZE)
    ) as store:
        yield store


async def test_a_call_cancelled_while_its_connection_goes_back_keeps_the_pool_whole(
    store: PostgresDurableStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = store._connections
    returning, go_on = asyncio.Event(), asyncio.Event()
    give_back = pool.putconn

    async def held_up(conn: Any) -> None:
        # Stands for the pool's lock, held by other calls' requests.
        returning.set()
        await go_on.wait()
        await give_back(conn)

    monkeypatch.setattr(pool, "putconn", held_up)
    call = asyncio.create_task(insert_a_session(store))
    await asyncio.wait_for(returning.wait(), 10)
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call
    go_on.set()
    monkeypatch.undo()
    # Every connection of the pool can be had at once (before: one slot was lost,
    # and this waited for it until PoolTimeout).
    async with asyncio.timeout(20):
        await fill_the_pool(store)
    assert pool.get_stats()["pool_available"] == POOL_SIZE


async def test_a_connection_out_of_step_with_its_prepared_statements_is_replaced(
    fresh_postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a review: a pipeline cut short by a cancellation can leave psycopg
    believing a statement is prepared that the server never kept; the next call
    on that connection failed with "prepared statement does not exist", which
    reached the client as INTERNAL. It is a transient failure now, and the
    connection is closed, so the next call gets a sound one."""
    async with migrated(PostgresDurableStore(fresh_postgres_url, max_connections=1)) as store:
        for _ in range(8):  # prepared from the fifth use on
            await insert_a_session(store)
        async with store._pooled() as conn:
            # Behind psycopg's back, as the cut-short pipeline leaves it.
            conn.pgconn.exec_(b"DEALLOCATE ALL")
        with pytest.raises(BackendUnavailable, match="does not exist"):
            await insert_a_session(store)
        await insert_a_session(store)
    # What it most likely means, said once (a transaction pooler mixes clients'
    # statements, and can run one client's in place of another's).
    said = [r for r in caplog.records if "--no-database-prepared-statements" in r.message]
    assert len(said) == 1 and said[0].levelname == "ERROR"
