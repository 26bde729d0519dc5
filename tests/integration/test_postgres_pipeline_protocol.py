"""memsvc's PostgreSQL transactions end their pipeline with a Sync alone.

psycopg followed the Sync with a Flush, which PgBouncer in transaction mode took
for a new transaction after handing the server connection back: it linked a
server connection to memsvc's idle client, which nothing answered (a review of
the pooler deployment; tests/pooler has the end-to-end race). Here the messages
memsvc sends are read from libpq's protocol trace, where the Flush always shows.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from psycopg import pq

from memsvc.store.postgres import PostgresDurableStore
from tests.helpers import migrated
from tests.integration.test_postgres_pool_after_loss import insert_a_session


async def test_no_flush_follows_a_transactions_sync(fresh_postgres_url: str, tmp_path: Path):
    trace = tmp_path / "protocol.trace"
    async with migrated(PostgresDurableStore(fresh_postgres_url, max_connections=1)) as store:
        with trace.open("w") as sink:
            async with store._pooled() as conn:  # the pool's one connection
                conn.pgconn.trace(sink.fileno())
                conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
            for _ in range(20):
                await insert_a_session(store)
            async with store._pooled() as conn:
                conn.pgconn.untrace()
    sent = [
        fields[2].strip()
        for fields in (line.split("\t") for line in trace.read_text().splitlines())
        if fields[0] == "F"
    ]
    assert sent.count("Sync") >= 20, sent[:40]
    assert [b for a, b in itertools.pairwise(sent) if a == "Sync"].count("Flush") == 0
