"""A read that runs out of time says on what: a pool with no free connection
(too small for the load, or not connected) or a database slow to answer."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from memsvc.domain import BackendUnavailable
from memsvc.domain._call_deadline import call_deadline
from memsvc.store.postgres import PostgresDurableStore
from tests.conftest import DATABASE_URL, need


async def test_a_read_out_of_time_names_what_it_waited_for(caplog):
    need(DATABASE_URL)
    store = PostgresDurableStore(DATABASE_URL, max_connections=1, connect_timeout_seconds=5)
    await store.open()
    caplog.set_level(logging.WARNING, logger="memsvc.store.postgres._store")

    async def quick_read(conn: Any, dialect: Any) -> None:
        await conn.execute("SELECT 1")

    async def slow_read(conn: Any, dialect: Any) -> None:
        await conn.execute("SELECT pg_sleep(2)")

    try:
        await store._query(quick_read)  # connected
        async with store._connections.connection():  # the pool's only connection, busy
            with call_deadline(0.3), pytest.raises(BackendUnavailable):
                await store._query(quick_read)
        waited = [r.getMessage() for r in caplog.records if "ran out of time" in r.getMessage()]
        assert len(waited) == 1, waited
        assert waited[0].startswith("quick_read ran out of time waiting for a connection")
        assert "'pool_size': 1" in waited[0] and "'requests_waiting'" in waited[0]

        caplog.clear()
        with call_deadline(0.3), pytest.raises(BackendUnavailable):
            await store._query(slow_read)
        waited = [r.getMessage() for r in caplog.records if "ran out of time" in r.getMessage()]
        assert waited and waited[0].startswith("slow_read ran out of time waiting for the answer")
    finally:
        await store.aclose()
