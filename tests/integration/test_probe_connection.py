"""The readiness probe asks PostgreSQL and Redis on connections of their own.

Calls that hold every connection of memsvc's pool (Spawns waiting for a purge's
project lock, say, or a burst of large Pauses) make a busy replica, not a backend
that is down: the probe still answers, so readiness does not turn the replica away.
"""

from __future__ import annotations

import asyncio

from memsvc.store.postgres import PostgresDurableStore
from memsvc.store.redis import RedisWorkingMemoryStore
from tests.conftest import DATABASE_URL, REDIS_URL, need


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


async def test_the_redis_probe_answers_while_busy_calls_hold_the_whole_pool():
    need(REDIS_URL)
    store = RedisWorkingMemoryStore(
        REDIS_URL,
        max_session_keys=10,
        max_session_bytes=1000,
        max_connections=1,
        socket_timeout_seconds=1,
    )
    await store.open()
    try:
        await asyncio.wait_for(store.ping(), 10)
        pool = store._redis.connection_pool  # type: ignore[union-attr]
        busy = await pool.get_connection()  # the pool's only connection, busy
        try:
            await asyncio.wait_for(store.ping(), 10)
            await asyncio.wait_for(store.ping(), 10)
        finally:
            await pool.release(busy)
    finally:
        await store.aclose()
