"""PostgreSQL keeps the plans of the statements memsvc runs often, unless told not to."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from memsvc.config import Config
from memsvc.domain import SessionRef
from memsvc.server import Server
from memsvc.store.postgres import PostgresDurableStore
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.helpers import expect_error


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


async def test_a_newer_schema_changing_a_returned_type_costs_no_internal_error(
    fresh_postgres_url: str, tmp_path: Path, scope: dict[str, str]
) -> None:
    """A newer memsvc's migration may change the type of a column this process's
    prepared statements return; PostgreSQL then refuses them ("cached plan must
    not change result type", as 0011 did to older replicas in a rolling update).
    Reads go on (retried on new connections); a transaction is UNAVAILABLE at
    most once, its retry with the request id succeeds; nothing is INTERNAL."""
    config = Config(
        listen="127.0.0.1:0", data_dir=str(tmp_path), health_listen="", metrics_listen="",
        database_url=fresh_postgres_url, database_max_connections=1,
    )  # fmt: skip
    ids: dict[str, Any] = scope
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        lifecycle = LifecycleServiceStub(channel)

        async def prepare_then_change(column_type: str) -> None:
            """Each statement run 5 times on the pool's one connection is prepared;
            then the column those statements return changes type."""
            for _ in range(6):
                await lifecycle.GetSession(lc.GetSessionRequest(**ids))
                await lifecycle.Pause(lc.PauseRequest(**ids))
                await lifecycle.Resume(lc.ResumeRequest(**ids))
            async with await psycopg.AsyncConnection.connect(
                fresh_postgres_url, autocommit=True
            ) as admin:
                await admin.execute(
                    f"ALTER TABLE sessions ALTER COLUMN memory_epoch TYPE {column_type}"
                )

        await lifecycle.Spawn(lc.SpawnRequest(**ids))
        # A transaction first: UNAVAILABLE once (nothing written), its retry succeeds.
        await prepare_then_change("varchar(200)")
        pause = lc.PauseRequest(**ids, request_id=str(uuid.uuid4()))
        refused = await expect_error(lifecycle.Pause(pause), grpc.StatusCode.UNAVAILABLE)
        assert refused.reason == "ERROR_REASON_BACKEND_UNAVAILABLE"
        paused = await lifecycle.Pause(pause)
        assert paused.session.state == lc.SESSION_STATE_PAUSED
        resumed = await lifecycle.Resume(lc.ResumeRequest(**ids))
        assert resumed.session.state == lc.SESSION_STATE_ACTIVE
        # A read first: retried on a new connection, it answers.
        await prepare_then_change("text")
        read = await lifecycle.GetSession(lc.GetSessionRequest(**ids))
        assert read.session.state == lc.SESSION_STATE_ACTIVE
        await lifecycle.Pause(lc.PauseRequest(**ids))  # and the connections are new
