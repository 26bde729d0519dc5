"""After PostgreSQL closes the pool's connections (a restart, a failover, an idle
reaper), one call fails, not one per pooled connection.

The pool hands out connections untested and a transaction is never retried (its
commit may have happened), so each connection that died would otherwise fail a
call of its own once the database is back. The first failure has the pool test
its idle connections. Found by a review: 4 of 6 writes failed after a restart
with a pool of 4.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import psycopg
import pytest

from memsvc.domain import BackendUnavailable, SessionRef
from memsvc.domain._lifecycle_records import SessionRecord, SessionState
from memsvc.domain._lifecycle_results import uuid7
from memsvc.store.postgres import PostgresDurableStore
from tests.conftest import DATABASE_URL

POOL_SIZE = 4


@pytest.fixture
async def store(fresh_postgres_url: str) -> AsyncIterator[PostgresDurableStore]:
    store = PostgresDurableStore(fresh_postgres_url, max_connections=POOL_SIZE)
    await store.open()
    await store.migrate()
    try:
        yield store
    finally:
        await store.aclose()


async def fill_the_pool(store: PostgresDurableStore) -> None:
    """Make the pool open all its connections (each held at once), left idle in it."""
    all_held = asyncio.Barrier(POOL_SIZE + 1)

    async def hold() -> None:
        async with store._connections.connection() as conn:
            await conn.execute("SELECT 1")
            await all_held.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(POOL_SIZE)]
    await all_held.wait()
    await asyncio.gather(*tasks)


def close_every_connection_to(database_url: str) -> None:
    """What a restart does to the pool: every backend of the database is ended."""
    database = urlsplit(database_url).path.lstrip("/")
    with psycopg.connect(DATABASE_URL, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        )
        for _ in range(100):
            left = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
            ).fetchone()
            if left and left[0] == 0:
                return
            time.sleep(0.05)
    raise AssertionError(f"backends of {database} still connected")


async def test_one_call_fails_after_the_pools_connections_are_closed(
    store: PostgresDurableStore, fresh_postgres_url: str
) -> None:
    await fill_the_pool(store)
    assert store._connections.get_stats()["pool_available"] == POOL_SIZE
    close_every_connection_to(fresh_postgres_url)
    failed = 0
    for _ in range(POOL_SIZE + 2):
        ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
        now = int(time.time() * 1000)
        record = SessionRecord(ref, None, SessionState.ACTIVE, {}, 1, uuid7(), None, now, now)
        try:
            async with store.transaction() as tx:
                assert await tx.insert_session(record)
        except BackendUnavailable:
            failed += 1
            # The next calls come a moment later: by then the pool tested its
            # idle connections and replaced the dead ones.
            await asyncio.sleep(0.2)
            if store._pool_check is not None:
                await asyncio.wait_for(asyncio.shield(store._pool_check), 10)
    assert failed == 1, f"{failed} of {POOL_SIZE + 2} transactions failed"
