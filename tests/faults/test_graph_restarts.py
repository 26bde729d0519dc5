"""Graph checkpoints while PostgreSQL restarts: acknowledged puts survive.

Writers extend LangGraph-like threads (each put names the previous checkpoint as
its parent and carries a new channel value) while the private PostgreSQL is
stopped or SIGKILLed and started again. Calls meeting the outage fail only with
UNAVAILABLE or DEADLINE_EXCEEDED and are retried with the same checkpoint (a put
is an upsert); once PostgreSQL is back, every put memsvc acknowledged is there,
with its value, its parent and its pending write.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import grpc
import pytest

from memsvc.v1 import graph_checkpoint_pb2 as pb
from memsvc.v1.graph_checkpoint_pb2_grpc import GraphCheckpointServiceStub
from tests.faults._support import RETRYABLE, Stubs, wait_serving
from tests.faults.conftest import RigFactory


class Writer:
    """Puts checkpoints c0, c1, ... on one thread, retrying each until acknowledged."""

    def __init__(
        self,
        graphs: GraphCheckpointServiceStub,
        project: str,
        thread: str,
        outage: asyncio.Event,
    ) -> None:
        self.graphs = graphs
        self.project = project
        self.thread = thread
        self.outage = outage  # set while PostgreSQL is down
        self.acknowledged: list[str] = []
        # Puts sent while PostgreSQL was down: each was refused, or waited it out.
        self.sent_in_outage = 0

    async def put(self, step: int) -> None:
        checkpoint_id = f"c{step:04d}"
        request = pb.PutGraphCheckpointRequest(
            project_id=self.project,
            checkpoint=pb.GraphCheckpoint(
                thread_id=self.thread,
                checkpoint_id=checkpoint_id,
                parent_checkpoint_id=f"c{step - 1:04d}" if step else "",
                checkpoint=pb.TypedValue(type="json", data=b"{}"),
                metadata_json=json.dumps({"step": step}),
                channel_versions={"notes": str(step)},
                channel_values=[
                    pb.ChannelValue(
                        channel="notes",
                        version=str(step),
                        value=pb.TypedValue(type="bytes", data=f"note {step}".encode()),
                    )
                ],
            ),
            # The fence holds across retries: a retry finds its own checkpoint latest.
            require_latest_parent=True,
        )
        writes = pb.PutGraphWritesRequest(
            project_id=self.project,
            thread_id=self.thread,
            checkpoint_id=checkpoint_id,
            writes=[
                pb.GraphWrite(task_id="task", channel="notes", value=request.checkpoint.checkpoint)
            ],
        )
        for call, message in (
            (self.graphs.PutGraphCheckpoint, request),
            (self.graphs.PutGraphWrites, writes),
        ):
            while True:
                self.sent_in_outage += self.outage.is_set()
                try:
                    await call(message, timeout=5)
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() in RETRYABLE, f"{error.code()}: {error.details()}"
                    await asyncio.sleep(0.2)
        self.acknowledged.append(checkpoint_id)

    async def run(self, stop: asyncio.Event) -> None:
        step = 0
        while not stop.is_set():
            await self.put(step)
            step += 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["stopped", "killed"])
async def test_acknowledged_graph_puts_survive_a_postgres_restart(make_rig: RigFactory, how: str):
    rig = make_rig()
    memsvc = rig.start()
    project = str(uuid.uuid4())
    async with grpc.aio.insecure_channel(memsvc.target) as channel:
        graphs = GraphCheckpointServiceStub(channel)
        outage = asyncio.Event()
        writers = [Writer(graphs, project, f"thread-{i}", outage) for i in range(3)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(w.run(stop)) for w in writers]
        await asyncio.sleep(0.5)
        outage.set()
        if how == "killed":
            rig.postgres.kill()
        else:
            rig.postgres.stop("fast")
        await asyncio.sleep(1.5)  # traffic meets the outage
        rig.postgres.start()
        outage.clear()
        deadline = time.monotonic() + 40
        before = sum(len(w.acknowledged) for w in writers)
        while sum(len(w.acknowledged) for w in writers) < before + 9:
            assert time.monotonic() < deadline, "no progress after PostgreSQL came back"
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks)
        # Each put sent meanwhile was refused or waited for the database (a probe that
        # saw the loss has the pool test its connections, so a put may never fail).
        assert sum(w.sent_in_outage for w in writers) > 0, "no put met the outage"
        await wait_serving(Stubs(channel))
        for writer in writers:
            listed = await graphs.ListGraphCheckpoints(
                pb.ListGraphCheckpointsRequest(
                    project_id=project, thread_id=writer.thread, page_size=1000
                )
            )
            stored = {c.checkpoint_id: c for c in listed.checkpoints}
            missing = [c for c in writer.acknowledged if c not in stored]
            assert not missing, f"acknowledged but lost: {missing}"
            for checkpoint_id in writer.acknowledged:
                step = int(checkpoint_id[1:])
                got = stored[checkpoint_id]
                assert [v.value.data for v in got.channel_values] == [f"note {step}".encode()]
                assert got.parent_checkpoint_id == (f"c{step - 1:04d}" if step else "")
                assert [w.task_id for w in got.pending_writes] == ["task"]
