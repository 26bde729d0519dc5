"""PostgreSQL keeps the plans of the statements memsvc runs often, unless told not to."""

from __future__ import annotations

import uuid

import pytest

from memsvc.domain import SessionRef
from memsvc.store.postgres import PostgresDurableStore


async def prepared_after_locking(url: str, prepared_statements: bool) -> list[str]:
    """Lock one (absent) session row 6 times on a pool of one connection; the
    statements that connection has prepared then."""
    store = PostgresDurableStore(url, max_connections=1, prepared_statements=prepared_statements)
    await store.open()
    try:
        await store.migrate()
        ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
        for _ in range(6):
            async with store.transaction() as tx:
                assert await tx.lock_session(ref) is None
        async with store._connections.connection() as conn:
            cursor = await conn.execute(
                "SELECT statement FROM pg_prepared_statements", prepare=False
            )
            return [row[0] for row in await cursor.fetchall()]
    finally:
        await store.aclose()


@pytest.mark.parametrize("prepared_statements", [True, False], ids=["on", "off"])
async def test_statements_run_often_are_prepared_only_when_on(
    fresh_postgres_url: str, prepared_statements: bool
) -> None:
    statements = await prepared_after_locking(fresh_postgres_url, prepared_statements)
    locks = [s for s in statements if "FROM sessions" in s and "FOR UPDATE" in s]
    assert len(locks) == (1 if prepared_statements else 0), statements
