"""A DeltaChannel's history, read over memsvc's listings with only its channels.

LangGraph rebuilds a DeltaChannel from the pending writes of a checkpoint's
ancestors, back to the nearest one that stores its value. MemsvcSaver walks them a
listing page per call, asking for those channels only. LangGraph's own default
walk (``BaseCheckpointSaver``'s, one whole read per ancestor) is the oracle for
what it returns.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from memsvc.langgraph import MemsvcSaver
from memsvc.server import Server

LIMIT = 1 << 20  # max_message_bytes


@pytest.fixture
def config_overrides() -> dict[str, object]:
    return {"max_message_bytes": LIMIT, "max_value_bytes": LIMIT // 4}


def _extend(state: list[str] | None, writes: list[list[str]]) -> list[str]:
    return [*(state or []), *(item for write in writes for item in write)]


class Counted(TypedDict, total=False):
    items: Annotated[list[str], DeltaChannel(_extend, snapshot_frequency=3)]
    big: str
    step: int


class RarelySnapshotted(TypedDict, total=False):
    items: Annotated[list[str], DeltaChannel(_extend)]  # a snapshot every 100 updates
    big: str
    step: int


def counting_graph(saver: BaseCheckpointSaver[Any], state: type[Any] = Counted) -> Any:
    """Five supersteps a run, each adding one item."""
    builder = StateGraph(state)
    builder.add_node("add", lambda state: {"items": [f"i{state.get('step', 0)}"],
                                           "step": state.get("step", 0) + 1})  # fmt: skip
    builder.add_edge(START, "add")
    builder.add_conditional_edges("add", lambda s: "add" if s["step"] % 5 else END, ["add", END])
    return builder.compile(checkpointer=saver)


def at_checkpoint(thread: str, checkpoint_id: str | None) -> Any:
    """The config of a checkpoint of ``thread``'s root namespace."""
    return {"configurable": {"thread_id": thread, "checkpoint_ns": "",
                             "checkpoint_id": checkpoint_id}}  # fmt: skip


async def put_checkpoint(
    saver: MemsvcSaver,
    thread: str,
    checkpoint_id: str,
    parent: str | None,
    channel: str,
    values: dict[str, Any],
) -> Any:
    """Put a checkpoint under ``parent`` with a new version of ``channel``, storing
    ``values`` (none: a version without a value, as a DeltaChannel's between its
    snapshots). Its config comes back."""
    checkpoint = empty_checkpoint()
    checkpoint["id"] = checkpoint_id
    checkpoint["channel_values"] = values
    checkpoint["channel_versions"] = {channel: saver.get_next_version(None, None)}
    new_versions = checkpoint["channel_versions"] if values else {}
    return await saver.aput(at_checkpoint(thread, parent), checkpoint, {"step": 0}, new_versions)


async def test_a_thread_whose_input_checkpoint_is_past_one_response_stays_readable(server: Server):
    """The input checkpoint holds a 600 KB input twice (a value and a pending
    write): past the 1 MiB response, though every state of the thread fits. Its
    DeltaChannel is rebuilt from its ancestors' writes of that channel only, so
    the thread reads and runs on, as on LangGraph's own saver."""
    thread: Any = {"configurable": {"thread_id": f"delta-{uuid.uuid4()}"}}
    first = {"big": "x" * 600_000, "step": 0}
    reference = counting_graph(InMemorySaver(), RarelySnapshotted)
    await reference.ainvoke(first, thread)
    expected = await reference.ainvoke({"step": 5}, thread)
    async with MemsvcSaver(f"127.0.0.1:{server.port}", project_id=str(uuid.uuid4())) as saver:
        graph = counting_graph(saver, RarelySnapshotted)
        await graph.ainvoke(first, thread)
        assert (await graph.aget_state(thread)).values["items"] == [f"i{n}" for n in range(5)]
        assert await graph.ainvoke({"step": 5}, thread) == expected
        assert len(expected["items"]) == 10


async def test_the_history_is_the_default_walks_on_every_checkpoint_and_fork(server: Server):
    """Runs, a fork from an early checkpoint (update_state) and runs on it: for every
    checkpoint and several channel sets, the listing walk returns what LangGraph's
    default walk returns, async and sync, including for a channel never written."""
    thread: Any = {"configurable": {"thread_id": f"forks-{uuid.uuid4()}"}}
    target = f"127.0.0.1:{server.port}"
    async with MemsvcSaver(target, project_id=str(uuid.uuid4())) as saver:
        graph = counting_graph(saver)
        await graph.ainvoke({"step": 0}, thread)
        await graph.ainvoke({"step": 5}, thread)
        early = [s async for s in graph.aget_state_history(thread)][-3].config
        forked = await graph.aupdate_state(early, {"items": ["forked"]})
        await graph.ainvoke({"step": 10}, forked)
        checkpoints = [c.config async for c in saver.alist(thread)]
        assert len(checkpoints) > 20
        walked = []
        for config in checkpoints:
            for channels in (["items"], ["items", "step", "nothing"], ["nothing"]):
                expected = await BaseCheckpointSaver.aget_delta_channel_history(
                    saver, config=config, channels=channels
                )
                got = await saver.aget_delta_channel_history(config=config, channels=channels)
                assert got == expected, (config, channels)
                walked.append(got[channels[0]])
        assert sum(len(h["writes"]) for h in walked) > 20  # the walks had writes to gather
        # The latest checkpoint without an id, and the sync methods (their own client).
        latest = await saver.aget_delta_channel_history(config=thread, channels=["items"])
        sync_saver = MemsvcSaver(target, project_id=saver.project_id)
        try:
            for config in [thread, *checkpoints[:6]]:
                got = await asyncio.to_thread(
                    sync_saver.get_delta_channel_history, config=config, channels=["items"]
                )
                expected = await asyncio.to_thread(
                    BaseCheckpointSaver.get_delta_channel_history,
                    sync_saver,
                    config=config,
                    channels=["items"],
                )
                assert got == expected
            assert got is not None and latest == await asyncio.to_thread(
                sync_saver.get_delta_channel_history, config=thread, channels=["items"]
            )
        finally:
            sync_saver.close()


async def test_ancestors_whose_ids_do_not_sort_below_their_children_are_read_too(server: Server):
    """Ids are the client's: a parent's may sort after its child's. The walk follows
    the parent ids whatever their order, as LangGraph's default does."""
    project = str(uuid.uuid4())
    thread = f"odd-{uuid.uuid4()}"
    async with MemsvcSaver(f"127.0.0.1:{server.port}", project_id=project) as saver:
        parent: str | None = None
        # k5 (root, stores "items"), then k9 under it, then k7 under k9, then k8.
        for checkpoint_id, values in (("k5", {"items": ["seed"]}), ("k9", {}), ("k7", {}),
                                      ("k8", {})):  # fmt: skip
            written = await put_checkpoint(saver, thread, checkpoint_id, parent, "items", values)
            await saver.aput_writes(written, [("items", [checkpoint_id])], f"task-{checkpoint_id}")
            parent = checkpoint_id
        for leaf in ("k8", "k7", "k9"):
            at = at_checkpoint(thread, leaf)
            expected = await BaseCheckpointSaver.aget_delta_channel_history(
                saver, config=at, channels=["items"]
            )
            got = await saver.aget_delta_channel_history(config=at, channels=["items"])
            assert got == expected
            if leaf == "k8":
                assert got["items"].get("seed") == ["seed"]
                assert [w[2] for w in got["items"]["writes"]] == [["k5"], ["k9"], ["k7"]]


async def test_a_fork_too_large_for_a_response_does_not_fail_another_branch_s_walk(
    server: Server,
):
    """Only the ancestors are read: a checkpoint of another fork whose writes of the
    channel are past one response (1 MiB here) sits between a checkpoint and its
    parent, as time travel leaves them, and the walk never meets it."""
    thread = f"forks-{uuid.uuid4()}"
    async with MemsvcSaver(f"127.0.0.1:{server.port}", project_id=str(uuid.uuid4())) as saver:

        async def put(checkpoint_id: str, parent: str | None, values: dict[str, Any]) -> Any:
            return await put_checkpoint(saver, thread, checkpoint_id, parent, "x", values)

        await put("m1", None, {"x": ["seed"]})
        main = await put("m5", "m1", {})
        await saver.aput_writes(main, [("x", ["on the main branch"])], "task-m5")
        fork = await put("m7", "m1", {})
        for index in range(5):  # 1.25 MB of writes of x
            await saver.aput_writes(fork, [("x", ["y" * 250_000])], f"task-m7-{index}")
        await put("m9", "m5", {})
        leaf = at_checkpoint(thread, "m9")
        history = await saver.aget_delta_channel_history(config=leaf, channels=["x"])
        assert history == await BaseCheckpointSaver.aget_delta_channel_history(
            saver, config=leaf, channels=["x"]
        )
        assert history["x"].get("seed") == ["seed"]
        assert [w[2] for w in history["x"]["writes"]] == [["on the main branch"]]
