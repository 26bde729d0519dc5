"""Graph puts take their project's lock, shared, as Spawn and RecordEpisode do.

A project purge deletes threads, checkpoints, values and writes in statements of
their own, each seeing what committed before it. A put of a new thread (no row for
the purge to lock) that committed between two of them could leave a checkpoint
whose values the next statement deleted. Holding the project's lock exclusively,
as a purge does, must hold every kind of put back until it ends.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import grpc
import pytest

from memsvc.config import Config
from memsvc.domain import SessionRef
from memsvc.server import Server
from memsvc.store.postgres import PostgresDurableStore
from memsvc.v1 import graph_checkpoint_pb2 as gpb
from memsvc.v1.graph_checkpoint_pb2_grpc import GraphCheckpointServiceStub

Put = Callable[[GraphCheckpointServiceStub, str], Awaitable[object]]


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


@pytest.mark.parametrize("call", [put, fenced_put, put_writes], ids=lambda c: c.__name__)
async def test_a_graph_put_waits_for_a_purge_of_its_project(
    tmp_path, fresh_postgres_url: str, call: Put
) -> None:
    config = Config(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path),
        database_url=fresh_postgres_url,
        health_listen="",
        metrics_listen="",
    )
    project = str(uuid.uuid4())
    holder = PostgresDurableStore(fresh_postgres_url, max_connections=1)
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        await holder.open()
        try:
            stub = GraphCheckpointServiceStub(channel)
            async with holder.transaction() as tx:
                await tx.lock_project(project, exclusive=True)
                # A read: the lock above has been taken once it answers.
                assert await tx.lock_session(SessionRef(project, str(uuid.uuid4()), "s")) is None
                writing = asyncio.ensure_future(call(stub, project))
                done, _ = await asyncio.wait({writing}, timeout=0.5)
                assert not done, "the put did not wait for the project's lock"
            await asyncio.wait_for(writing, 10)
        finally:
            await holder.aclose()
