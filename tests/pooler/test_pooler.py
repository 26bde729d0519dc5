"""The pooler tests really go through PgBouncer in transaction mode."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import psycopg

from memsvc.server import Server
from memsvc.store.postgres import PostgresDurableStore
from memsvc.testing import free_port
from memsvc.testing._pgbouncer import PrivatePgBouncer
from tests.helpers import migrated
from tests.integration.test_postgres_pool_after_loss import insert_a_session


async def test_memsvc_reaches_postgresql_through_the_pooler(
    server: Server, pgbouncer: PrivatePgBouncer
):
    assert f"127.0.0.1:{pgbouncer.port}/" in server.config.database_url
    assert server.config.database_listen_url.startswith("postgresql://")
    # The pooler's admin console lists memsvc's database among its pools.
    console = f"postgresql://pgbouncer@127.0.0.1:{pgbouncer.port}/pgbouncer"
    async with await psycopg.AsyncConnection.connect(console, autocommit=True) as admin:
        rows = await (await admin.execute("SHOW POOLS")).fetchall()
    database = server.config.database_url.rsplit("/", 1)[1]
    pools = {(row[0], row[-1]) for row in rows}
    assert any(name == database for name, _ in pools), rows
    assert any(name == database and mode == "transaction" for name, mode in pools), rows


async def test_a_pipeline_leaves_no_server_connection_linked_to_its_client(
    fresh_postgres_url: str,
):
    """Found by a review: psycopg ended a pipeline with a Flush after its Sync;
    PgBouncer, having handed the server connection back at the Sync's answer, took
    the Flush for a new transaction and linked a server connection to memsvc's
    idle client, which PostgreSQL never answered: with a pool of one, every other
    client waited (for minutes). memsvc ends pipelines with the Sync alone."""
    workdir = Path(tempfile.mkdtemp(prefix="memsvc-pgbouncer-one-"))
    bouncer = PrivatePgBouncer(free_port(), workdir, pool_size=1)
    bouncer.start()
    try:
        pooled = bouncer.url(fresh_postgres_url.rsplit("/", 1)[1])
        store = PostgresDurableStore(pooled, max_connections=1, prepared_statements=False)
        async with migrated(store):
            other = await psycopg.AsyncConnection.connect(pooled, autocommit=True)
            stop = asyncio.Event()

            async def busy_loop() -> None:
                # Other work on the event loop widens the window the race needs.
                while not stop.is_set():
                    until = time.perf_counter() + 0.0005
                    while time.perf_counter() < until:
                        pass
                    await asyncio.sleep(0)

            busy = asyncio.create_task(busy_loop())
            try:
                for _ in range(600):
                    await insert_a_session(store)
                    # The pool's one server connection must be free for another client.
                    await asyncio.wait_for(other.execute("SELECT 1"), 5)
            finally:
                stop.set()
                await busy
                await other.close()
    finally:
        bouncer.stop()
        shutil.rmtree(workdir, ignore_errors=True)
