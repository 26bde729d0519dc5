"""The SDK's graph checkpoints (client.graphs) and MemsvcSaver with a bearer token."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from memsvc.client import (
    AsyncClient,
    Client,
    GraphCheckpointConflict,
    GraphCheckpointNotFound,
    PermissionDenied,
)
from memsvc.langgraph import MemsvcSaver
from memsvc.server import Server
from memsvc.v1 import graph_checkpoint_pb2 as pb
from tests.client._credentials import new_token, write_token, write_tokens
from tests.client.conftest import FAST_RETRY


def checkpoint(checkpoint_id: str, parent: str = "") -> pb.GraphCheckpoint:
    return pb.GraphCheckpoint(
        thread_id="t",
        checkpoint_id=checkpoint_id,
        parent_checkpoint_id=parent,
        checkpoint=pb.TypedValue(type="json", data=b"{}"),
        metadata_json=json.dumps({"run_id": "r1"}),
        channel_versions={"a": checkpoint_id},
        channel_values=[
            pb.ChannelValue(
                channel="a", version=checkpoint_id, value=pb.TypedValue(type="bytes", data=b"v")
            )
        ],
    )


async def test_graph_calls_and_their_errors(client: AsyncClient, scope: dict[str, str]):
    graphs = client.graphs(scope["project_id"])
    assert await graphs.put_checkpoint(checkpoint("c1")) == 1
    await graphs.put_checkpoint(checkpoint("c2", "c1"), require_latest_parent=True)
    with pytest.raises(GraphCheckpointConflict) as conflict:
        await graphs.put_checkpoint(checkpoint("c3", "c1"), require_latest_parent=True)
    assert conflict.value.latest_checkpoint_id == "c2"
    await graphs.put_writes(
        "t", "c2", [pb.GraphWrite(task_id="x", channel="a", value=pb.TypedValue(type="null"))]
    )
    latest = await graphs.get_checkpoint("t")
    assert (latest.checkpoint_id, len(latest.pending_writes)) == ("c2", 1)
    with pytest.raises(GraphCheckpointNotFound) as missing:
        await graphs.get_checkpoint("t", "c9")
    assert missing.value.checkpoint_id == "c9"
    listed = await graphs.checkpoints("t", page_size=1).collect()
    assert [c.checkpoint_id for c in listed] == ["c2", "c1"]
    assert await graphs.copy_thread("t", "u") == 2
    assert await graphs.prune(["u"]) == 1
    assert await graphs.delete_runs(["r1"]) == 3
    assert await graphs.delete_thread("t") == 0
    report = await client.purge(scope["project_id"])
    assert report.graph_checkpoints_deleted == 0


async def test_the_sync_graph_client(server: Server, token_file: Path, scope: dict[str, str]):
    def run() -> list[str]:
        with Client(f"127.0.0.1:{server.port}", token_file=token_file) as client:
            graphs = client.graphs(scope["project_id"])
            graphs.put_checkpoint(checkpoint("c1"))
            graphs.put_checkpoint(checkpoint("c2", "c1"))
            assert graphs.prune(["t"], strategy="keep_latest") == 1
            return [c.checkpoint_id for c in graphs.checkpoints("t")]

    assert await asyncio.to_thread(run) == ["c2"]


async def test_a_token_bound_to_another_project_is_refused(
    server: Server, tmp_path: Path, server_tokens_file: Path, auth_token: str
):
    """MemsvcSaver with a token bound to one project cannot touch another's threads."""
    bound = new_token()
    mine = str(uuid.uuid4())
    write_tokens(server_tokens_file, auth_token, f"{bound} {mine}")
    await server.reload_credentials()
    token_file = write_token(tmp_path / "bound-token", bound)
    config = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
    async with MemsvcSaver(
        f"127.0.0.1:{server.port}",
        project_id=str(uuid.uuid4()),
        token_file=token_file,
        retry=FAST_RETRY,
    ) as saver:
        with pytest.raises(PermissionDenied):
            await saver.aget_tuple(config)  # type: ignore[arg-type]
    async with MemsvcSaver(
        f"127.0.0.1:{server.port}", project_id=mine, token_file=token_file, retry=FAST_RETRY
    ) as saver:
        assert await saver.aget_tuple(config) is None  # type: ignore[arg-type]
