"""Schema migrations: applied once, in order, even by many processes at once."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from memsvc.store._migrations import MigrationError, load_migrations
from tests.helpers import durable_store_at

MEMSVC = str(Path(sys.executable).parent / "memsvc")
LATEST = {
    "sqlite": len(load_migrations("memsvc.store.sqlite")),
    "postgres": len(load_migrations("memsvc.store.postgres")),
}


def kind(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgres"


async def test_migrate_applies_everything_once(database_url):
    store = durable_store_at(database_url)
    await store.open()
    try:
        assert await store.schema_version() == 0
        assert await store.migrate() == list(range(1, LATEST[kind(database_url)] + 1))
        assert await store.migrate() == []
        assert await store.schema_version() == LATEST[kind(database_url)]
    finally:
        await store.aclose()


async def test_concurrent_migrators_apply_each_migration_exactly_once(database_url):
    """Eight stores (own connections each) migrating at once: each version applied once."""
    stores = [durable_store_at(database_url) for _ in range(8)]
    for store in stores:
        await store.open()
    try:
        results = await asyncio.gather(*(store.migrate() for store in stores))
    finally:
        for store in stores:
            await store.aclose()
    applied = sorted(v for result in results for v in result)
    assert applied == list(range(1, LATEST[kind(database_url)] + 1))
    assert installation_rows(database_url) == 1


def installation_rows(url: str) -> int:
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite://")) as conn:
            return int(conn.execute("SELECT count(*) FROM memsvc_installation").fetchone()[0])
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM memsvc_installation").fetchone()
        assert row is not None
        return int(row[0])


async def test_a_changed_migration_file_stops_the_server(database_url):
    store = durable_store_at(database_url)
    await store.open()
    try:
        await store.migrate()
        tamper = "UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1"
        if database_url.startswith("sqlite"):
            with sqlite3.connect(database_url.removeprefix("sqlite://")) as conn:
                conn.execute(tamper)
        else:
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(tamper)
        with pytest.raises(MigrationError, match="was changed after it was applied"):
            await store.migrate()
    finally:
        await store.aclose()


def run_memsvc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MEMSVC, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


async def test_memsvc_migrate_command(database_url):
    """`memsvc migrate` applies the migrations and exits 0; a rerun applies nothing."""
    first = await asyncio.to_thread(run_memsvc, "migrate", "--database-url", database_url)
    assert first.returncode == 0, first.stderr
    assert "applied migration 0001_installation" in first.stderr
    second = await asyncio.to_thread(
        run_memsvc, "migrate", env={"MEMSVC_DATABASE_URL": database_url}
    )
    assert second.returncode == 0, second.stderr
    assert "applied migration" not in second.stderr
    store = durable_store_at(database_url)
    await store.open()
    try:
        assert await store.schema_version() == LATEST[kind(database_url)]
    finally:
        await store.aclose()
