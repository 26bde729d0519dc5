"""GetCheckpoint with entries reads a checkpoint's whole contents for each page: a
review saw 64 such calls, each asking for one entry of a 15 MiB checkpoint, hold
1.1 GB at once. At most CONTENTS_READS_AT_ONCE of them read contents at once."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import grpc

from memsvc.config import Config
from memsvc.domain._lifecycle_reads import CONTENTS_READS_AT_ONCE
from memsvc.server import Server
from memsvc.store.sqlite import SqliteDurableStore
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.helpers import value


class CountingReads(SqliteDurableStore):
    """The SQLite store, counting the reads of contents under way (each held a while,
    so that calls that could overlap do)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.reading = 0
        self.most = 0

    async def read_checkpoint(
        self, ref: Any, checkpoint_id: str, with_contents: bool = True
    ) -> Any:
        if not with_contents:
            return await super().read_checkpoint(ref, checkpoint_id, with_contents)
        self.reading += 1
        self.most = max(self.most, self.reading)
        try:
            await asyncio.sleep(0.05)
            return await super().read_checkpoint(ref, checkpoint_id, with_contents)
        finally:
            self.reading -= 1


async def test_few_calls_read_a_checkpoints_contents_at_once(tmp_path: Path):
    store = CountingReads(f"sqlite:///{tmp_path / 'memsvc.db'}")
    config = Config(listen="127.0.0.1:0", data_dir=str(tmp_path), health_listen="",
                    metrics_listen="")  # fmt: skip
    ids: dict[str, Any] = {"project_id": str(uuid.uuid4()), "agent_instance_id": str(uuid.uuid4()),
           "session_id": "s"}  # fmt: skip
    async with (
        Server(config, durable=store) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        life = LifecycleServiceStub(channel)
        initial = [pb.EntryInput(key=f"k{i}", value=value(i)) for i in range(20)]
        await life.Spawn(lc.SpawnRequest(**ids, initial_entries=initial))
        paused = await life.Pause(lc.PauseRequest(**ids))
        ask = lc.GetCheckpointRequest(
            **ids, checkpoint_id=paused.checkpoint.checkpoint_id, include_entries=True, page_size=1
        )
        pages = await asyncio.gather(*(life.GetCheckpoint(ask, timeout=30) for _ in range(12)))
    assert all([entry.key for entry in page.entries] == ["k0"] for page in pages)
    assert store.most == CONTENTS_READS_AT_ONCE  # they overlapped up to the bound, no more
