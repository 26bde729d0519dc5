"""GraphCheckpointService contract: validation, values stored once, the writer fence,
retention, session links and purges (the LangGraph conformance suite covers the
checkpointer semantics, in tests/langgraph)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import string
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from memsvc.domain import _graph_checkpoints
from memsvc.domain._graph_checkpoints import _apply_session_end
from memsvc.server import Server
from memsvc.store import _graph_sql
from memsvc.v1 import data_removal_pb2 as dr
from memsvc.v1 import graph_checkpoint_pb2 as pb
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.data_removal_pb2_grpc import DataRemovalServiceStub
from memsvc.v1.graph_checkpoint_pb2_grpc import GraphCheckpointServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.conftest import DEPLOYMENTS
from tests.helpers import expect_error, forge_page_token, results_of, sql_rows


@pytest.fixture
def graphs(channel: grpc.aio.Channel) -> GraphCheckpointServiceStub:
    return GraphCheckpointServiceStub(channel)


def checkpoint(
    thread_id: str,
    checkpoint_id: str,
    *,
    parent: str = "",
    ns: str = "",
    versions: dict[str, str] | None = None,
    new: dict[str, bytes] | None = None,
    metadata: dict[str, Any] | None = None,
) -> pb.GraphCheckpoint:
    versions = versions or {}
    message = pb.GraphCheckpoint(
        thread_id=thread_id,
        checkpoint_ns=ns,
        checkpoint_id=checkpoint_id,
        parent_checkpoint_id=parent,
        checkpoint=pb.TypedValue(type="json", data=b'{"v": 4}'),
        metadata_json=json.dumps(metadata or {"step": 0}),
        channel_versions=versions,
    )
    for channel, data in (new or {}).items():
        message.channel_values.add(
            channel=channel,
            version=versions.get(channel, "9"),
            value=pb.TypedValue(type="bytes", data=data),
        )
    return message


async def put(
    graphs: GraphCheckpointServiceStub, project: str, message: pb.GraphCheckpoint, **extra: Any
) -> pb.PutGraphCheckpointResponse:
    response: pb.PutGraphCheckpointResponse = await graphs.PutGraphCheckpoint(
        pb.PutGraphCheckpointRequest(project_id=project, checkpoint=message, **extra)
    )
    return response


async def put_write(
    graphs: GraphCheckpointServiceStub,
    project: str,
    thread_id: str,
    checkpoint_id: str,
    channel: str,
) -> None:
    """One pending write (an empty value of type "b") to a checkpoint of the thread."""
    await graphs.PutGraphWrites(
        pb.PutGraphWritesRequest(
            project_id=project,
            thread_id=thread_id,
            checkpoint_id=checkpoint_id,
            writes=[pb.GraphWrite(task_id="task", channel=channel, value=pb.TypedValue(type="b"))],
        )
    )


async def ids(graphs: GraphCheckpointServiceStub, project: str, thread_id: str) -> list[str]:
    response = await graphs.ListGraphCheckpoints(
        pb.ListGraphCheckpointsRequest(project_id=project, thread_id=thread_id)
    )
    return [c.checkpoint_id for c in response.checkpoints]


async def value_rows(server: Server, project: str) -> int:
    rows = await sql_rows(
        server.config.database_url,
        "SELECT count(*) FROM graph_values WHERE project_id = ?",
        project,
    )
    return int(rows[0][0])


async def test_a_bad_put_names_every_bad_field_and_writes_nothing(graphs, scope):
    """Malformed ids, JSON and versions: one INVALID_ARGUMENT, nothing stored."""
    project = scope["project_id"]
    bad = checkpoint("t\x01", "", versions={"a": "1"}, new={"a": b"x", "b": b"y"})
    bad.metadata_json = "[1, 2]"
    bad.checkpoint.type = ""
    error = await expect_error(put(graphs, "not-a-uuid", bad), grpc.StatusCode.INVALID_ARGUMENT)
    assert error.reason == "ERROR_REASON_INVALID_ARGUMENT"
    assert set(error.violations) == {
        "project_id",
        "checkpoint.thread_id",
        "checkpoint.checkpoint_id",
        "checkpoint.metadata_json",
        "checkpoint.checkpoint.type",
        "checkpoint.channel_values[1].version",
    }
    nan = checkpoint("t", "c1")
    nan.metadata_json = '{"score": NaN}'
    error = await expect_error(put(graphs, project, nan), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(error.violations) == {"checkpoint.metadata_json"}
    # A thread's TTL is bounded like a key's: at most 1,000 years.
    for seconds in (31_557_600_000_001, 2**62):
        options = pb.GraphThreadOptions(ttl=duration_pb2.Duration(seconds=seconds))
        error = await expect_error(
            put(graphs, project, checkpoint("t", "c1"), options=options),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert set(error.violations) == {"options.ttl"}
    assert await ids(graphs, project, "t") == []


async def test_a_channel_version_is_stored_once(graphs, scope, server):
    """Checkpoints sharing a channel version share its one stored value."""
    project = scope["project_id"]
    await put(
        graphs,
        project,
        checkpoint(
            "t", "c1", versions={"big": "1", "n": "1"}, new={"big": b"B" * 10_000, "n": b"1"}
        ),
    )
    for step in range(2, 6):
        await put(
            graphs,
            project,
            checkpoint(
                "t", f"c{step}", parent=f"c{step - 1}", versions={"big": "1", "n": str(step)},
                new={"n": str(step).encode()},
            ),
        )  # fmt: skip
    assert await value_rows(server, project) == 6  # big once, n five times
    got = await graphs.GetGraphCheckpoint(
        pb.GetGraphCheckpointRequest(project_id=project, thread_id="t")
    )
    assert got.checkpoint.checkpoint_id == "c5"
    assert {v.channel: v.value.data for v in got.checkpoint.channel_values} == {
        "big": b"B" * 10_000,
        "n": b"5",
    }


async def test_the_writer_fence_refuses_a_stale_parent(graphs, scope):
    """With require_latest_parent, a put whose parent is no longer the latest is refused."""
    project = scope["project_id"]
    await put(graphs, project, checkpoint("t", "c1"), require_latest_parent=True)
    await put(graphs, project, checkpoint("t", "c2", parent="c1"), require_latest_parent=True)
    # A retry of the same put passes the fence (the latest is that checkpoint).
    await put(graphs, project, checkpoint("t", "c2", parent="c1"), require_latest_parent=True)
    error = await expect_error(
        put(graphs, project, checkpoint("t", "c3", parent="c1"), require_latest_parent=True),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error.reason == "ERROR_REASON_GRAPH_CHECKPOINT_CONFLICT"
    assert error.metadata["latest_checkpoint_id"] == "c2"
    assert error.metadata["parent_checkpoint_id"] == "c1"
    # Without the fence the fork is stored, as LangGraph's savers do.
    await put(graphs, project, checkpoint("t", "c3", parent="c1"))
    assert await ids(graphs, project, "t") == ["c3", "c2", "c1"]


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["embedded"]], ids=["embedded"])
async def test_a_retried_put_matches_a_row_stored_with_escapes(graphs, scope, server):
    """Found by the change's review: SQLite stored JSON with \\u escapes until the
    twenty-third session and UTF-8 since, and compared a retried put's metadata as
    text, so the retry of a put stored before the upgrade was refused as another
    writer's. They are compared as JSON values now, as jsonb does."""
    project = scope["project_id"]
    message = checkpoint("t", "c1")
    message.metadata_json = json.dumps({"step": 1, "note": "привет"}, ensure_ascii=False)
    await put(graphs, project, message, require_latest_parent=True)
    database = f"sqlite:///{server.config.data_dir}/memsvc.db"
    await sql_rows(
        database,
        "UPDATE graph_checkpoints SET metadata = ? WHERE project_id = ? AND checkpoint_id = 'c1'",
        json.dumps({"step": 1, "note": "привет"}, separators=(",", ":")),  # as stored before
        project,
    )
    (stored,) = await sql_rows(
        database, "SELECT metadata FROM graph_checkpoints WHERE project_id = ?", project
    )
    assert "\\u043f" in stored[0]
    retried = await put(graphs, project, message, require_latest_parent=True)
    assert retried.values_stored == 0


async def test_the_writer_fence_refuses_another_put_under_the_latest_id(graphs, scope):
    """Writers that name checkpoints by step ("step-0002") may both choose the latest's
    id: only a retry of the very put that stored it passes the fence; another one (a
    parent, a state, metadata or versions of its own) is a conflict, not an overwrite."""
    project = scope["project_id"]
    first = checkpoint("t", "s2", parent="s1", versions={"a": "2"}, new={"a": b"writer A"})
    await put(graphs, project, checkpoint("t", "s1"), require_latest_parent=True)
    await put(graphs, project, first, require_latest_parent=True)
    await put(graphs, project, first, require_latest_parent=True)  # its retry
    # A retry whose metadata holds numbers the database writes in another form
    # (jsonb reads 1e23 back as an integer) is still the same put.
    numbers = checkpoint("t", "s3", parent="s2", metadata={"t": 1e23, "big": 2.0**60})
    await put(graphs, project, numbers, require_latest_parent=True)
    await put(graphs, project, numbers, require_latest_parent=True)
    first = checkpoint("t", "s4", parent="s3", versions={"a": "2"}, new={"a": b"writer A"})
    await put(graphs, project, first, require_latest_parent=True)
    others = [
        checkpoint("t", "s4", parent="bogus", versions={"a": "2"}, new={"a": b"writer A"}),
        checkpoint("t", "s4", parent="s3", versions={"a": "3"}, new={"a": b"writer B"}),
        checkpoint("t", "s4", parent="s3", versions={"a": "2"}, metadata={"step": 7}),
    ]
    for other in others:
        error = await expect_error(
            put(graphs, project, other, require_latest_parent=True),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert error.reason == "ERROR_REASON_GRAPH_CHECKPOINT_CONFLICT"
        assert error.metadata["latest_checkpoint_id"] == "s4"
        assert "another writer took this id" in error.message
    got = await graphs.GetGraphCheckpoint(
        pb.GetGraphCheckpointRequest(project_id=project, thread_id="t")
    )
    assert got.checkpoint.parent_checkpoint_id == "s3"
    assert {v.channel: v.value.data for v in got.checkpoint.channel_values} == {"a": b"writer A"}


async def test_the_writer_fence_refuses_an_id_that_would_not_become_the_latest(graphs, scope):
    """Two fenced writers whose clocks run behind the one that wrote the latest both
    name it as parent with lower ids: the first would fork the thread unseen."""
    project = scope["project_id"]
    await put(graphs, project, checkpoint("t", "c5"), require_latest_parent=True)
    error = await expect_error(
        put(graphs, project, checkpoint("t", "c4", parent="c5"), require_latest_parent=True),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error.reason == "ERROR_REASON_GRAPH_CHECKPOINT_CONFLICT"
    assert error.metadata["checkpoint_id"] == "c4"
    assert "'c4' sorts before the latest checkpoint 'c5'" in error.message
    assert await ids(graphs, project, "t") == ["c5"]


async def test_a_fenced_put_retried_after_a_prune_passes(graphs, scope):
    """A prune clears the parent a kept checkpoint names when it deletes that parent
    (as LangGraph's PostgreSQL saver does): the retry of the put that stored the
    kept one (its reply lost) is still the same put, and passes the fence."""
    project = scope["project_id"]
    await put(graphs, project, checkpoint("t", "c1"), require_latest_parent=True)
    second = checkpoint("t", "c2", parent="c1", versions={"n": "2"}, new={"n": b"2"})
    await put(graphs, project, second, require_latest_parent=True)
    pruned = await graphs.PruneGraphThreads(
        pb.PruneGraphThreadsRequest(project_id=project, thread_ids=["t"])
    )
    assert pruned.checkpoints_deleted == 1
    await put(graphs, project, second, require_latest_parent=True)  # the retry
    got = await graphs.GetGraphCheckpoint(
        pb.GetGraphCheckpointRequest(project_id=project, thread_id="t")
    )
    # The retry names c1 again, but c1 is gone: c2 keeps no parent.
    assert (got.checkpoint.checkpoint_id, got.checkpoint.parent_checkpoint_id) == ("c2", "")
    assert [v.value.data for v in got.checkpoint.channel_values] == [b"2"]
    # Another put under c2's id is refused still.
    other = checkpoint("t", "c2", parent="c1", versions={"n": "3"}, new={"n": b"3"})
    error = await expect_error(
        put(graphs, project, other, require_latest_parent=True),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error.reason == "ERROR_REASON_GRAPH_CHECKPOINT_CONFLICT"


async def test_a_forged_page_token_is_invalid_argument(graphs, scope):
    project = scope["project_id"]
    for step in range(1, 4):
        await put(graphs, project, checkpoint("t", f"c{step}"))
    first = await graphs.ListGraphCheckpoints(
        pb.ListGraphCheckpointsRequest(project_id=project, thread_id="t", page_size=1)
    )
    # The token of this very request, its position replaced: the fingerprint
    # still matches (it binds the request, not the position).
    forged = ('"x"', '["a"]', "{}", '["c1", "t\\u0000", ""]', '[1, "t", ""]',
              '["c1", "t\\ud800", ""]', "[" * 100_000)  # fmt: skip
    for position in forged:
        error = await expect_error(
            graphs.ListGraphCheckpoints(
                pb.ListGraphCheckpointsRequest(
                    project_id=project,
                    thread_id="t",
                    page_size=1,
                    page_token=forge_page_token(first.next_page_token, position),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "page_token" in error.violations


async def test_concurrent_fenced_writers_never_both_succeed(graphs, scope):
    """Two writers extending the same parent at once: exactly one wins."""
    project = scope["project_id"]
    await put(graphs, project, checkpoint("t", "c1"))
    results = await asyncio.gather(
        *(
            put(
                graphs, project, checkpoint("t", f"c2-{i}", parent="c1"), require_latest_parent=True
            )
            for i in range(4)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) == 3
    assert all(r.code() == grpc.StatusCode.FAILED_PRECONDITION for r in refused)


MANY_KEYS = {f"key{i}": i for i in range(1000)}


@pytest.mark.parametrize(
    ("filter_json", "expected"),
    [
        ('{"n": 1}', ["one-float", "one-int"]),  # numbers compare by value
        ('{"n": 1.0}', ["one-float", "one-int"]),
        ('{"n": true}', ["true"]),  # true is not 1
        ('{"o": {"b": 2, "a": [1, null]}}', ["nested"]),  # key order does not matter
        ('{"o": {"a": [1, null]}}', []),  # an object equals only all of it
        ('{"s": "1"}', ["string"]),
        # Exactly: no rounding to 15 digits, no big integer as a float.
        ('{"k": 0.30000000000000004}', ["precise"]),
        ('{"k": 0.3}', []),
        ('{"big": 18446744073709551616}', ["precise"]),
        ('{"t": 1765000000.123456}', ["precise"]),
        ('{"k": 0.30000000000000004, "big": 18446744073709551616, "n": 1}', []),
        # Any number of keys (a condition per key was too deep for SQLite at 1,000).
        (json.dumps(MANY_KEYS), ["many"]),
    ],
    ids=lambda value: value if isinstance(value, list) or len(value) < 80 else "many keys",
)
async def test_metadata_filters_compare_json_values_alike_on_every_backend(
    graphs, scope, filter_json, expected
):
    """As PostgreSQL's jsonb compares them, SQLite too (it stores JSON text)."""
    project = scope["project_id"]
    for name, metadata in (("one-int", '{"n": 1}'), ("one-float", '{"n": 1.0}'),
                           ("true", '{"n": true}'), ("string", '{"s": "1"}'),
                           ("nested", '{"o": {"a": [1.0, null], "b": 2}}'),
                           ("precise", '{"k": 0.30000000000000004, "big": 18446744073709551616,'
                                       ' "t": 1765000000.123456}'),
                           ("many", json.dumps(MANY_KEYS))):  # fmt: skip
        message = checkpoint(name, "c1")
        message.metadata_json = metadata
        await put(graphs, project, message)
    found = await graphs.ListGraphCheckpoints(
        pb.ListGraphCheckpointsRequest(project_id=project, metadata_filter_json=filter_json)
    )
    assert sorted(c.thread_id for c in found.checkpoints) == expected


async def test_a_negative_zero_in_metadata_reads_back_as_zero_on_every_backend(graphs, scope):
    """Found by a review: PostgreSQL's jsonb has no -0.0, SQLite's JSON text kept it."""
    message = checkpoint("zeros", "c1")
    message.metadata_json = '{"x": -0.0, "y": [-0.0, 1.5]}'
    await put(graphs, scope["project_id"], message)
    got = await graphs.GetGraphCheckpoint(
        pb.GetGraphCheckpointRequest(project_id=scope["project_id"], thread_id="zeros")
    )
    metadata = json.loads(got.checkpoint.metadata_json)
    assert metadata == {"x": 0.0, "y": [0.0, 1.5]}
    assert [math.copysign(1.0, metadata["x"]), math.copysign(1.0, metadata["y"][0])] == [1, 1]


async def test_pages_follow_tokens_and_filters_apply(graphs, scope):
    """Newest first, page by page, no repeats; metadata filters and before."""
    project = scope["project_id"]
    for step in range(1, 6):
        await put(graphs, project, checkpoint("t", f"c{step}", metadata={"step": step % 2}))
    seen, token = [], ""
    while True:
        page = await graphs.ListGraphCheckpoints(
            pb.ListGraphCheckpointsRequest(
                project_id=project, thread_id="t", page_size=2, page_token=token
            )
        )
        seen += [c.checkpoint_id for c in page.checkpoints]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["c5", "c4", "c3", "c2", "c1"]
    odd = await graphs.ListGraphCheckpoints(
        pb.ListGraphCheckpointsRequest(
            project_id=project,
            thread_id="t",
            metadata_filter_json='{"step": 1}',
            before_checkpoint_id="c5",
        )
    )
    assert [c.checkpoint_id for c in odd.checkpoints] == ["c3", "c1"]
    await expect_error(
        graphs.ListGraphCheckpoints(
            pb.ListGraphCheckpointsRequest(
                project_id=project, thread_id="u", page_token=token or "x"
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_pages_of_non_latin_metadata_fill_their_budget_on_every_backend(graphs, scope):
    """Found by a review: SQLite stored metadata with \\u escapes and weighed a row
    by them, so a page of Cyrillic metadata ended at a third of its 3 MiB budget
    (2 checkpoints of 600 KB a page, against 5 on PostgreSQL)."""
    project = scope["project_id"]
    for step in range(8):
        message = checkpoint("t", f"c{step}")
        message.metadata_json = json.dumps({"m": "ж" * 300_000}, ensure_ascii=False)
        await put(graphs, project, message)
    first = await graphs.ListGraphCheckpoints(
        pb.ListGraphCheckpointsRequest(project_id=project, thread_id="t")
    )
    # 600 KB each against 3 MiB: 5 fit, and the page must not end before 4.
    assert len(first.checkpoints) >= 4, len(first.checkpoints)
    assert first.ByteSize() <= 3 << 20


async def test_retention_forgets_expired_threads_and_keeps_the_newest(graphs, scope, server):
    """A thread past its TTL goes; keep_last prunes each namespace and frees old values."""
    project = scope["project_id"]
    expiring = pb.GraphThreadOptions(keep_last=0)
    expiring.ttl.FromMilliseconds(1)
    await put(graphs, project, checkpoint("gone", "c1"), options=expiring)
    kept = pb.GraphThreadOptions(keep_last=2)
    for step in range(1, 5):
        await put(
            graphs,
            project,
            checkpoint("kept", f"c{step}", versions={"n": str(step)}, new={"n": b"v"}),
            options=kept,
        )
    await asyncio.sleep(0.01)
    assert server.graphs is not None
    # (The server's own sweep may have run first: the state is what counts.)
    await server.graphs.sweep()
    assert await ids(graphs, project, "gone") == []
    assert await ids(graphs, project, "kept") == ["c4", "c3"]
    assert await value_rows(server, project) == 2


async def test_a_put_again_with_other_versions_leaves_no_value_behind(graphs, scope, server):
    """An unfenced put again under a stored id (a writer reusing ids, a replay)
    replaces its versions: the values only the replaced versions named go with
    them, as no prune could reach them later; those another checkpoint holds stay."""
    project = scope["project_id"]
    await put(graphs, project, checkpoint("t", "c1", versions={"a": "1"}, new={"a": b"a1"}))
    first = checkpoint("t", "c2", parent="c1", versions={"a": "1", "b": "1"}, new={"b": b"b1"})
    await put(graphs, project, first)
    await put(graphs, project, first)  # a retry: the same versions, nothing freed
    again = checkpoint(
        "t", "c2", parent="c1", versions={"a": "2", "b": "2"}, new={"a": b"a2", "b": b"b2"}
    )
    assert (await put(graphs, project, again)).values_stored == 2
    stored = await sql_rows(
        server.config.database_url,
        "SELECT channel, version FROM graph_values WHERE project_id = ? ORDER BY channel, version",
        project,
    )
    # b@1 went with the version map that named it; c1 still holds a@1.
    assert [tuple(row) for row in stored] == [("a", "1"), ("a", "2"), ("b", "2")]
    got = await graphs.GetGraphCheckpoint(
        pb.GetGraphCheckpointRequest(project_id=project, thread_id="t", checkpoint_id="c2")
    )
    assert {v.channel: v.value.data for v in got.checkpoint.channel_values} == {
        "a": b"a2",
        "b": b"b2",
    }
    await graphs.PruneGraphThreads(
        pb.PruneGraphThreadsRequest(project_id=project, thread_ids=["t"])
    )
    assert await value_rows(server, project) == 2  # c1 and a@1 pruned: c2's values only


async def write_ids(server: Server, project: str) -> list[str]:
    """The checkpoint ids the project's stored pending writes belong to."""
    rows = await sql_rows(
        server.config.database_url,
        "SELECT DISTINCT checkpoint_id FROM graph_writes WHERE project_id = ?"
        " ORDER BY checkpoint_id",
        project,
    )
    return [str(row[0]) for row in rows]


async def test_writes_of_a_checkpoint_never_stored_go_as_it_would(graphs, scope, server):
    """LangGraph may save a step's writes before its checkpoint, and a run that fails
    in between leaves them without one. keep_last and keep_latest delete them as
    they would their checkpoint: once as many newer ones are stored as they keep.
    Those of a checkpoint newer than every stored one (still being saved) stay,
    and are read with it once it is put."""
    project = scope["project_id"]
    for step in range(1, 5):
        await put(
            graphs, project, checkpoint("t", f"c{step}"), options=pb.GraphThreadOptions(keep_last=2)
        )
    for checkpoint_id in ("c0", "c25", "c3", "c35", "c4", "c9"):
        await put_write(graphs, project, "t", checkpoint_id, "ch")
    assert server.graphs is not None
    await server.graphs.sweep()  # keep_last 2 keeps c4 and c3
    assert await ids(graphs, project, "t") == ["c4", "c3"]
    # The oldest kept checkpoint keeps its writes (the bound is exclusive).
    assert await write_ids(server, project) == ["c3", "c35", "c4", "c9"]
    await graphs.PruneGraphThreads(
        pb.PruneGraphThreadsRequest(project_id=project, thread_ids=["t"])
    )
    assert await write_ids(server, project) == ["c4", "c9"]
    await put(graphs, project, checkpoint("t", "c9", parent="c4"))
    got = await graphs.GetGraphCheckpoint(
        pb.GetGraphCheckpointRequest(project_id=project, thread_id="t")
    )
    assert (got.checkpoint.checkpoint_id, len(got.checkpoint.pending_writes)) == ("c9", 1)


async def test_a_prune_leaves_threads_whose_metadata_holds_a_refused_key(graphs, scope):
    """KEEP_LATEST with refuse_metadata_keys (what MemsvcSaver sends for a DeltaChannel):
    when a thread has a checkpoint whose metadata holds one, no thread is pruned and
    the response names it; DELETE ignores them; bad keys are INVALID_ARGUMENT."""
    project = scope["project_id"]
    delta = {"counters_since_delta_snapshot": {"items": [1, 1]}}
    for step in range(1, 4):
        # Only the oldest checkpoint holds the key (LangGraph drops it at a snapshot).
        await put(
            graphs, project, checkpoint("delta", f"c{step}", metadata=delta if step == 1 else None)
        )
        await put(graphs, project, checkpoint("plain", f"c{step}"))

    async def prune(threads: list[str], **extra: Any) -> pb.PruneGraphThreadsResponse:
        response: pb.PruneGraphThreadsResponse = await graphs.PruneGraphThreads(
            pb.PruneGraphThreadsRequest(project_id=project, thread_ids=threads, **extra)
        )
        return response

    keys = ["delta_writes_versioned", "counters_since_delta_snapshot"]
    refused = await prune(["plain", "delta", "absent"], refuse_metadata_keys=keys)
    assert (list(refused.refused_thread_ids), refused.checkpoints_deleted) == (["delta"], 0)
    assert await ids(graphs, project, "plain") == ["c3", "c2", "c1"]
    assert await ids(graphs, project, "delta") == ["c3", "c2", "c1"]
    pruned = await prune(["plain"], refuse_metadata_keys=keys)
    assert (list(pruned.refused_thread_ids), pruned.checkpoints_deleted) == ([], 2)
    deleted = await prune(
        ["delta"], strategy=pb.GRAPH_PRUNE_STRATEGY_DELETE, refuse_metadata_keys=keys
    )
    assert (list(deleted.refused_thread_ids), deleted.checkpoints_deleted) == ([], 3)
    error = await expect_error(
        prune(["plain"], refuse_metadata_keys=[""]), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert set(error.violations) == {"refuse_metadata_keys[0]"}
    error = await expect_error(
        prune(["plain"], refuse_metadata_keys=[f"k{i}" for i in range(17)]),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(error.violations) == {"refuse_metadata_keys"}


async def test_one_interval_clears_a_backlog_past_one_batch(graphs, scope, server):
    """More threads expire than one batch (100): one interval's sweep deletes them
    all, instead of 100 per interval while more keep expiring."""
    project = scope["project_id"]
    expiring = pb.GraphThreadOptions()
    expiring.ttl.FromMilliseconds(1)
    await asyncio.gather(
        *(put(graphs, project, checkpoint(f"t{i}", "c1"), options=expiring) for i in range(150))
    )
    await asyncio.sleep(0.01)
    await server._sweep_graphs()
    rows = await sql_rows(
        server.config.database_url,
        "SELECT count(*) FROM graph_threads WHERE project_id = ?",
        project,
    )
    assert int(rows[0][0]) == 0


async def test_keep_last_reaches_every_thread_flagged_for_it(graphs, scope, server, monkeypatch):
    """Every put flags its thread for keep_last. More flagged threads than one batch
    with nothing to prune (the first in key order, flagged again and again under
    steady puts), and a thread past its keep_last after them: one sweep run prunes
    it, instead of clearing the first batch's flags and stopping there."""
    monkeypatch.setattr(_graph_checkpoints, "SWEEP_BATCH", 4)
    project = scope["project_id"]
    roomy = pb.GraphThreadOptions(keep_last=5)
    for number in range(10):
        await put(graphs, project, checkpoint(f"a{number}", "c1"), options=roomy)
    tight = pb.GraphThreadOptions(keep_last=1)
    for step in range(1, 4):
        await put(graphs, project, checkpoint("z", f"c{step}"), options=tight)
    await server._sweep_graphs()
    assert await ids(graphs, project, "z") == ["c3"]
    flagged = await sql_rows(
        server.config.database_url,
        "SELECT count(*) FROM graph_threads WHERE project_id = ? AND prune_pending",
        project,
    )
    assert int(flagged[0][0]) == 0


async def test_a_copy_leaves_a_checkpoint_the_target_holds_as_it_was(graphs, scope, server):
    """Copying into a thread that holds one of the source's checkpoint ids keeps the
    target's checkpoint (as ON CONFLICT DO NOTHING does) without the source's pending
    writes for it, or values it does not name; the checkpoints copied come whole."""
    project = scope["project_id"]
    await put(graphs, project, checkpoint("src", "c1", versions={"a": "1"}, new={"a": b"s1"}))
    second = checkpoint("src", "c2", parent="c1", versions={"a": "2"}, new={"a": b"s2"})
    await put(graphs, project, second)
    for checkpoint_id in ("c1", "c2"):
        await put_write(graphs, project, "src", checkpoint_id, "a")
    await put(graphs, project, checkpoint("dst", "c1", versions={"a": "9"}, new={"a": b"d9"}))
    copied = await graphs.CopyGraphThread(
        pb.CopyGraphThreadRequest(
            project_id=project, source_thread_id="src", target_thread_id="dst"
        )
    )
    assert copied.checkpoints_copied == 1
    held = {}
    for checkpoint_id in ("c1", "c2"):
        got = await graphs.GetGraphCheckpoint(
            pb.GetGraphCheckpointRequest(
                project_id=project, thread_id="dst", checkpoint_id=checkpoint_id
            )
        )
        held[checkpoint_id] = (
            [v.value.data for v in got.checkpoint.channel_values],
            [w.task_id for w in got.checkpoint.pending_writes],
        )
    assert held == {"c1": ([b"d9"], []), "c2": ([b"s2"], ["task"])}
    stored = await sql_rows(
        server.config.database_url,
        "SELECT version FROM graph_values WHERE project_id = ? AND thread_id = 'dst'"
        " ORDER BY version",
        project,
    )
    assert [row[0] for row in stored] == ["2", "9"]  # not the source's "1"


async def test_a_linked_session_ends_its_threads(graphs, scope, server, channel):
    """Terminating a linked session prunes (keep_latest) or deletes its threads, in
    the Terminate's own transaction: the moment it returns, no sweep needed."""
    project = scope["project_id"]
    life = LifecycleServiceStub(channel)
    await life.Spawn(lc.SpawnRequest(**scope))
    for thread_id, action in (
        ("pruned", pb.GRAPH_SESSION_END_ACTION_KEEP_LATEST),
        ("deleted", pb.GRAPH_SESSION_END_ACTION_DELETE),
    ):
        link = pb.GraphThreadOptions(
            session=pb.GraphSessionLink(
                agent_instance_id=scope["agent_instance_id"],
                session_id=scope["session_id"],
                on_session_end=action,
            )
        )
        for step in range(1, 4):
            await put(graphs, project, checkpoint(thread_id, f"c{step}"), options=link)
    await life.Terminate(lc.TerminateRequest(**scope))
    assert await ids(graphs, project, "pruned") == ["c3"]
    assert await ids(graphs, project, "deleted") == []
    assert server.graphs is not None
    assert (await server.graphs.sweep()).threads_ended == 0, "nothing left for the sweep"


async def test_a_thread_pruned_whole_leaves_nothing_a_new_thread_of_its_id_inherits(
    graphs, scope, channel
):
    """PruneGraphThreads(DELETE) deletes a thread whole, as DeleteGraphThread: its
    session link goes too, so a later thread of the same id outlives the session."""
    project = scope["project_id"]
    life = LifecycleServiceStub(channel)
    await life.Spawn(lc.SpawnRequest(**scope))
    link = pb.GraphThreadOptions(
        session=pb.GraphSessionLink(
            agent_instance_id=scope["agent_instance_id"],
            session_id=scope["session_id"],
            on_session_end=pb.GRAPH_SESSION_END_ACTION_DELETE,
        )
    )
    await put(graphs, project, checkpoint("t", "c1"), options=link)
    pruned = await graphs.PruneGraphThreads(
        pb.PruneGraphThreadsRequest(
            project_id=project, thread_ids=["t"], strategy=pb.GRAPH_PRUNE_STRATEGY_DELETE
        )
    )
    assert pruned.checkpoints_deleted == 1
    await put(graphs, project, checkpoint("t", "d1"))  # another writer, no options
    await life.Terminate(lc.TerminateRequest(**scope))
    assert await ids(graphs, project, "t") == ["d1"]


async def test_an_applied_end_action_is_not_applied_again_for_the_same_link(
    graphs, scope, server, channel
):
    """The saver sends its link with every put: a run still writing after its
    session ended keeps its new checkpoints (the action ran once); another action
    for the link is a new one, applied at the next sweep."""
    project = scope["project_id"]
    life = LifecycleServiceStub(channel)
    await life.Spawn(lc.SpawnRequest(**scope))

    def linked(action: pb.GraphSessionEndAction.ValueType) -> pb.GraphThreadOptions:
        return pb.GraphThreadOptions(
            session=pb.GraphSessionLink(
                agent_instance_id=scope["agent_instance_id"],
                session_id=scope["session_id"],
                on_session_end=action,
            )
        )

    keep_latest = linked(pb.GRAPH_SESSION_END_ACTION_KEEP_LATEST)
    for step in range(1, 4):
        await put(graphs, project, checkpoint("t", f"c{step}"), options=keep_latest)
    await life.Terminate(lc.TerminateRequest(**scope))
    assert await ids(graphs, project, "t") == ["c3"]
    for step in range(4, 7):
        await put(graphs, project, checkpoint("t", f"c{step}"), options=keep_latest)
    assert server.graphs is not None
    assert (await server.graphs.sweep()).threads_ended == 0
    assert sorted(await ids(graphs, project, "t")) == ["c3", "c4", "c5", "c6"]
    await put(graphs, project, checkpoint("t", "c7"), options=linked(
        pb.GRAPH_SESSION_END_ACTION_DELETE))  # fmt: skip
    assert (await server.graphs.sweep()).threads_ended == 1
    assert await ids(graphs, project, "t") == []


async def test_an_end_action_is_read_again_under_the_thread_lock(graphs, scope, server, channel):
    """The sweep lists the threads of ended sessions, then ends each in a transaction
    of its own: a put that relinked a thread in between (to a live session, no end
    action) must win, not the stale list."""
    project = scope["project_id"]
    life = LifecycleServiceStub(channel)
    await life.Spawn(lc.SpawnRequest(**scope))
    await life.Terminate(lc.TerminateRequest(**scope))

    def link(session_id: str, action: pb.GraphSessionEndAction.ValueType) -> pb.GraphThreadOptions:
        return pb.GraphThreadOptions(
            session=pb.GraphSessionLink(
                agent_instance_id=scope["agent_instance_id"],
                session_id=session_id,
                on_session_end=action,
            )
        )

    # Linked after its session ended: left to the sweep.
    await put(graphs, project, checkpoint("t", "c1"),
              options=link(scope["session_id"], pb.GRAPH_SESSION_END_ACTION_DELETE))  # fmt: skip
    async with server.durable_store.transaction() as tx:
        listed = await tx.graph_threads_of_ended_sessions(100)
    assert (project, "t") in listed
    live = {**scope, "session_id": "live"}
    await life.Spawn(lc.SpawnRequest(**live))
    await put(graphs, project, checkpoint("t", "c2", parent="c1"),
              options=link("live", pb.GRAPH_SESSION_END_ACTION_UNSPECIFIED))  # fmt: skip
    async with server.durable_store.transaction() as tx:
        assert await _apply_session_end(tx, project, "t") == 0
    assert await ids(graphs, project, "t") == ["c2", "c1"], "the relinked thread was ended"


async def test_a_purge_forgets_linked_threads_and_whole_projects(graphs, scope, server, channel):
    """Purging an agent instance forgets its linked threads; purging the project, all."""
    project = scope["project_id"]
    link = pb.GraphThreadOptions(
        session=pb.GraphSessionLink(
            agent_instance_id=scope["agent_instance_id"], session_id=scope["session_id"]
        )
    )
    await put(
        graphs,
        project,
        checkpoint("linked", "c1", versions={"a": "1"}, new={"a": b"x"}),
        options=link,
    )
    await put(graphs, project, checkpoint("free", "c1"))
    # A copy (a fork) belongs where its source does: linked as well.
    await graphs.CopyGraphThread(
        pb.CopyGraphThreadRequest(
            project_id=project, source_thread_id="linked", target_thread_id="forked"
        )
    )
    assert await ids(graphs, project, "forked") == ["c1"]
    removal = DataRemovalServiceStub(channel)
    report = await removal.PurgeData(
        dr.PurgeDataRequest(project_id=project, agent_instance_id=scope["agent_instance_id"])
    )
    assert report.graph_checkpoints_deleted == 2
    assert await ids(graphs, project, "linked") == []
    assert await ids(graphs, project, "forked") == []
    assert await ids(graphs, project, "free") == ["c1"]
    report = await removal.PurgeData(dr.PurgeDataRequest(project_id=project))
    assert report.graph_checkpoints_deleted == 1
    assert await ids(graphs, project, "free") == []
    assert await value_rows(server, project) == 0


@pytest.mark.parametrize("metadata_json", ['{"a": "\\ud800"}', '{"\\udfff": 1}'])
async def test_a_lone_surrogate_in_json_is_invalid_argument(graphs, scope, metadata_json):
    """JSON text may escape a lone surrogate, which no UTF-8 (so no database text
    or jsonb) holds: refused, in metadata and in a filter, never stored."""
    project = scope["project_id"]
    bad = checkpoint("t", "c1")
    bad.metadata_json = metadata_json
    error = await expect_error(put(graphs, project, bad), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(error.violations) == {"checkpoint.metadata_json"}
    assert "surrogate" in error.message
    assert await ids(graphs, project, "t") == []
    error = await expect_error(
        graphs.ListGraphCheckpoints(
            pb.ListGraphCheckpointsRequest(project_id=project, metadata_filter_json=metadata_json)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(error.violations) == {"metadata_filter_json"}


async def test_ids_at_their_longest_are_stored_on_every_backend(graphs, scope):
    """Every key column at its documented maximum, in characters that do not
    compress: the keys still fit a PostgreSQL index entry (2,704 bytes)."""
    project = scope["project_id"]
    rng = random.Random(7)

    def text(size: int) -> str:
        return "".join(rng.choices(string.ascii_letters + string.digits, k=size))

    thread, ns, checkpoint_id = text(512), text(1024), text(128)
    channel, version = text(512), text(128)
    message = checkpoint(
        thread, checkpoint_id, ns=ns, versions={channel: version}, new={channel: b"v"}
    )
    await put(graphs, project, message)
    await graphs.PutGraphWrites(
        pb.PutGraphWritesRequest(
            project_id=project,
            thread_id=thread,
            checkpoint_ns=ns,
            checkpoint_id=checkpoint_id,
            writes=[
                pb.GraphWrite(
                    task_id=text(256),
                    task_path=text(2048),
                    idx=0,
                    channel=channel,
                    value=pb.TypedValue(type="bytes", data=b"w"),
                )
            ],
        )
    )
    got = await graphs.GetGraphCheckpoint(
        pb.GetGraphCheckpointRequest(project_id=project, thread_id=thread, checkpoint_ns=ns)
    )
    assert got.checkpoint.checkpoint_id == checkpoint_id
    assert [(v.channel, v.version) for v in got.checkpoint.channel_values] == [(channel, version)]
    assert len(got.checkpoint.pending_writes) == 1
    too_long = checkpoint(thread, checkpoint_id, ns=text(1025))
    error = await expect_error(put(graphs, project, too_long), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(error.violations) == {"checkpoint.checkpoint_ns"}
    # Writes to a namespace past the bound that holds no checkpoint: refused, naming
    # the field (they could never be read with a checkpoint; PostgreSQL's index
    # refused them with an error naming none).
    error = await expect_error(
        graphs.PutGraphWrites(
            pb.PutGraphWritesRequest(
                project_id=project,
                thread_id=thread,
                checkpoint_ns=text(1500),
                checkpoint_id=checkpoint_id,
                writes=[pb.GraphWrite(task_id="t", channel="c", value=pb.TypedValue(type="b"))],
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(error.violations) == {"checkpoint_ns"}
    # Namespaces of up to 2,048 bytes were put before that bound: still readable.
    for size, code in ((2048, grpc.StatusCode.NOT_FOUND), (2049, grpc.StatusCode.INVALID_ARGUMENT)):
        await expect_error(
            graphs.GetGraphCheckpoint(
                pb.GetGraphCheckpointRequest(
                    project_id=project, thread_id=thread, checkpoint_ns=text(size)
                )
            ),
            code,
        )


async def test_a_page_counts_every_field_against_its_budget(graphs, scope):
    """Pending writes with long task paths (2 KiB each, which the budget left out):
    every page still fits a response, and every checkpoint is listed."""
    project = scope["project_id"]
    for step in range(12):
        checkpoint_id = f"c{step:02}"
        await put(graphs, project, checkpoint("t", checkpoint_id))
        await graphs.PutGraphWrites(
            pb.PutGraphWritesRequest(
                project_id=project,
                thread_id="t",
                checkpoint_id=checkpoint_id,
                writes=[
                    pb.GraphWrite(task_id="task", task_path="p" * 2048, idx=index, channel="c",
                                  value=pb.TypedValue(type="t", data=b""))
                    for index in range(200)
                ],
            )
        )  # fmt: skip
    listed, token = [], ""
    while True:
        page = await graphs.ListGraphCheckpoints(
            pb.ListGraphCheckpointsRequest(project_id=project, thread_id="t", page_token=token)
        )
        assert page.ByteSize() <= 4 << 20
        listed += [c.checkpoint_id for c in page.checkpoints]
        token = page.next_page_token
        if not token:
            break
    assert listed == [f"c{step:02}" for step in reversed(range(12))]


async def test_threads_of_other_projects_are_invisible(graphs, scope):
    """The same thread id in two projects names two threads."""
    other = str(uuid.uuid4())
    await put(graphs, scope["project_id"], checkpoint("t", "mine"))
    await put(graphs, other, checkpoint("t", "theirs"))
    assert await ids(graphs, scope["project_id"], "t") == ["mine"]
    copied = await graphs.CopyGraphThread(
        pb.CopyGraphThreadRequest(project_id=other, source_thread_id="t", target_thread_id="u")
    )
    assert copied.checkpoints_copied == 1
    assert await ids(graphs, scope["project_id"], "u") == []
    error = await expect_error(
        graphs.GetGraphCheckpoint(
            pb.GetGraphCheckpointRequest(project_id=scope["project_id"], thread_id="u")
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert error.reason == "ERROR_REASON_GRAPH_CHECKPOINT_NOT_FOUND"


async def test_a_page_ends_before_its_values_outgrow_a_message(graphs, scope):
    """Pages stop at 3 MiB of values: large checkpoints come a few at a time, none lost."""
    project = scope["project_id"]
    big = b"x" * (1 << 20)
    for step in range(1, 6):
        await put(
            graphs,
            project,
            checkpoint("t", f"c{step}", versions={"v": str(step)}, new={"v": big}),
        )
    pages, token = [], ""
    while True:
        page = await graphs.ListGraphCheckpoints(
            pb.ListGraphCheckpointsRequest(project_id=project, thread_id="t", page_token=token)
        )
        pages.append([c.checkpoint_id for c in page.checkpoints])
        token = page.next_page_token
        if not token:
            break
    assert [c for p in pages for c in p] == ["c5", "c4", "c3", "c2", "c1"]
    assert max(len(p) for p in pages) <= 3 and len(pages) >= 2


async def test_a_page_reads_only_the_checkpoints_that_fit(graphs, scope, monkeypatch):
    """Twelve checkpoints whose documents hold 600 KB each, listed in pages of up to
    1,000: memsvc reads from its store about the checkpoints a page can carry (4 in
    3 MiB), not all twelve rows. Random bytes, so no compression makes them small."""
    project = scope["project_id"]
    for step in range(1, 13):
        message = checkpoint("t", f"c{step:02d}")
        message.checkpoint.data = random.randbytes(600_000)
        await put(graphs, project, message)
    read = results_of(monkeypatch, _graph_sql, "_record", lambda c: c.checkpoint_id)
    listed, token = [], ""
    while True:
        read.clear()
        page = await graphs.ListGraphCheckpoints(
            pb.ListGraphCheckpointsRequest(project_id=project, page_size=1000, page_token=token)
        )
        returned = [c.checkpoint_id for c in page.checkpoints]
        # The crossing one, and one more: the store weighs a row by its stored
        # lengths, the page by its protobuf bytes.
        assert returned and len(read) <= len(returned) + 2, (len(read), len(returned))
        listed += returned
        token = page.next_page_token
        if not token:
            break
    assert listed == [f"c{step:02d}" for step in range(12, 0, -1)]


@pytest.mark.parametrize(
    ("metadata_json", "problem"),
    [
        # 1e300 reads back as 301 digits on PostgreSQL: 2 KiB of input is over 1 MiB.
        ('{"a": [' + ",".join(["1e300"] * 3_600) + "]}", "plain decimal"),
        # A run DeleteGraphRuns could not name: the same rules as its run_ids.
        ('{"run_id": "a\\nb"}', "run_id must not contain control characters"),
        ('{"run_id": "' + "r" * 257 + '"}', "run_id is 257 bytes"),
    ],
    ids=["expands", "run-id-control", "run-id-long"],
)
async def test_metadata_that_could_not_be_read_back_or_named_is_refused(
    graphs, scope, metadata_json, problem
):
    project = scope["project_id"]
    bad = checkpoint("t", "c1")
    bad.metadata_json = metadata_json
    error = await expect_error(put(graphs, project, bad), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(error.violations) == {"checkpoint.metadata_json"}
    assert problem in error.violations["checkpoint.metadata_json"]
    assert await ids(graphs, project, "t") == []


async def test_metadata_at_its_limit_as_read_back_is_stored_and_read(graphs, scope):
    project = scope["project_id"]
    numbers = [1e300] * 3_000  # 3,000 x 302 bytes read back: under 1 MiB
    stored = checkpoint("t", "c1", metadata={"a": numbers, "run_id": "r" * 256})
    await put(graphs, project, stored)
    got = await graphs.GetGraphCheckpoint(
        pb.GetGraphCheckpointRequest(project_id=project, thread_id="t")
    )
    # PostgreSQL gives it back as the integer 10**300 (jsonb keeps numbers as numeric).
    assert [float(n) for n in json.loads(got.checkpoint.metadata_json)["a"]] == numbers
    # Tiny numbers come back as floats, written short again: not counted long.
    tiny = [1e-300] * 4_000  # 4,000 x 302 bytes would be over 1 MiB
    await put(graphs, project, checkpoint("t", "c2", metadata={"a": tiny}))
    got = await graphs.GetGraphCheckpoint(
        pb.GetGraphCheckpointRequest(project_id=project, thread_id="t")
    )
    assert json.loads(got.checkpoint.metadata_json)["a"] == tiny
