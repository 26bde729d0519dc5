"""memsvc's PostgreSQL transactions end their pipeline with a Sync alone.

psycopg followed the Sync with a Flush, which PgBouncer in transaction mode took
for a new transaction after handing the server connection back: it linked a
server connection to memsvc's idle client, which nothing answered (a review of
the pooler deployment; tests/pooler has the end-to-end race). Here the messages
memsvc sends are read from libpq's protocol trace, where the Flush always shows.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import uuid
from pathlib import Path

from psycopg import pq

from memsvc.domain import EventRecord, EventType
from memsvc.domain._lifecycle_records import CheckpointRecord
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


async def test_a_transaction_with_a_statement_of_15_mb_ends(fresh_postgres_url: str):
    """Found by a review: ending with the Sync alone, the pipeline no longer sent
    what libpq still held of a large statement (one write does not take 15 MB), so
    a Pause or CreateCheckpoint of a session near max_session_bytes (16 MiB) waited
    for an answer PostgreSQL never had the whole request for, until its deadline."""
    contents = os.urandom(15 << 20)  # incompressible: 15 MB on the wire
    async with migrated(PostgresDurableStore(fresh_postgres_url, max_connections=1)) as store:
        ref = await insert_a_session(store)
        async with store._pooled() as conn:  # the pool's one connection
            # A small send buffer: every write of libpq takes a small part (on a
            # busy machine the kernel's own took a part of 15 MB too).
            sock = socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
            sock.close()  # a duplicate: the connection's own stays open

        async def write(checkpoint: CheckpointRecord) -> None:
            async with store.transaction() as tx:
                await tx.insert_checkpoint(checkpoint, contents, 0)
                # The checkpoint travels with the event's statement, as in a Pause.
                await tx.append_event(
                    EventRecord(str(uuid.uuid4()), EventType.CHECKPOINT_CREATED, ref, None, 0)
                )

        for _ in range(3):  # a hang showed in most attempts, not all
            checkpoint = CheckpointRecord(ref, f"big-{uuid.uuid4()}", 0, 15, len(contents))
            # A bound on a hang, not a measure: it takes well under a second.
            await asyncio.wait_for(write(checkpoint), 60)
            found = await store.read_checkpoint(ref, checkpoint.checkpoint_id)
            assert found is not None and found[1] == contents
