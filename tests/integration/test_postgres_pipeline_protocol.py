"""What memsvc's PostgreSQL connections send: transactions end their pipeline with
a Sync alone, and a new LISTEN connection checks that it hears notifications.

psycopg followed the Sync with a Flush, which PgBouncer in transaction mode took
for a new transaction after handing the server connection back: it linked a
server connection to memsvc's idle client, which nothing answered (a review of
the pooler deployment; tests/pooler has the end-to-end race). Here the messages
memsvc sends are read from libpq's protocol trace, where the Flush always shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from pathlib import Path

import pytest
from psycopg import pq

import memsvc.store.postgres._store as postgres_store
from memsvc.store.postgres import PostgresDurableStore
from memsvc.testing import create_postgres_database, drop_postgres_database
from tests.conftest import DATABASE_URL
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


async def test_a_listen_that_hears_nothing_is_said(
    fresh_postgres_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """Found by a review: an event LISTEN that could not hear memsvc's commits (its
    URL through a transaction pooler, or naming another database) went unnoticed,
    and watchers got events a poll interval late. A new LISTEN connection sends
    itself a notification through the pool, and says when it never comes."""
    monkeypatch.setattr(postgres_store, "LISTEN_CHECK_SECONDS", 0.5)
    other = create_postgres_database(DATABASE_URL)
    try:
        for listen_url, heard in ((None, True), (other, False)):
            caplog.clear()
            store = PostgresDurableStore(fresh_postgres_url, listen_url=listen_url)
            async with migrated(store), store.event_wakeups() as wakeups:
                assert await anext(wakeups) == 0
                # The check runs before the next wakeup; none is coming.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(anext(wakeups), 2)
            said = [r for r in caplog.records if "did not reach the event LISTEN" in r.message]
            assert bool(said) is not heard, (listen_url, said)
    finally:
        drop_postgres_database(DATABASE_URL, other)
