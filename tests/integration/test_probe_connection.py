"""The readiness probe asks PostgreSQL on a connection of its own.

Calls that hold every connection of memsvc's pool (Spawns waiting for a purge's
project lock, say) make a busy replica, not a database that is down: the probe
still answers, so readiness does not turn the replica away.
"""

from __future__ import annotations

import asyncio

from memsvc.store.postgres import PostgresDurableStore
from tests.conftest import DATABASE_URL, need


async def test_the_probe_answers_while_busy_calls_hold_the_whole_pool():
    need(DATABASE_URL)
    store = PostgresDurableStore(DATABASE_URL, max_connections=1, connect_timeout_seconds=1)
    await store.open()
    try:
        await asyncio.wait_for(store.ping(), 10)
        async with store._connections.connection():  # the pool's only connection, busy
            await asyncio.wait_for(store.ping(), 10)
            await asyncio.wait_for(store.ping(), 10)  # the same probe connection again
    finally:
        await store.aclose()
