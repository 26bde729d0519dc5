"""`memsvc graph ...`: a thread's LangGraph checkpoints listed, pruned and deleted."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from langgraph.checkpoint.base import empty_checkpoint

from memsvc.langgraph import MemsvcSaver
from memsvc.server import Server
from tests.integration.test_cli_client import Cli


@pytest.fixture
def graph_cli(server: Server, scope: dict[str, str]) -> Cli:
    return Cli(server, scope)


async def test_graph_list_prune_and_delete(graph_cli: Cli, server: Server, scope: dict[str, str]):
    cli = graph_cli
    project, thread_id = scope["project_id"], f"thread-{uuid.uuid4()}"
    config: Any = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    ids = []
    async with MemsvcSaver(f"127.0.0.1:{server.port}", project_id=project) as saver:
        for step in range(3):
            checkpoint = empty_checkpoint()
            checkpoint["channel_values"] = {"notes": ["n"] * (step + 1)}
            checkpoint["channel_versions"] = {"notes": saver.get_next_version(None, None)}
            config = await saver.aput(
                config,
                checkpoint,
                {"source": "loop", "step": step, "parents": {}},
                checkpoint["channel_versions"],
            )
            ids.append(checkpoint["id"])
    thread = ["-p", project, "-t", thread_id]
    listed = await cli.json("graph", "list", *thread)
    assert [c["checkpoint_id"] for c in listed] == ids[::-1]
    assert [c["metadata"]["step"] for c in listed] == [2, 1, 0]
    text = await cli.ok("graph", "list", *thread, "--limit", "1")
    assert ids[-1] in text and "step 2 (loop)" in text and "1 channels" in text
    assert (await cli.json("graph", "prune", *thread))["checkpoints_deleted"] == 2
    assert "deleted 1 checkpoint(s)" in await cli.ok("graph", "delete", *thread)
    assert await cli.json("graph", "list", *thread) == []
