"""LifecycleService contract: the full lifecycle through gRPC, on both deployments."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import duration_pb2, struct_pb2

from memsvc.domain import SessionRef, _lifecycle_reads, _snapshot
from memsvc.domain import _lifecycle as lifecycle_module
from memsvc.domain._lifecycle_results import arguments_hash
from memsvc.v1 import episodic_pb2 as ep
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.episodic_pb2_grpc import EpisodicMemoryServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.helpers import (
    LoggedEvent,
    checkpoint_contents,
    details_of,
    eventually,
    expect_error,
    forge_page_token,
    lifecycle_log,
    python,
    session_episodes,
    value,
)

ACTIVE, PAUSED, TERMINATED = (
    lc.SESSION_STATE_ACTIVE,
    lc.SESSION_STATE_PAUSED,
    lc.SESSION_STATE_TERMINATED,
)


@pytest.fixture
def life(channel: grpc.aio.Channel) -> LifecycleServiceStub:
    return LifecycleServiceStub(channel)


def entries(**items: Any) -> list[pb.EntryInput]:
    return [pb.EntryInput(key=k, value=value(v)) for k, v in items.items()]


def struct(**fields: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(fields)
    return message


async def memory_of(wm, scope) -> dict[str, Any]:
    """The session's whole working memory, every page of it."""
    memory: dict[str, Any] = {}
    token = ""
    while True:
        page = await wm.ListEntries(pb.ListEntriesRequest(**scope, page_token=token))
        memory.update({e.key: python(e.value) for e in page.entries})
        if not (token := page.next_page_token):
            return memory


def events_of(server, scope) -> list[tuple[int, int, str | None]]:
    """(sequence, type, checkpoint or episode id) of the session's events, from the database."""
    query = (
        "SELECT sequence, event_type, coalesce(checkpoint_id, CAST(episode_id AS TEXT))"
        " FROM lifecycle_events WHERE project_id = {p} AND session_id = {p} ORDER BY sequence"
    )
    url = server.config.database_url
    params = (scope["project_id"], scope["session_id"])
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite://")) as conn:
            return [tuple(r) for r in conn.execute(query.format(p="?"), params)]
    with psycopg.connect(url) as conn:
        rows = conn.execute(query.format(p="%s"), params).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]


async def test_full_lifecycle(life, wm, scope, server):
    """Spawn seeded, write, pause, resume, terminate: states, data, events."""
    spawned = await life.Spawn(
        lc.SpawnRequest(**scope, initial_entries=entries(plan=["a", "b"], step=0),
                        metadata=struct(team="x"))
    )  # fmt: skip
    assert spawned.session.state == ACTIVE
    assert spawned.session.version == 1
    assert spawned.initial_entries_written == 2
    assert spawned.session.working_memory_status == lc.WORKING_MEMORY_STATUS_INTACT
    await wm.Set(pb.SetRequest(**scope, key="step", value=value(1)))

    paused = await life.Pause(lc.PauseRequest(**scope))
    assert paused.session.state == PAUSED
    assert paused.session.version == 2
    assert paused.checkpoint.key_count == 2
    assert paused.session.resume_checkpoint_id == paused.checkpoint.checkpoint_id
    assert uuid.UUID(paused.checkpoint.checkpoint_id).version == 7

    resumed = await life.Resume(lc.ResumeRequest(**scope))
    assert resumed.session.state == ACTIVE
    assert resumed.checkpoint.checkpoint_id == paused.checkpoint.checkpoint_id
    assert resumed.entries_restored == 2
    assert await memory_of(wm, scope) == {"plan": ["a", "b"], "step": 1}

    ended = await life.Terminate(lc.TerminateRequest(**scope, lessons_learned=["keep it short"]))
    assert ended.session.state == TERMINATED
    assert ended.episode_id
    assert (ended.entries_consolidated, ended.entries_cleared) == (2, 2)
    assert ended.outcome == lc.OUTCOME_SUCCESS
    await expect_error(memory_of(wm, scope), grpc.StatusCode.NOT_FOUND)
    got = await life.GetSession(lc.GetSessionRequest(**scope))
    assert got.session.state == TERMINATED
    assert got.session.version == 4
    assert got.session.working_memory_status == lc.WORKING_MEMORY_STATUS_UNSPECIFIED

    events = events_of(server, scope)
    # Spawned, paused, resumed, the pause's checkpoint deleted by the Terminate, terminated.
    assert [e[1] for e in events] == [1, 2, 3, 6, 4]
    assert events[1][2] == paused.checkpoint.checkpoint_id
    assert events[3][2] == paused.checkpoint.checkpoint_id
    assert events[4][2] == ended.episode_id
    # Gap-free in commit order, and nothing else ran: the session's events are consecutive.
    sequences = [e[0] for e in events]
    assert sequences == list(range(sequences[0], sequences[0] + len(events)))


async def test_non_finite_numbers_are_kept_and_consolidated(life, wm, scope, channel):
    """Working memory stores any Value, NaN and infinities included (they come back
    exactly); Terminate's summary spells them as json.dumps does, never INTERNAL."""
    await life.Spawn(lc.SpawnRequest(**scope))
    nested = struct_pb2.Value()
    nested.list_value.values.add().number_value = float("-inf")
    for key, stored in (("n", struct_pb2.Value(number_value=float("nan"))), ("l", nested)):
        await wm.Set(pb.SetRequest(**scope, key=key, value=stored))
    got = (await wm.Get(pb.GetRequest(**scope, key="n"))).entry.value.number_value
    assert math.isnan(got)
    ended = await life.Terminate(lc.TerminateRequest(**scope))
    assert ended.entries_consolidated == 2
    episode = await EpisodicMemoryServiceStub(channel).GetEpisode(
        ep.GetEpisodeRequest(project_id=scope["project_id"], episode_id=ended.episode_id)
    )
    assert episode.episode.context_summary == '{"l": [-Infinity], "n": NaN}'


async def test_writes_are_refused_while_paused_and_reads_work(life, wm, scope):
    await life.Spawn(lc.SpawnRequest(**scope, initial_entries=entries(a=1)))
    await life.Pause(lc.PauseRequest(**scope))
    error = await expect_error(
        wm.Set(pb.SetRequest(**scope, key="b", value=value(2))), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert error.reason == "ERROR_REASON_SESSION_NOT_WRITABLE"
    assert error.metadata["state"] == "paused"
    await expect_error(
        wm.Delete(pb.DeleteRequest(**scope, key="a")), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert python((await wm.Get(pb.GetRequest(**scope, key="a"))).entry.value) == 1


async def test_resume_rolls_back_an_active_session_and_merges_on_request(life, wm, scope):
    await life.Spawn(lc.SpawnRequest(**scope, initial_entries=entries(a=1, b=1)))
    checkpoint = (await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope))).checkpoint
    await wm.Set(pb.SetRequest(**scope, key="a", value=value(2)))
    await wm.Set(pb.SetRequest(**scope, key="c", value=value(3)))
    merged = await life.Resume(
        lc.ResumeRequest(**scope, checkpoint_id=checkpoint.checkpoint_id, merge_with_current=True)
    )
    assert merged.session.state == ACTIVE
    assert await memory_of(wm, scope) == {"a": 1, "b": 1, "c": 3}
    assert merged.entries_restored == 2  # the checkpoint's entries, not "c" it left alone
    await life.Resume(lc.ResumeRequest(**scope, checkpoint_id=checkpoint.checkpoint_id))
    assert await memory_of(wm, scope) == {"a": 1, "b": 1}


async def remaining_ttls(life, scope, checkpoint_id: str) -> dict[str, int]:
    """The remaining TTL (ms) a checkpoint recorded, of each of its keys that has one."""
    detail = await life.GetCheckpoint(
        lc.GetCheckpointRequest(**scope, checkpoint_id=checkpoint_id, include_entries=True)
    )
    return {
        e.key: e.remaining_ttl.ToMilliseconds()
        for e in detail.entries
        if e.HasField("remaining_ttl")
    }


async def test_ttls_survive_pause_and_resume(life, wm, scope):
    """A checkpoint records what is left of each TTL, and Resume gives back that, not
    the full TTL: a later checkpoint never holds more of it than an earlier one."""
    await life.Spawn(lc.SpawnRequest(**scope))
    await wm.Set(
        pb.SetRequest(**scope, key="t", value=value(1), ttl=duration_pb2.Duration(seconds=600))
    )
    await wm.Set(pb.SetRequest(**scope, key="p", value=value(2)))
    # Some of the TTL runs out while ACTIVE, so what is left differs from the full
    # TTL (at least this much has passed: a lower bound, no speed is measured).
    await asyncio.sleep(0.3)
    paused = await life.Pause(lc.PauseRequest(**scope))
    first = await remaining_ttls(life, scope, paused.checkpoint.checkpoint_id)
    assert list(first) == ["t"]  # "p" has no TTL
    assert 0 < first["t"] <= 600_000 - 250
    await life.Resume(lc.ResumeRequest(**scope))
    got = await wm.Get(pb.GetRequest(**scope, key="t"))
    assert got.entry.HasField("expire_time")
    assert got.entry.expire_time.ToMilliseconds() > time.time() * 1000
    assert not (await wm.Get(pb.GetRequest(**scope, key="p"))).entry.HasField("expire_time")
    # What Resume set is what was left: a full TTL again would exceed the first.
    again = await life.Pause(lc.PauseRequest(**scope))
    second = await remaining_ttls(life, scope, again.checkpoint.checkpoint_id)
    assert list(second) == ["t"]
    assert 0 < second["t"] <= first["t"]


async def test_terminate_of_a_paused_session_records_it_as_paused(life, wm, scope, channel):
    """A key whose TTL runs out while paused is gone from the working memory, but a
    Resume would bring it back (the checkpoint keeps its remaining TTL): Terminate
    records the session as paused, not what is left, before deleting the checkpoint."""
    await life.Spawn(lc.SpawnRequest(**scope, initial_entries=entries(kept=1)))
    # Long enough for the Pause to come first even on a machine that stalls a while.
    await wm.Set(
        pb.SetRequest(**scope, key="brief", value=value(2), ttl=duration_pb2.Duration(seconds=5))
    )
    paused = await life.Pause(lc.PauseRequest(**scope))
    assert paused.checkpoint.key_count == 2  # paused before "brief" expired

    async def expired() -> bool:
        listed = await wm.ListKeys(pb.ListKeysRequest(**scope))
        return [info.key for info in listed.keys] == ["kept"]

    await eventually(expired, timeout=15)
    ended = await life.Terminate(lc.TerminateRequest(**scope))
    assert (ended.entries_consolidated, ended.entries_cleared) == (2, 1)
    episode = await EpisodicMemoryServiceStub(channel).GetEpisode(
        ep.GetEpisodeRequest(project_id=scope["project_id"], episode_id=ended.episode_id)
    )
    # Whole numbers as the reference's Python summarised them (and as the SDK reads them).
    assert episode.episode.context_summary == '{"brief": 2, "kept": 1}'
    assert list(python(episode.episode.actions[0])["state_keys"]) == ["brief", "kept"]


async def test_a_merge_resume_of_a_paused_session_goes_over_its_paused_entries(life, wm, scope):
    """A PAUSED session's entries are its resume checkpoint's: a merge Resume writes
    the named checkpoint over those, keys whose TTL ran out while paused included
    (with the TTL they had left, as a plain Resume gives it back)."""
    await life.Spawn(lc.SpawnRequest(**scope, initial_entries=entries(c=1)))
    earlier = (await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope))).checkpoint
    await wm.Set(pb.SetRequest(**scope, key="c", value=value(2)))
    await wm.Set(pb.SetRequest(**scope, key="a", value=value(3)))
    # Long enough to outlast the wait below and a machine's stall before the Pause.
    await wm.Set(
        pb.SetRequest(**scope, key="brief", value=value(4), ttl=duration_pb2.Duration(seconds=5))
    )
    # Not a synchronisation: time that must pass, so that the TTL the Pause records
    # is visibly less than the full one (a longer stall only makes it less still).
    await asyncio.sleep(0.4)
    paused = await life.Pause(lc.PauseRequest(**scope))
    left = (await remaining_ttls(life, scope, paused.checkpoint.checkpoint_id))["brief"]
    assert 0 < left <= 5_000 - 350

    async def expired() -> bool:
        listed = await wm.ListKeys(pb.ListKeysRequest(**scope))
        return "brief" not in [info.key for info in listed.keys]

    await eventually(expired, timeout=15)
    resumed = await life.Resume(
        lc.ResumeRequest(**scope, checkpoint_id=earlier.checkpoint_id, merge_with_current=True)
    )
    assert resumed.entries_restored == 1
    listed = await wm.ListEntries(pb.ListEntriesRequest(**scope))
    assert {e.key: python(e.value) for e in listed.entries} == {"a": 3, "brief": 4, "c": 1}
    brief = (await wm.Get(pb.GetRequest(**scope, key="brief"))).entry
    assert brief.expire_time.ToMilliseconds() > time.time() * 1000
    # What it had left, not its full TTL again: no more than the pause recorded.
    later = await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope))
    assert 0 < (await remaining_ttls(life, scope, later.checkpoint.checkpoint_id))["brief"] <= left


async def test_invalid_transitions_are_refused_with_the_state(life, scope):
    error = await expect_error(life.Pause(lc.PauseRequest(**scope)), grpc.StatusCode.NOT_FOUND)
    assert error.reason == "ERROR_REASON_SESSION_NOT_FOUND"
    await life.Spawn(lc.SpawnRequest(**scope))
    # Only a PAUSED session has a checkpoint to resume from by default.
    error = await expect_error(
        life.Resume(lc.ResumeRequest(**scope)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert error.reason == "ERROR_REASON_INVALID_TRANSITION"
    assert error.metadata["state"] == "ACTIVE"
    assert error.message == (
        f"cannot resume session {scope['session_id']!r}: it is ACTIVE, with no checkpoint"
        " to resume from: name one in checkpoint_id"
    )
    await life.Pause(lc.PauseRequest(**scope))
    error = await expect_error(
        life.Pause(lc.PauseRequest(**scope)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert error.reason == "ERROR_REASON_INVALID_TRANSITION"
    assert error.metadata["state"] == "PAUSED"
    await expect_error(
        life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await life.Terminate(lc.TerminateRequest(**scope))
    for call in (
        life.Terminate(lc.TerminateRequest(**scope)),
        life.Resume(lc.ResumeRequest(**scope, checkpoint_id="x")),
        life.Pause(lc.PauseRequest(**scope)),
    ):
        error = await expect_error(call, grpc.StatusCode.FAILED_PRECONDITION)
        assert error.metadata["state"] == "TERMINATED"
    error = await expect_error(life.Spawn(lc.SpawnRequest(**scope)), grpc.StatusCode.ALREADY_EXISTS)
    assert error.reason == "ERROR_REASON_SESSION_ALREADY_EXISTS"


async def test_spawn_of_a_live_session_is_already_exists(life, scope):
    await life.Spawn(lc.SpawnRequest(**scope))
    error = await expect_error(life.Spawn(lc.SpawnRequest(**scope)), grpc.StatusCode.ALREADY_EXISTS)
    assert error.metadata == {**scope, "state": "ACTIVE"}


async def test_unknown_checkpoint_is_not_found(life, scope):
    # Of a session never spawned, every checkpoint read says so, not "no checkpoint".
    for call in (
        life.GetCheckpoint(lc.GetCheckpointRequest(**scope, checkpoint_id="nope")),
        life.ListCheckpoints(lc.ListCheckpointsRequest(**scope)),
    ):
        error = await expect_error(call, grpc.StatusCode.NOT_FOUND)
        assert error.reason == "ERROR_REASON_SESSION_NOT_FOUND"
    await life.Spawn(lc.SpawnRequest(**scope))
    error = await expect_error(
        life.GetCheckpoint(lc.GetCheckpointRequest(**scope, checkpoint_id="nope")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert error.reason == "ERROR_REASON_CHECKPOINT_NOT_FOUND"
    error = await expect_error(
        life.Resume(lc.ResumeRequest(**scope, checkpoint_id="nope")), grpc.StatusCode.NOT_FOUND
    )
    assert error.reason == "ERROR_REASON_CHECKPOINT_NOT_FOUND"
    assert (await life.GetSession(lc.GetSessionRequest(**scope))).session.version == 1


async def test_a_contents_page_token_ends_with_its_checkpoint(life, wm, scope):
    """A checkpoint deleted and taken again under the same id holds other contents:
    a token of the first one's listing must not continue in the second's."""
    await life.Spawn(lc.SpawnRequest(**scope))
    # A malformed token is bad input whatever the checkpoint: refused before any read,
    # with or without entries (as a bad page_size is; a review found it ignored).
    for include_entries in (True, False):
        garbage = lc.GetCheckpointRequest(
            **scope,
            checkpoint_id="absent",
            include_entries=include_entries,
            page_token="not-a-token",
        )
        error = await expect_error(life.GetCheckpoint(garbage), grpc.StatusCode.INVALID_ARGUMENT)
        assert list(error.violations) == ["page_token"]
    for key in "abcd":
        await wm.Set(pb.SetRequest(**scope, key=key, value=value(1)))
    await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id="cp"))
    request = lc.GetCheckpointRequest(
        **scope, checkpoint_id="cp", include_entries=True, page_size=2
    )
    first = await life.GetCheckpoint(request)
    assert [entry.key for entry in first.entries] == ["a", "b"]
    await life.DeleteCheckpoint(lc.DeleteCheckpointRequest(**scope, checkpoint_id="cp"))
    await wm.Set(pb.SetRequest(**scope, key="c", value=value(2)))
    await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id="cp"))
    request.page_token = first.next_page_token
    error = await expect_error(life.GetCheckpoint(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert list(error.violations) == ["page_token"]
    # A listing of the new one starts again.
    request.page_token = ""
    again = await life.GetCheckpoint(request)
    assert [entry.key for entry in again.entries] == ["a", "b"]
    request.page_token = again.next_page_token
    rest = await life.GetCheckpoint(request)
    assert [(entry.key, python(entry.value)) for entry in rest.entries] == [("c", 2), ("d", 1)]


async def test_contents_pages_decode_only_their_own_entries(life, wm, scope, monkeypatch):
    """Paging through a checkpoint indexes its snapshot's keys once; each page then
    decodes only its own entries (decoding the whole snapshot for every page held
    the event loop 42 ms a page at 10,000 keys)."""
    await life.Spawn(lc.SpawnRequest(**scope))
    keys = [f"k{n:02d}" for n in range(50)]
    await wm.BatchSet(
        pb.BatchSetRequest(**scope, entries=[pb.EntryInput(key=k, value=value(k)) for k in keys])
    )
    await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id="cp"))
    indexed: list[int] = []
    decoded: list[int] = []
    real_index, real_entries = _snapshot.key_index, _snapshot.entries_at

    def counted_index(data: bytes) -> Any:
        indexed.append(len(data))
        return real_index(data)

    def counted_entries(data: bytes, offsets: Any) -> Any:
        found = real_entries(data, offsets)
        decoded.append(len(found))
        return found

    monkeypatch.setattr(_lifecycle_reads, "key_index", counted_index)
    monkeypatch.setattr(_lifecycle_reads, "entries_at", counted_entries)
    request = lc.GetCheckpointRequest(
        **scope, checkpoint_id="cp", include_entries=True, page_size=10
    )
    listed: list[tuple[str, Any]] = []
    while True:
        page = await life.GetCheckpoint(request)
        listed += [(entry.key, python(entry.value)) for entry in page.entries]
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert listed == [(k, k) for k in keys]
    assert len(indexed) == 1 and decoded == [10] * 5


async def test_client_checkpoint_ids_are_unique_per_session(life, scope):
    await life.Spawn(lc.SpawnRequest(**scope))
    await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id="before-tool"))
    error = await expect_error(
        life.Pause(lc.PauseRequest(**scope, checkpoint_id="before-tool")),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert error.reason == "ERROR_REASON_CHECKPOINT_ALREADY_EXISTS"
    assert (await life.GetSession(lc.GetSessionRequest(**scope))).session.state == ACTIVE


async def test_concurrent_calls_naming_one_checkpoint_id_make_it_once(life, wm, scope):
    """Calls racing to make the same checkpoint id: one makes it, the others are
    refused with ALREADY_EXISTS (never INTERNAL), and the session stays writable."""
    await life.Spawn(lc.SpawnRequest(**scope))
    for round_number in range(5):
        name = f"same-{round_number}"
        calls = [
            life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id=name))
            for _ in range(4)
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        made = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(made) == 1 and len(refused) == 3, outcomes
        assert {error.code() for error in refused} == {grpc.StatusCode.ALREADY_EXISTS}
    await wm.Set(pb.SetRequest(**scope, key="after", value=value(1)))


async def test_delete_checkpoint_hashes_its_request_as_before_unless_given_metadata(
    life, scope, monkeypatch
):
    """A request id's arguments are hashed to refuse its reuse for another call. A
    DeleteCheckpoint without metadata hashes what replicas before the field did, so
    a retry answered first by an older replica (a rolling upgrade) still matches."""
    hashed: list[tuple[Any, ...]] = []
    original = arguments_hash

    def recording(method: str, *arguments: Any) -> str:
        hashed.append((method, *arguments))
        return original(method, *arguments)

    monkeypatch.setattr(lifecycle_module, "arguments_hash", recording)
    await life.Spawn(lc.SpawnRequest(**scope))
    for name in ("plain", "noted"):
        await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id=name))
    noted = struct_pb2.Struct()
    noted.update({"why": "done"})
    for name, metadata in (("plain", None), ("noted", noted)):
        await life.DeleteCheckpoint(
            lc.DeleteCheckpointRequest(
                **scope, checkpoint_id=name, request_id=str(uuid.uuid4()), metadata=metadata
            )
        )
    deletes = [h[1:] for h in hashed if h[0] == "DeleteCheckpoint"]
    ref = SessionRef(**scope)
    assert deletes == [(ref, "plain"), (ref, "noted", {"why": "done"})]


async def test_request_id_makes_retries_safe(life, scope):
    await life.Spawn(lc.SpawnRequest(**scope))
    request_id = str(uuid.uuid4())
    first = await life.Pause(lc.PauseRequest(**scope, request_id=request_id))
    again = await life.Pause(lc.PauseRequest(**scope, request_id=request_id))
    assert again == first
    # A UUID in any case is the same request id.
    shouted = await life.Pause(lc.PauseRequest(**scope, request_id=request_id.upper()))
    assert shouted == first
    error = await expect_error(
        life.Pause(lc.PauseRequest(**scope, request_id=request_id, checkpoint_id="other")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error.reason == "ERROR_REASON_REQUEST_ID_REUSED"
    assert (await life.GetSession(lc.GetSessionRequest(**scope))).session.version == 2


async def duplicates(method: Callable[[Any], Awaitable[Any]], request: Any) -> Any:
    """Five concurrent calls of one request (one request id): every answer the same."""
    answers = await asyncio.gather(*(method(request) for _ in range(5)))
    assert all(answer == answers[0] for answer in answers), answers
    return answers[0]


async def test_concurrent_duplicates_with_one_request_id_have_one_effect(life, wm, scope, server):
    """Spawn, CreateCheckpoint, DeleteCheckpoint, Pause and Resume, each called five
    times at once with one request id: one answer, one event, one checkpoint made
    or deleted, one version step, and nothing else changed (Terminate: below)."""
    database = server.config.database_url
    expected: list[tuple[int, str | None, str | None]] = []

    async def leaves(memory: dict[str, Any], checkpoints: dict[str, Any], version: int) -> None:
        log = await lifecycle_log(database, scope)
        assert [(e.event_type, e.ref, e.request_id) for e in log] == expected
        assert await memory_of(wm, scope) == memory
        listed = await life.ListCheckpoints(lc.ListCheckpointsRequest(**scope))
        assert sorted(c.checkpoint_id for c in listed.checkpoints) == sorted(checkpoints)
        for name, contents in checkpoints.items():
            assert await checkpoint_contents(life, scope, name) == contents
        assert (await life.GetSession(lc.GetSessionRequest(**scope))).session.version == version

    rid = str(uuid.uuid4())
    spawn = lc.SpawnRequest(**scope, initial_entries=entries(a=1), request_id=rid)
    spawned = await duplicates(life.Spawn, spawn)
    assert (spawned.session.state, spawned.session.version) == (ACTIVE, 1)
    expected.append((lc.EVENT_TYPE_SESSION_SPAWNED, None, rid))
    await leaves({"a": 1}, {}, 1)

    await wm.Set(pb.SetRequest(**scope, key="b", value=value(2)))
    rid = str(uuid.uuid4())
    made = await duplicates(
        life.CreateCheckpoint, lc.CreateCheckpointRequest(**scope, request_id=rid)
    )
    mark = made.checkpoint.checkpoint_id  # generated by the server: one, whoever asked
    expected.append((lc.EVENT_TYPE_CHECKPOINT_CREATED, mark, rid))
    checkpoints: dict[str, Any] = {mark: {"a": 1, "b": 2}}
    await leaves({"a": 1, "b": 2}, checkpoints, 1)

    await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id="doomed"))
    expected.append((lc.EVENT_TYPE_CHECKPOINT_CREATED, "doomed", None))
    rid = str(uuid.uuid4())
    delete = lc.DeleteCheckpointRequest(**scope, checkpoint_id="doomed", request_id=rid)
    await duplicates(life.DeleteCheckpoint, delete)  # none of them NOT_FOUND
    expected.append((lc.EVENT_TYPE_CHECKPOINT_DELETED, "doomed", rid))
    await leaves({"a": 1, "b": 2}, checkpoints, 1)

    await wm.Set(pb.SetRequest(**scope, key="c", value=value(3)))
    rid = str(uuid.uuid4())
    paused = await duplicates(life.Pause, lc.PauseRequest(**scope, request_id=rid))
    assert (paused.session.state, paused.session.version) == (PAUSED, 2)
    taken = paused.checkpoint.checkpoint_id
    expected.append((lc.EVENT_TYPE_SESSION_PAUSED, taken, rid))
    checkpoints[taken] = {"a": 1, "b": 2, "c": 3}
    await leaves({"a": 1, "b": 2, "c": 3}, checkpoints, 2)

    rid = str(uuid.uuid4())
    resume = lc.ResumeRequest(**scope, checkpoint_id=mark, request_id=rid)
    resumed = await duplicates(life.Resume, resume)
    assert (resumed.session.state, resumed.session.version) == (ACTIVE, 3)
    assert resumed.entries_restored == 2
    expected.append((lc.EVENT_TYPE_SESSION_RESUMED, mark, rid))
    await leaves({"a": 1, "b": 2}, checkpoints, 3)


async def test_concurrent_terminates_with_one_request_id_have_one_effect(
    life, wm, scope, server, channel
):
    """Five Terminates at once with one request id: one answer, one episode, one
    TERMINATED event, each checkpoint deleted (and announced) once."""
    await life.Spawn(lc.SpawnRequest(**scope, initial_entries=entries(a=1)))
    await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id="kept"))
    taken = (await life.Pause(lc.PauseRequest(**scope))).checkpoint.checkpoint_id
    rid = str(uuid.uuid4())
    ended = await duplicates(life.Terminate, lc.TerminateRequest(**scope, request_id=rid))
    assert (ended.session.state, ended.session.version) == (TERMINATED, 3)
    assert (ended.entries_consolidated, ended.entries_cleared) == (1, 1)
    assert await session_episodes(channel, scope) == [ended.episode_id]
    log = [
        (e.event_type, e.ref, e.request_id)
        for e in await lifecycle_log(server.config.database_url, scope)
    ]
    assert log[:3] == [
        (lc.EVENT_TYPE_SESSION_SPAWNED, None, None),
        (lc.EVENT_TYPE_CHECKPOINT_CREATED, "kept", None),
        (lc.EVENT_TYPE_SESSION_PAUSED, taken, None),
    ]
    deleted = sorted(log[3:5])
    assert deleted == sorted(
        (lc.EVENT_TYPE_CHECKPOINT_DELETED, name, rid) for name in ("kept", taken)
    )
    assert log[5:] == [(lc.EVENT_TYPE_SESSION_TERMINATED, ended.episode_id, rid)]
    listed = await life.ListCheckpoints(lc.ListCheckpointsRequest(**scope))
    assert not listed.checkpoints
    got = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert (got.state, got.version) == (TERMINATED, 3)
    await expect_error(memory_of(wm, scope), grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("keep", [False, True], ids=["cleanup", "keep"])
async def test_terminate_announces_each_checkpoint_it_deletes(life, scope, server, keep):
    """A watcher mirroring checkpoints learns of every deletion, Terminate's too;
    checkpoints a Terminate keeps stay unannounced (and listable)."""
    await life.Spawn(lc.SpawnRequest(**scope))
    for name in ("a", "b"):
        await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id=name))
    await life.Terminate(lc.TerminateRequest(**scope, keep_working_memory=keep))
    deleted = [e[2] for e in events_of(server, scope) if e[1] == lc.EVENT_TYPE_CHECKPOINT_DELETED]
    assert deleted == ([] if keep else ["a", "b"])
    listed = await life.ListCheckpoints(lc.ListCheckpointsRequest(**scope))
    assert len(listed.checkpoints) == (2 if keep else 0)


@dataclass
class Replayed:
    """A session as its event log says it must be."""

    state: int
    memory: dict[str, Any]
    checkpoints: dict[str, dict[str, Any]]
    resume_from: str = ""
    events: int = 0  # how many events were replayed


def replay(events: list[LoggedEvent], session: Replayed, named: set[str]) -> None:
    """Run ``events`` through the state machine from ``session``, failing on any
    illegal step: Pause only from ACTIVE; Resume from PAUSED (to its resume
    checkpoint) or from either state to a checkpoint the calls named (``named``),
    one that exists; a Terminate's checkpoint deletions right before it, the
    terminate once and last."""
    for index, event in enumerate(events):
        where = f"event {session.events + index}: {event}, session {session.state}"
        assert session.state != TERMINATED, f"{where}: after the terminate"
        kind, ref = event.event_type, event.ref or ""
        if kind == lc.EVENT_TYPE_SESSION_PAUSED:
            assert session.state == ACTIVE, where
            assert ref not in session.checkpoints, where
            session.checkpoints[ref] = dict(session.memory)
            session.state, session.resume_from = PAUSED, ref
        elif kind == lc.EVENT_TYPE_SESSION_RESUMED:
            assert session.state in (ACTIVE, PAUSED), where
            assert ref in session.checkpoints, where
            own = session.state == PAUSED and ref == session.resume_from
            assert own or ref in named, f"{where}: resumed from a checkpoint nobody named"
            session.memory = dict(session.checkpoints[ref])
            session.state = ACTIVE
        elif kind == lc.EVENT_TYPE_CHECKPOINT_DELETED:
            assert ref in session.checkpoints, where
            following = {e.event_type for e in events[index + 1 :]}
            assert following <= {lc.EVENT_TYPE_CHECKPOINT_DELETED, lc.EVENT_TYPE_SESSION_TERMINATED}
            assert lc.EVENT_TYPE_SESSION_TERMINATED in following, where
            del session.checkpoints[ref]
        elif kind == lc.EVENT_TYPE_SESSION_TERMINATED:
            assert not session.checkpoints, f"{where}: checkpoints left"
            session.state, session.memory = TERMINATED, {}
        else:
            raise AssertionError(f"{where}: not a Pause, Resume or Terminate")
    session.events += len(events)


async def test_concurrent_lifecycle_calls_are_serialized(life, wm, scope, server):
    """Pause/Resume/Terminate racing: the event log replays through the state
    machine, each success is one event and one version step, and the state, the
    checkpoints and the working memory are what the last event left."""
    await life.Spawn(lc.SpawnRequest(**scope, initial_entries=entries(a=1)))
    await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id="base"))
    await wm.Set(pb.SetRequest(**scope, key="b", value=value(2)))
    session = Replayed(ACTIVE, {"a": 1, "b": 2}, {"base": {"a": 1}}, events=2)

    async def attempt(call: Any) -> Any:
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            details = details_of(error)
            assert details.code == grpc.StatusCode.FAILED_PRECONDITION, details
            assert details.reason == "ERROR_REASON_INVALID_TRANSITION", details
            return None

    for terminate in (False, True):
        calls = [life.Pause(lc.PauseRequest(**scope)) for _ in range(3)]
        calls += [life.Resume(lc.ResumeRequest(**scope)) for _ in range(2)]
        calls += [life.Resume(lc.ResumeRequest(**scope, checkpoint_id="base")) for _ in range(2)]
        calls += [life.Terminate(lc.TerminateRequest(**scope))] if terminate else []
        answers = [a for a in await asyncio.gather(*(attempt(c) for c in calls)) if a is not None]
        log = await lifecycle_log(server.config.database_url, scope)
        assert [e.sequence - log[0].sequence for e in log] == list(range(len(log)))  # no gaps
        new = log[session.events :]
        replay(new, session, named={"base"})
        # Each answer is one of the new events, and each change event one answer.
        changes = [e for e in new if e.event_type != lc.EVENT_TYPE_CHECKPOINT_DELETED]
        assert sorted((e.event_type, e.ref) for e in changes) == sorted(
            answered(answer) for answer in answers
        )
        got = (await life.GetSession(lc.GetSessionRequest(**scope))).session
        assert got.state == session.state
        assert got.version == 1 + len([e for e in log if e.event_type in TRANSITION_EVENTS])
        if session.state == PAUSED:
            assert got.resume_checkpoint_id == session.resume_from
        listed = await life.ListCheckpoints(lc.ListCheckpointsRequest(**scope, page_size=100))
        assert sorted(c.checkpoint_id for c in listed.checkpoints) == sorted(session.checkpoints)
        for name, contents in session.checkpoints.items():
            assert await checkpoint_contents(life, scope, name) == contents
        if session.state == TERMINATED:
            await expect_error(memory_of(wm, scope), grpc.StatusCode.NOT_FOUND)
        else:
            assert await memory_of(wm, scope) == session.memory
        write = wm.Set(pb.SetRequest(**scope, key="b", value=value(2)))
        if session.state == ACTIVE:
            await write
            session.memory["b"] = 2
        else:
            await expect_error(write, grpc.StatusCode.FAILED_PRECONDITION)


TRANSITION_EVENTS = frozenset(
    {lc.EVENT_TYPE_SESSION_PAUSED, lc.EVENT_TYPE_SESSION_RESUMED, lc.EVENT_TYPE_SESSION_TERMINATED}
)


def answered(answer: Any) -> tuple[int, str]:
    """The (event type, checkpoint or episode id) an answer announces."""
    if isinstance(answer, lc.PauseResponse):
        return lc.EVENT_TYPE_SESSION_PAUSED, answer.checkpoint.checkpoint_id
    if isinstance(answer, lc.ResumeResponse):
        return lc.EVENT_TYPE_SESSION_RESUMED, answer.checkpoint.checkpoint_id
    return lc.EVENT_TYPE_SESSION_TERMINATED, answer.episode_id


async def test_checkpoints_are_listed_newest_first_and_deletable(life, scope):
    await life.Spawn(lc.SpawnRequest(**scope, initial_entries=entries(a=1)))
    made = []
    for name in ("c1", "c2", "c3"):
        made.append(
            (
                await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id=name))
            ).checkpoint
        )
    page = await life.ListCheckpoints(lc.ListCheckpointsRequest(**scope, page_size=2))
    rest = await life.ListCheckpoints(
        lc.ListCheckpointsRequest(**scope, page_token=page.next_page_token)
    )
    listed = [c.checkpoint_id for c in page.checkpoints] + [
        c.checkpoint_id for c in rest.checkpoints
    ]
    expected = [
        c.checkpoint_id
        for c in sorted(
            made, key=lambda c: (c.create_time.ToMilliseconds(), c.checkpoint_id), reverse=True
        )
    ]
    assert listed == expected
    assert rest.next_page_token == ""
    await life.DeleteCheckpoint(lc.DeleteCheckpointRequest(**scope, checkpoint_id="c2"))
    await expect_error(
        life.DeleteCheckpoint(lc.DeleteCheckpointRequest(**scope, checkpoint_id="c2")),
        grpc.StatusCode.NOT_FOUND,
    )
    paused = await life.Pause(lc.PauseRequest(**scope))
    error = await expect_error(
        life.DeleteCheckpoint(
            lc.DeleteCheckpointRequest(**scope, checkpoint_id=paused.checkpoint.checkpoint_id)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error.reason == "ERROR_REASON_CHECKPOINT_PROTECTED"


async def test_list_sessions_filters_and_pages(life, scope):
    agent_a, agent_b = str(uuid.uuid4()), str(uuid.uuid4())
    for agent, name in [(agent_a, "s1"), (agent_a, "s2"), (agent_b, "s3")]:
        await life.Spawn(
            lc.SpawnRequest(
                project_id=scope["project_id"], agent_instance_id=agent, session_id=name
            )
        )
    await life.Pause(
        lc.PauseRequest(project_id=scope["project_id"], agent_instance_id=agent_a, session_id="s1")
    )
    everything = []
    token = ""
    while True:
        page = await life.ListSessions(
            lc.ListSessionsRequest(project_id=scope["project_id"], page_size=1, page_token=token)
        )
        everything += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert sorted(everything) == ["s1", "s2", "s3"]
    assert len(set(everything)) == 3
    only_a = await life.ListSessions(
        lc.ListSessionsRequest(project_id=scope["project_id"], agent_instance_id=agent_a)
    )
    assert sorted(s.session_id for s in only_a.sessions) == ["s1", "s2"]
    paused = await life.ListSessions(
        lc.ListSessionsRequest(project_id=scope["project_id"], state=PAUSED)
    )
    assert [s.session_id for s in paused.sessions] == ["s1"]


# A page token's position replaced (its fingerprint still matches): not a list,
# the wrong length, a time outside protobuf's range, a NUL in an id.
FORGED_POSITIONS = ('"x"', "[1]", '[1e400, "a", "b"]', '[1, "a\\u0000", "b"]',
                    '[99999999999999999999, "a", "b"]', '["1", "a", "b"]',
                    '[1, "a\\ud800", "b"]', "[" * 100_000)  # fmt: skip


async def test_forged_page_tokens_are_invalid_argument(life, wm, scope):
    for name in (scope["session_id"], "other"):
        await life.Spawn(lc.SpawnRequest(**{**scope, "session_id": name}))
    # Working memory's position is a key: one no key can be is refused too.
    await wm.BatchSet(pb.BatchSetRequest(**scope, entries=entries(a=1, b=2)))
    keys = pb.ListKeysRequest(**scope, page_size=1)
    keys.page_token = forge_page_token((await wm.ListKeys(keys)).next_page_token, "\ud800")
    error = await expect_error(wm.ListKeys(keys), grpc.StatusCode.INVALID_ARGUMENT)
    assert "page_token" in error.violations
    await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope))
    await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope))
    sessions = lc.ListSessionsRequest(project_id=scope["project_id"], page_size=1)
    checkpoints = lc.ListCheckpointsRequest(**scope, page_size=1)
    for call, request in ((life.ListSessions, sessions), (life.ListCheckpoints, checkpoints)):
        token = (await call(request)).next_page_token
        for position in FORGED_POSITIONS:
            # ListCheckpoints' position has two parts: keep the same defects.
            if call == life.ListCheckpoints and position.startswith("["):
                position = position.replace(', "b"]', "]")
            request.page_token = forge_page_token(token, position)
            error = await expect_error(call(request), grpc.StatusCode.INVALID_ARGUMENT)
            assert "page_token" in error.violations, position
    # A ListSessions position names an agent instance: a valid time and text that is
    # no UUID is refused too (PostgreSQL's uuid column cannot compare it).
    sessions.page_token = ""
    sessions.page_token = forge_page_token(
        (await life.ListSessions(sessions)).next_page_token, '[1700000000000, "not-a-uuid", "b"]'
    )
    error = await expect_error(life.ListSessions(sessions), grpc.StatusCode.INVALID_ARGUMENT)
    assert "page_token" in error.violations


async def test_bad_lifecycle_input_is_invalid_argument(life, scope):
    cases = [
        (life.Spawn(lc.SpawnRequest(**scope, agent_type_id="not-a-uuid")), "agent_type_id"),
        (life.Spawn(lc.SpawnRequest(**scope, request_id="nope")), "request_id"),
        (
            life.Spawn(lc.SpawnRequest(**scope, initial_entries=[pb.EntryInput(key="k")])),
            "initial_entries[0].value",
        ),
        (life.Pause(lc.PauseRequest(**scope, checkpoint_id="has space")), "checkpoint_id"),
        (life.ListSessions(lc.ListSessionsRequest(project_id="x")), "project_id"),
        (life.ListCheckpoints(lc.ListCheckpointsRequest(**scope, page_size=-1)), "page_size"),
    ]
    for call, field in cases:
        error = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert field in error.violations, error.violations
    await expect_error(life.GetSession(lc.GetSessionRequest(**scope)), grpc.StatusCode.NOT_FOUND)


async def test_working_memory_is_bound_to_spawned_sessions(life, wm, scope):
    """Never spawned: writes FAILED_PRECONDITION, reads NOT_FOUND; the same once terminated."""
    error = await expect_error(
        wm.Set(pb.SetRequest(**scope, key="k", value=value(1))), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert error.reason == "ERROR_REASON_SESSION_NOT_WRITABLE"
    assert error.metadata["state"] == "not spawned"
    error = await expect_error(wm.Get(pb.GetRequest(**scope, key="k")), grpc.StatusCode.NOT_FOUND)
    assert error.reason == "ERROR_REASON_SESSION_NOT_FOUND"
    await expect_error(wm.ListKeys(pb.ListKeysRequest(**scope)), grpc.StatusCode.NOT_FOUND)
    await life.Spawn(lc.SpawnRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="k", value=value(1)))
    await life.Terminate(lc.TerminateRequest(**scope))
    error = await expect_error(
        wm.Set(pb.SetRequest(**scope, key="k", value=value(2))), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert error.metadata["state"] == "terminated"
    error = await expect_error(wm.Get(pb.GetRequest(**scope, key="k")), grpc.StatusCode.NOT_FOUND)
    assert "terminated" in error.message


async def test_terminate_can_keep_working_memory_read_only(life, wm, scope):
    await life.Spawn(lc.SpawnRequest(**scope, initial_entries=entries(a=1)))
    await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id="kept"))
    ended = await life.Terminate(
        lc.TerminateRequest(**scope, keep_working_memory=True, skip_consolidation=True)
    )
    assert (ended.episode_id, ended.entries_cleared, ended.entries_consolidated) == ("", 0, 0)
    assert await memory_of(wm, scope) == {"a": 1}
    await expect_error(
        wm.Set(pb.SetRequest(**scope, key="b", value=value(2))), grpc.StatusCode.FAILED_PRECONDITION
    )
    listed = await life.ListCheckpoints(lc.ListCheckpointsRequest(**scope))
    assert [c.checkpoint_id for c in listed.checkpoints] == ["kept"]


async def test_concurrent_writes_during_pause_never_tear_the_checkpoint(life, wm, scope):
    """Every write acknowledged while a Pause runs is in its checkpoint. Writers
    keep writing until the Pause refuses them, so the Pause always meets writes."""
    await life.Spawn(lc.SpawnRequest(**scope))
    acknowledged: list[str] = []

    async def writer(index: int) -> None:
        for attempt in range(10_000):
            key = f"k{index:02d}-{attempt:04d}"
            try:
                await wm.Set(pb.SetRequest(**scope, key=key, value=value(attempt)))
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
                return  # paused
            acknowledged.append(key)
        raise AssertionError("the Pause never refused this writer")

    writers = [asyncio.ensure_future(writer(i)) for i in range(8)]

    async def writing() -> bool:
        return len(acknowledged) >= 20

    await eventually(writing)
    paused = await life.Pause(lc.PauseRequest(**scope))
    await asyncio.gather(*writers)
    detail = await life.GetCheckpoint(
        lc.GetCheckpointRequest(
            **scope, checkpoint_id=paused.checkpoint.checkpoint_id, include_entries=True,
            page_size=1000,
        )
    )  # fmt: skip
    in_checkpoint = {e.key for e in detail.entries}
    assert set(acknowledged) <= in_checkpoint
    assert set(await memory_of(wm, scope)) == in_checkpoint
    assert paused.checkpoint.key_count == len(in_checkpoint)


async def test_checkpoint_events_are_recorded(life, scope, server):
    await life.Spawn(lc.SpawnRequest(**scope))
    await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id="c"))
    await life.DeleteCheckpoint(lc.DeleteCheckpointRequest(**scope, checkpoint_id="c"))
    events = events_of(server, scope)
    assert [(kind, ref) for _, kind, ref in events] == [(1, None), (5, "c"), (6, "c")]


@pytest.mark.parametrize(
    ("lessons", "field"),
    [(["lesson"] * 101, "lessons_learned"), (["x" * 2001], "lessons_learned[0]")],
    ids=["101 lessons", "a lesson of 2,001 characters"],
)
async def test_terminate_lessons_have_the_episode_limits(life, scope, lessons, field):
    """They become the episode's lessons as they are (only the description is cut),
    so an episode recorded by Terminate keeps the Episode contract."""
    await life.Spawn(lc.SpawnRequest(**scope))
    error = await expect_error(
        life.Terminate(lc.TerminateRequest(**scope, lessons_learned=lessons)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(error.violations) == {field}
    got = await life.GetSession(lc.GetSessionRequest(**scope))
    assert got.session.state == ACTIVE


async def test_terminate_without_an_episode_takes_any_lessons(life, scope):
    """Lessons go nowhere without consolidation: they are not the episode's."""
    await life.Spawn(lc.SpawnRequest(**scope))
    ended = await life.Terminate(
        lc.TerminateRequest(**scope, lessons_learned=["lesson"] * 101, skip_consolidation=True)
    )
    assert ended.session.state == TERMINATED and not ended.episode_id
