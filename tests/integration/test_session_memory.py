"""The lifecycle steps of each working-memory store (ADR 0004), on memory and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from memsvc.domain import EntryWrite, SessionLimitExceeded, SessionNotWritable, SessionRef
from memsvc.domain._session_memory import (
    ContentsNeeded,
    LostOperation,
    MarkerStateError,
    NoSession,
    ResumePoint,
    SnapshotEntry,
)
from memsvc.domain._snapshot import encode_snapshot
from memsvc.store.memory import InMemoryWorkingMemoryStore
from memsvc.store.redis import RedisWorkingMemoryStore, session_keys
from memsvc.store.redis._working_memory import staging_keys
from memsvc.testing import PrivateRedis, free_port
from tests.conftest import REDIS_URL, need


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "redis":
        need(REDIS_URL)
        created: Any = RedisWorkingMemoryStore(
            REDIS_URL, max_session_keys=10, max_session_bytes=1000
        )
    else:
        created = InMemoryWorkingMemoryStore(max_session_keys=10, max_session_bytes=1000)
    await created.open()
    created.touched = []
    yield created
    await created.aclose()
    if request.param == "redis":
        client = aioredis.Redis.from_url(REDIS_URL)
        for session in created.touched:
            await client.delete(*session_keys(session), *staging_keys(session))
        await client.aclose()


@pytest.fixture
def session(store: Any) -> SessionRef:
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "lifecycle")
    store.touched.append(ref)
    return ref


async def contents(store: Any, session: SessionRef) -> dict[str, bytes]:
    items, _ = await store.list_entries(session, None, 100, 1 << 20)
    return {item.key: item.value for item in items}


async def spawn(store: Any, session: SessionRef, entries: dict[str, bytes], ttl: int | None = None):
    await store.begin_spawn(
        session, "op-spawn", "epoch-1", [EntryWrite(k, v, ttl) for k, v in entries.items()]
    )
    await store.finish(session, "op-spawn", "active", swap=False, clear=False)


async def test_spawn_is_refusing_writes_until_finished(store, session):
    await store.begin_spawn(session, "op1", "epoch-1", [EntryWrite("a", b"1", None)])
    marker = await store.read_marker(session)
    assert marker.state == "spawning"
    with pytest.raises(SessionNotWritable):
        await store.set_entries(session, [EntryWrite("b", b"2", None)])
    await store.finish(session, "op1", "active", swap=False, clear=False)
    marker = await store.read_marker(session)
    assert (marker.state, marker.epoch, marker.op) == ("active", "epoch-1", None)
    await store.set_entries(session, [EntryWrite("b", b"2", None)])
    assert await contents(store, session) == {"a": b"1", "b": b"2"}


async def test_pause_snapshot_is_atomic_and_refuses_later_writes(store, session):
    await spawn(store, session, {"a": b"1"})
    await store.set_entries(session, [EntryWrite("t", b"2", 60_000)])
    snapshot = await store.begin_snapshot(session, "op2", "pausing", False, {"active"})
    assert snapshot.prior_state == "active"
    by_key = {e.key: e for e in snapshot.entries()}
    assert by_key["a"].remaining_ttl_ms is None
    assert 0 < by_key["t"].remaining_ttl_ms <= 60_000
    with pytest.raises(SessionNotWritable) as refused:
        await store.set_entries(session, [EntryWrite("late", b"x", None)])
    assert refused.value.metadata["state"] == "pausing"
    await store.finish(session, "op2", "paused", swap=False, clear=False)
    assert (await store.read_marker(session)).state == "paused"
    with pytest.raises(SessionNotWritable):
        await store.delete_entries(session, ["a"])
    assert await contents(store, session) == {"a": b"1", "t": b"2"}, "reads still work"


async def test_snapshot_in_a_wrong_state_changes_nothing(store, session):
    with pytest.raises(MarkerStateError) as error:
        await store.begin_snapshot(session, "op", "pausing", False, {"active"})
    assert error.value.state == "missing"
    assert await store.read_marker(session) is None


async def test_concurrent_writes_never_tear_a_pause(store, session):
    """Every write acknowledged around a pause is in its snapshot; later ones are refused."""
    await spawn(store, session, {})
    acknowledged: list[str] = []

    async def writer(index: int) -> None:
        try:
            await store.set_entries(session, [EntryWrite(f"k{index}", b"v", None)])
            acknowledged.append(f"k{index}")
        except SessionNotWritable:
            pass

    writers = [asyncio.create_task(writer(i)) for i in range(9)]
    await asyncio.sleep(0)
    snapshot = await store.begin_snapshot(session, "op", "pausing", False, {"active"})
    await asyncio.gather(*writers)
    assert set(acknowledged) <= {e.key for e in snapshot.entries()}
    assert set(await contents(store, session)) == {e.key for e in snapshot.entries()}


async def test_restore_is_staged_then_swapped_with_ttls(store, session):
    await spawn(store, session, {"old": b"o", "both": b"1"})
    checkpoint = [SnapshotEntry("both", b"2", None), SnapshotEntry("ttl", b"t", 50_000)]
    count = await store.begin_restore(
        session, "op3", "epoch-2", encode_snapshot(checkpoint), False, {"active"}
    )
    assert count == 2
    # Until the commit is known, no read is served (the caller heals the marker first).
    with pytest.raises(NoSession) as unread:
        await contents(store, session)
    assert unread.value.state == "resuming"
    with pytest.raises(SessionNotWritable):
        await store.set_entries(session, [EntryWrite("x", b"x", None)])
    await store.finish(session, "op3", "active", swap=True, clear=False)
    assert await contents(store, session) == {"both": b"2", "ttl": b"t"}
    marker = await store.read_marker(session)
    assert (marker.state, marker.epoch) == ("active", "epoch-2")
    read = await store.get_entries(session, ["ttl", "both"], 1 << 20)
    assert read.found[0].expire_at_ms is not None
    assert read.found[1].expire_at_ms is None
    await store.set_entries(session, [EntryWrite("x", b"x", None)])


async def test_reads_wait_out_spawn_resume_and_terminate_but_not_pause(store, session):
    """Spawn seeds, resume replaces and terminate deletes the contents: while one is
    between its steps, the store serves no read (get or list) and names the state.
    A pause changes no contents, so reads go on while it runs."""
    await store.begin_spawn(session, "op-s", "epoch-1", [EntryWrite("k", b"v", None)])
    for read in (contents(store, session), store.get_entries(session, ["k"], 1 << 20)):
        with pytest.raises(NoSession) as unread:
            await read
        assert unread.value.state == "spawning"
    await store.finish(session, "op-s", "active", swap=False, clear=False)
    await store.begin_snapshot(session, "op-p", "pausing", False, {"active"})
    assert await contents(store, session) == {"k": b"v"}, "a pause changes no contents"
    await store.finish(session, "op-p", "paused", swap=False, clear=False)
    await store.begin_snapshot(session, "op-t", "terminating", True, {"paused"})
    with pytest.raises(NoSession) as unread:
        await store.get_entries(session, ["k"], 1 << 20)
    assert unread.value.state == "terminating"


async def test_merge_restore_keeps_keys_absent_from_the_checkpoint(store, session):
    await spawn(store, session, {"keep": b"k", "both": b"1"})
    await store.begin_restore(
        session, "op", "e2", encode_snapshot([SnapshotEntry("both", b"2", None)]), True, {"active"}
    )
    await store.finish(session, "op", "active", swap=True, clear=False)
    assert await contents(store, session) == {"keep": b"k", "both": b"2"}
    await store.set_entries(session, [EntryWrite("n", b"n", None)])
    assert len(await contents(store, session)) == 3


async def test_a_merge_restore_outlives_the_live_keys_expiry(store, session):
    """Every live key has a TTL, so the live memory expires as a whole; what the
    merge staged (the checkpoint's entries, one with no TTL) must not go with it."""
    await spawn(store, session, {"short": b"s"}, ttl=300)
    checkpoint = encode_snapshot([SnapshotEntry("restored", b"r", None)])
    await store.begin_restore(session, "op", "e2", checkpoint, True, {"active"})
    await asyncio.sleep(0.5)  # the live key expires between step 1 and step 3
    await store.finish(session, "op", "active", swap=True, clear=False)
    assert await contents(store, session) == {"restored": b"r"}


async def test_restore_past_the_limits_stages_nothing(store, session):
    await spawn(store, session, {"a": b"1"})
    too_many = [SnapshotEntry(f"k{i}", b"v", None) for i in range(11)]
    with pytest.raises(SessionLimitExceeded):
        await store.begin_restore(session, "op", "e2", encode_snapshot(too_many), False, {"active"})
    assert (await store.read_marker(session)).state == "active"
    await store.set_entries(session, [EntryWrite("b", b"2", None)])


async def test_abort_puts_things_back(store, session):
    await spawn(store, session, {"a": b"1"})
    await store.begin_restore(
        session, "op", "e2", encode_snapshot([SnapshotEntry("z", b"z", None)]), False, {"active"}
    )
    assert await store.abort(session, "op") == "active"
    assert await contents(store, session) == {"a": b"1"}
    await store.begin_snapshot(session, "op2", "pausing", False, {"active"})
    assert await store.abort(session, "op2") == "active"
    await store.set_entries(session, [EntryWrite("b", b"2", None)])
    other = SessionRef(session.project_id, session.agent_instance_id, "aborted-spawn")
    store.touched.append(other)
    await store.begin_spawn(other, "op3", "e", [EntryWrite("a", b"1", None)])
    assert await store.abort(other, "op3") == "missing"
    assert await store.read_marker(other) is None
    with pytest.raises(NoSession):
        await contents(store, other)


async def test_a_stale_operation_cannot_settle_a_newer_one(store, session):
    await spawn(store, session, {})
    await store.begin_snapshot(session, "op-new", "pausing", False, {"active"})
    with pytest.raises(LostOperation):
        await store.finish(session, "op-old", "active", swap=False, clear=False)
    with pytest.raises(LostOperation):
        await store.abort(session, "op-old")
    assert (await store.read_marker(session)).state == "pausing"


async def test_terminate_clears_everything(store, session):
    await spawn(store, session, {"a": b"1"})
    snapshot = await store.begin_snapshot(session, "op", "terminating", True, {"active", "paused"})
    assert [e.key for e in snapshot.entries()] == ["a"]
    assert (await store.read_marker(session)).clear is True
    await store.finish(session, "op", None, swap=False, clear=True)
    assert await store.read_marker(session) is None
    with pytest.raises(NoSession):
        await contents(store, session)
    with pytest.raises(SessionNotWritable):
        await store.set_entries(session, [EntryWrite("a", b"1", None)])


async def test_a_snapshot_without_contents_only_counts(store, session):
    """Terminate without an episode: the marker changes as usual, the key count and
    size are those of the full snapshot, and no value is read."""
    await spawn(store, session, {"a": b"1", "bb": b"22"})
    full = await store.begin_snapshot(session, "op-c", None, False, {"active"})
    counted = await store.begin_snapshot(
        session, "op-t", "terminating", True, {"active"}, with_contents=False
    )
    assert (counted.key_count, counted.size_bytes) == (full.key_count, full.size_bytes) == (2, 6)
    assert counted.entries() == []
    assert (await store.read_marker(session)).state == "terminating"


async def pause(store: Any, session: SessionRef, checkpoint_id: str) -> ResumePoint:
    """Pause as the lifecycle does; the ResumePoint of the checkpoint it took."""
    snapshot = await store.begin_snapshot(
        session, f"pause-{checkpoint_id}", "pausing", False, {"active"}, checkpoint_id=checkpoint_id
    )
    await store.finish(session, f"pause-{checkpoint_id}", "paused", swap=False, clear=False)
    return ResumePoint(checkpoint_id, snapshot.key_count, snapshot.size_bytes, "epoch-1")


@pytest.mark.parametrize("with_contents", [True, False])
async def test_a_snapshot_counts_the_same_on_every_store(store, session, with_contents):
    """Found by a review: without its contents, Redis's snapshot said no key had a TTL."""
    await spawn(store, session, {"a": b"1", "b": b"22"}, ttl=60_000)
    await store.set_entries(session, [EntryWrite("c", b"333", None)])
    snapshot = await store.begin_snapshot(
        session, "op-end", "terminating", True, {"active"}, with_contents=with_contents
    )
    assert (snapshot.key_count, snapshot.size_bytes, snapshot.timed_keys) == (3, 9, 2)
    assert len(snapshot.entries()) == (3 if with_contents else 0)


async def test_a_paused_memory_that_holds_its_checkpoint_is_kept_on_resume(store, session):
    """No contents needed: the memory is staged as it is, and swapped back in."""
    await spawn(store, session, {"a": b"1", "b": b"22"})
    held = await pause(store, session, "c1")
    assert (held.key_count, held.size_bytes) == (2, 5)
    count = await store.begin_restore(session, "r1", "epoch-2", None, False, {"paused"}, held=held)
    assert count == 2
    with pytest.raises(NoSession) as unread:
        await contents(store, session)
    assert unread.value.state == "resuming"
    await store.finish(session, "r1", "active", swap=True, clear=False)
    assert await contents(store, session) == {"a": b"1", "b": b"22"}
    marker = await store.read_marker(session)
    assert (marker.state, marker.epoch, marker.snapshot) == ("active", "epoch-2", None)
    # The key index and the byte count came through too: listing pages, limits hold.
    assert [k.key for k in (await store.list_keys(session, "a", 10))[0]] == ["b"]
    with pytest.raises(SessionLimitExceeded):
        await store.set_entries(session, [EntryWrite("big", b"x" * 996, None)])


async def test_an_aborted_kept_resume_leaves_the_paused_memory_as_it_was(store, session):
    await spawn(store, session, {"a": b"1"})
    held = await pause(store, session, "c1")
    await store.begin_restore(session, "r1", "epoch-2", None, True, {"paused"}, held=held)
    with pytest.raises(SessionNotWritable):  # a write meanwhile finds no live data
        await store.set_entries(session, [EntryWrite("b", b"2", None)])
    assert await store.abort(session, "r1") == "paused"
    assert await contents(store, session) == {"a": b"1"}
    assert (await store.read_marker(session)).snapshot == "c1"
    assert await store.begin_restore(session, "r2", "e3", None, False, {"paused"}, held=held) == 1
    await store.finish(session, "r2", "active", swap=True, clear=False)
    assert await contents(store, session) == {"a": b"1"}


@pytest.mark.parametrize(
    "why",
    [
        "another checkpoint",
        "a key with a TTL",
        "other contents",
        "past the limits",
        "resumed",
        "another epoch",
    ],
)
async def test_contents_are_needed_unless_the_memory_holds_the_checkpoint(store, session, why):
    """Without contents the step changes nothing; with them it restores them."""
    await spawn(store, session, {"a": b"1"}, ttl=60_000 if why == "a key with a TTL" else None)
    held = await pause(store, session, "c1")
    if why == "another checkpoint":
        held = ResumePoint("c0", held.key_count, held.size_bytes)
    elif why == "other contents":
        held = ResumePoint("c1", held.key_count, held.size_bytes + 1)
    elif why == "past the limits":
        held = ResumePoint("c1", 11, held.size_bytes)
    elif why == "another epoch":  # an older copy of the store, paused at c1 too
        held = ResumePoint("c1", held.key_count, held.size_bytes, "epoch-2")
    allowed = {"paused"}
    if why == "resumed":
        # Resumed since (and written to): a rollback to c1 must move c1 back in.
        await store.begin_restore(session, "r0", "e1", None, False, allowed, held=held)
        await store.finish(session, "r0", "active", swap=True, clear=False)
        await store.set_entries(session, [EntryWrite("a", b"2", None)])
        allowed = {"active"}
    before = await store.read_marker(session)
    with pytest.raises(ContentsNeeded):
        await store.begin_restore(session, "r1", "e2", None, False, allowed, held=held)
    assert await store.read_marker(session) == before
    checkpoint = encode_snapshot([SnapshotEntry("c", b"from the checkpoint", None)])
    if why != "past the limits":
        await store.begin_restore(session, "r2", "e2", checkpoint, False, allowed, held=held)
        await store.finish(session, "r2", "active", swap=True, clear=False)
        assert await contents(store, session) == {"c": b"from the checkpoint"}


@pytest.mark.parametrize("store", ["redis"], indirect=True)
async def test_a_paused_memory_that_lost_its_data_is_not_kept(store, session):
    """Redis may evict or lose the data but keep the marker: counted, not trusted."""
    await spawn(store, session, {"a": b"1", "b": b"2"})
    held = await pause(store, session, "c1")
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.hdel(session_keys(session)[0], "b")
    finally:
        await client.aclose()
    with pytest.raises(ContentsNeeded):
        await store.begin_restore(session, "r1", "e2", None, False, {"paused"}, held=held)


async def test_a_snapshot_after_redis_forgot_its_scripts(tmp_path):
    """A pause's snapshot is a script plus plain reads in one MULTI/EXEC; after a
    SCRIPT FLUSH (or a restart) the script is refused inside the transaction, is
    loaded and the whole step runs again, once, with the same result."""
    redis = PrivateRedis(free_port(), tmp_path / "redis")
    redis.start()
    store = RedisWorkingMemoryStore(redis.url, max_session_keys=10, max_session_bytes=1000)
    client = aioredis.Redis.from_url(redis.url)
    try:
        await store.open()
        session = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "forgotten-scripts")
        await spawn(store, session, {"a": b"1"})
        await store.set_entries(session, [EntryWrite("t", b"2", 60_000)])
        await client.script_flush()
        snapshot = await store.begin_snapshot(session, "op", "pausing", False, {"active"})
        by_key = {e.key: e for e in snapshot.entries()}
        assert by_key["a"] == SnapshotEntry("a", b"1", None)
        ttl = by_key["t"].remaining_ttl_ms
        assert ttl is not None and 0 < ttl <= 60_000
        assert (snapshot.key_count, snapshot.timed_keys) == (2, 1)
        stats = await client.info("commandstats")
        # Refused once inside the transaction (NOSCRIPT), then run.
        assert stats["cmdstat_evalsha"]["calls"] >= 2
        assert stats["cmdstat_evalsha"]["failed_calls"] == 1
        marker = await store.read_marker(session)
        assert marker is not None and marker.state == "pausing"
    finally:
        await client.aclose()
        await store.aclose()
        redis.kill()


@pytest.mark.parametrize("store", ["redis"], indirect=True)
async def test_a_late_copy_of_a_failed_spawns_step_leaves_the_live_session(store, session):
    """A Spawn whose step 1 the network held back failed (its transaction rolled
    back, its undo found nothing); the client's retry spawned the session under
    another operation id, and writes followed. The held copy then arrives: it must
    not wipe the live session (its op was never settled, so only the memory it
    finds can refuse it: any memory but the one its call named)."""
    await spawn(store, session, {"a": b"1"})
    await store.set_entries(session, [EntryWrite("b", b"2", None)])
    late = ["op-failed", "epoch-0", "", "a", b"old", 0]  # as the failed call sent it
    reply = await store._run_lifecycle("lifecycle_begin_spawn", session, late)
    assert reply[0] == b"exists" and reply[1].startswith(b"active|")
    assert await contents(store, session) == {"a": b"1", "b": b"2"}
    assert (await store.read_marker(session)).state == "active"
    # Nor while an operation of the live session is between its steps.
    await store.begin_snapshot(session, "op-pause", "pausing", False, {"active"})
    reply = await store._run_lifecycle("lifecycle_begin_spawn", session, late)
    assert reply[0] == b"exists" and reply[1].startswith(b"pausing|op-pause|")
    # A late copy of a call that named the memory it met (an orphan, then) finds
    # another one there now.
    named = ["op-failed", "epoch-0", b"spawning|op-dead||epoch-dead", "a", b"old", 0]
    reply = await store._run_lifecycle("lifecycle_begin_spawn", session, named)
    assert reply[0] == b"exists"
    await store.finish(session, "op-pause", "active", swap=False, clear=False)
    assert await contents(store, session) == {"a": b"1", "b": b"2"}
    # A Spawn that holds a new row (the database had none): the memory is an orphan,
    # and the call replaces it. The fence of settled operations survives that.
    await store.begin_spawn(session, "op-new", "epoch-2", [EntryWrite("c", b"3", None)])
    await store.finish(session, "op-new", "active", swap=False, clear=False)
    assert await contents(store, session) == {"c": b"3"}
    with pytest.raises(LostOperation):
        await store.begin_spawn(session, "op-spawn", "epoch-1", [])  # settled before
    assert await contents(store, session) == {"c": b"3"}


@pytest.mark.parametrize("store", ["redis"], indirect=True)
async def test_an_eviction_during_a_resume_leaves_the_session_lost(store, session):
    """A Redis that evicts the key index of a session between a Resume's steps: the
    next script drops what is left, marker included, and the Resume's last step
    finds it gone. Lost, reported as such (Resume from a checkpoint restores it),
    never an empty or half memory served as intact."""
    await spawn(store, session, {"a": b"1"})
    checkpoint = encode_snapshot([SnapshotEntry("c", b"from the checkpoint", None)])
    await store.begin_restore(session, "r1", "epoch-2", checkpoint, False, {"active"})
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.delete(session_keys(session)[2])  # the key index, evicted
    finally:
        await client.aclose()
    assert await store.read_marker(session) is None
    with pytest.raises(SessionNotWritable):
        await store.set_entries(session, [EntryWrite("b", b"2", None)])
    with pytest.raises(LostOperation):
        await store.finish(session, "r1", "active", swap=True, clear=False)
    assert await store.read_marker(session) is None


@pytest.mark.parametrize("store", ["redis"], indirect=True)
async def test_keys_expiring_a_moment_apart_are_not_an_eviction(store, session):
    """The data and its index share one expiry, yet may go a moment apart (a slot
    moved between nodes re-bases TTLs): one left with little time to live is an
    expiry, and the session stays (empty), not reported lost."""
    await spawn(store, session, {"a": b"1"}, ttl=60_000)
    data, _, index, _ = session_keys(session)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.delete(index)
        await client.pexpire(data, 500)  # about to expire too
    finally:
        await client.aclose()
    marker = await store.read_marker(session)
    assert marker is not None and marker.state == "active"
    assert await store.set_entries(session, [EntryWrite("b", b"2", None)])


async def test_redis_connections_speak_resp2() -> None:
    """redis-py 8 speaks RESP3 unless told otherwise, and hiredis reads HGETALL's
    RESP3 map, on the path of every Pause, about ten times slower than RESP2's flat
    array (0.49 against 0.05 ms at 1,000 entries). memsvc asks for RESP2."""
    need(REDIS_URL)
    store = RedisWorkingMemoryStore(REDIS_URL, max_session_keys=10, max_session_bytes=1000)
    await store.open()
    try:
        client = store._client
        assert isinstance(client, aioredis.Redis)
        assert (await client.client_info())["resp"] == "2"
    finally:
        await store.aclose()
