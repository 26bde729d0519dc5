"""What a lifecycle call stores comes back in one response (both deployments):
metadata has a size and a depth limit, pages of sessions and checkpoints end within
a response however large their metadata, and so does a Terminate's episode however
many keys the session held."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from memsvc.store import _lifecycle_sql
from memsvc.v1 import episodic_pb2 as ep
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as wm_pb
from memsvc.v1.episodic_pb2_grpc import EpisodicMemoryServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import expect_error, value

LIMIT = 64 * 1024
MESSAGE_BYTES = 256 * 1024


@pytest.fixture
def config_overrides() -> dict[str, object]:
    # Small messages, so that a few sessions of large metadata fill a page.
    return {"max_message_bytes": MESSAGE_BYTES, "max_value_bytes": 64 * 1024}


@pytest.fixture
def life(channel: grpc.aio.Channel) -> LifecycleServiceStub:
    return LifecycleServiceStub(channel)


def json_size(struct: struct_pb2.Struct) -> int:
    plain = json_format.MessageToDict(struct)
    return len(json.dumps(plain, separators=(",", ":"), ensure_ascii=False).encode())


def metadata_of_size(size: int) -> struct_pb2.Struct:
    """A Struct whose compact JSON is ``size`` bytes (of two-byte characters, so
    that a limit counted in characters or escapes would be caught)."""
    room = size - len('{"note":""}')
    struct = struct_pb2.Struct()
    struct.update({"note": "é" * (room // 2) + "x" * (room % 2)})
    return struct


Fetch = Callable[[str], Awaitable[tuple[list[str], str]]]


async def every_page(fetch: Fetch) -> tuple[list[str], int]:
    """The names on all pages, in order, following page tokens from the first page,
    and how many pages held them (one name at least each)."""
    listed: list[str] = []
    pages = 0
    token = ""
    while True:
        names, token = await fetch(token)
        assert names, "every page holds one item at least"
        listed += names
        pages += 1
        if not token:
            return listed, pages


def test_the_helper_makes_the_size_it_is_asked_for():
    for size in (LIMIT, LIMIT + 1):
        assert json_size(metadata_of_size(size)) == size


async def test_every_call_refuses_metadata_past_the_limit_and_changes_nothing(
    life: LifecycleServiceStub, scope: dict[str, Any]
):
    over = metadata_of_size(LIMIT + 1)
    calls: list[Callable[[struct_pb2.Struct], Awaitable[Any]]] = [
        lambda m: life.Spawn(lc.SpawnRequest(**scope, metadata=m)),
        lambda m: life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, metadata=m)),
        lambda m: life.Pause(lc.PauseRequest(**scope, checkpoint_id="held", metadata=m)),
        lambda m: life.Resume(lc.ResumeRequest(**scope, metadata=m)),
        lambda m: life.Terminate(lc.TerminateRequest(**scope, metadata=m)),
    ]
    for call in calls:
        error = await expect_error(call(over), grpc.StatusCode.INVALID_ARGUMENT)
        assert list(error.violations) == ["metadata"]
        assert f"{LIMIT} bytes" in error.violations["metadata"]
        # At the limit the same call goes through: each step of the lifecycle in turn.
        await call(metadata_of_size(LIMIT))
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.state == lc.SESSION_STATE_TERMINATED
    # Five calls went through, one each: the refused ones left no event.
    kinds = [
        lc.EVENT_TYPE_SESSION_SPAWNED,
        lc.EVENT_TYPE_CHECKPOINT_CREATED,
        lc.EVENT_TYPE_SESSION_PAUSED,
        lc.EVENT_TYPE_SESSION_RESUMED,
        lc.EVENT_TYPE_SESSION_TERMINATED,
    ]
    events = life.WatchLifecycle(
        lc.WatchLifecycleRequest(
            project_id=scope["project_id"], start=lc.WATCH_START_OLDEST, event_types=kinds
        )
    )
    seen: list[int] = []
    async for message in events:
        if message.HasField("event"):
            seen.append(message.event.event_type)
            assert len(message.event.metadata["note"]) > LIMIT // 4
        if len(seen) == 5:
            break
    events.cancel()
    assert seen == kinds


async def test_session_pages_end_within_a_response(
    life: LifecycleServiceStub, scope: dict[str, Any]
):
    big = metadata_of_size(LIMIT)
    spawned: set[str] = set()
    for index in range(8):  # 8 x 64 KiB: twice a 256 KiB message
        session_id = f"big-{index}"
        await life.Spawn(lc.SpawnRequest(**{**scope, "session_id": session_id}, metadata=big))
        spawned.add(session_id)

    async def fetch(token: str) -> tuple[list[str], str]:
        page = await life.ListSessions(
            lc.ListSessionsRequest(project_id=scope["project_id"], page_size=100, page_token=token)
        )
        return [s.session_id for s in page.sessions], page.next_page_token

    listed, pages = await every_page(fetch)
    assert sorted(listed) == sorted(spawned)
    assert pages > 2


async def test_checkpoint_pages_end_within_a_response(
    life: LifecycleServiceStub, scope: dict[str, Any]
):
    big = metadata_of_size(LIMIT)
    await life.Spawn(lc.SpawnRequest(**scope))
    made: set[str] = set()
    for index in range(8):
        checkpoint_id = f"big-{index}"
        await life.CreateCheckpoint(
            lc.CreateCheckpointRequest(**scope, checkpoint_id=checkpoint_id, metadata=big)
        )
        made.add(checkpoint_id)

    async def fetch(token: str) -> tuple[list[str], str]:
        page = await life.ListCheckpoints(
            lc.ListCheckpointsRequest(**scope, page_size=100, page_token=token)
        )
        return [c.checkpoint_id for c in page.checkpoints], page.next_page_token

    listed, pages = await every_page(fetch)
    assert sorted(listed) == sorted(made)
    assert pages > 2


@pytest.fixture
def rows_decoded(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many session and checkpoint rows the store has read into memsvc (from
    now on), by kind."""
    counts = {"sessions": 0, "checkpoints": 0}
    for kind, name in (("sessions", "session_from_row"), ("checkpoints", "checkpoint_from_row")):
        real = getattr(_lifecycle_sql, name)

        def counted(*args: Any, real: Any = real, kind: str = kind) -> Any:
            counts[kind] += 1
            return real(*args)

        monkeypatch.setattr(_lifecycle_sql, name, counted)
    return counts


@pytest.mark.parametrize("kind", ["sessions", "checkpoints"])
async def test_a_page_reads_no_more_rows_than_it_sends_whatever_their_metadata(
    life: LifecycleServiceStub, scope: dict[str, Any], kind: str, rows_decoded: dict[str, int]
):
    # Repetitive metadata: PostgreSQL stores it compressed to a fraction of what
    # it sends, so only what memsvc counted on writing weighs it right.
    big = metadata_of_size(LIMIT)
    await life.Spawn(lc.SpawnRequest(**scope))
    for index in range(8):
        item = f"big-{index}"
        if kind == "sessions":
            await life.Spawn(lc.SpawnRequest(**{**scope, "session_id": item}, metadata=big))
        else:
            await life.CreateCheckpoint(
                lc.CreateCheckpointRequest(**scope, checkpoint_id=item, metadata=big)
            )
    reads: list[tuple[int, int]] = []

    async def fetch(token: str) -> tuple[list[str], str]:
        before = rows_decoded[kind]
        names: list[str]
        if kind == "sessions":
            request = lc.ListSessionsRequest(
                project_id=scope["project_id"], page_size=100, page_token=token
            )
            page = await life.ListSessions(request)
            names, next_token = [s.session_id for s in page.sessions], page.next_page_token
        else:
            listing = lc.ListCheckpointsRequest(**scope, page_size=100, page_token=token)
            answer = await life.ListCheckpoints(listing)
            names = [c.checkpoint_id for c in answer.checkpoints]
            next_token = answer.next_page_token
        reads.append((len(names), rows_decoded[kind] - before))
        return names, next_token

    listed, pages = await every_page(fetch)
    assert len(listed) == (9 if kind == "sessions" else 8)
    assert pages > 2
    # The row that crosses the budget is read (the exact check decides); no more.
    # A page of 100 read whole would read all nine.
    for sent, read in reads:
        assert read <= sent + 1, reads


def nested(depth: int) -> struct_pb2.Struct:
    """A Struct ``depth`` objects deep: {"a": {"a": ... 1}}."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


async def test_metadata_too_deep_to_send_back_is_refused_and_the_deepest_accepted_reads_back(
    life: LifecycleServiceStub, channel: grpc.aio.Channel, scope: dict[str, Any]
):
    # 33 objects parse in a request, but not in a search result, where a consolidating
    # Terminate's metadata ends up (protobuf's limit of 100 nested messages).
    error = await expect_error(
        life.Spawn(lc.SpawnRequest(**scope, metadata=nested(33))),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "nests too deep" in error.violations["metadata"]
    await expect_error(life.GetSession(lc.GetSessionRequest(**scope)), grpc.StatusCode.NOT_FOUND)
    deepest = nested(32)
    await life.Spawn(lc.SpawnRequest(**scope, metadata=deepest))
    await life.Terminate(lc.TerminateRequest(**scope, task_description="deep", metadata=deepest))
    assert (await life.GetSession(lc.GetSessionRequest(**scope))).session.metadata == deepest
    episodes = EpisodicMemoryServiceStub(channel)
    found = await episodes.SearchEpisodes(
        ep.SearchEpisodesRequest(project_id=scope["project_id"], query="deep")
    )
    [result] = found.results
    assert result.episode.metadata == deepest


async def many_long_keys(wm: WorkingMemoryServiceStub, scope: dict[str, Any]) -> list[str]:
    """1,000 keys of 400 bytes, small values: twice what a response carries here."""
    keys = [f"{index:04d}" + "k" * 396 for index in range(1_000)]
    for start in range(0, len(keys), 250):
        entries = [wm_pb.EntryInput(key=key, value=value(1)) for key in keys[start : start + 250]]
        await wm.BatchSet(wm_pb.BatchSetRequest(**scope, entries=entries))
    return keys


async def test_key_pages_end_within_a_response(
    life: LifecycleServiceStub, wm: WorkingMemoryServiceStub, scope: dict[str, Any]
):
    await life.Spawn(lc.SpawnRequest(**scope))
    keys = await many_long_keys(wm, scope)

    async def fetch(token: str) -> tuple[list[str], str]:
        page = await wm.ListKeys(wm_pb.ListKeysRequest(**scope, page_size=1_000, page_token=token))
        return [item.key for item in page.keys], page.next_page_token

    assert (await every_page(fetch))[0] == keys


async def test_checkpoint_entry_pages_count_keys_too(
    life: LifecycleServiceStub, wm: WorkingMemoryServiceStub, scope: dict[str, Any]
):
    await life.Spawn(lc.SpawnRequest(**scope))
    keys = await many_long_keys(wm, scope)
    made = await life.CreateCheckpoint(
        lc.CreateCheckpointRequest(**scope, metadata=metadata_of_size(LIMIT))
    )

    async def fetch(token: str) -> tuple[list[str], str]:
        page = await life.GetCheckpoint(
            lc.GetCheckpointRequest(
                **scope,
                checkpoint_id=made.checkpoint.checkpoint_id,
                include_entries=True,
                page_size=1_000,
                page_token=token,
            )
        )
        return [entry.key for entry in page.entries], page.next_page_token

    assert (await every_page(fetch))[0] == keys


async def test_a_terminate_of_many_long_keys_records_an_episode_one_response_carries(
    life: LifecycleServiceStub,
    wm: WorkingMemoryServiceStub,
    channel: grpc.aio.Channel,
    scope: dict[str, Any],
):
    await life.Spawn(lc.SpawnRequest(**scope))
    keys = await many_long_keys(wm, scope)
    ended = await life.Terminate(lc.TerminateRequest(**scope, task_description="many keys"))
    episodes = EpisodicMemoryServiceStub(channel)
    got = await episodes.GetEpisode(
        ep.GetEpisodeRequest(project_id=scope["project_id"], episode_id=ended.episode_id)
    )
    [action] = got.episode.actions
    listed = list(action["state_keys"])
    assert 100 < len(listed) < len(keys)
    assert listed == keys[: len(listed)]  # the first keys, in order
    assert action["state_keys_truncated"] is True
    assert action["state_key_count"] == len(keys)
    assert got.episode.ByteSize() <= MESSAGE_BYTES * 3 // 4
    found = await episodes.SearchEpisodes(
        ep.SearchEpisodesRequest(project_id=scope["project_id"], query="many keys")
    )
    assert [r.episode.episode_id for r in found.results] == [ended.episode_id]


def episode_of(scope: dict[str, Any], **fields: Any) -> ep.Episode:
    """An episode of the test's session (task type "t", a success) with ``fields``."""
    return ep.Episode(
        project_id=scope["project_id"],
        agent_instance_id=scope["agent_instance_id"],
        session_id=scope["session_id"],
        task_type="t",
        outcome=lc.OUTCOME_SUCCESS,
        **fields,
    )


async def test_an_episode_too_large_for_one_response_is_refused(
    channel: grpc.aio.Channel, scope: dict[str, Any]
):
    episodes = EpisodicMemoryServiceStub(channel)
    # Every field within its own limit (100,000 characters), 200 KB as a whole.
    episode = episode_of(scope, context_summary="é" * 100_000)
    error = await expect_error(
        episodes.RecordEpisode(ep.RecordEpisodeRequest(episode=episode)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "one response carries" in error.violations["episode"]
    listed = await episodes.ListEpisodes(ep.ListEpisodesRequest(project_id=scope["project_id"]))
    assert list(listed.episodes) == []
    episode.context_summary = "é" * 50_000
    await episodes.RecordEpisode(ep.RecordEpisodeRequest(episode=episode))


async def test_a_terminate_whose_episode_would_not_fit_a_response_is_refused_and_changes_nothing(
    life: LifecycleServiceStub,
    wm: WorkingMemoryServiceStub,
    channel: grpc.aio.Channel,
    scope: dict[str, Any],
):
    """Found by a review: each lesson within its limit, the episode a Terminate
    recorded could still outgrow a response (RecordEpisode refused the same
    episode), and then failed GetEpisode and every ListEpisodes page reaching it."""
    await life.Spawn(lc.SpawnRequest(**scope))
    await wm.Set(wm_pb.SetRequest(**scope, key="plan", value=value("kept")))
    too_many = ["é" * 2_000] * 60  # 240,000 bytes of lessons, over 3/4 of 256 KiB
    error = await expect_error(
        life.Terminate(lc.TerminateRequest(**scope, lessons_learned=too_many)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "one response carries" in error.violations["lessons_learned"]
    assert "skip_consolidation" in error.violations["lessons_learned"]
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.state == lc.SESSION_STATE_ACTIVE
    got = await wm.Get(wm_pb.GetRequest(**scope, key="plan"))
    assert got.entry.value == value("kept")
    await wm.Set(wm_pb.SetRequest(**scope, key="after", value=value(1)))  # still writable
    episodes = EpisodicMemoryServiceStub(channel)
    project = {"project_id": scope["project_id"]}
    assert list((await episodes.ListEpisodes(ep.ListEpisodesRequest(**project))).episodes) == []

    fitting = ["é" * 2_000] * 45  # 180,000 bytes: room left for the rest
    ended = await life.Terminate(lc.TerminateRequest(**scope, lessons_learned=fitting))
    got_episode = await episodes.GetEpisode(
        ep.GetEpisodeRequest(**project, episode_id=ended.episode_id)
    )
    assert list(got_episode.episode.lessons_learned) == fitting
    assert got_episode.episode.ByteSize() <= MESSAGE_BYTES * 3 // 4
    listed = await episodes.ListEpisodes(ep.ListEpisodesRequest(**project))
    assert [e.episode_id for e in listed.episodes] == [ended.episode_id]


def negative_zeros() -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update({"z": -0.0, "nested": {"list": [-0.0, 1.5]}})
    return struct


def signs(struct: struct_pb2.Struct) -> list[float]:
    """The sign (1.0 or -1.0) of each zero in a negative_zeros() Struct as read back."""
    plain = json_format.MessageToDict(struct)
    return [math.copysign(1.0, plain["z"]), math.copysign(1.0, plain["nested"]["list"][0])]


async def test_a_negative_zero_in_metadata_reads_back_as_zero_on_every_store(
    life: LifecycleServiceStub, channel: grpc.aio.Channel, scope: dict[str, Any]
):
    """Found by reviews: PostgreSQL's jsonb has no -0.0, SQLite keeps it, so the
    deployments read back different metadata, and on PostgreSQL a call's answer
    differed from what was then read (a retry with the metadata read back was refused
    as a reused request id)."""
    request_id = str(uuid.uuid4())
    spawned = await life.Spawn(
        lc.SpawnRequest(**scope, metadata=negative_zeros(), request_id=request_id)
    )
    assert signs(spawned.session.metadata) == [1.0, 1.0]
    read = (await life.GetSession(lc.GetSessionRequest(**scope))).session.metadata
    assert signs(read) == [1.0, 1.0]
    again = await life.Spawn(lc.SpawnRequest(**scope, metadata=read, request_id=request_id))
    assert again.session == spawned.session  # the same arguments: the first answer

    episodes = EpisodicMemoryServiceStub(channel)
    recorded = await episodes.RecordEpisode(
        ep.RecordEpisodeRequest(
            episode=episode_of(
                scope, actions=[negative_zeros()], metadata=negative_zeros(), importance=-0.0
            )
        )
    )
    got = await episodes.GetEpisode(
        ep.GetEpisodeRequest(project_id=scope["project_id"], episode_id=recorded.episode.episode_id)
    )
    for episode in (recorded.episode, got.episode):
        assert signs(episode.metadata) == [1.0, 1.0]
        assert signs(episode.actions[0]) == [1.0, 1.0]
        assert math.copysign(1.0, episode.importance) == 1.0
