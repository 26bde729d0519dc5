"""Schema migrations: applied once, in order, even by many processes at once."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from memsvc.config import StartupError
from memsvc.domain import BackendUnavailable
from memsvc.server import Server
from memsvc.store._migrations import MigrationError, load_migrations
from memsvc.store.postgres import PostgresDurableStore
from memsvc.store.postgres import _store as _postgres_store
from memsvc.store.postgres._store import MIGRATION_LOCK_KEY, MIGRATION_LOCK_WAIT_SECONDS
from tests.helpers import durable_store_at, eventually, waiting_for_locks

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


async def test_a_migration_waits_as_long_as_another_replica_migrates(fresh_postgres_url):
    """The connect timeout bounds reaching the database, not the migrations: a
    replica that waits for another's (here the migration lock, held past three
    connect timeouts) applies them once it may, instead of giving up."""
    store = PostgresDurableStore(fresh_postgres_url, connect_timeout_seconds=0.2)
    await store.open()
    try:
        async with await psycopg.AsyncConnection.connect(fresh_postgres_url) as other:
            await other.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            migrating = asyncio.ensure_future(store.migrate())
            await asyncio.sleep(1.5)  # 2.5x the retry budget
            assert not migrating.done()
            await other.rollback()
        assert await asyncio.wait_for(migrating, 30) == list(range(1, LATEST["postgres"] + 1))
    finally:
        await store.aclose()


EVERY = load_migrations("memsvc.store.postgres")
# A migration that ALTERs tables (sessions and checkpoints): its locks conflict with
# every reader's, which the lock-wait tests below need (a CREATE INDEX's do not).
ALTERING = next(m for m in EVERY if m.version == 12)
# What a migration from before ALTERING applies.
FROM_ALTERING = [m.version for m in EVERY if m.version >= ALTERING.version]


@pytest.fixture
async def one_migration_behind(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[PostgresDurableStore]:
    """A store over a database as the release before ALTERING left it, whose
    migration tries again quickly after it lets go of its locks."""
    monkeypatch.setattr(_postgres_store, "MIGRATION_RETRY_SECONDS", (0.2, 0.2))
    store = PostgresDurableStore(fresh_postgres_url)
    await store.open()
    try:
        with monkeypatch.context() as older:
            older.setattr(
                _postgres_store,
                "load_migrations",
                lambda package: [m for m in EVERY if m.version < ALTERING.version],
            )
            await store.migrate()
        yield store
    finally:
        await store.aclose()


async def test_a_migration_that_waits_for_its_table_lets_other_queries_through(
    one_migration_behind, fresh_postgres_url, caplog
):
    """A migration's ALTER TABLE queues for its lock behind a long transaction on the
    table (a backup, a report), and PostgreSQL queues every later query on the table
    behind the ALTER: every replica's calls on it stalled for as long as the
    transaction lasted (a review). The migration now gives up its place after
    MIGRATION_LOCK_WAIT_SECONDS and tries again later, naming the transaction, and
    applies once the table is free."""
    table = "sessions"  # ALTERING's
    assert f"TABLE {table}" in ALTERING.sql
    async with (
        await psycopg.AsyncConnection.connect(fresh_postgres_url) as report,
        await psycopg.AsyncConnection.connect(fresh_postgres_url) as replica,
    ):
        await report.execute(f"SELECT count(*) FROM {table}")  # its transaction stays open
        migrating = asyncio.ensure_future(one_migration_behind.migrate())

        async def let_go() -> bool:  # its first try gave up
            return "let go" in caplog.text

        await eventually(let_go, timeout=30)
        assert "SELECT count(*) FROM sessions" in caplog.text  # the blocker is named
        assert f"not granted within {MIGRATION_LOCK_WAIT_SECONDS:g} s" in caplog.text
        # Another replica's query on the table runs while the migration keeps
        # trying: it waits at most one try's lock wait, far from this bound.
        await replica.execute("SET statement_timeout = '20s'")
        for _ in range(5):
            await replica.execute(f"SELECT count(*) FROM {table}")
            await replica.commit()
        assert not migrating.done()
        await report.rollback()
        assert await asyncio.wait_for(migrating, 30) == FROM_ALTERING


async def test_a_migration_caught_in_a_deadlock_tries_again(
    one_migration_behind, fresh_postgres_url, caplog
):
    """A transaction that read the checkpoints, then reads the sessions that the
    migration ALTERING holds while it waits for the checkpoints: PostgreSQL ends one of
    the two as a deadlock (the migration, whose wait began first). It tries again
    rather than stop the start (a review), and the other transaction commits."""
    assert "TABLE sessions" in ALTERING.sql and "TABLE checkpoints" in ALTERING.sql
    async with await psycopg.AsyncConnection.connect(fresh_postgres_url) as other:
        await other.execute("SELECT 1 FROM checkpoints LIMIT 1")
        migrating = asyncio.ensure_future(one_migration_behind.migrate())

        async def migration_waits() -> bool:  # holds the sessions, waits for the checkpoints
            return await waiting_for_locks(fresh_postgres_url) > 0

        await eventually(migration_waits, timeout=30)
        await other.execute("SELECT 1 FROM sessions LIMIT 1")
        await other.commit()
    assert await asyncio.wait_for(migrating, 30) == FROM_ALTERING
    # The warning says why: not a lock wait that ran out (the deadlock came first).
    assert "PostgreSQL found it in a deadlock" in caplog.text


async def test_without_migrations_a_database_behind_the_code_stops_the_start(
    local_config, database_url
):
    """--no-migrate (a migration Job runs them instead): had that Job not run,
    memsvc would report ready and fail every call; it refuses to start instead."""
    unmigrated = dataclasses.replace(local_config, migrate=False)
    with pytest.raises(StartupError, match=r"schema is at version 0.*run `memsvc migrate`"):
        async with Server(unmigrated):
            pass
    store = durable_store_at(database_url)
    await store.open()
    try:
        await store.migrate()
    finally:
        await store.aclose()
    async with Server(unmigrated) as server:
        assert server.port


@pytest.mark.parametrize("locale", [None, "C"], ids=["default locale", "C locale"])
async def test_migration_0009_indexes_episodes_as_words_whoever_inserts_them(locale, monkeypatch):
    """PostgreSQL: episodes recorded before 0009, and those a memsvc that predates
    it records afterwards (a rolling upgrade), are indexed as the words memsvc
    now writes itself, under a C locale too (whose classes know only ASCII)."""
    import memsvc.store.postgres._store as postgres_store
    from memsvc.domain._episodes import EpisodeScope
    from memsvc.testing._backends import create_postgres_database, drop_postgres_database
    from tests.conftest import DATABASE_URL, need
    from tests.helpers import sql_rows

    need(DATABASE_URL)
    url = create_postgres_database(DATABASE_URL, locale=locale)
    project = str(uuid.uuid4())

    async def insert_as_before(episode_id: str, description: str, summary: str) -> None:
        await sql_rows(
            url,
            "INSERT INTO episodes (episode_id, project_id, agent_instance_id, session_id,"
            " task_type, task_description, outcome, outcome_details, actions, context_summary,"
            " lessons_learned, duration_seconds, tokens_used, importance, metadata, create_time)"
            " VALUES (?, ?, ?, 's', 't', ?, 1, '', '[]', ?, '[\"measure pauses first\"]', 0, 0,"
            " 0.5, '{}', '2026-11-01T00:00:00.000Z')",
            episode_id, project, str(uuid.uuid4()), description, summary,
        )  # fmt: skip

    try:
        monkeypatch.setattr(
            postgres_store, "load_migrations", lambda package: load_migrations(package)[:8]
        )
        store = PostgresDurableStore(url)
        await store.open()
        try:
            await store.migrate()
        finally:
            await store.aclose()
        monkeypatch.undo()
        before, after = str(uuid.uuid4()), str(uuid.uuid4())
        await insert_as_before(before, "Tune the collector of gc.py", "naïve 東京 notes")
        store = PostgresDurableStore(url)
        await store.open()
        try:
            assert await store.migrate() == list(range(9, LATEST["postgres"] + 1))
            await insert_as_before(after, "Deploy api.example.com", "the rollout")
            for terms, found in (
                (["gc"], [before]), (["gc py"], [before]), (["pauses"], [before, after]),
                (["東京"], [before]), (["the"], [before, after]), (["api"], [after]),
                (["example com"], [after]),
            ):  # fmt: skip
                hits, _ = await store.search_episodes(
                    EpisodeScope(project), terms, None, 10, False, 1 << 20
                )
                assert sorted(h.episode.episode_id for h in hits) == sorted(found), terms
        finally:
            await store.aclose()
    finally:
        drop_postgres_database(DATABASE_URL, url)


@pytest.mark.parametrize("locale", [None, "C"], ids=["default locale", "C locale"])
async def test_migrate_warns_when_search_would_match_letters_by_their_case(locale, caplog):
    """Found by a review: under LC_CTYPE C, PostgreSQL's text search lowercases ASCII
    only ("Über" is not found by "über"); memsvc says so where the schema is made."""
    from memsvc.testing._backends import create_postgres_database, drop_postgres_database
    from tests.conftest import DATABASE_URL, need

    need(DATABASE_URL)
    url = create_postgres_database(DATABASE_URL, locale=locale)
    try:
        store = PostgresDurableStore(url)
        await store.open()
        try:
            with caplog.at_level("WARNING", logger="memsvc.store.postgres._store"):
                await store.migrate()
        finally:
            await store.aclose()
    finally:
        drop_postgres_database(DATABASE_URL, url)
    warned = [r.getMessage() for r in caplog.records if "lowercases ASCII only" in r.getMessage()]
    if locale == "C":
        assert len(warned) == 1 and "LC_CTYPE (C)" in warned[0], warned
    else:
        assert warned == []


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


async def test_episodes_recorded_before_the_search_migration_are_searchable_after(
    database_url, monkeypatch
):
    """Migration 0003 indexes (and, on SQLite, moves) the episodes already stored;
    0009 indexes them again as memsvc's words ("gc" of "gc.py", "the"; "x" of "x²",
    where SQLite's own tokenizer saw one word)."""
    import memsvc.store.postgres._store as postgres_store
    import memsvc.store.sqlite._store as sqlite_store
    from memsvc.domain._episodes import EpisodeScope
    from tests.helpers import sql_rows

    for module in (postgres_store, sqlite_store):
        monkeypatch.setattr(module, "load_migrations", lambda package: load_migrations(package)[:2])
    store = durable_store_at(database_url)
    await store.open()
    try:
        assert await store.migrate() == [1, 2]
    finally:
        await store.aclose()
    project, agent = "0f8fad5b-d9cb-469f-a165-70867728950e", "7c9e6679-7425-40de-944b-e07fc1f90ae7"
    await sql_rows(
        database_url,
        "INSERT INTO episodes (episode_id, project_id, agent_instance_id, session_id, task_type,"
        " task_description, outcome, outcome_details, actions, context_summary, lessons_learned,"
        " duration_seconds, tokens_used, importance, metadata, create_time) VALUES"
        " (?, ?, ?, 's', 'session_completion', 'Tune the garbage collector of gc.py by x²', 1,"
        " '',"
        " '[]', '',"
        " '[\"measure pauses first\"]', 1.5, 0, 0.6, '{}', '2026-11-01T00:00:00.000Z')",
        "01a1f000-0000-7000-8000-000000000001",
        project,
        agent,
    )
    monkeypatch.undo()
    store = durable_store_at(database_url)
    await store.open()
    try:
        assert await store.migrate() == list(range(3, LATEST[kind(database_url)] + 1))
        for terms in (["garbage"], ["pauses"], ["gc"], ["the"], ["gc py"], ["x"]):
            found, _ = await store.search_episodes(
                EpisodeScope(project), terms, None, 10, False, 1 << 20
            )
            assert [f.episode.episode_id for f in found] == ["01a1f000-0000-7000-8000-000000000001"]
        listed, _ = await store.list_episodes(EpisodeScope(project), None, 10, False, 1 << 20)
        assert listed[0].lessons_learned == ["measure pauses first"]
        assert listed[0].embedding_dimensions == 0
    finally:
        await store.aclose()


async def test_a_database_that_refuses_memsvc_is_named_in_the_start_failure(fresh_postgres_url):
    """The pool only times out: the failure says why it could not connect (here, a
    database that does not exist), not just TimeoutError."""
    missing = fresh_postgres_url.rsplit("/", 1)[0] + f"/memsvc_missing_{uuid.uuid4().hex}"
    store = PostgresDurableStore(missing, connect_timeout_seconds=0.2)
    await store.open()
    try:
        with pytest.raises(BackendUnavailable) as failed:
            await store.migrate()
    finally:
        await store.aclose()
    assert "does not exist" in str(failed.value)


def test_migrations_read_the_same_under_any_locale() -> None:
    """Found by a review: the files were read in the locale's encoding, and one holds
    an 'é'. Under the C locale (without Python's UTF-8 coercion) a server could not
    load them; under latin-1 it computed other checksums, and refused a database
    migrated under UTF-8 as "changed after it was applied"."""
    script = (
        "from memsvc.store._migrations import load_migrations\n"
        "for package in ('memsvc.store.postgres', 'memsvc.store.sqlite'):\n"
        "    for m in load_migrations(package):\n"
        "        print(package, m.version, m.checksum)\n"
    )
    expected = "".join(
        f"{package} {m.version} {m.checksum}\n"
        for package in ("memsvc.store.postgres", "memsvc.store.sqlite")
        for m in load_migrations(package)
    )
    assert any("é" in m.sql for m in load_migrations("memsvc.store.postgres"))
    for locale in ("C", "C.UTF-8"):
        environment = {
            **os.environ,
            "LC_ALL": locale,
            "PYTHONCOERCECLOCALE": "0",
            "PYTHONUTF8": "0",
        }
        loaded = subprocess.run(
            [sys.executable, "-c", script],
            env=environment,
            capture_output=True,
            text=True,
            encoding="utf-8",
            check=False,
        )
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout == expected
