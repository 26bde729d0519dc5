"""The pooler tests really go through PgBouncer in transaction mode."""

from __future__ import annotations

import psycopg

from memsvc.server import Server
from memsvc.testing._pgbouncer import PrivatePgBouncer


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
