"""Fuzzing GraphCheckpointService with Hypothesis-generated requests, valid and invalid.

Each example seeds a project of its own with a thread of two checkpoints (values,
a pending write, a child namespace). A request is drawn for one RPC, mixing the
seeded ids with malformed ones (bad UUIDs, oversized and control-character
strings, invalid JSON, NaN, deep nesting, mismatched versions, duplicate writes,
unknown enum numbers, negative or huge page sizes, garbage tokens and durations),
and the answer must be OK or a documented error code with an ErrorInfo: never
INTERNAL or UNKNOWN. A call that fails must leave the project's threads as they
were, and the server must stay SERVING.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from memsvc.v1 import graph_checkpoint_pb2 as pb
from memsvc.v1.graph_checkpoint_pb2_grpc import GraphCheckpointServiceStub
from tests.fuzz.test_requests import CALL_TIMEOUT, check_healthy
from tests.fuzz.test_requests import FUZZ as REQUEST_FUZZ
from tests.helpers import details_of

FUZZ = settings(REQUEST_FUZZ, max_examples=40)
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
READS = {"GetGraphCheckpoint", "ListGraphCheckpoints"}

BAD_TEXT = st.one_of(
    st.sampled_from(
        ["", " ", "x" * 600, "é" * 300, "\x00", "a\x01b", "\x7f", "'; DROP TABLE x; --"]
    ),
    st.text(max_size=40),
)
IDS = st.one_of(st.sampled_from(["t", "c1", "c2"]), BAD_TEXT)
BAD_JSON = st.sampled_from(
    ["", "{}", "[]", "1", "{", '{"a": NaN}', '{"a": Infinity}', '{"a": "\\u0000"}',
     "[" * 100 + "]" * 100, '{"a":' * 80 + "1" + "}" * 80, '{"step": 1}', '{"x": {"y": [1]}}',
     "x" * (1 << 16 + 1)]
)  # fmt: skip
PAGE_SIZES = st.one_of(st.sampled_from([-(2**31), -1, 0, 1, 1001]), st.integers(-5, 5))
PAGE_TOKENS = st.one_of(
    st.just(""),
    st.text(max_size=40),
    st.binary(max_size=100).map(lambda b: base64.urlsafe_b64encode(b).decode()),
)
ENUMS = st.one_of(st.integers(-2, 4), st.just(2**31 - 1))
DURATIONS = st.one_of(
    st.none(),
    st.builds(
        duration_pb2.Duration,
        seconds=st.sampled_from([-1, 0, 1, 315_576_000_000, 2**63 - 1]),
        nanos=st.sampled_from([0, 1, -1, 999_999_999, 2**31 - 1]),
    ),
)


@dataclass(frozen=True)
class Seeded:
    project_id: str
    agent_instance_id: str


def typed(data: bytes = b"v") -> pb.TypedValue:
    return pb.TypedValue(type="bytes", data=data)


async def seed(graphs: GraphCheckpointServiceStub, projects: list[str]) -> Seeded:
    project = str(uuid.uuid4())
    projects.append(project)
    for ns in ("", "child:1"):
        for index, checkpoint_id in enumerate(("c1", "c2")):
            await graphs.PutGraphCheckpoint(
                pb.PutGraphCheckpointRequest(
                    project_id=project,
                    checkpoint=pb.GraphCheckpoint(
                        thread_id="t",
                        checkpoint_ns=ns,
                        checkpoint_id=checkpoint_id,
                        parent_checkpoint_id="c1" if index else "",
                        checkpoint=typed(b"doc"),
                        metadata_json=json.dumps({"step": index, "run_id": f"run-{index}"}),
                        channel_versions={"a": str(index + 1)},
                        channel_values=[
                            pb.ChannelValue(channel="a", version=str(index + 1), value=typed())
                        ],
                    ),
                )
            )
    await graphs.PutGraphWrites(
        pb.PutGraphWritesRequest(
            project_id=project,
            thread_id="t",
            checkpoint_id="c2",
            writes=[pb.GraphWrite(task_id="task", idx=0, channel="a", value=typed())],
        )
    )
    return Seeded(project, str(uuid.uuid4()))


@st.composite
def checkpoints(draw: st.DrawFn) -> pb.GraphCheckpoint:
    versions = draw(
        st.dictionaries(
            st.one_of(st.just("a"), BAD_TEXT), st.one_of(st.just("9"), BAD_TEXT), max_size=3
        )
    )
    channels = list(versions) or ["a"]
    values = draw(
        st.lists(
            st.builds(
                pb.ChannelValue,
                channel=st.one_of(st.sampled_from(channels), BAD_TEXT),
                version=st.one_of(st.sampled_from([*versions.values(), "9"]), BAD_TEXT),
                value=st.builds(
                    pb.TypedValue,
                    type=st.one_of(st.just("bytes"), BAD_TEXT),
                    data=st.binary(max_size=64),
                ),
            ),
            max_size=3,
        )
    )  # fmt: skip
    message = pb.GraphCheckpoint(
        thread_id=draw(IDS),
        checkpoint_ns=draw(st.one_of(st.sampled_from(["", "child:1"]), BAD_TEXT)),
        checkpoint_id=draw(st.one_of(st.sampled_from(["c3", "c2"]), BAD_TEXT)),
        parent_checkpoint_id=draw(st.one_of(st.sampled_from(["", "c2", "c1"]), BAD_TEXT)),
        checkpoint=pb.TypedValue(type=draw(st.one_of(st.just("json"), BAD_TEXT)), data=b"{}"),
        metadata_json=draw(BAD_JSON),
        channel_versions=versions,
        channel_values=values,
    )
    if draw(st.booleans()):
        message.pending_writes.add(task_id="x", channel="a", value=typed())
    if draw(st.booleans()):
        message.create_time.seconds = 1
    return message


@st.composite
def requests(draw: st.DrawFn, ids: Seeded) -> tuple[str, Message]:
    project = draw(st.one_of(st.just(ids.project_id), BAD_TEXT))
    name = draw(
        st.sampled_from(
            [
                "PutGraphCheckpoint",
                "PutGraphWrites",
                "GetGraphCheckpoint",
                "ListGraphCheckpoints",
                "DeleteGraphThread",
                "DeleteGraphRuns",
                "CopyGraphThread",
                "PruneGraphThreads",
            ]
        )
    )
    request: Message
    if name == "PutGraphCheckpoint":
        options = None
        if draw(st.booleans()):
            options = pb.GraphThreadOptions(
                keep_last=draw(st.integers(-5, 2**31 - 1)),
                session=pb.GraphSessionLink(
                    agent_instance_id=draw(st.one_of(st.just(ids.agent_instance_id), BAD_TEXT)),
                    session_id=draw(st.one_of(st.just("s"), BAD_TEXT)),
                    on_session_end=draw(ENUMS),  # type: ignore[arg-type]
                ),
            )
            ttl = draw(DURATIONS)
            if ttl is not None:
                options.ttl.CopyFrom(ttl)
        request = pb.PutGraphCheckpointRequest(
            project_id=project,
            checkpoint=draw(checkpoints()),
            require_latest_parent=draw(st.booleans()),
            options=options,
        )
    elif name == "PutGraphWrites":
        writes = draw(
            st.lists(
                st.builds(
                    pb.GraphWrite,
                    task_id=st.one_of(st.just("task"), BAD_TEXT),
                    task_path=st.one_of(st.just(""), BAD_TEXT),
                    idx=st.integers(-4, 2),
                    channel=st.one_of(st.just("a"), BAD_TEXT),
                    value=st.builds(pb.TypedValue, type=st.one_of(st.just("bytes"), BAD_TEXT)),
                ),
                max_size=4,
            )
        )
        request = pb.PutGraphWritesRequest(
            project_id=project,
            thread_id=draw(IDS),
            checkpoint_ns=draw(st.one_of(st.just(""), BAD_TEXT)),
            checkpoint_id=draw(IDS),
            writes=writes,
            replace=draw(st.booleans()),
        )
    elif name == "GetGraphCheckpoint":
        request = pb.GetGraphCheckpointRequest(
            project_id=project,
            thread_id=draw(IDS),
            checkpoint_ns=draw(st.one_of(st.sampled_from(["", "child:1"]), BAD_TEXT)),
            checkpoint_id=draw(st.one_of(st.sampled_from(["", "c1", "c9"]), BAD_TEXT)),
        )
    elif name == "ListGraphCheckpoints":
        request = pb.ListGraphCheckpointsRequest(
            project_id=project,
            thread_id=draw(st.one_of(st.just(""), IDS)),
            metadata_filter_json=draw(BAD_JSON),
            before_checkpoint_id=draw(st.one_of(st.sampled_from(["", "c2"]), BAD_TEXT)),
            page_size=draw(PAGE_SIZES),
            page_token=draw(PAGE_TOKENS),
            checkpoint_id=draw(st.one_of(st.sampled_from(["", "c1", "c9"]), BAD_TEXT)),
        )
        if draw(st.booleans()):
            request.checkpoint_ns = draw(st.one_of(st.just(""), BAD_TEXT))
    elif name == "DeleteGraphThread":
        request = pb.DeleteGraphThreadRequest(project_id=project, thread_id=draw(IDS))
    elif name == "DeleteGraphRuns":
        request = pb.DeleteGraphRunsRequest(
            project_id=project,
            run_ids=draw(st.lists(st.one_of(st.just("run-0"), BAD_TEXT), max_size=3)),
        )
    elif name == "CopyGraphThread":
        request = pb.CopyGraphThreadRequest(
            project_id=project, source_thread_id=draw(IDS), target_thread_id=draw(IDS)
        )
    else:
        request = pb.PruneGraphThreadsRequest(
            project_id=project,
            thread_ids=draw(st.lists(IDS, max_size=3)),
            strategy=draw(ENUMS),  # type: ignore[arg-type]
            refuse_metadata_keys=draw(
                st.lists(st.one_of(st.sampled_from(["source", "step"]), BAD_TEXT), max_size=20)
            ),
        )
    return name, request


async def snapshot(graphs: GraphCheckpointServiceStub, project: str) -> list[Any]:
    listed = await graphs.ListGraphCheckpoints(
        pb.ListGraphCheckpointsRequest(project_id=project, page_size=1000), timeout=CALL_TIMEOUT
    )
    return [c.SerializeToString(deterministic=True) for c in listed.checkpoints]


@FUZZ
@given(data=st.data())
async def test_graph_checkpoint_requests(
    channel: grpc.aio.Channel, projects: list[str], data: st.DataObject
) -> None:
    graphs = GraphCheckpointServiceStub(channel)
    ids = await seed(graphs, projects)
    name, request = data.draw(requests(ids), label="request")
    before = await snapshot(graphs, ids.project_id)
    try:
        await getattr(graphs, name)(request, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        details = details_of(error)
        assert details.code in ALLOWED, f"{name} -> {details.code}: {details.message}\n{request}"
        assert details.reason, f"{name} -> {details.code} without ErrorInfo: {details.message}"
        if name not in READS:
            assert await snapshot(graphs, ids.project_id) == before, f"{name} failed yet wrote"
    await check_healthy(health_pb2_grpc.HealthStub(channel))
