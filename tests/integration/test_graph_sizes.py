"""A graph thread whose state grows past one response, put by put.

Each put sends only the values that changed, so every put fits, yet the latest
checkpoint with all its values may not: reading it is refused by name
(GRAPH_CHECKPOINT_TOO_LARGE, with the size and the limit), and with a larger
``max_message_bytes`` the SDK reads it whatever grpc's client default (4 MiB).
"""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from memsvc.client import AsyncClient, GraphCheckpointTooLarge
from memsvc.config import Config
from memsvc.server import Server
from tests.contract.test_graph_checkpoints import checkpoint


async def put_growing_thread(client: AsyncClient, project: str, values: int, size: int) -> None:
    """Checkpoints c1..cN, each adding a new channel of ``size`` bytes."""
    graphs = client.graphs(project)
    versions: dict[str, str] = {}
    for step in range(1, values + 1):
        channel = f"ch{step}"
        versions[channel] = "1"
        message = checkpoint(
            "t", f"c{step}", parent=f"c{step - 1}" if step > 1 else "",
            versions=dict(versions), new={channel: bytes([step]) * size},
        )  # fmt: skip
        await graphs.put_checkpoint(message)


async def test_a_checkpoint_too_large_for_one_response_is_refused_by_name(base_config: Config):
    config = replace(base_config, max_message_bytes=2 << 20)
    project = str(uuid.uuid4())
    async with Server(config) as server, AsyncClient(f"127.0.0.1:{server.port}") as client:
        await put_growing_thread(client, project, values=3, size=900_000)  # 2.7 MB in all
        graphs = client.graphs(project)
        assert len((await graphs.get_checkpoint("t", "c2")).channel_values) == 2
        with pytest.raises(GraphCheckpointTooLarge) as raised:
            await graphs.get_checkpoint("t")
        assert raised.value.limit == 2 << 20
        assert raised.value.size is not None and raised.value.size > 2_700_000
        assert raised.value.metadata["checkpoint_id"] == "c3"
        assert "raise max_message_bytes" in raised.value.message
        with pytest.raises(GraphCheckpointTooLarge):  # the newest first: c3 alone
            await graphs.checkpoints("t").collect()


async def test_the_sdk_reads_what_a_memsvc_with_a_larger_limit_sends(base_config: Config):
    config = replace(base_config, max_message_bytes=16 << 20)
    project = str(uuid.uuid4())
    async with Server(config) as server, AsyncClient(f"127.0.0.1:{server.port}") as client:
        await put_growing_thread(client, project, values=2, size=3_000_000)  # 6 MB
        latest = await client.graphs(project).get_checkpoint("t")
    assert [len(v.value.data) for v in latest.channel_values] == [3_000_000, 3_000_000]


async def test_list_pages_count_metadata_so_each_fits_a_response(base_config: Config):
    """Checkpoints with large metadata (up to 1 MiB each): a page stops at the byte
    budget counting it, instead of outgrowing the response."""
    config = replace(base_config, max_message_bytes=2 << 20)
    project = str(uuid.uuid4())
    async with Server(config) as server, AsyncClient(f"127.0.0.1:{server.port}") as client:
        graphs = client.graphs(project)
        for step in range(1, 4):
            await graphs.put_checkpoint(
                checkpoint("t", f"c{step}", metadata={"notes": "n" * 700_000})
            )
        listed = await graphs.checkpoints("t").collect()
    assert [c.checkpoint_id for c in listed] == ["c3", "c2", "c1"]
