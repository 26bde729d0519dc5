"""After PostgreSQL closes the pool's connections (a restart, a failover, an idle
reaper), one call fails, not one per pooled connection.

The pool hands out connections untested and a transaction is never retried (its
commit may have happened), so each connection that died would otherwise fail a
call of its own once the database is back. After the first failure the pool tests
each connection before handing it out, for a while. Found by a review: 4 of 6
writes failed after a restart with a pool of 4.

Nor does a call cancelled while its connection goes back to the pool lose one:
psycopg_pool's ``connection()`` awaits the return in the caller, under the pool's
lock, and a call cancelled there (its client's deadline, while other calls held
the lock) dropped the connection the pool still counted as out. Found by a review:
about one slot in a thousand such calls, until no call got a connection and the
replica answered every database call UNAVAILABLE while its probe said ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from memsvc.domain import BackendUnavailable, SessionRef
from memsvc.domain._lifecycle_records import SessionRecord, SessionState
from memsvc.domain._lifecycle_results import uuid7
from memsvc.store.postgres import PostgresDurableStore
from memsvc.testing._proxy import TcpProxy
from tests.conftest import DATABASE_URL
from tests.helpers import migrated

POOL_SIZE = 4


@pytest.fixture
async def store(fresh_postgres_url: str) -> AsyncIterator[PostgresDurableStore]:
    async with migrated(
        PostgresDurableStore(fresh_postgres_url, max_connections=POOL_SIZE)
    ) as store:
        yield store


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


async def insert_a_session(store: PostgresDurableStore) -> SessionRef:
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    now = int(time.time() * 1000)
    record = SessionRecord(ref, None, SessionState.ACTIVE, {}, 1, uuid7(), None, now, now)
    async with store.transaction() as tx:
        assert await tx.insert_session(record)
    return ref


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
        try:
            await insert_a_session(store)
        except BackendUnavailable:
            failed += 1
    assert failed == 1, f"{failed} of {POOL_SIZE + 2} transactions failed"


async def test_a_pooled_connection_that_went_silent_is_replaced(fresh_postgres_url: str) -> None:
    """Connections that stay open and answer nothing (half-open) fail their test in
    a bounded time and are replaced: a call may time out meanwhile, but the pool
    recovers (a review found a version of this check that starved it for good)."""
    port = urlsplit(fresh_postgres_url).port or 5432
    with TcpProxy(port) as proxy:
        through = fresh_postgres_url.replace(f":{port}/", f":{proxy.port}/")
        store = PostgresDurableStore(through, max_connections=POOL_SIZE, connect_timeout_seconds=1)
        async with migrated(store):
            try:
                await fill_the_pool(store)
                proxy.hold()  # the open connections go silent; new ones pass
                store._suspect_connections(psycopg.OperationalError("server closed the connection"))
                outcomes = []
                for _ in range(8):
                    try:
                        async with asyncio.timeout(10):
                            await insert_a_session(store)
                        outcomes.append("ok")
                    except BackendUnavailable:
                        outcomes.append("unavailable")
                assert outcomes[-3:] == ["ok"] * 3, outcomes
            finally:
                proxy.release()  # before the store closes its connections


async def test_a_probe_whose_connection_was_closed_asks_again_on_a_new_one(
    store: PostgresDurableStore, fresh_postgres_url: str
) -> None:
    """Found by a review: the probe reported the database unready, for a whole
    health interval, when only its own connection had been closed (a restart that
    was over, a reaper) and the database answered."""
    await store.ping()
    close_every_connection_to(fresh_postgres_url)
    await store.ping()  # raised BackendUnavailable before


async def test_after_a_probe_meets_a_loss_no_call_fails_for_a_dead_pooled_connection(
    store: PostgresDurableStore, fresh_postgres_url: str
) -> None:
    """Found by a review: health was SERVING again, and the next write still failed
    on a pooled connection that died with the restart the probe had seen."""
    await fill_the_pool(store)
    await store.ping()
    close_every_connection_to(fresh_postgres_url)
    await store.ping()
    for _ in range(POOL_SIZE + 2):
        await insert_a_session(store)


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
