"""A purge finds a project's working memories by a SCAN of the whole keyspace, page
by page, each page retried alone: a page that fails is read again, not the walk
from its start (on a large keyspace, starting over on every failure never ends,
and one budget for the whole walk cut it short)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from memsvc.domain import SessionRef
from memsvc.store.redis import RedisWorkingMemoryStore
from tests.conftest import REDIS_URL

JUNK_KEYS = 3_000  # more than a few SCAN pages of 1,000


@pytest.fixture
async def store() -> AsyncIterator[RedisWorkingMemoryStore]:
    opened = RedisWorkingMemoryStore(REDIS_URL, max_session_keys=100, max_session_bytes=100_000)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
async def large_keyspace() -> AsyncIterator[None]:
    """Keys of nobody's, so that the walk takes several pages."""
    client = aioredis.Redis.from_url(REDIS_URL)
    prefix = f"test-junk:{uuid.uuid4().hex}:"
    names = [f"{prefix}{index}" for index in range(JUNK_KEYS)]
    try:
        await client.mset(dict.fromkeys(names, "x"))
        yield
    finally:
        for start in range(0, len(names), 1_000):
            await client.delete(*names[start : start + 1_000])
        await client.aclose()


async def test_a_page_that_fails_is_read_again_alone(
    store: RedisWorkingMemoryStore, large_keyspace: None, monkeypatch: pytest.MonkeyPatch
):
    project = str(uuid.uuid4())
    sessions = [SessionRef(project, str(uuid.uuid4()), f"s{index}") for index in range(3)]
    for session in sessions:
        await store.begin_spawn(session, "op", "epoch", [])
        await store.finish(session, "op", "active", swap=False, clear=False)
    real = store._scan_page
    cursors: list[int] = []

    async def flaky_page(node: Any, cursor: int, pattern: str) -> tuple[int, list[Any]]:
        cursors.append(cursor)
        if cursor != 0 and cursors.count(cursor) == 1:
            raise RedisConnectionError("lost mid-walk")  # each later page fails once
        return await real(node, cursor, pattern)

    monkeypatch.setattr(store, "_scan_page", flaky_page)
    try:
        found = await store.sessions_in(SessionRef(project, "", ""))
        assert sorted(found, key=lambda s: s.session_id) == sessions
        pages = [cursor for cursor in cursors if cursor != 0]
        assert pages, "the walk took more than one page"
        # Every later page read twice (its failure, its retry); the first once.
        assert cursors.count(0) == 1
        assert all(pages.count(cursor) == 2 for cursor in pages)
    finally:
        assert await store.forget(sessions) == len(sessions)
