"""The event tail's commit notifications outlive their LISTEN connection: when
PostgreSQL drops it (a restart, a failover, an idle-connection reaper), the
store connects again, and the tail is told to read what it may have missed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from memsvc.store._lifecycle_sql import EVENT_CHANNEL
from memsvc.store.postgres import PostgresDurableStore
from memsvc.store.postgres import _store as postgres_store
from memsvc.testing._proxy import TcpProxy
from tests.helpers import migrated


@pytest.fixture
async def store(fresh_postgres_url: str) -> AsyncIterator[PostgresDurableStore]:
    async with migrated(PostgresDurableStore(fresh_postgres_url, max_connections=1)) as store:
        yield store


async def listeners(admin: psycopg.AsyncConnection[Any]) -> list[int]:
    cursor = await admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND query LIKE 'LISTEN%%'"
    )
    return [int(row[0]) for row in await cursor.fetchall()]


async def test_a_lost_listen_connection_is_made_again(
    store: PostgresDurableStore, fresh_postgres_url: str
) -> None:
    admin = await psycopg.AsyncConnection.connect(fresh_postgres_url, autocommit=True)
    async with admin:
        async with store.event_wakeups() as wakeups:
            assert await asyncio.wait_for(anext(wakeups), 10) == 0  # connected: read once
            await admin.execute("SELECT pg_notify(%s, '7')", (EVENT_CHANNEL,))
            assert await asyncio.wait_for(anext(wakeups), 10) == 7
            [pid] = await listeners(admin)
            await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            # Connected again: a 0 has the tail read what it may have missed...
            assert await asyncio.wait_for(anext(wakeups), 10) == 0
            assert len(await listeners(admin)) == 1
            assert pid not in await listeners(admin)
            # ...and notifications arrive again.
            await admin.execute("SELECT pg_notify(%s, '8')", (EVENT_CHANNEL,))
            assert await asyncio.wait_for(anext(wakeups), 10) == 8
        # Released with the tail.
        for _ in range(200):
            if not await listeners(admin):
                break
            await asyncio.sleep(0.05)
        assert await listeners(admin) == []


async def test_a_silent_listen_connection_is_made_again(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: a LISTEN connection that went half-open (a failover behind
    the same address, a NAT dropping it) never raises, so wake-ups stopped for good.
    A quiet connection is now asked a question and made again when it does not answer."""
    monkeypatch.setattr(postgres_store, "_LISTEN_QUIET_SECONDS", (0.5, 0.5))
    database = urlsplit(fresh_postgres_url)
    proxy = TcpProxy(database.port or 5432)
    proxy.start()
    through_proxy = fresh_postgres_url.replace(f":{database.port}/", f":{proxy.port}/")
    store = PostgresDurableStore(fresh_postgres_url, max_connections=1, listen_url=through_proxy)
    await store.open()
    await store.migrate()
    admin = await psycopg.AsyncConnection.connect(fresh_postgres_url, autocommit=True)
    try:
        async with admin, store.event_wakeups() as wakeups:
            assert await asyncio.wait_for(anext(wakeups), 10) == 0
            proxy.hold()  # the connection stays open and says nothing, new ones pass
            await admin.execute("SELECT pg_notify(%s, '7')", (EVENT_CHANNEL,))
            # Connected again (a 0: read what may have been missed), notified again.
            assert await asyncio.wait_for(anext(wakeups), 10) == 0
            await admin.execute("SELECT pg_notify(%s, '8')", (EVENT_CHANNEL,))
            assert await asyncio.wait_for(anext(wakeups), 10) == 8
    finally:
        proxy.release()
        await store.aclose()
        proxy.close()
