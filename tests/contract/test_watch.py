"""WatchLifecycle contract: ordered, resumable, filtered event streams on both deployments."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2

from memsvc.config import Config
from memsvc.server import Server
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.conftest import stop_or_explain
from tests.helpers import details_of, next_event, sql_rows

FAST = duration_pb2.Duration(nanos=200_000_000)


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


@pytest.fixture
def life(channel: grpc.aio.Channel) -> LifecycleServiceStub:
    return LifecycleServiceStub(channel)


async def start_position(call: Any) -> int:
    first = await asyncio.wait_for(call.read(), 10)
    assert first.HasField("progress"), "a stream starts with a progress message"
    return int(first.progress.sequence)


async def test_events_arrive_live_with_their_fields(life, scope):
    call = life.WatchLifecycle(lc.WatchLifecycleRequest(project_id=scope["project_id"]))
    start = await start_position(call)
    # Sent in upper case: the event carries the canonical (lower-case) form.
    agent_type_id, request_id = str(uuid.uuid4()).upper(), str(uuid.uuid4()).upper()
    spawn_metadata = {"owner": "watch-test", "attempt": 2, "tags": ["a", "b"]}
    pause_request_id = str(uuid.uuid4())
    await life.Spawn(
        lc.SpawnRequest(
            **scope,
            agent_type_id=agent_type_id,
            request_id=request_id,
            metadata=struct(spawn_metadata),
        )
    )
    paused = await life.Pause(
        lc.PauseRequest(**scope, request_id=pause_request_id, metadata=struct({"why": "test"}))
    )
    spawned = await next_event(call)
    assert spawned.event_type == lc.EVENT_TYPE_SESSION_SPAWNED
    assert spawned.sequence > start
    assert (
        spawned.project_id,
        spawned.agent_instance_id,
        spawned.session_id,
        spawned.agent_type_id,
        spawned.request_id,
    ) == (
        scope["project_id"],
        scope["agent_instance_id"],
        scope["session_id"],
        agent_type_id.lower(),
        request_id.lower(),
    )
    assert json_format.MessageToDict(spawned.metadata) == spawn_metadata
    assert spawned.HasField("event_time")
    pause_event = await next_event(call)
    assert pause_event.event_type == lc.EVENT_TYPE_SESSION_PAUSED
    # Later, not necessarily next: the server's retention sweep may append between.
    assert pause_event.sequence > spawned.sequence
    assert pause_event.checkpoint_id == paused.checkpoint.checkpoint_id
    assert (pause_event.session_id, pause_event.agent_type_id, pause_event.request_id) == (
        scope["session_id"],
        agent_type_id.lower(),
        pause_request_id,
    )
    assert json_format.MessageToDict(pause_event.metadata) == {"why": "test"}
    # Event ids are UUIDs (canonical form), one of its own per event.
    ids = [spawned.event_id, pause_event.event_id]
    assert [str(uuid.UUID(event_id)) for event_id in ids] == ids
    assert ids[0] != ids[1]
    call.cancel()


async def test_resume_after_a_sequence_is_exact(life, scope):
    project = {"project_id": scope["project_id"]}
    call = life.WatchLifecycle(lc.WatchLifecycleRequest(**project))
    await start_position(call)
    await life.Spawn(lc.SpawnRequest(**scope))
    for _ in range(3):
        await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope))
    seen = [await next_event(call) for _ in range(4)]
    call.cancel()
    sequences = [e.sequence for e in seen]
    assert sequences == sorted(sequences)
    again = life.WatchLifecycle(lc.WatchLifecycleRequest(**project, after_sequence=sequences[1]))
    assert await start_position(again) == sequences[1]
    resumed = [await next_event(again) for _ in range(2)]
    assert [e.event_id for e in resumed] == [e.event_id for e in seen[2:]]
    oldest = life.WatchLifecycle(lc.WatchLifecycleRequest(**project, start=lc.WATCH_START_OLDEST))
    await start_position(oldest)
    replayed = [await next_event(oldest) for _ in range(4)]
    assert [e.event_id for e in replayed] == [e.event_id for e in seen]
    again.cancel()
    oldest.cancel()


async def next_batch(call: Any) -> list[lc.LifecycleEvent]:
    """The events of the next batch of a stream that asked for batches (progress
    messages skipped; an event alone in `event` fails the test)."""
    while True:
        message = await asyncio.wait_for(call.read(), 10)
        assert message is not grpc.aio.EOF
        assert not message.HasField("event"), "a batching stream got an event alone"
        if message.HasField("batch"):
            assert message.batch.events, "an empty batch"
            return list(message.batch.events)


async def test_a_stream_that_asks_for_batches_gets_events_ready_together_in_one_message(
    life, scope
):
    """max_events_per_message: events ready together come in one message, never
    more than asked, in order, each once; a batch's last sequence is a cursor."""
    session = {**scope}
    now = life.WatchLifecycle(lc.WatchLifecycleRequest(**session))
    before = await start_position(now)
    now.cancel()
    await life.Spawn(lc.SpawnRequest(**scope))
    for _ in range(6):
        await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope))
    # Seven events in the log: a stream from before them reads them together.
    call = life.WatchLifecycle(
        lc.WatchLifecycleRequest(**session, after_sequence=before, max_events_per_message=3)
    )
    assert await start_position(call) == before
    batches = [await next_batch(call) for _ in range(3)]
    assert [len(batch) for batch in batches] == [3, 3, 1]
    caught_up = [event for batch in batches for event in batch]
    assert [e.event_type for e in caught_up] == [lc.EVENT_TYPE_SESSION_SPAWNED] + [
        lc.EVENT_TYPE_CHECKPOINT_CREATED
    ] * 6
    sequences = [e.sequence for e in caught_up]
    assert sequences == sorted(set(sequences)) and sequences[0] > before
    # Live: events committed together come in batches of 1 to 3, each once, in order.
    await asyncio.gather(
        *(life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope)) for _ in range(8))
    )
    live: list[lc.LifecycleEvent] = []
    while len(live) < 8:
        batch = await next_batch(call)
        assert 1 <= len(batch) <= 3
        live.extend(batch)
    assert len(live) == 8
    live_sequences = [e.sequence for e in live]
    assert live_sequences == sorted(set(live_sequences)) and live_sequences[0] > sequences[-1]
    call.cancel()
    # Resuming after any event, here one in the middle of a batch (the fourth), is exact.
    again = life.WatchLifecycle(
        lc.WatchLifecycleRequest(
            **session, after_sequence=sequences[3], max_events_per_message=1000
        )
    )
    await start_position(again)
    rest = await next_batch(again)
    assert [e.event_id for e in rest] == [e.event_id for e in caught_up[4:] + live]
    again.cancel()


async def test_filters_select_sessions_and_types(life, scope):
    other = dict(scope, session_id=scope["session_id"] + "-other")
    call = life.WatchLifecycle(
        lc.WatchLifecycleRequest(
            project_id=scope["project_id"],
            session_id=scope["session_id"],
            event_types=[lc.EVENT_TYPE_SESSION_PAUSED, lc.EVENT_TYPE_SESSION_TERMINATED],
        )
    )
    await start_position(call)
    await life.Spawn(lc.SpawnRequest(**other))
    await life.Pause(lc.PauseRequest(**other))
    await life.Spawn(lc.SpawnRequest(**scope))
    await life.Pause(lc.PauseRequest(**scope))
    await life.Terminate(lc.TerminateRequest(**scope))
    kinds = [(await next_event(call)).event_type for _ in range(2)]
    assert kinds == [lc.EVENT_TYPE_SESSION_PAUSED, lc.EVENT_TYPE_SESSION_TERMINATED]
    call.cancel()


async def test_progress_messages_keep_a_quiet_cursor_fresh(life, scope):
    quiet = life.WatchLifecycle(
        lc.WatchLifecycleRequest(project_id=str(uuid.uuid4()), progress_interval=FAST)
    )
    start = await start_position(quiet)
    await life.Spawn(lc.SpawnRequest(**scope))
    latest = start
    while latest <= start:
        message = await asyncio.wait_for(quiet.read(), 10)
        assert message.HasField("progress"), "nothing matches this filter"
        latest = message.progress.sequence
    assert latest > start
    quiet.cancel()


async def test_a_watch_with_no_commits_at_all_gets_periodic_progress(life):
    """Periodic, not one progress after a commit somewhere: nobody writes to this
    project, and messages still come, each at or after the start position."""
    quiet = life.WatchLifecycle(
        lc.WatchLifecycleRequest(project_id=str(uuid.uuid4()), progress_interval=FAST)
    )
    try:
        start = await start_position(quiet)
        for _ in range(2):
            message = await asyncio.wait_for(quiet.read(), 10)
            assert message.HasField("progress"), "nothing matches this filter"
            assert message.progress.sequence >= start
    finally:
        quiet.cancel()


async def test_bad_watch_requests_are_invalid_argument(life):
    for request, field in [
        (lc.WatchLifecycleRequest(project_id="nope"), "project_id"),
        (lc.WatchLifecycleRequest(after_sequence=-1), "after_sequence"),
        (lc.WatchLifecycleRequest(event_types=[lc.EventType.ValueType(99)]), "event_types[0]"),
        (
            lc.WatchLifecycleRequest(
                event_types=[lc.EVENT_TYPE_SESSION_PAUSED, lc.EVENT_TYPE_UNSPECIFIED]
            ),
            "event_types[1]",
        ),
        (
            lc.WatchLifecycleRequest(progress_interval=duration_pb2.Duration(nanos=1000)),
            "progress_interval",
        ),
        (  # malformed: seconds and nanos of opposite signs
            lc.WatchLifecycleRequest(
                progress_interval=duration_pb2.Duration(seconds=1, nanos=-500_000_000)
            ),
            "progress_interval",
        ),
        (lc.WatchLifecycleRequest(start=lc.WatchStart.ValueType(7)), "start"),
        (lc.WatchLifecycleRequest(max_events_per_message=-1), "max_events_per_message"),
        (lc.WatchLifecycleRequest(max_events_per_message=1001), "max_events_per_message"),
        (  # found by a review: a stream keeps its request (4 MB of one type: 7.5 MB)
            lc.WatchLifecycleRequest(event_types=[lc.EVENT_TYPE_SESSION_PAUSED] * 65),
            "event_types",
        ),
    ]:
        call = life.WatchLifecycle(request)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
        details = details_of(error.value)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in details.violations
        if request.event_types[1:] == [lc.EVENT_TYPE_UNSPECIFIED]:
            # What to do instead, not "is not an EventType value: 0".
            assert "none to watch every type" in details.violations[field]


async def test_a_filter_may_list_64_event_types(life):
    call = life.WatchLifecycle(
        lc.WatchLifecycleRequest(event_types=[lc.EVENT_TYPE_SESSION_PAUSED] * 64)
    )
    assert (await call.read()).WhichOneof("kind") == "progress"
    call.cancel()


async def test_a_zero_progress_interval_is_the_default(life):
    """Found by a review: an empty Duration (grpcurl's "0s", Go's zero value) was
    INVALID_ARGUMENT, where every other Duration of the API takes zero as unset."""
    call = life.WatchLifecycle(
        lc.WatchLifecycleRequest(progress_interval=duration_pb2.Duration(seconds=0))
    )
    first = await call.read()
    assert first.WhichOneof("kind") == "progress"
    # Not an interval of zero either (progress as fast as it can go): nothing
    # matches here, and the next progress is ten seconds away.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(call.read(), 1.0)
    call.cancel()


def on_database(url: str, database: str) -> str:
    """``url`` (a postgresql:// URL, maybe through a pooler) naming ``database`` instead."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@pytest.fixture
async def own_server(base_config: Config, request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    """A server whose event log is this test's alone, from its first event: the
    embedded SQLite is in the test's own directory already; PostgreSQL gets a fresh
    database (through the same pooler, if any) instead of the run's shared one."""
    config = base_config
    if config.database_url.startswith("postgres"):
        fresh = urlsplit(request.getfixturevalue("fresh_postgres_url")).path.lstrip("/")
        listen = config.database_listen_url
        config = replace(
            config,
            database_url=on_database(config.database_url, fresh),
            database_listen_url=listen if listen in ("", "off") else on_database(listen, fresh),
        )
    running = Server(config)
    await running.start()
    try:
        yield running
    finally:
        await stop_or_explain(running)


async def test_after_sequence_zero_means_from_the_first_event(own_server: Server, scope):
    """An explicit 0 is a position (before the first event), not "now"."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{own_server.port}") as channel:
        life = LifecycleServiceStub(channel)
        await life.Spawn(lc.SpawnRequest(**scope))
        call = life.WatchLifecycle(
            lc.WatchLifecycleRequest(project_id=scope["project_id"], after_sequence=0)
        )
        try:
            assert await start_position(call) == 0
            assert (await next_event(call)).event_type == lc.EVENT_TYPE_SESSION_SPAWNED
        finally:
            call.cancel()


async def test_an_event_type_from_a_newer_memsvc_is_delivered_as_its_number(life, scope, server):
    """In a rolling upgrade a newer replica may log a type this one does not know:
    its tail delivers it (protobuf enums are open) and goes on, instead of failing
    on that row forever while every watcher waits."""
    call = life.WatchLifecycle(lc.WatchLifecycleRequest(project_id=scope["project_id"]))
    await start_position(call)
    await life.Spawn(lc.SpawnRequest(**scope))
    url = server.config.database_url
    insert = (
        "INSERT INTO lifecycle_events (sequence, event_id, event_type, project_id,"
        " agent_instance_id, session_id, metadata, event_time)"
        " SELECT last_sequence, ?, 99, ?, ?, ?, '{}', '2026-12-06T00:00:00.000Z' FROM {source}"
    )
    event = (
        str(uuid.uuid4()),
        scope["project_id"],
        scope["agent_instance_id"],
        scope["session_id"],
    )
    bump = "UPDATE event_sequence SET last_sequence = last_sequence + 1"
    if url.startswith("sqlite"):  # this server's own file: nobody appends in between
        await sql_rows(url, bump)
        await sql_rows(url, insert.replace("{source}", "event_sequence"), *event)
    else:  # one statement: other servers of the run may append to the same log
        await sql_rows(
            url,
            f"WITH s AS ({bump} RETURNING last_sequence) " + insert.replace("{source}", "s"),
            *event,
        )
    await life.Pause(lc.PauseRequest(**scope))  # commits after it, and wakes the tail
    types = [(await next_event(call)).event_type for _ in range(3)]
    assert types == [lc.EVENT_TYPE_SESSION_SPAWNED, 99, lc.EVENT_TYPE_SESSION_PAUSED]
    call.cancel()
