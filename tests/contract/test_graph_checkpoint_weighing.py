"""Reads weigh a graph checkpoint before reading its values.

A thread's state may grow past one response, put by put. Get and List weigh a
checkpoint with its values and pending writes in the database, from their stored
lengths, and refuse one that cannot fit (or, in a List page, leave it for the next
page) before any of its value bytes are read: eight concurrent reads of a 42 MB
state must not hold 42 MB each. What the weight cannot see (metadata) is left to
the exact check of the response, which stays the final word.
"""

from __future__ import annotations

import random
from typing import Any

import grpc
import pytest

from memsvc.store import _graph_sql
from memsvc.v1 import graph_checkpoint_pb2 as pb
from memsvc.v1.graph_checkpoint_pb2_grpc import GraphCheckpointServiceStub
from tests.contract.test_graph_checkpoints import checkpoint, put
from tests.helpers import expect_error

LIMIT = 1 << 20  # max_message_bytes; a List page carries 3/4 of it
VALUE = 300_000  # bytes of each value put: random, so no compression shrinks them


@pytest.fixture
def config_overrides() -> dict[str, object]:
    # Working memory's values must stay readable under the smaller limit too.
    return {"max_message_bytes": LIMIT, "max_value_bytes": LIMIT // 4}


@pytest.fixture
def graphs(channel: grpc.aio.Channel) -> GraphCheckpointServiceStub:
    return GraphCheckpointServiceStub(channel)


@pytest.fixture
def bytes_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Value and write bytes the store reads, per read of values (from now on)."""
    seen: list[int] = []
    real = _graph_sql._attach

    async def attach(*args: Any) -> Any:
        attached, changed = await real(*args)
        seen.append(
            sum(len(v.data) for r in attached for v in r.values)
            + sum(len(w.data) for r in attached for w in r.writes)
        )
        return attached, changed

    monkeypatch.setattr(_graph_sql, "_attach", attach)
    return seen


async def put_growing_thread(graphs: GraphCheckpointServiceStub, project: str, steps: int) -> None:
    """Checkpoints c1..c<steps> of thread t, each adding a channel of VALUE bytes
    (each put sends only its new value, and fits)."""
    versions: dict[str, str] = {}
    for step in range(1, steps + 1):
        versions[f"ch{step}"] = "1"
        message = checkpoint(
            "t", f"c{step}", parent=f"c{step - 1}" if step > 1 else "",
            versions=dict(versions), new={f"ch{step}": random.randbytes(VALUE)},
        )  # fmt: skip
        await put(graphs, project, message)


async def test_a_checkpoint_past_one_response_is_refused_before_its_values_are_read(
    graphs, scope, bytes_read
):
    project = scope["project_id"]
    await put_growing_thread(graphs, project, 4)  # c4 holds 1.2 MB of values
    get_latest = graphs.GetGraphCheckpoint(
        pb.GetGraphCheckpointRequest(project_id=project, thread_id="t")
    )
    error = await expect_error(get_latest, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert error.reason == "ERROR_REASON_GRAPH_CHECKPOINT_TOO_LARGE"
    assert error.metadata["checkpoint_id"] == "c4"
    assert int(error.metadata["size"]) > 4 * VALUE
    listing = graphs.ListGraphCheckpoints(
        pb.ListGraphCheckpointsRequest(project_id=project, thread_id="t")
    )
    error = await expect_error(listing, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert error.metadata["checkpoint_id"] == "c4"
    assert sum(bytes_read) == 0, "refused, yet its values were read"
    # One that fits is served whole.
    got = await graphs.GetGraphCheckpoint(
        pb.GetGraphCheckpointRequest(project_id=project, thread_id="t", checkpoint_id="c3")
    )
    assert [len(v.value.data) for v in got.checkpoint.channel_values] == [VALUE] * 3
    assert sum(bytes_read) == 3 * VALUE


async def test_pending_writes_count_in_the_weight(graphs, scope, bytes_read):
    """Values that fit, and a pending write that takes the checkpoint past the
    limit: refused unread too."""
    project = scope["project_id"]
    await put_growing_thread(graphs, project, 3)  # 900 KB of values: fits
    await graphs.PutGraphWrites(
        pb.PutGraphWritesRequest(
            project_id=project,
            thread_id="t",
            checkpoint_id="c3",
            writes=[
                pb.GraphWrite(
                    task_id="task",
                    idx=0,
                    channel="ch1",
                    value=pb.TypedValue(type="bytes", data=random.randbytes(VALUE)),
                )
            ],
        )
    )
    get_latest = graphs.GetGraphCheckpoint(
        pb.GetGraphCheckpointRequest(project_id=project, thread_id="t")
    )
    error = await expect_error(get_latest, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert error.reason == "ERROR_REASON_GRAPH_CHECKPOINT_TOO_LARGE"
    assert sum(bytes_read) == 0


async def test_what_the_weight_cannot_see_is_refused_by_the_exact_check(graphs, scope, bytes_read):
    """Values that fit, with metadata that takes the checkpoint past the limit: the
    weight lets it through (it never refuses one that might fit), the response's
    own size refuses it."""
    project = scope["project_id"]
    big = random.randbytes(2 * VALUE)
    await put(graphs, project, checkpoint("t", "c1", versions={"ch": "1"}, new={"ch": big}))
    # c2 names c1's value (stored, not sent again) and brings the metadata.
    notes = {"notes": "n" * (LIMIT - 2 * VALUE)}
    await put(graphs, project, checkpoint("t", "c2", versions={"ch": "1"}, metadata=notes))
    get_latest = graphs.GetGraphCheckpoint(
        pb.GetGraphCheckpointRequest(project_id=project, thread_id="t")
    )
    error = await expect_error(get_latest, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert error.reason == "ERROR_REASON_GRAPH_CHECKPOINT_TOO_LARGE"
    assert int(error.metadata["size"]) > LIMIT
    assert sum(bytes_read) == 2 * VALUE  # read, then refused by its exact size


async def test_a_page_reads_no_values_it_leaves_for_the_next(graphs, scope, bytes_read):
    """Checkpoints of VALUE bytes each, in pages of 3/4 of LIMIT: each page reads the
    values it sends, and none of those of the checkpoints it leaves out."""
    project = scope["project_id"]
    for step in range(1, 7):
        message = checkpoint(
            "t", f"c{step}", versions={"v": str(step)}, new={"v": random.randbytes(VALUE)}
        )
        await put(graphs, project, message)
    listed, token = [], ""
    while True:
        bytes_read.clear()
        page = await graphs.ListGraphCheckpoints(
            pb.ListGraphCheckpointsRequest(project_id=project, thread_id="t", page_token=token)
        )
        sent = sum(len(v.value.data) for c in page.checkpoints for v in c.channel_values)
        assert sum(bytes_read) == sent == VALUE * len(page.checkpoints)
        listed += [c.checkpoint_id for c in page.checkpoints]
        token = page.next_page_token
        if not token:
            break
    assert listed == [f"c{step}" for step in range(6, 0, -1)]


async def test_a_read_of_some_channels_weighs_and_reads_only_theirs(graphs, scope, bytes_read):
    """A checkpoint too large whole is read for the channels asked for: only their
    values and pending writes come (and are read), its versions and document whole;
    a List with channels pages as one without, and its token keeps them."""
    project = scope["project_id"]
    await put_growing_thread(graphs, project, 4)  # c4 holds 1.2 MB of values
    small = pb.GraphWrite(task_id="task", channel="ch2", value=pb.TypedValue(type="b", data=b"w"))
    large = pb.GraphWrite(
        task_id="task",
        idx=1,
        channel="ch3",
        value=pb.TypedValue(type="b", data=random.randbytes(VALUE)),
    )
    await graphs.PutGraphWrites(
        pb.PutGraphWritesRequest(
            project_id=project, thread_id="t", checkpoint_id="c4", writes=[small, large]
        )
    )
    bytes_read.clear()
    got = await graphs.GetGraphCheckpoint(
        pb.GetGraphCheckpointRequest(project_id=project, thread_id="t", channels=["ch2", "nope"])
    )
    found = got.checkpoint
    assert found.checkpoint_id == "c4"
    assert dict(found.channel_versions) == {f"ch{i}": "1" for i in range(1, 5)}
    assert [v.channel for v in found.channel_values] == ["ch2"]
    assert len(found.channel_values[0].value.data) == VALUE
    assert [(w.channel, w.value.data) for w in found.pending_writes] == [("ch2", b"w")]
    assert sum(bytes_read) == VALUE + 1
    # Asked for too much still, it is refused unread.
    bytes_read.clear()
    error = await expect_error(
        graphs.GetGraphCheckpoint(
            pb.GetGraphCheckpointRequest(
                project_id=project, thread_id="t", channels=["ch1", "ch2", "ch3", "ch4"]
            )
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert error.reason == "ERROR_REASON_GRAPH_CHECKPOINT_TOO_LARGE"
    assert sum(bytes_read) == 0
    # A List with channels: ch4's value (c4's only) and no write, in one page.
    listed = await graphs.ListGraphCheckpoints(
        pb.ListGraphCheckpointsRequest(project_id=project, thread_id="t", channels=["ch4"])
    )
    assert [
        (c.checkpoint_id, [v.channel for v in c.channel_values], len(c.pending_writes))
        for c in listed.checkpoints
    ] == [("c4", ["ch4"], 0), ("c3", [], 0), ("c2", [], 0), ("c1", [], 0)]
    # A token only continues the listing of the same channels.
    first = await graphs.ListGraphCheckpoints(
        pb.ListGraphCheckpointsRequest(
            project_id=project, thread_id="t", channels=["ch1"], page_size=1
        )
    )
    again = pb.ListGraphCheckpointsRequest(
        project_id=project, thread_id="t", channels=["ch1"], page_size=1,
        page_token=first.next_page_token,
    )  # fmt: skip
    assert [c.checkpoint_id for c in (await graphs.ListGraphCheckpoints(again)).checkpoints] == [
        "c3"
    ]
    again.channels[:] = ["ch2"]
    error = await expect_error(graphs.ListGraphCheckpoints(again), grpc.StatusCode.INVALID_ARGUMENT)
    assert "page_token" in error.violations


async def test_a_channel_selection_is_checked(graphs, scope):
    project = scope["project_id"]
    for request in (
        pb.GetGraphCheckpointRequest(project_id=project, thread_id="t", channels=["a", ""]),
        pb.ListGraphCheckpointsRequest(project_id=project, thread_id="t", channels=["a", ""]),
    ):
        method = (
            graphs.GetGraphCheckpoint
            if isinstance(request, pb.GetGraphCheckpointRequest)
            else graphs.ListGraphCheckpoints
        )
        error = await expect_error(method(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert "channels[1]" in error.violations
        # As many as a checkpoint may hold (LangGraph asks for all of a graph's
        # DeltaChannels at once; 300 were refused at a bound of 256), not more.
        request.channels[:] = [f"c{i}" for i in range(300)]
        if isinstance(request, pb.GetGraphCheckpointRequest):
            await expect_error(method(request), grpc.StatusCode.NOT_FOUND)  # checked, no thread
        else:
            assert not (await method(request)).checkpoints
        request.channels[:] = [f"c{i}" for i in range(10_001)]
        error = await expect_error(method(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert "channels" in error.violations
