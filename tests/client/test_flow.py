"""Every RPC through the SDK against a real memsvc, on both deployments."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from memsvc.client import (
    AsyncClient,
    AsyncSessionClient,
    Checkpoint,
    EventType,
    KeyNotFound,
    Outcome,
    SessionState,
    WithTTL,
    WorkingMemoryStatus,
)
from memsvc.server import Server

PLAN = {"steps": ["search", "summarise"], "budget": 3, "ratio": 0.5, "done": False, "x": None}


async def test_working_memory_round_trips_plain_values(session: AsyncSessionClient):
    spawned = await session.spawn(initial={"plan": PLAN, "scratch": WithTTL("tmp", ttl=3600)})
    assert spawned.state is SessionState.ACTIVE
    assert await session.get("plan") == PLAN
    assert isinstance((await session.get("plan"))["budget"], int)
    scratch = await session.get_entry("scratch")
    assert scratch.value == "tmp"
    assert scratch.expire_time is not None and scratch.expire_time.tzinfo is UTC

    created = await session.set("notes", ["a", {"b": [1, 2.25]}], ttl=timedelta(minutes=5))
    assert created.created and created.expire_time is not None
    replaced = await session.set("notes", "plain")
    assert not replaced.created and replaced.expire_time is None
    assert await session.get("notes") == "plain"
    assert await session.get("absent", default=None) is None
    with pytest.raises(KeyNotFound) as missing:
        await session.get("absent")
    assert missing.value.key == "absent"

    results = await session.set_many({"a": 1, "b": WithTTL(2, 60), "c": {"d": []}}, ttl=600)
    assert [r.key for r in results] == ["a", "b", "c"]
    assert all(r.expire_time is not None for r in results)
    assert await session.get_many(["a", "zz", "c"]) == {"a": 1, "c": {"d": []}}
    assert await session.get_many([]) == {}

    keys = [info.key async for info in session.keys(page_size=2)]
    assert keys == sorted(keys) == ["a", "b", "c", "notes", "plan", "scratch"]
    assert all(info.value_size_bytes > 0 for info in await session.keys().collect())
    pages = [page async for page in session.entries(page_size=4).pages()]
    assert [len(p.items) for p in pages] == [4, 2]
    assert pages[0].next_page_token and pages[-1].next_page_token is None
    resumed = await session.entries(page_token=pages[0].next_page_token).collect()
    assert [e.key for e in resumed] == ["plan", "scratch"]
    everything = await session.get_all()
    assert everything["plan"] == PLAN and len(everything) == 6

    assert await session.delete("a") is True
    assert await session.delete("a") is False
    removed = await session.delete_many(["b", "zz"])
    assert (removed.deleted_keys, removed.absent_keys) == (("b",), ("zz",))


async def test_lifecycle_and_checkpoints(client: AsyncClient, session: AsyncSessionClient):
    agent_type = str(uuid.uuid4())
    await session.spawn(initial={"k": 1}, agent_type_id=agent_type, metadata={"team": "x"})
    described = await session.describe()
    assert described.agent_type_id == agent_type and described.metadata == {"team": "x"}
    assert described.working_memory_status is WorkingMemoryStatus.INTACT
    assert described.version == 1

    manual = await session.create_checkpoint(checkpoint_id="before-2", metadata={"why": "test"})
    assert isinstance(manual, Checkpoint) and manual.key_count == 1
    assert manual.metadata == {"why": "test"}
    await session.set("k", 2)
    paused = await session.pause()
    assert paused.session.state is SessionState.PAUSED
    assert paused.session.resume_checkpoint_id == paused.checkpoint.checkpoint_id
    assert paused.checkpoint.expire_time is None  # protected while paused
    listed = await session.checkpoints(page_size=1).collect()
    assert [c.checkpoint_id for c in listed] == [paused.checkpoint.checkpoint_id, "before-2"]
    assert (await session.get_checkpoint("before-2")).create_time <= datetime.now(UTC)
    entries = await session.checkpoint_entries(paused.checkpoint.checkpoint_id).collect()
    assert [(e.key, e.value, e.remaining_ttl) for e in entries] == [("k", 2, None)]

    resumed = await session.resume()
    assert resumed.session.state is SessionState.ACTIVE and resumed.entries_restored == 1
    rolled_back = await session.resume("before-2", metadata={"rollback": True})
    assert rolled_back.checkpoint.checkpoint_id == "before-2"
    assert await session.get("k") == 1
    await session.set("extra", True)
    await session.resume(paused.checkpoint.checkpoint_id, merge=True)
    assert await session.get_all() == {"k": 2, "extra": True}
    await session.delete_checkpoint("before-2")
    assert [c.checkpoint_id async for c in session.checkpoints()] == [
        paused.checkpoint.checkpoint_id
    ]

    sessions = await client.list_sessions(session.project_id, state="active").collect()
    assert [s.session_id for s in sessions] == [session.session_id]
    assert await client.list_sessions(session.project_id, state=SessionState.PAUSED).collect() == []

    ended = await session.terminate(
        task_description="try the SDK", outcome="partial", lessons_learned=["retry safely"]
    )
    assert ended.session.state is SessionState.TERMINATED
    assert ended.outcome is Outcome.PARTIAL and ended.episode_id
    assert ended.entries_consolidated == 2
    episode = await client.episodes(session.project_id).get(ended.episode_id)
    assert episode.task_type == "session_completion"
    assert episode.lessons_learned == ("retry safely",)


async def test_terminate_without_consolidation_keeps_memory(session: AsyncSessionClient):
    await session.spawn(initial={"k": "v"})
    ended = await session.terminate(consolidate=False, keep_working_memory=True)
    assert ended.episode_id is None
    assert await session.get("k") == "v"
    assert ended.outcome is Outcome.SUCCESS


async def test_episodes_record_list_search_delete(client: AsyncClient, scope: dict[str, str]):
    episodes = client.episodes(scope["project_id"])
    agent = scope["agent_instance_id"]
    first = await episodes.record(
        agent_instance_id=agent,
        session_id="s1",
        task_type="code_review",
        outcome=Outcome.SUCCESS,
        task_description="Review the retry policy of the client",
        lessons_learned=["test the slow path"],
        actions=[{"tool": "grep", "args": ["retry"]}],
        duration=timedelta(seconds=90),
        tokens_used=1200,
        importance=0.8,
        metadata={"pr": 42},
        embedding=[1.0, 0.0, 0.0],
    )
    assert first.episode_id and first.create_time.tzinfo is UTC
    assert first.actions == ({"tool": "grep", "args": ["retry"]},)
    assert first.duration == timedelta(seconds=90) and first.metadata == {"pr": 42}
    assert first.embedding is None and first.embedding_dimensions == 3
    second = await episodes.record(
        agent_instance_id=agent,
        session_id="s2",
        task_type="planning",
        outcome="failure",
        task_description="Plan the quarterly roadmap",
        embedding=[0.0, 1.0, 0.0],
    )

    newest_first = await episodes.list().collect()
    assert [e.episode_id for e in newest_first] == [second.episode_id, first.episode_id]
    assert [e.episode_id for e in await episodes.list(outcome="failure").collect()] == [
        second.episode_id
    ]
    assert await episodes.list(task_type="code_review", min_importance=0.5).collect() == [first]
    later = await episodes.list(start_time=datetime.now(UTC) + timedelta(hours=1)).collect()
    assert later == []
    with_vectors = await episodes.get(first.episode_id, include_embedding=True)
    assert with_vectors.embedding == (1.0, 0.0, 0.0)

    found = await episodes.search("retry policy").collect()
    assert [r.episode.episode_id for r in found] == [first.episode_id]
    similar = await episodes.search(embedding=[0.1, 0.9, 0.0]).collect()
    assert similar[0].episode.episode_id == second.episode_id
    assert similar[0].score > similar[1].score

    await episodes.delete(first.episode_id)
    await episodes.delete(first.episode_id, allow_missing=True)
    assert [e.episode_id async for e in episodes.list()] == [second.episode_id]


async def test_purge_forgets_a_session(client: AsyncClient, session: AsyncSessionClient):
    await session.spawn(initial={"k": 1})
    await session.create_checkpoint()
    report = await session.purge()
    assert report.sessions_deleted == 1 and report.checkpoints_deleted == 1
    assert report.events_tombstoned == 2
    again = await client.purge(session.project_id, session.agent_instance_id, session.session_id)
    assert again.sessions_deleted == 0
    await session.spawn()  # a purged id may be spawned again


async def test_session_watch_sees_its_events(session: AsyncSessionClient):
    async with session.watch(event_types=["session_spawned", EventType.SESSION_PAUSED]) as events:
        assert events.sequence is not None
        await session.spawn()
        await session.create_checkpoint()  # filtered out
        await session.pause()
        spawned = await anext(events)
        paused = await anext(events)
    assert (spawned.event_type, paused.event_type) == (
        EventType.SESSION_SPAWNED,
        EventType.SESSION_PAUSED,
    )
    assert spawned.session_id == session.session_id and spawned.request_id
    assert paused.sequence > spawned.sequence and paused.checkpoint_id
    assert events.sequence == paused.sequence


class ListEntriesTimeouts(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Records the timeout each ListEntries call is sent with, over a link that takes
    LINK_SECONDS to carry each one (time the next page's budget must show spent)."""

    LINK_SECONDS = 0.2

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        method = client_call_details.method
        if (method.decode() if isinstance(method, bytes) else method).endswith("/ListEntries"):
            self.timeouts.append(client_call_details.timeout)
            await asyncio.sleep(self.LINK_SECONDS)
        return await continuation(client_call_details, request)


async def test_get_all_spends_one_timeout_across_its_pages(
    server: Server, session: AsyncSessionClient, scope: dict[str, str], token_file: Path
):
    """Each page is sent with what is left of the one ``timeout``, not a new one: a
    working memory of many pages cannot take that many timeouts."""
    await session.spawn()
    await session.set_many({f"k{i:03}": i for i in range(250)})  # 3 pages of 100
    recorder = ListEntriesTimeouts()
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", interceptors=[recorder]) as channel,
        AsyncClient.from_channel(channel, token_file=token_file) as client,
    ):
        ids = (scope["project_id"], scope["agent_instance_id"], scope["session_id"])
        everything = await client.session(*ids).get_all(timeout=30)
    assert len(everything) == 250
    budgets = [t for t in recorder.timeouts if t is not None]
    assert len(budgets) == 3
    assert budgets[0] <= 30
    spent = recorder.LINK_SECONDS * 0.95  # asyncio may wake a hair early
    assert all(later <= earlier - spent for earlier, later in itertools.pairwise(budgets))
