"""Graph puts take their project's lock, shared, as Spawn and RecordEpisode do.

A project purge deletes threads, checkpoints, values and writes in statements of
their own, each seeing what committed before it. A put of a new thread (no row for
the purge to lock) that committed between two of them could leave a checkpoint
whose values the next statement deleted. Holding the project's lock exclusively,
as a purge does, must hold every kind of put back until it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import psycopg
import pytest

from memsvc.config import Config
from memsvc.domain import SessionRef
from memsvc.domain._graph_checkpoints import GraphCheckpointRecord, GraphValue
from memsvc.server import Server
from memsvc.store._lifecycle_sql import project_lock
from memsvc.store.postgres import PostgresDurableStore
from memsvc.v1 import graph_checkpoint_pb2 as gpb
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.graph_checkpoint_pb2_grpc import GraphCheckpointServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.helpers import expect_error

Put = Callable[[GraphCheckpointServiceStub, str], Awaitable[object]]


# PostgreSQL only: SQLite's write lock serializes every write already.
postgres_only = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


def checkpoint(thread: str, checkpoint_id: str) -> gpb.GraphCheckpoint:
    return gpb.GraphCheckpoint(
        thread_id=thread,
        checkpoint_id=checkpoint_id,
        checkpoint=gpb.TypedValue(type="json", data=b"{}"),
        metadata_json="{}",
    )


async def put(stub: GraphCheckpointServiceStub, project: str) -> object:
    request = gpb.PutGraphCheckpointRequest(project_id=project, checkpoint=checkpoint("t", "c1"))
    return await stub.PutGraphCheckpoint(request)


async def fenced_put(stub: GraphCheckpointServiceStub, project: str) -> object:
    request = gpb.PutGraphCheckpointRequest(
        project_id=project, checkpoint=checkpoint("t", "c1"), require_latest_parent=True
    )
    return await stub.PutGraphCheckpoint(request)


async def put_writes(stub: GraphCheckpointServiceStub, project: str) -> object:
    request = gpb.PutGraphWritesRequest(
        project_id=project,
        thread_id="t",
        checkpoint_id="c1",
        writes=[
            gpb.GraphWrite(
                task_id="task", channel="ch", value=gpb.TypedValue(type="json", data=b"1")
            )
        ],
    )
    return await stub.PutGraphWrites(request)


async def copy(stub: GraphCheckpointServiceStub, project: str) -> object:
    request = gpb.CopyGraphThreadRequest(
        project_id=project, source_thread_id="source", target_thread_id="t"
    )
    return await stub.CopyGraphThread(request)


@contextlib.asynccontextmanager
async def served_with_a_holder(
    config: Config, database_url: str
) -> AsyncIterator[tuple[GraphCheckpointServiceStub, PostgresDurableStore]]:
    """A server's graph stub, and a store of the test's own on the same database,
    which holds locks and transactions while the server's calls run."""
    holder = PostgresDurableStore(database_url, max_connections=1)
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        await holder.open()
        try:
            yield GraphCheckpointServiceStub(channel), holder
        finally:
            await holder.aclose()


@postgres_only
@pytest.mark.parametrize("call", [put, fenced_put, put_writes, copy], ids=lambda c: c.__name__)
async def test_a_graph_put_waits_for_a_purge_of_its_project(
    local_config: Config, database_url: str, call: Put
) -> None:
    project = str(uuid.uuid4())
    async with served_with_a_holder(local_config, database_url) as (stub, holder):
        source = checkpoint("source", "c0")
        await stub.PutGraphCheckpoint(
            gpb.PutGraphCheckpointRequest(project_id=project, checkpoint=source)
        )
        async with holder.transaction() as tx:
            await tx.lock_project(project, exclusive=True)
            # A read: the lock above has been taken once it answers.
            assert await tx.lock_session(SessionRef(project, str(uuid.uuid4()), "s")) is None
            writing = asyncio.ensure_future(call(stub, project))
            done, _ = await asyncio.wait({writing}, timeout=0.5)
            assert not done, "the put did not wait for the project's lock"
        await asyncio.wait_for(writing, 10)


@postgres_only
@pytest.mark.parametrize("call", [put, fenced_put, put_writes, copy], ids=lambda c: c.__name__)
async def test_a_graph_put_holds_its_projects_lock_until_it_commits(
    local_config: Config, database_url: str, call: Put
) -> None:
    """Not taken and let go at once: while the put waits for its thread's row
    (held here), a purge could still not take the project's lock."""
    project = str(uuid.uuid4())
    async with (
        Server(local_config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        await psycopg.AsyncConnection.connect(database_url) as rows,
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as purge,
    ):
        stub = GraphCheckpointServiceStub(channel)
        source = checkpoint("source", "c0")
        await stub.PutGraphCheckpoint(
            gpb.PutGraphCheckpointRequest(project_id=project, checkpoint=source)
        )
        await put_writes(stub, project)  # thread t's row, with no checkpoint to fence on
        await rows.execute(
            "SELECT 1 FROM graph_threads WHERE project_id = %s AND thread_id = 't' FOR UPDATE",
            (project,),
        )
        writing = asyncio.ensure_future(call(stub, project))
        try_exclusive = (
            "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))",
            (project_lock(project),),
        )
        for _ in range(500):  # until the put waits for the row, its project's lock taken
            cursor = await purge.execute(*try_exclusive)
            if (await cursor.fetchone()) == (False,):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the put never held its project's lock")
        await asyncio.sleep(0.2)
        assert not writing.done()
        cursor = await purge.execute(*try_exclusive)
        assert (await cursor.fetchone()) == (False,), "the lock went before the put committed"
        await rows.rollback()
        await asyncio.wait_for(writing, 10)
        cursor = await purge.execute(*try_exclusive)
        assert (await cursor.fetchone()) == (True,)


@postgres_only
async def test_a_terminate_waiting_for_a_linked_thread_holds_no_other_writer_back(
    local_config: Config, database_url: str
) -> None:
    """A Terminate ends its session's linked threads under their row locks. It
    must wait for those before its event append locks the event counter, which
    every lifecycle write of the deployment needs until COMMIT: a Spawn in
    another project goes through while the Terminate waits."""
    project, agent = str(uuid.uuid4()), str(uuid.uuid4())
    scope: dict[str, Any] = {"project_id": project, "agent_instance_id": agent, "session_id": "s"}
    async with (
        Server(local_config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        await psycopg.AsyncConnection.connect(database_url) as rows,
    ):
        life = LifecycleServiceStub(channel)
        graphs = GraphCheckpointServiceStub(channel)
        await life.Spawn(lc.SpawnRequest(**scope))
        link = gpb.GraphThreadOptions(
            session=gpb.GraphSessionLink(
                agent_instance_id=agent,
                session_id="s",
                on_session_end=gpb.GRAPH_SESSION_END_ACTION_DELETE,
            )
        )
        await graphs.PutGraphCheckpoint(
            gpb.PutGraphCheckpointRequest(
                project_id=project, checkpoint=checkpoint("t", "c1"), options=link
            )
        )
        await rows.execute(
            "SELECT 1 FROM graph_threads WHERE project_id = %s AND thread_id = 't' FOR UPDATE",
            (project,),
        )
        terminating = asyncio.ensure_future(life.Terminate(lc.TerminateRequest(**scope)))
        done, _ = await asyncio.wait({terminating}, timeout=0.5)
        assert not done, "the Terminate did not wait for its thread's row"
        other: dict[str, Any] = {
            "project_id": str(uuid.uuid4()),
            "agent_instance_id": agent,
            "session_id": "s",
        }
        await asyncio.wait_for(life.Spawn(lc.SpawnRequest(**other)), 5)
        assert not terminating.done()
        await rows.rollback()
        await asyncio.wait_for(terminating, 10)
        error = await expect_error(
            graphs.GetGraphCheckpoint(
                gpb.GetGraphCheckpointRequest(project_id=project, thread_id="t")
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        assert error.reason == "ERROR_REASON_GRAPH_CHECKPOINT_NOT_FOUND"


@postgres_only
async def test_a_put_waiting_for_its_thread_stores_its_values_after_the_wait(
    local_config: Config, database_url: str
) -> None:
    """A put retried while a delete holds the thread's row (the delete removes a
    checkpoint and its values, then commits): the put must find the values gone
    and store them again, not skip them as stored before it waited, leaving a
    checkpoint without its values."""
    project = str(uuid.uuid4())
    message = checkpoint("t", "c1")
    message.channel_versions["a"] = "1"
    message.channel_values.add(
        channel="a", version="1", value=gpb.TypedValue(type="json", data=b'"v"')
    )
    request = gpb.PutGraphCheckpointRequest(project_id=project, checkpoint=message)
    async with (
        Server(local_config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        await psycopg.AsyncConnection.connect(database_url) as deleter,
    ):
        stub = GraphCheckpointServiceStub(channel)
        await stub.PutGraphCheckpoint(request)
        await deleter.execute(
            "SELECT 1 FROM graph_threads WHERE project_id = %s AND thread_id = 't' FOR UPDATE",
            (project,),
        )
        retried = asyncio.ensure_future(stub.PutGraphCheckpoint(request))
        done, _ = await asyncio.wait({retried}, timeout=0.5)
        assert not done, "the put did not wait for its thread's row"
        for table in ("graph_checkpoints", "graph_values"):
            await deleter.execute(
                f"DELETE FROM {table} WHERE project_id = %s AND thread_id = 't'", (project,)
            )
        await deleter.commit()
        await asyncio.wait_for(retried, 10)
        got = await stub.GetGraphCheckpoint(
            gpb.GetGraphCheckpointRequest(project_id=project, thread_id="t")
        )
        assert [(v.channel, v.value.data) for v in got.checkpoint.channel_values] == [("a", b'"v"')]


@postgres_only
async def test_deleting_a_thread_waits_for_its_first_put_and_deletes_all_of_it(
    local_config: Config, database_url: str
) -> None:
    """A thread's first put still in flight (it made the thread's row, uncommitted)
    while DeleteGraphThread runs: the delete waits for it and then deletes all of it.
    Without the wait, the put could commit between the delete's statements and leave
    its checkpoint with its values deleted."""
    project = str(uuid.uuid4())
    async with served_with_a_holder(local_config, database_url) as (stub, holder):
        record = GraphCheckpointRecord(
            project, "t", "", "c1", None, "json", b"{}", {}, {"a": "1"}, create_ms=1
        )
        async with holder.transaction() as tx:  # the put, in flight
            await tx.lock_project(project, exclusive=False)
            await tx.lock_graph_thread(project, "t", 1, None)
            await tx.insert_graph_values(project, "t", "", [GraphValue("a", "1", "json", b"1")])
            await tx.upsert_graph_checkpoint(record)
            deleting = asyncio.ensure_future(
                stub.DeleteGraphThread(
                    gpb.DeleteGraphThreadRequest(project_id=project, thread_id="t")
                )
            )
            done, _ = await asyncio.wait({deleting}, timeout=0.5)
            assert not done, "the delete did not wait for the thread's first put"
        deleted = await asyncio.wait_for(deleting, 10)
        assert deleted.checkpoints_deleted == 1
        await expect_error(
            stub.GetGraphCheckpoint(
                gpb.GetGraphCheckpointRequest(project_id=project, thread_id="t")
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        async with await psycopg.AsyncConnection.connect(database_url) as rows:
            for table in ("graph_values", "graph_checkpoints", "graph_threads"):
                cursor = await rows.execute(
                    f"SELECT count(*) FROM {table} WHERE project_id = %s", (project,)
                )
                assert await cursor.fetchone() == (0,), table
