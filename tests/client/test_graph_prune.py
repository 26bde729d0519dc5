"""A keep_latest prune from the SDK or `memsvc graph prune` leaves a thread that uses a
LangGraph DeltaChannel (its values are rebuilt from older checkpoints) unless forced."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from memsvc.client import (
    DELTA_METADATA_KEYS,
    AsyncClient,
    AsyncGraphClient,
    Client,
    GraphPruneRefused,
)
from memsvc.server import Server
from memsvc.v1 import graph_checkpoint_pb2 as pb
from tests.integration.test_cli_client import Cli


def checkpoint(thread_id: str, step: int, metadata: Mapping[str, object]) -> pb.GraphCheckpoint:
    return pb.GraphCheckpoint(
        thread_id=thread_id,
        checkpoint_id=f"c{step}",
        parent_checkpoint_id=f"c{step - 1}" if step else "",
        checkpoint=pb.TypedValue(type="json", data=b"{}"),
        metadata_json=json.dumps({"step": step, **metadata}),
    )


async def put_threads(graphs: AsyncGraphClient) -> None:
    """Threads "delta" and "plain", three checkpoints each; the first of "delta" holds the
    counters LangGraph's DeltaChannel leaves in checkpoint metadata."""
    for thread_id in ("delta", "plain"):
        for step in range(3):
            delta = thread_id == "delta" and step == 0
            metadata = {DELTA_METADATA_KEYS[0]: {"items": 1}} if delta else {}
            await graphs.put_checkpoint(checkpoint(thread_id, step, metadata))


async def count(graphs: AsyncGraphClient, thread_id: str) -> int:
    return len(await graphs.checkpoints(thread_id).collect())


async def test_prune_refuses_a_thread_with_a_delta_channel_unless_forced(
    client: AsyncClient, scope: dict[str, str]
):
    graphs = client.graphs(scope["project_id"])
    await put_threads(graphs)
    with pytest.raises(GraphPruneRefused) as refused:
        await graphs.prune(["plain", "delta"])
    assert (refused.value.refused_thread_ids, refused.value.checkpoints_deleted) == (["delta"], 0)
    assert (await count(graphs, "plain"), await count(graphs, "delta")) == (3, 3)
    # prune_threads refuses the same threads, and answers with them.
    response = await graphs.prune_threads(["delta"])
    assert (list(response.refused_thread_ids), response.checkpoints_deleted) == (["delta"], 0)
    assert await graphs.prune(["plain"]) == 2
    assert await graphs.prune(["delta"], force=True) == 2
    assert await count(graphs, "delta") == 1


async def test_the_sync_prune_refuses_it_too(
    client: AsyncClient, server: Server, scope: dict[str, str], token_file: Path
):
    await put_threads(client.graphs(scope["project_id"]))

    def prune(force: bool) -> int:
        with Client(f"127.0.0.1:{server.port}", token_file=token_file) as sync:
            return sync.graphs(scope["project_id"]).prune(["delta"], force=force)

    with pytest.raises(GraphPruneRefused):
        await asyncio.to_thread(prune, False)
    assert await asyncio.to_thread(prune, True) == 2


async def test_the_cli_exits_4_naming_the_thread_unless_forced(
    client: AsyncClient, server: Server, scope: dict[str, str], token_file: Path
):
    graphs = client.graphs(scope["project_id"])
    await put_threads(graphs)
    cli = Cli(server, scope)
    cli.env["MEMSVC_TOKEN_FILE"] = str(token_file)
    thread = ["graph", "prune", "-p", scope["project_id"], "-t", "delta"]
    code, out, err = await cli.run(*thread)
    assert code == 4, err
    assert "FAILED_PRECONDITION" in err and "'delta'" in err and "--force" in err
    assert out == ""
    assert await count(graphs, "delta") == 3
    assert (await cli.json(*thread, "--force"))["checkpoints_deleted"] == 2
    assert await count(graphs, "delta") == 1
