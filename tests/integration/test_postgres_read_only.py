"""A PostgreSQL that answers but cannot take writes (a standby, or the old primary,
behind the address after a failover; or default_transaction_read_only on) is a
backend that is not available: writes fail UNAVAILABLE, which clients retry, and
readiness is NOT_SERVING, saying why. Once it takes writes again, so does memsvc.

A review found readiness SERVING (its probe ran only ``SELECT 1``) while every
write failed with INTERNAL (psycopg's ReadOnlySqlTransaction, SQLSTATE 25006, was
not taken for a condition of the backend).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memsvc.server import Server
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.conftest import DATABASE_URL
from tests.helpers import eventually, expect_error, local_server_config
from tests.integration.test_postgres_pool_after_loss import close_every_connection_to

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def set_read_only(database_url: str, read_only: bool) -> None:
    """Make the database's new sessions start read-only (or not): what a standby
    behind its address looks like to memsvc."""
    database = urlsplit(database_url).path.lstrip("/")
    change = "SET default_transaction_read_only = on" if read_only else "RESET ALL"
    with psycopg.connect(DATABASE_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{database}" {change}')


def spawn_request() -> lc.SpawnRequest:
    return lc.SpawnRequest(
        project_id=str(uuid.uuid4()), agent_instance_id=str(uuid.uuid4()), session_id="s"
    )


async def readiness(probe: grpc.aio.Channel) -> Any:
    reply = await health_pb2_grpc.HealthStub(probe).Check(
        health_pb2.HealthCheckRequest(service="readiness")
    )
    return reply.status


async def test_a_read_only_database_is_unavailable_and_not_ready_until_it_takes_writes(
    tmp_path: Path, fresh_postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="memsvc.server")
    config = local_server_config(
        tmp_path,
        fresh_postgres_url,
        working_memory_url="memory://",
        health_interval_seconds=0.2,
        health_listen="127.0.0.1:0",
    )
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as probe,
    ):
        life = LifecycleServiceStub(channel)
        await life.Spawn(spawn_request())
        try:
            set_read_only(fresh_postgres_url, True)
            close_every_connection_to(fresh_postgres_url)  # a failover cuts them

            async def refused_as_read_only() -> bool:
                # INTERNAL (the defect) fails here at once; UNAVAILABLE for a
                # connection cut by the failover comes first, and is polled past.
                error = await expect_error(
                    life.Spawn(spawn_request(), timeout=10), grpc.StatusCode.UNAVAILABLE
                )
                assert error.reason == "ERROR_REASON_BACKEND_UNAVAILABLE"
                return "read-only" in error.message

            await eventually(refused_as_read_only)

            async def not_ready_saying_why() -> bool:
                said = any(
                    "NOT_SERVING" in record.getMessage() and "read-only" in record.getMessage()
                    for record in caplog.records
                )
                return said and await readiness(probe) == NOT_SERVING

            await eventually(not_ready_saying_why)
        finally:
            set_read_only(fresh_postgres_url, False)

        async def ready() -> bool:
            return bool(await readiness(probe) == SERVING)

        await eventually(ready)
        # Ready again means writes succeed at once, on every connection of the pool:
        # none made while the database was read-only is left to fail one of its own.
        pool = config.database_max_connections
        await asyncio.gather(*(life.Spawn(spawn_request(), timeout=10) for _ in range(pool)))
