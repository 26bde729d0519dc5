"""The Redis store in cluster mode: URLs, scripts, cross-slot forget, migrating slots."""

from __future__ import annotations

import asyncio
import socket
import struct
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from memsvc.domain import BackendUnavailable, EntryWrite, SessionRef
from memsvc.domain._call_deadline import call_deadline
from memsvc.domain._session_memory import SnapshotEntry
from memsvc.domain._snapshot import encode_snapshot
from memsvc.server import Server
from memsvc.store import working_memory_store
from memsvc.store.redis import RedisWorkingMemoryStore, session_keys
from memsvc.store.redis._cluster import parse_cluster_url
from memsvc.store.redis._connections import ResettingConnection
from memsvc.store.redis._working_memory import guard_key, staging_keys
from memsvc.testing import PrivateRedisCluster
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.cluster._support import held_by, slot_of
from tests.helpers import eventually, expect_error, python, value


def new_session(name: str = "s") -> SessionRef:
    return SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), name)


def on_every_master(cluster: PrivateRedisCluster, each: int = 2) -> list[SessionRef]:
    """New sessions, at least ``each`` of them on every master."""
    found: dict[int, list[SessionRef]] = {port: [] for port in cluster.ports}
    for i in range(10_000):
        session = new_session(f"s{i}")
        owner = cluster.owner_of(slot_of(session))
        if len(found[owner]) < each:
            found[owner].append(session)
        if all(len(sessions) == each for sessions in found.values()):
            return [session for sessions in found.values() for session in sessions]
    raise AssertionError("no sessions on some master")


@pytest.fixture
async def store(redis_cluster: PrivateRedisCluster) -> AsyncIterator[RedisWorkingMemoryStore]:
    opened = RedisWorkingMemoryStore(
        redis_cluster.url, max_session_keys=100, max_session_bytes=1 << 20
    )
    await opened.open()
    yield opened
    await opened.aclose()


@pytest.fixture
async def raw_cluster(redis_cluster: PrivateRedisCluster) -> AsyncIterator[RedisCluster]:
    """A plain redis-py cluster client, to look at what memsvc stored."""
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    yield client
    await client.aclose()


async def spawn(store: RedisWorkingMemoryStore, session: SessionRef, **entries: bytes) -> None:
    writes = [EntryWrite(key, data, 3_600_000) for key, data in entries.items()]
    await store.begin_spawn(session, "op-spawn", "epoch-1", writes)
    await store.finish(session, "op-spawn", "active", swap=False, clear=False)


async def contents(store: RedisWorkingMemoryStore, session: SessionRef) -> dict[str, bytes]:
    items, _ = await store.list_entries(session, None, 100, 1 << 20)
    return {item.key: item.value for item in items}


def test_cluster_urls_name_startup_nodes_and_options():
    nodes, options = parse_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2,[::1]:7002")
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002)]
    assert options == {}
    nodes, options = parse_cluster_url(
        "rediss+cluster://me:p%40ss@redis-a:6380,redis-b:6380/0?ssl_cert_reqs=none"
    )
    assert nodes == [("redis-a", 6380), ("redis-b", 6380)]
    assert options == {"username": "me", "password": "p@ss", "ssl": True, "ssl_cert_reqs": "none"}
    for bad in ("redis://a:1", "redis+cluster://", "redis+cluster://a:1/2", "redis+cluster://a:x"):
        with pytest.raises(ValueError):  # noqa: PT011 - several messages
            parse_cluster_url(bad)


async def test_the_factory_picks_cluster_mode_and_sessions_spread_over_masters(
    redis_cluster: PrivateRedisCluster, base_config: Any
):
    created = working_memory_store(base_config)
    assert isinstance(created, RedisWorkingMemoryStore)
    assert created.backend_name == "working memory (Redis Cluster)"
    await created.open()
    try:
        await created.ping()
        sessions = on_every_master(redis_cluster)
        for session in sessions:
            await spawn(created, session, k=b"v")
        for session in sessions:
            assert (await contents(created, session)) == {"k": b"v"}
    finally:
        await created.aclose()


async def test_scripts_are_loaded_again_after_a_master_forgets_them(
    store: RedisWorkingMemoryStore, redis_cluster: PrivateRedisCluster
):
    session = new_session()
    await spawn(store, session, a=b"1")
    for port in redis_cluster.ports:
        with redis.Redis(port=port) as client:
            client.script_flush()
    await store.set_entries(session, [EntryWrite("b", b"2", None)])
    assert await contents(store, session) == {"a": b"1", "b": b"2"}


async def test_forget_deletes_sessions_on_every_master_in_one_pipeline(
    store: RedisWorkingMemoryStore, redis_cluster: PrivateRedisCluster, raw_cluster: RedisCluster
):
    sessions = on_every_master(redis_cluster, each=3)
    for session in sessions:
        await spawn(store, session, a=b"1")
    # One of them is mid-Resume, with staging keys.
    snapshot = encode_snapshot([SnapshotEntry("b", b"2", None)])
    await store.begin_restore(sessions[0], "op-r", "epoch-2", snapshot, False, ["active"])
    kept = new_session()
    await spawn(store, kept, a=b"1")

    assert await raw_cluster.exists(*staging_keys(sessions[0])) == 2

    assert await store.forget([*sessions, new_session("never-spawned")]) == len(sessions)

    for session in sessions:
        assert await raw_cluster.exists(*session_keys(session), *staging_keys(session)) == 0
    assert await contents(store, kept) == {"a": b"1"}


async def test_forget_waits_for_a_moving_slot_and_counts_exactly(
    store: RedisWorkingMemoryStore, redis_cluster: PrivateRedisCluster, raw_cluster: RedisCluster
):
    """The DELs on settled slots are done at once; the one on the moving slot is
    sent again until the slot settles, and the count stays exact."""
    sessions = on_every_master(redis_cluster)
    for session in sessions:
        await spawn(store, session, a=b"1")
    moving = sessions[0]
    slot = slot_of(moving)
    owner = redis_cluster.owner_of(slot)
    target = next(port for port in redis_cluster.ports if port != owner)
    settled = [s for s in sessions if slot_of(s) != slot]
    forgetting: list[asyncio.Task[int]] = []

    async def check(step: int) -> None:
        if step == 0:
            forgetting.append(asyncio.create_task(store.forget(sessions)))

        async def settled_forgotten() -> bool:
            for session in settled:
                if await raw_cluster.exists(*session_keys(session)):
                    return False
            return True

        await eventually(settled_forgotten)  # the sessions of other slots go at once
        assert not forgetting[0].done()  # the moving one waits for its slot
        assert before in [held_by(port, session_keys(moving)[0]) for port in (owner, target)]

    before = {b"a": b"1"}
    try:
        await redis_cluster.migrate_slot(slot, target, batch=1, pause_seconds=0.1, on_step=check)
        assert await asyncio.wait_for(forgetting[0], 10) == len(sessions)
    finally:
        for task in forgetting:
            task.cancel()
    assert await raw_cluster.exists(*session_keys(moving)) == 0


async def test_operations_wait_when_no_connection_is_free(redis_cluster: PrivateRedisCluster):
    limited = RedisWorkingMemoryStore(
        redis_cluster.url, max_session_keys=100, max_session_bytes=1 << 20, max_connections=2
    )
    await limited.open()
    try:
        sessions = [new_session(f"s{i}") for i in range(30)]
        await asyncio.gather(*(spawn(limited, session, a=b"1") for session in sessions))
        reads = await asyncio.gather(*(contents(limited, session) for session in sessions))
        assert reads == [{"a": b"1"}] * len(sessions)
        client = limited._redis
        assert isinstance(client, RedisCluster)
        assert all(len(node._connections) <= 2 for node in client.get_nodes())
    finally:
        await limited.aclose()


async def test_a_master_that_stops_answering_holds_up_only_its_own_sessions(
    redis_cluster: PrivateRedisCluster,
):
    """The connection limit is per master: calls that wait on a stalled master
    (CLIENT PAUSE stands in for a hung or partitioned one) take up its
    connections only, and a call on another master goes through meanwhile."""
    limited = RedisWorkingMemoryStore(
        redis_cluster.url,
        max_session_keys=100,
        max_session_bytes=1 << 20,
        max_connections=2,
        socket_timeout_seconds=30,  # the stalled calls wait out the pause, no retry
    )
    await limited.open()
    sessions = on_every_master(redis_cluster, each=2)
    stalled_port = redis_cluster.ports[0]
    stalled = [s for s in sessions if redis_cluster.owner_of(slot_of(s)) == stalled_port]
    elsewhere = next(s for s in sessions if s not in stalled)
    try:
        await asyncio.gather(*(spawn(limited, session, a=b"1") for session in sessions))
        with redis.Redis(port=stalled_port, socket_timeout=5) as client:
            # Shorter than the cluster's node timeout (5 s): no node is marked failed.
            client.execute_command("CLIENT", "PAUSE", 4000, "ALL")
        try:
            waiting = [asyncio.create_task(contents(limited, s)) for s in stalled]
            await asyncio.sleep(0.2)  # both of the stalled master's connections taken
            assert await contents(limited, elsewhere) == {"a": b"1"}
            # Before the change, this read waited for a connection the stalled
            # calls held, and got one only when they had their answers.
            assert not any(task.done() for task in waiting)
        finally:
            with redis.Redis(port=stalled_port, socket_timeout=5) as client:
                client.execute_command("CLIENT", "UNPAUSE")
        assert await asyncio.gather(*waiting) == [{"a": b"1"}] * len(stalled)
    finally:
        await limited.aclose()


async def test_without_the_guard_key_redis_can_fail_a_script_midway(
    redis_cluster: PrivateRedisCluster,
):
    """Why every script declares the guard key: on a MIGRATING slot, Redis starts a
    script whose declared keys all exist, then fails it at the first command on a
    key that no longer exists (here one the script deleted), keeping the writes
    made so far. Declaring a key that never exists makes Redis refuse it whole."""
    keys = ["{guarded}:a", "{guarded}:b"]
    slot = key_slot(keys[0].encode())
    owner = redis_cluster.owner_of(slot)
    target = next(port for port in redis_cluster.ports if port != owner)
    script = (
        "redis.call('SET', KEYS[2], 'started'); redis.call('DEL', KEYS[1]);"
        "redis.call('HSET', KEYS[1], 'f', 'v'); redis.call('SET', KEYS[2], 'finished')"
    )
    source = redis.Redis(port=owner)
    try:
        source.set(keys[0], "x")
        source.set(keys[1], "x")
        opened = asyncio.Event()
        done = asyncio.Event()

        async def while_open(step: int) -> None:
            if step == 0:
                opened.set()
                await done.wait()

        migration = asyncio.create_task(
            redis_cluster.migrate_slot(slot, target, on_step=while_open, timeout_seconds=20)
        )
        try:
            await asyncio.wait_for(opened.wait(), 10)
            with pytest.raises(redis.exceptions.TryAgainError):
                source.eval(script, 3, *keys, "{guarded}:never-written")
            assert source.get(keys[1]) == b"x"
            with pytest.raises(redis.ResponseError, match="non local key"):
                source.eval(script, 2, *keys)
            assert source.get(keys[1]) == b"started"  # half of the script stayed
        finally:
            done.set()
            await asyncio.wait_for(migration, 20)
    finally:
        source.close()


async def test_no_script_runs_while_its_slot_migrates_and_calls_wait_for_it(
    store: RedisWorkingMemoryStore, redis_cluster: PrivateRedisCluster
):
    """A write sent while its session's slot is open waits (it is refused whole,
    again and again), runs once the slot has settled on the new master, and
    nothing of it is seen on either node before then: every key moves one at a
    time, so the session is split across the two masters for a while."""
    session = new_session()
    # Every key of the session exists (values with TTLs fill the expiry set too).
    await spawn(store, session, a=b"1", b=b"2")
    await store.set_entries(session, [EntryWrite("c", b"3", None)])
    slot = slot_of(session)
    owner = redis_cluster.owner_of(slot)
    target = next(port for port in redis_cluster.ports if port != owner)
    data_key = session_keys(session)[0]
    before = {b"a": b"1", b"b": b"2", b"c": b"3"}
    pending: list[asyncio.Task[Any]] = []

    async def check(step: int) -> None:
        if step == 0:
            pending.append(
                asyncio.create_task(store.set_entries(session, [EntryWrite("a", b"new", None)]))
            )
            pending.append(asyncio.create_task(store.delete_entries(session, ["b"])))
        await asyncio.sleep(0.1)
        assert not any(task.done() for task in pending), [t.result() for t in pending if t.done()]
        views = [held_by(port, data_key) for port in (owner, target)]
        assert before in views, (step, views)
        assert all(view in (None, {}, before) for view in views), (step, views)

    try:
        await redis_cluster.migrate_slot(slot, target, batch=1, pause_seconds=0.1, on_step=check)
        written, deleted = await asyncio.wait_for(asyncio.gather(*pending), 10)
    finally:
        for task in pending:
            task.cancel()
    assert [w.key for w in written] == ["a"]
    assert deleted == [True]
    assert await contents(store, session) == {"a": b"new", "c": b"3"}
    assert redis_cluster.keys_in_slot(slot, owner) == 0
    assert held_by(target, data_key) == {b"a": b"new", b"c": b"3"}
    with redis.Redis(port=target) as client:
        assert client.exists(guard_key(session)) == 0


async def test_a_slot_that_stays_open_makes_calls_unavailable(
    store: RedisWorkingMemoryStore, redis_cluster: PrivateRedisCluster
):
    """Past the retry budget a call gives up with BackendUnavailable (UNAVAILABLE),
    having changed nothing."""
    session = new_session()
    await spawn(store, session, a=b"1")
    slot = slot_of(session)
    owner = redis_cluster.owner_of(slot)
    target = next(port for port in redis_cluster.ports if port != owner)
    outcome: list[BaseException] = []

    async def hold_open(step: int) -> None:
        if step == 0:
            with call_deadline(1.5), pytest.raises(BackendUnavailable) as raised:
                await store.set_entries(session, [EntryWrite("a", b"2", None)])
            outcome.append(raised.value)

    await redis_cluster.migrate_slot(slot, target, on_step=hold_open, timeout_seconds=30)
    assert len(outcome) == 1
    assert await contents(store, session) == {"a": b"1"}


async def test_checkpoints_survive_a_restart_and_lost_memory_is_reported(
    server: Server, scope: dict[str, Any], raw_cluster: RedisCluster
):
    """tests/contract/test_lifecycle_retention.py's restart test, with the session's
    keys deleted through a cluster client."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        life = LifecycleServiceStub(channel)
        wm = WorkingMemoryServiceStub(channel)
        await life.Spawn(lc.SpawnRequest(**scope))
        await wm.Set(pb.SetRequest(**scope, key="k", value=value({"v": 1})))
        paused = await life.Pause(lc.PauseRequest(**scope))
    config = replace(server.config, listen=f"127.0.0.1:{server.port}")
    await server.stop()
    await raw_cluster.delete(*session_keys(SessionRef(**scope)))
    async with (
        Server(config) as restarted,
        grpc.aio.insecure_channel(f"127.0.0.1:{restarted.port}") as channel,
    ):
        life = LifecycleServiceStub(channel)
        wm = WorkingMemoryServiceStub(channel)
        session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
        assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_LOST
        error = await expect_error(
            wm.Get(pb.GetRequest(**scope, key="k")), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert error.reason == "ERROR_REASON_WORKING_MEMORY_LOST"
        resumed = await life.Resume(lc.ResumeRequest(**scope))
        assert resumed.checkpoint.checkpoint_id == paused.checkpoint.checkpoint_id
        assert python((await wm.Get(pb.GetRequest(**scope, key="k"))).entry.value) == {"v": 1}


async def test_sessions_in_a_scope_are_found_on_every_master(
    store: RedisWorkingMemoryStore, redis_cluster: PrivateRedisCluster
):
    """A purge's SCAN for the working memory the database may have no row for (a
    Spawn that died after its first step) must walk every master, not one."""
    project, agent = str(uuid.uuid4()), str(uuid.uuid4())
    by_master: dict[int, SessionRef] = {}
    for i in range(10_000):
        session = SessionRef(project, agent, f"s{i}")
        by_master.setdefault(redis_cluster.owner_of(slot_of(session)), session)
        if len(by_master) == len(redis_cluster.ports):
            break
    sessions = list(by_master.values())
    cousin = SessionRef(project, str(uuid.uuid4()), "cousin")
    for session in [*sessions, cousin, new_session()]:
        await spawn(store, session, a=b"1")

    found = await store.sessions_in(SessionRef(project, agent, ""))
    assert sorted(found, key=str) == sorted(sessions, key=str)
    assert set(await store.sessions_in(SessionRef(project, "", ""))) == {*sessions, cousin}


async def test_cluster_connections_reset_when_closed(store: RedisWorkingMemoryStore):
    """As single-node ones (tests/integration/test_redis_late_write.py): a connection
    memsvc gave up on drops what it had not sent, instead of TCP delivering an old
    write after the retry. redis-py builds cluster connections itself, with its own
    class, unless told where each node takes it. Found by a review."""
    client: Any = store._client
    assert await client.ping(target_nodes=RedisCluster.PRIMARIES)  # a connection to each
    nodes = client.get_nodes()
    assert len(nodes) == 3
    for node in nodes:
        assert node._connections, f"no connection to {node.name}"
        for connection in node._connections:
            assert isinstance(connection, ResettingConnection), type(connection)
            sock = connection._writer.transport.get_extra_info("socket")
            # SO_LINGER on, 0 seconds: close() resets the connection.
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8) == struct.pack(
                "ii", 1, 0
            )
