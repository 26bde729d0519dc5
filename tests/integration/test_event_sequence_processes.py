"""The event sequence is gap-free and unique with writers in several processes."""

from __future__ import annotations

import asyncio
import sys
import textwrap

import psycopg

from memsvc.store.postgres import PostgresDurableStore

WRITER = textwrap.dedent(
    """
    import asyncio, sys, uuid
    from memsvc.domain import SessionRef
    from memsvc.domain._lifecycle_records import EventRecord, EventType
    from memsvc.store.postgres import PostgresDurableStore

    async def main(url: str, count: int) -> None:
        store = PostgresDurableStore(url)
        await store.open()
        ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "writer")
        try:
            for _ in range(count):
                async with store.transaction() as tx:
                    await tx.append_event(
                        EventRecord(str(uuid.uuid4()), EventType.SPAWNED, ref, None, 0)
                    )
        finally:
            await store.aclose()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def test_two_processes_appending_at_once_leave_no_gap(fresh_postgres_url):
    store = PostgresDurableStore(fresh_postgres_url)
    await store.open()
    await store.migrate()
    await store.aclose()
    writers = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, fresh_postgres_url, "60")
        for _ in range(3)
    ]
    codes = await asyncio.gather(*(w.wait() for w in writers))
    assert codes == [0, 0, 0]
    with psycopg.connect(fresh_postgres_url) as conn:
        rows = conn.execute("SELECT sequence FROM lifecycle_events ORDER BY sequence").fetchall()
    assert [r[0] for r in rows] == list(range(1, 181))
