"""The blocking Client: the same flow from plain threads, on both deployments.

The server runs on the test's event loop, so the blocking code runs in a worker
thread (``asyncio.to_thread``) while that loop keeps serving.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from memsvc.client import (
    AsyncClient,
    AsyncEpisodesClient,
    AsyncGraphClient,
    AsyncSessionClient,
    Client,
    EpisodesClient,
    EventType,
    GraphClient,
    KeyNotFound,
    RetryPolicy,
    SessionClient,
    SessionState,
    Unavailable,
    WithTTL,
)
from memsvc.server import Server
from memsvc.testing import free_port
from tests.client.conftest import FAST_RETRY


def sync_flow(port: int, scope: dict[str, str], token_file: Path) -> None:
    project, agent, name = scope["project_id"], scope["agent_instance_id"], scope["session_id"]
    with Client(f"127.0.0.1:{port}", retry=FAST_RETRY, token_file=token_file) as client:
        client.wait_ready(10)
        s = client.session(project, agent, name)
        with s.watch() as events:
            assert s.spawn(initial={"plan": {"steps": [1, 2]}}).state is SessionState.ACTIVE
            s.set("notes", "n", ttl=60)
            assert s.get("plan") == {"steps": [1, 2]}
            assert s.get("missing", default=0) == 0
            with pytest.raises(KeyNotFound):
                s.get("missing")
            s.set_many({"a": 1, "b": WithTTL(2, 30)})
            keys = s.keys(page_size=2)
            assert [k.key for k in keys] == ["a", "b", "notes", "plan"]
            assert next(iter(keys)).key == "a"  # an iterable: each iteration starts over
            assert s.get_many(["a", "b", "zz"]) == {"a": 1, "b": 2}
            assert s.delete("a") and s.delete_many(["b"]).deleted_keys == ("b",)
            checkpoint = s.create_checkpoint()
            paused = s.pause()
            assert [c.checkpoint_id for c in s.checkpoints()] == [
                paused.checkpoint.checkpoint_id,
                checkpoint.checkpoint_id,
            ]
            assert {e.key for e in s.checkpoint_entries(checkpoint.checkpoint_id)} == {
                "notes",
                "plan",
            }
            s.resume()
            ended = s.terminate(outcome="success")
            kinds = [next(events).event_type for _ in range(7)]
        assert kinds == [
            EventType.SESSION_SPAWNED,
            EventType.CHECKPOINT_CREATED,
            EventType.SESSION_PAUSED,
            EventType.SESSION_RESUMED,
            # The Terminate deletes both checkpoints, oldest first, then ends.
            EventType.CHECKPOINT_DELETED,
            EventType.CHECKPOINT_DELETED,
            EventType.SESSION_TERMINATED,
        ]
        assert ended.episode_id is not None
        episodes = client.episodes(project)
        assert episodes.get(ended.episode_id).session_id == name
        assert [e.episode_id for e in episodes.list()] == [ended.episode_id]
        assert client.list_sessions(project).collect()[0].state is SessionState.TERMINATED

        # One client, many threads.
        def spawn(i: int) -> str:
            return client.session(project, agent, f"{name}-{i}").spawn().session_id

        with ThreadPoolExecutor(4) as pool:
            assert sorted(pool.map(spawn, range(8))) == sorted(f"{name}-{i}" for i in range(8))
        assert client.purge(project).sessions_deleted == 9


async def test_sync_client_full_flow(server: Server, scope: dict[str, str], token_file: Path):
    before = threading.active_count()
    await asyncio.to_thread(sync_flow, server.port or 0, scope, token_file)
    # close() stopped the client's loop thread.
    assert threading.active_count() <= before + 1  # the to_thread worker may linger


def test_a_closed_client_refuses_calls():
    client = Client("127.0.0.1:1")
    client.close()
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.session("p", "a", "s").describe()


def child_call(call: Callable[[], object]) -> str:
    """Run ``call`` in a forked child; what it raised (or "no error")."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12 warns that forking a process with threads may deadlock: the
        # child here only makes one call, which must fail before any lock or I/O.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            try:
                call()
                outcome = "no error"
            except BaseException as error:
                outcome = f"{type(error).__name__}: {error}"
            os.write(write, outcome.encode())
        finally:
            os._exit(0)  # never back into pytest
    os.close(write)
    with os.fdopen(read, "rb") as reader:
        outcome = reader.read().decode()
    os.waitpid(pid, 0)
    return outcome


async def test_a_forked_child_is_told_to_make_its_own_client(
    server: Server, scope: dict[str, str], token_file: Path
):
    """A fork copies a Client but not its loop thread: a call in the child says so
    (not that the client is closed: nobody closed it), and the parent's goes on."""
    ids = (scope["project_id"], scope["agent_instance_id"], scope["session_id"])

    def run() -> str:
        with Client(f"127.0.0.1:{server.port}", token_file=token_file) as client:
            session = client.session(*ids)
            session.spawn()
            outcome = child_call(session.get_all)
            session.set("after-the-fork", True)
            assert session.get_all() == {"after-the-fork": True}
            return outcome

    outcome = await asyncio.to_thread(run)
    assert outcome.startswith("RuntimeError: the sync memsvc Client was created in process")
    assert "create one in each process, after the fork" in outcome


async def test_closing_a_client_whose_loop_is_gone_raises_nothing(server: Server, token_file: Path):
    """Found by a review: close() in a forked child (as at interpreter teardown, the
    loop thread gone) raised RuntimeError, though close() is idempotent and nobody
    had closed the client; Watch.close() already returned quietly."""

    def run() -> str:
        with Client(f"127.0.0.1:{server.port}", token_file=token_file) as client:
            return child_call(client.close)

    assert await asyncio.to_thread(run) == "no error"


async def test_a_closed_client_leaves_no_grpc_thread_behind(server: Server, token_file: Path):
    """Found by a review: close() kept a reference to the closed gRPC channel, and
    with it gRPC's poller thread ran for as long as the client was referenced (and
    a forked child's own client could hang in it). Run in a process of its own: the
    test server here keeps a poller thread of its own."""
    script = (
        "import sys, threading, time, uuid\n"
        "from memsvc.client import Client\n"
        f"client = Client('127.0.0.1:{server.port}', token_file={str(token_file)!r})\n"
        "client.list_sessions(str(uuid.uuid4())).collect()\n"
        "client.close()\n"
        "for _ in range(50):\n"
        "    if len(threading.enumerate()) == 1: break\n"
        "    time.sleep(0.1)\n"
        "print(sorted(t.name for t in threading.enumerate()))\n"
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.strip() == "['MainThread']", done.stdout + done.stderr


@pytest.mark.parametrize(
    ("sync_class", "async_class"),
    [
        (Client, AsyncClient),
        (SessionClient, AsyncSessionClient),
        (EpisodesClient, AsyncEpisodesClient),
        (GraphClient, AsyncGraphClient),
    ],
)
def test_sync_methods_mirror_the_async_ones(sync_class: type, async_class: type):
    """Same public methods, same parameters (names, kinds, defaults)."""

    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_") and name != "from_channel"
        }

    sync_methods, async_methods = public(sync_class), public(async_class)
    assert set(sync_methods) == set(async_methods)
    for name, signature in async_methods.items():
        mirrored = sync_methods[name]
        assert [(p.name, p.kind, p.default) for p in mirrored.parameters.values()] == [
            (p.name, p.kind, p.default) for p in signature.parameters.values()
        ], name


def test_an_unclosed_client_warns():
    client = Client("127.0.0.1:1")
    with pytest.warns(ResourceWarning, match="unclosed"):
        del client  # CPython finalizes at once


async def test_an_unclosed_async_client_warns():
    sdk = AsyncClient("127.0.0.1:1")
    channel = sdk.channel
    with pytest.warns(ResourceWarning, match="unclosed"):
        del sdk  # CPython finalizes at once
    await channel.close()


async def test_a_closed_async_client_refuses_calls():
    async with AsyncClient("127.0.0.1:1") as sdk:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        await sdk.session("p", "a", "s").describe()


def test_what_a_client_made_keeps_the_client_open():
    """``Client(...).session(...)`` drops the Client at once: the session (like a
    pager or a watch) keeps it, so its calls still run (here to a port nobody
    listens on: Unavailable, not "the Client is closed"). The unclosed Client is
    reported when the last thing it made goes."""
    target = f"127.0.0.1:{free_port()}"
    made = [Client(target, timeout=0.5, retry=RetryPolicy(max_attempts=1)).session("p", "a", "s")]
    gc.collect()
    with pytest.raises(Unavailable):
        made[0].describe()
    gc.collect()  # the error's traceback, which referred to the session too
    with pytest.warns(ResourceWarning, match="unclosed"):
        made.clear()  # the session, then the Client it held (collected at once)
