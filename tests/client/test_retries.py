"""Retries with real faults: a proxy forwards the first attempt to memsvc (so it takes
effect), then fails it; the SDK's retry must reuse the request id, get the first answer
and change nothing more. Both deployments."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest

from memsvc.client import (
    AsyncClient,
    AsyncSessionClient,
    Cancelled,
    DeadlineExceeded,
    EpisodeNotFound,
    EventType,
    RetryPolicy,
    SessionState,
    Unavailable,
)
from memsvc.config import Config
from memsvc.server import Server
from memsvc.testing import free_port
from memsvc.v1 import graph_checkpoint_pb2 as pb
from tests.client._proxy import FaultProxy
from tests.client.conftest import FAST_RETRY
from tests.client.test_graphs import checkpoint
from tests.conftest import stop_or_explain
from tests.helpers import eventually

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
ABORTED = grpc.StatusCode.ABORTED
CANCELLED = grpc.StatusCode.CANCELLED


@pytest.fixture
async def proxy(server: Server) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(f"127.0.0.1:{server.port}") as running:
        yield running


@pytest.fixture
async def via_proxy(proxy: FaultProxy, auth_token: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(proxy.target, retry=FAST_RETRY, timeout=20, token=auth_token) as sdk:
        yield sdk


@pytest.fixture
def flaky(via_proxy: AsyncClient, scope: dict[str, str]) -> AsyncSessionClient:
    """The test's session, reached through the fault proxy."""
    return via_proxy.session(scope["project_id"], scope["agent_instance_id"], scope["session_id"])


def one_request_id(proxy: FaultProxy, rpc: str, attempts: int) -> str:
    """The single request id every attempt of one call carried."""
    calls = proxy.calls(rpc)
    assert len(calls) == attempts, [c.request_id for c in calls]
    ids = {c.request_id for c in calls}
    assert len(ids) == 1 and None not in ids, ids
    (request_id,) = ids
    assert request_id is not None
    uuid.UUID(request_id)
    return request_id


async def test_spawn_retried_after_unavailable_is_spawned_once(
    proxy: FaultProxy, flaky: AsyncSessionClient, session: AsyncSessionClient
):
    proxy.fail_after("Spawn", UNAVAILABLE)
    spawned = await flaky.spawn(initial={"k": 1})
    # Without the request id the retry would have failed with ALREADY_EXISTS.
    assert spawned.state is SessionState.ACTIVE and spawned.version == 1
    one_request_id(proxy, "Spawn", attempts=2)
    async with session.watch(start="oldest") as events:
        first = await anext(events)
        assert first.event_type is EventType.SESSION_SPAWNED
        await session.pause()  # the next event must be this pause: one spawn only
        assert (await anext(events)).event_type is EventType.SESSION_PAUSED


async def test_create_checkpoint_retried_after_deadline_exceeded_makes_one_checkpoint(
    proxy: FaultProxy, flaky: AsyncSessionClient, session: AsyncSessionClient
):
    await session.spawn(initial={"k": 1})
    proxy.fail_after("CreateCheckpoint", DEADLINE_EXCEEDED)
    checkpoint = await flaky.create_checkpoint(metadata={"n": 1})
    one_request_id(proxy, "CreateCheckpoint", attempts=2)
    listed = await session.checkpoints().collect()
    assert [c.checkpoint_id for c in listed] == [checkpoint.checkpoint_id]


async def test_record_episode_retried_twice_records_one_episode(
    proxy: FaultProxy, via_proxy: AsyncClient, client: AsyncClient, scope: dict[str, str]
):
    proxy.fail_after("RecordEpisode", ABORTED, UNAVAILABLE)
    recorded = await via_proxy.episodes(scope["project_id"]).record(
        agent_instance_id=scope["agent_instance_id"],
        session_id=scope["session_id"],
        task_type="code_review",
        outcome="success",
        task_description="retry me",
    )
    one_request_id(proxy, "RecordEpisode", attempts=3)
    stored = await client.episodes(scope["project_id"]).list().collect()
    assert [e.episode_id for e in stored] == [recorded.episode_id]


async def test_delete_episode_retried_after_a_lost_answer_succeeds(
    proxy: FaultProxy, via_proxy: AsyncClient, client: AsyncClient, scope: dict[str, str]
):
    """The first attempt deleted the episode, its answer was lost: the retry, with the
    same request id, answers OK instead of EpisodeNotFound."""
    recorded = await client.episodes(scope["project_id"]).record(
        agent_instance_id=scope["agent_instance_id"],
        session_id=scope["session_id"],
        task_type="code_review",
        outcome="success",
    )
    proxy.fail_after("DeleteEpisode", UNAVAILABLE, DEADLINE_EXCEEDED)
    await via_proxy.episodes(scope["project_id"]).delete(recorded.episode_id)
    one_request_id(proxy, "DeleteEpisode", attempts=3)
    assert await client.episodes(scope["project_id"]).list().collect() == []
    with pytest.raises(EpisodeNotFound):  # a new call finds nothing, as before
        await client.episodes(scope["project_id"]).delete(recorded.episode_id)


async def test_pause_resume_terminate_retried_take_effect_once(
    proxy: FaultProxy, flaky: AsyncSessionClient, session: AsyncSessionClient
):
    await session.spawn(initial={"k": 1})
    proxy.fail_after("Pause", ABORTED)
    proxy.fail_after("Resume", DEADLINE_EXCEEDED)
    proxy.fail_after("Terminate", UNAVAILABLE)
    paused = await flaky.pause()
    resumed = await flaky.resume()
    ended = await flaky.terminate(consolidate=False, keep_working_memory=True)
    for rpc in ("Pause", "Resume", "Terminate"):
        one_request_id(proxy, rpc, attempts=2)
    assert (paused.session.version, resumed.session.version, ended.session.version) == (2, 3, 4)
    assert resumed.checkpoint.checkpoint_id == paused.checkpoint.checkpoint_id
    assert (await session.describe()).version == 4


async def test_purge_retried_returns_the_first_report(
    proxy: FaultProxy, flaky: AsyncSessionClient, session: AsyncSessionClient
):
    await session.spawn(initial={"k": 1})
    proxy.fail_after("PurgeData", DEADLINE_EXCEEDED)
    report = await flaky.purge()
    one_request_id(proxy, "PurgeData", attempts=2)
    # A second purge would find nothing; the retry answered with the first report.
    assert report.sessions_deleted == 1


async def test_delete_checkpoint_retried_after_unavailable(
    proxy: FaultProxy, flaky: AsyncSessionClient, session: AsyncSessionClient
):
    await session.spawn()
    checkpoint = await session.create_checkpoint()
    proxy.fail_after("DeleteCheckpoint", UNAVAILABLE)
    await flaky.delete_checkpoint(checkpoint.checkpoint_id)
    one_request_id(proxy, "DeleteCheckpoint", attempts=2)
    assert await session.checkpoints().collect() == []


async def test_every_call_has_its_own_request_id_and_a_given_one_is_used(
    proxy: FaultProxy, flaky: AsyncSessionClient
):
    await flaky.spawn()
    await flaky.create_checkpoint()
    await flaky.create_checkpoint()
    mine = str(uuid.uuid4())
    await flaky.create_checkpoint(request_id=mine)
    ids = [c.request_id for c in proxy.calls("CreateCheckpoint")]
    assert len(set(ids)) == 3 and ids[2] == mine


async def test_a_call_without_request_id_is_not_retried_on_deadline_exceeded(
    proxy: FaultProxy, flaky: AsyncSessionClient, session: AsyncSessionClient
):
    await session.spawn()
    proxy.fail_after("Set", DEADLINE_EXCEEDED)
    with pytest.raises(DeadlineExceeded) as raised:
        await flaky.set("k", "first")
    assert raised.value.attempts == 1 and raised.value.request_id is None
    assert len(proxy.calls("Set")) == 1
    assert await session.get("k") == "first"  # the attempt did take effect


async def test_a_read_is_retried_on_deadline_exceeded_and_aborted(
    proxy: FaultProxy, flaky: AsyncSessionClient, session: AsyncSessionClient
):
    """A read changes nothing, so an attempt that timed out runs again within the
    call's budget (attempt_timeout would otherwise be every read's deadline)."""
    await session.spawn()
    await session.set("k", "v")
    proxy.fail_after("Get", DEADLINE_EXCEEDED, ABORTED)
    assert await flaky.get("k") == "v"
    assert len(proxy.calls("Get")) == 3
    proxy.fail_after("ListSessions", ABORTED)
    listed = flaky.client.list_sessions(session.project_id)
    assert [s.session_id async for s in listed] == [session.session_id]


async def test_a_read_is_retried_on_unavailable_and_a_write_without_request_id_is_not(
    proxy: FaultProxy, flaky: AsyncSessionClient, session: AsyncSessionClient
):
    """The proxy forwards each call, then fails it: a read runs again, but a write
    without a request id took effect and is not run a second time."""
    await flaky.spawn()
    proxy.fail_after("BatchGet", UNAVAILABLE, UNAVAILABLE)
    proxy.fail_after("Delete", UNAVAILABLE)
    await session.set("k", [1])
    assert await flaky.get_many(["k"]) == {"k": [1]}
    assert len(proxy.calls("BatchGet")) == 3
    with pytest.raises(Unavailable) as raised:
        await flaky.delete("k")
    assert raised.value.attempts == 1 and len(proxy.calls("Delete")) == 1
    assert await session.get("k", default=None) is None  # the attempt did take effect


async def test_a_cancelled_status_is_retried_for_reads_and_request_ids_only(
    proxy: FaultProxy, flaky: AsyncSessionClient, session: AsyncSessionClient
):
    """gRPC cancels the calls that reached a server as it stopped (every graceful
    restart): CANCELLED as a status is the server's, and a read or a call with a
    request id is tried again (a review: they raised Cancelled, which the SDK
    documents as the client's own close). A write without one may have run."""
    await session.spawn()
    await session.set("k", "v")
    proxy.fail_after("Get", CANCELLED)
    assert await flaky.get("k") == "v"
    assert len(proxy.calls("Get")) == 2
    proxy.fail_after("Pause", CANCELLED)
    await flaky.pause()
    one_request_id(proxy, "Pause", 2)
    assert (await session.describe()).state == SessionState.PAUSED
    await session.resume()
    proxy.fail_after("Delete", CANCELLED)
    with pytest.raises(Cancelled) as raised:
        await flaky.delete("k")
    assert raised.value.attempts == 1 and len(proxy.calls("Delete")) == 1


async def test_a_graph_put_whose_answer_was_lost_is_retried_to_one_effect(
    proxy: FaultProxy, via_proxy: AsyncClient, client: AsyncClient, scope: dict[str, str]
):
    """A graph put names its step by checkpoint id: its retry stores the same step
    again (a fenced one's retry matches what is stored), so the SDK retries it
    after a lost answer, as a call with a request id."""
    graphs = via_proxy.graphs(scope["project_id"])
    assert await graphs.put_checkpoint(checkpoint("c1")) == 1
    proxy.fail_after("PutGraphCheckpoint", UNAVAILABLE)
    await graphs.put_checkpoint(checkpoint("c2", "c1"), require_latest_parent=True)
    assert len(proxy.calls("PutGraphCheckpoint")) == 3
    proxy.fail_after("PutGraphWrites", UNAVAILABLE)
    write = pb.GraphWrite(task_id="task", channel="a", value=pb.TypedValue(type="bytes", data=b"w"))
    await graphs.put_writes("t", "c2", [write])
    assert len(proxy.calls("PutGraphWrites")) == 2
    stored = await client.graphs(scope["project_id"]).get_checkpoint("t")
    assert stored.checkpoint_id == "c2" and [w.task_id for w in stored.pending_writes] == ["task"]


async def test_a_write_whose_answer_was_lost_is_not_retried_over_a_later_write(
    proxy: FaultProxy, session: AsyncSessionClient, auth_token: str
):
    """A's Set commits and its answer is lost on the way back; B then writes the
    key. A retry of A's Set (a second later here) would overwrite B's value with
    A's older one: A gets Unavailable instead, and B's value stays."""
    await session.spawn()
    patient = RetryPolicy(initial_backoff=1.0, max_backoff=1.0, jitter=0)
    async with AsyncClient(proxy.target, retry=patient, timeout=20, token=auth_token) as sdk:
        a = sdk.session(session.project_id, session.agent_instance_id, session.session_id)
        proxy.fail_after("Set", UNAVAILABLE)
        writing = asyncio.ensure_future(a.set("k", "A"))

        async def a_committed() -> bool:
            return bool(await session.get("k", default=None) == "A")

        await eventually(a_committed, timeout=10)
        await session.set("k", "B")
        with pytest.raises(Unavailable) as raised:
            await asyncio.wait_for(writing, 10)
    assert raised.value.attempts == 1 and raised.value.request_id is None
    assert len(proxy.calls("Set")) == 1
    assert await session.get("k") == "B"


@pytest.fixture
async def restartable(base_config: Config) -> AsyncIterator[Server]:
    """A server that can be started again on its port: one below the ephemeral
    range (free_port), where no outgoing connection takes it while the server is
    down, as one could take the port a server on 127.0.0.1:0 is given."""
    running = Server(replace(base_config, listen=f"127.0.0.1:{free_port()}"))
    await running.start()
    try:
        yield running
    finally:
        await stop_or_explain(running)


async def test_calls_made_while_memsvc_restarts_succeed_once_it_is_back(
    restartable: Server, scope: dict[str, str], auth_token: str
):
    """gRPC fails calls at once while its channel waits out a reconnection backoff
    (up to 5 s), however soon memsvc is back. The SDK's attempts wait for the
    connection instead, within their timeout: a read, a graph put, and a write
    without a request id (a thread's delete: never retried once it may have run, so
    it must not fail for want of a connection), made while memsvc is down, succeed
    once it is back."""
    server = restartable
    target, restart = f"127.0.0.1:{server.port}", server.config
    async with AsyncClient(target, retry=FAST_RETRY, timeout=30, token=auth_token) as sdk:
        graphs = sdk.graphs(scope["project_id"])
        await graphs.put_checkpoint(checkpoint("c1"))
        gone = checkpoint("g1")
        gone.thread_id = "gone"
        await graphs.put_checkpoint(gone)
        await server.stop()

        async def disconnected() -> bool:
            return bool(sdk.channel.get_state() != grpc.ChannelConnectivity.READY)

        await eventually(disconnected, timeout=10)
        # By id: the put below may land first once memsvc is back (the latest is c2 then).
        reading = asyncio.ensure_future(graphs.get_checkpoint("t", "c1"))
        writing = asyncio.ensure_future(graphs.put_checkpoint(checkpoint("c2", "c1")))
        deleting = asyncio.ensure_future(graphs.delete_thread("gone"))
        # Longer than FAST_RETRY's five attempts take to fail when none waits (~1 s).
        await asyncio.sleep(3)
        assert not reading.done() and not writing.done() and not deleting.done()
        async with Server(restart):
            assert (await asyncio.wait_for(reading, 30)).checkpoint_id == "c1"
            assert await asyncio.wait_for(writing, 30) == 1
            assert await asyncio.wait_for(deleting, 30) == 1
            assert (await graphs.get_checkpoint("t")).checkpoint_id == "c2"


async def test_attempts_stop_at_max_attempts(
    proxy: FaultProxy, scope: dict[str, str], auth_token: str
):
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
    async with AsyncClient(proxy.target, retry=policy, token=auth_token) as sdk:
        s = sdk.session(scope["project_id"], scope["agent_instance_id"], scope["session_id"])
        proxy.fail_after("Spawn", UNAVAILABLE, UNAVAILABLE, UNAVAILABLE, UNAVAILABLE)
        with pytest.raises(Unavailable) as raised:
            await s.spawn()
    assert raised.value.attempts == 3
    assert len(proxy.calls("Spawn")) == 3
    assert raised.value.request_id == one_request_id(proxy, "Spawn", attempts=3)


async def test_retries_disabled(proxy: FaultProxy, scope: dict[str, str], auth_token: str):
    async with AsyncClient(proxy.target, retry=RetryPolicy.disabled(), token=auth_token) as sdk:
        s = sdk.session(scope["project_id"], scope["agent_instance_id"], scope["session_id"])
        proxy.fail_after("Spawn", UNAVAILABLE)
        with pytest.raises(Unavailable):
            await s.spawn()
    assert len(proxy.calls("Spawn")) == 1
