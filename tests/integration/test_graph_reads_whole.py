"""A graph checkpoint is read whole or not at all.

Get and List read the checkpoint rows in one statement, then their values and
writes in another. A delete (of the thread, a run, or by retention) that commits
between the two must not turn into a checkpoint without its values: Get then
answers as it would after the delete, and List leaves that checkpoint out.
The delete is made to commit exactly there by running it just before the second
statement.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from memsvc.config import Config
from memsvc.server import Server
from memsvc.store import _graph_sql
from memsvc.v1 import graph_checkpoint_pb2 as gpb
from memsvc.v1.graph_checkpoint_pb2_grpc import GraphCheckpointServiceStub
from tests.helpers import expect_error


@pytest.fixture
async def graphs(local_config: Config) -> AsyncIterator[GraphCheckpointServiceStub]:
    server = Server(local_config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield GraphCheckpointServiceStub(channel)
    finally:
        await server.stop()


def checkpoint(thread: str, checkpoint_id: str, run_id: str) -> gpb.GraphCheckpoint:
    return gpb.GraphCheckpoint(
        thread_id=thread,
        checkpoint_id=checkpoint_id,
        checkpoint=gpb.TypedValue(type="json", data=b"{}"),
        metadata_json=f'{{"run_id": "{run_id}"}}',
        channel_versions={"messages": checkpoint_id},
        channel_values=[
            gpb.ChannelValue(
                channel="messages",
                version=checkpoint_id,
                value=gpb.TypedValue(type="json", data=f'"{checkpoint_id}"'.encode()),
            )
        ],
    )


async def put_checkpoints(graphs: GraphCheckpointServiceStub, project: str, count: int) -> None:
    """Checkpoints c1 to c<count> of thread t, each of its own run (r1, r2...)."""
    for number in range(1, count + 1):
        await graphs.PutGraphCheckpoint(
            gpb.PutGraphCheckpointRequest(
                project_id=project, checkpoint=checkpoint("t", f"c{number}", f"r{number}")
            )
        )


def delete_run(
    graphs: GraphCheckpointServiceStub, project: str, run_id: str
) -> Callable[[], Awaitable[object]]:
    """The change of deleting one run's checkpoints."""
    return lambda: graphs.DeleteGraphRuns(
        gpb.DeleteGraphRunsRequest(project_id=project, run_ids=[run_id])
    )


def before_the_values_are_read(
    monkeypatch: pytest.MonkeyPatch, change: Callable[[], Awaitable[object]], times: int = 1
) -> None:
    """Runs ``change`` between a read's checkpoint rows and its values, at the
    first ``times`` reads."""
    real = _graph_sql._attach
    pending = [change] * times

    async def attach(*args: Any) -> Any:
        if pending:
            await pending.pop()()
        return await real(*args)

    monkeypatch.setattr(_graph_sql, "_attach", attach)


async def list_all(
    graphs: GraphCheckpointServiceStub, project: str, page_size: int = 0
) -> list[gpb.GraphCheckpoint]:
    """Thread t's checkpoints, page after page (a page may end early, before a
    checkpoint that changed while it was read)."""
    listed: list[gpb.GraphCheckpoint] = []
    token = ""
    while True:
        page = await graphs.ListGraphCheckpoints(
            gpb.ListGraphCheckpointsRequest(
                project_id=project, thread_id="t", page_size=page_size, page_token=token
            )
        )
        listed += page.checkpoints
        token = page.next_page_token
        if not token:
            return listed


async def test_get_of_a_checkpoint_deleted_meanwhile_is_not_found(
    graphs: GraphCheckpointServiceStub, monkeypatch: pytest.MonkeyPatch
):
    project = str(uuid.uuid4())
    await put_checkpoints(graphs, project, 1)
    before_the_values_are_read(
        monkeypatch,
        lambda: graphs.DeleteGraphThread(
            gpb.DeleteGraphThreadRequest(project_id=project, thread_id="t")
        ),
    )
    request = gpb.GetGraphCheckpointRequest(project_id=project, thread_id="t", checkpoint_id="c1")
    error = await expect_error(graphs.GetGraphCheckpoint(request), grpc.StatusCode.NOT_FOUND)
    assert error.reason == "ERROR_REASON_GRAPH_CHECKPOINT_NOT_FOUND"


async def test_get_of_the_latest_deleted_meanwhile_answers_the_one_before(
    graphs: GraphCheckpointServiceStub, monkeypatch: pytest.MonkeyPatch
):
    project = str(uuid.uuid4())
    await put_checkpoints(graphs, project, 2)
    before_the_values_are_read(monkeypatch, delete_run(graphs, project, "r2"))
    got = await graphs.GetGraphCheckpoint(
        gpb.GetGraphCheckpointRequest(project_id=project, thread_id="t")
    )
    assert got.checkpoint.checkpoint_id == "c1"
    assert [v.value.data for v in got.checkpoint.channel_values] == [b'"c1"']


async def test_list_leaves_out_a_checkpoint_deleted_meanwhile(
    graphs: GraphCheckpointServiceStub, monkeypatch: pytest.MonkeyPatch
):
    project = str(uuid.uuid4())
    await put_checkpoints(graphs, project, 3)
    before_the_values_are_read(monkeypatch, delete_run(graphs, project, "r2"))
    listed = await list_all(graphs, project)
    assert [c.checkpoint_id for c in listed] == ["c3", "c1"]
    for item in listed:
        data = [v.value.data for v in item.channel_values]
        assert data == [f'"{item.checkpoint_id}"'.encode()]


async def test_reads_of_a_checkpoint_put_again_meanwhile_have_its_new_values(
    graphs: GraphCheckpointServiceStub, monkeypatch: pytest.MonkeyPatch
):
    project = str(uuid.uuid4())
    await put_checkpoints(graphs, project, 1)
    again = checkpoint("t", "c1", "r1")
    again.channel_versions["messages"] = "v2"
    del again.channel_values[:]
    again.channel_values.add(
        channel="messages", version="v2", value=gpb.TypedValue(type="json", data=b'"v2"')
    )

    before_the_values_are_read(
        monkeypatch,
        lambda: graphs.PutGraphCheckpoint(
            gpb.PutGraphCheckpointRequest(project_id=project, checkpoint=again)
        ),
    )
    [item] = await list_all(graphs, project)
    assert dict(item.channel_versions) == {"messages": "v2"}
    assert [v.value.data for v in item.channel_values] == [b'"v2"']


async def test_a_page_that_lost_a_checkpoint_meanwhile_still_leads_to_the_rest(
    graphs: GraphCheckpointServiceStub, monkeypatch: pytest.MonkeyPatch
):
    """A page reads one row more than it holds to know whether more follow: a row
    deleted before its values were read must not end the listing early."""
    project = str(uuid.uuid4())
    await put_checkpoints(graphs, project, 5)
    before_the_values_are_read(monkeypatch, delete_run(graphs, project, "r4"))
    listed = await list_all(graphs, project, page_size=2)
    assert [c.checkpoint_id for c in listed] == ["c5", "c3", "c2", "c1"]


async def test_a_page_ends_before_a_checkpoint_that_keeps_changing(
    graphs: GraphCheckpointServiceStub, monkeypatch: pytest.MonkeyPatch
):
    """The checkpoints before it make a page of their own, instead of the whole page
    being read again until it fails (a page read again five times is UNAVAILABLE)."""
    project = str(uuid.uuid4())
    await put_checkpoints(graphs, project, 3)
    versions = iter(range(100))

    async def put_c1_again() -> object:
        again = checkpoint("t", "c1", "r1")
        version = f"v{next(versions)}"
        again.channel_versions["messages"] = version
        again.channel_values[0].version = version
        request = gpb.PutGraphCheckpointRequest(project_id=project, checkpoint=again)
        return await graphs.PutGraphCheckpoint(request)

    before_the_values_are_read(monkeypatch, put_c1_again, times=5)
    listed = await list_all(graphs, project)
    assert [c.checkpoint_id for c in listed] == ["c3", "c2", "c1"]
    assert dict(listed[2].channel_versions) == {"messages": "v4"}
