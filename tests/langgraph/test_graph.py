"""A real LangGraph graph on MemsvcSaver: it runs, interrupts, and resumes after memsvc restarts.

The graph writes a draft, asks a human (an ``interrupt``) and publishes. The same
graph runs on LangGraph's own InMemorySaver as the reference: results, state and
history must match. memsvc is stopped between the interrupt and the resume, and a
new server starts on the same stores (the embedded SQLite file, or PostgreSQL).
"""

from __future__ import annotations

import asyncio
import operator
import random
import uuid
from dataclasses import replace
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from memsvc.client import AsyncClient, GraphCheckpointConflict
from memsvc.langgraph import MemsvcSaver
from memsvc.server import Server


class Draft(TypedDict, total=False):
    topic: str
    draft: str
    approved: bool
    log: Annotated[list[str], operator.add]


def write(state: Draft) -> Draft:
    return {"draft": f"a note about {state['topic']}", "log": ["write"]}


def review(state: Draft) -> Draft:
    answer = interrupt({"question": "publish?", "draft": state["draft"]})
    return {"approved": answer == "yes", "log": [f"review:{answer}"]}


def publish(state: Draft) -> Draft:
    return {"log": ["publish" if state["approved"] else "discard"]}


def compile_graph(saver: BaseCheckpointSaver[Any]) -> Any:
    builder = StateGraph(Draft)
    builder.add_node("write", write)
    builder.add_node("review", review)
    builder.add_node("publish", publish)
    builder.add_edge(START, "write")
    builder.add_edge("write", "review")
    builder.add_edge("review", "publish")
    builder.add_edge("publish", END)
    return builder.compile(checkpointer=saver)


def history_shape(snapshots: list[Any]) -> list[tuple[Any, ...]]:
    """What a run's history must share across savers (ids and times differ)."""
    return [(s.next, s.metadata.get("source"), s.metadata.get("step"), s.values) for s in snapshots]


async def run_reference(thread_id: str) -> tuple[Any, Any, list[Any]]:
    graph = compile_graph(InMemorySaver())
    config = {"configurable": {"thread_id": thread_id}}
    interrupted = await graph.ainvoke({"topic": "otters"}, config)
    final = await graph.ainvoke(Command(resume="yes"), config)
    history = [s async for s in graph.aget_state_history(config)]
    return interrupted, final, history


async def test_a_graph_interrupts_and_resumes_across_a_memsvc_restart(server: Server):
    """Interrupted on one memsvc, resumed on the next: same answers as LangGraph's own saver."""
    project, thread_id = str(uuid.uuid4()), f"thread-{uuid.uuid4()}"
    config: Any = {"configurable": {"thread_id": thread_id}}
    async with MemsvcSaver(f"127.0.0.1:{server.port}", project_id=project) as saver:
        graph = compile_graph(saver)
        interrupted = await graph.ainvoke({"topic": "otters"}, config)
        paused = await graph.aget_state(config)
    assert paused.next == ("review",)
    assert interrupted["__interrupt__"][0].value == {
        "question": "publish?",
        "draft": "a note about otters",
    }

    restart = replace(server.config, listen=f"127.0.0.1:{server.port}")
    await server.stop()
    async with (
        Server(restart) as restarted,
        MemsvcSaver(f"127.0.0.1:{restarted.port}", project_id=project) as saver,
    ):
        graph = compile_graph(saver)
        resumed_state = await graph.aget_state(config)
        assert resumed_state.next == ("review",)
        assert resumed_state.values == paused.values
        final = await graph.ainvoke(Command(resume="yes"), config)
        history = [s async for s in graph.aget_state_history(config)]

    ref_interrupted, ref_final, ref_history = await run_reference(thread_id)
    # Interrupt ids derive from task ids, which differ from run to run.
    assert {k: v for k, v in interrupted.items() if k != "__interrupt__"} == {
        k: v for k, v in ref_interrupted.items() if k != "__interrupt__"
    }
    assert [i.value for i in interrupted["__interrupt__"]] == [
        i.value for i in ref_interrupted["__interrupt__"]
    ]
    assert (
        final
        == ref_final
        == {
            "topic": "otters",
            "draft": "a note about otters",
            "approved": True,
            "log": ["write", "review:yes", "publish"],
        }
    )
    assert history_shape(history) == history_shape(ref_history)


async def test_a_sync_graph_runs_on_the_sync_methods(server: Server):
    """invoke/get_state (the saver's sync methods) work as the async ones do."""
    project, thread_id = str(uuid.uuid4()), f"thread-{uuid.uuid4()}"
    config: Any = {"configurable": {"thread_id": thread_id}}

    def run() -> tuple[Any, list[Any]]:
        with MemsvcSaver(f"127.0.0.1:{server.port}", project_id=project) as saver:
            graph = compile_graph(saver)
            graph.invoke({"topic": "otters"}, config)
            final = graph.invoke(Command(resume="no"), config)
            return final, list(graph.get_state_history(config))

    # The server runs on this event loop: the blocking graph runs in a thread.
    final, history = await asyncio.to_thread(run)
    assert final["log"] == ["write", "review:no", "discard"]
    assert final["approved"] is False
    assert [s.metadata["step"] for s in history] == [3, 2, 1, 0, -1]


async def test_the_fence_refuses_a_stale_writer_and_plain_forks_still_work(server: Server):
    """With fence=True, a writer extending an old checkpoint is refused instead of forking
    the thread; without it, LangGraph's time travel forks as usual."""
    project, thread_id = str(uuid.uuid4()), f"thread-{uuid.uuid4()}"
    config: Any = {"configurable": {"thread_id": thread_id}}
    target = f"127.0.0.1:{server.port}"
    async with MemsvcSaver(target, project_id=project, fence=True) as saver:
        graph = compile_graph(saver)
        await graph.ainvoke({"topic": "otters"}, config)
        history = [s async for s in graph.aget_state_history(config)]
        stale = history[1].config  # the checkpoint before the latest
        with pytest.raises(GraphCheckpointConflict) as refused:
            await graph.ainvoke(None, stale)
        assert (
            refused.value.latest_checkpoint_id == history[0].config["configurable"]["checkpoint_id"]
        )
        assert [s.config async for s in graph.aget_state_history(config)] == [
            s.config for s in history
        ]
        # The rightful writer, extending the latest, goes on.
        final = await graph.ainvoke(Command(resume="yes"), config)
        assert final["log"] == ["write", "review:yes", "publish"]
    async with MemsvcSaver(target, project_id=project) as saver:
        graph = compile_graph(saver)
        await graph.ainvoke(None, stale)  # unfenced: a fork from the old checkpoint
        forked = [s async for s in graph.aget_state_history(config)]
        assert len(forked) > len(history) + 3


class Answers(TypedDict, total=False):
    out: str


def ask_twice(state: Answers) -> Answers:
    return {"out": f"{interrupt('first?')}/{interrupt('second?')}"}


async def test_a_node_that_interrupts_twice_resumes_to_its_end(server: Server):
    """Its last resume saves two RESUME writes with one index: the saver keeps one,
    as LangGraph's savers do, instead of the whole batch being refused."""
    project = str(uuid.uuid4())
    results = []
    for saver_of in (
        lambda: MemsvcSaver(f"127.0.0.1:{server.port}", project_id=project),
        InMemorySaver,
    ):
        builder = StateGraph(Answers)
        builder.add_node("ask", ask_twice)
        builder.add_edge(START, "ask")
        builder.add_edge("ask", END)
        config: Any = {"configurable": {"thread_id": f"twice-{uuid.uuid4()}"}}
        saver = saver_of()
        try:
            graph = builder.compile(checkpointer=saver)
            await graph.ainvoke({"out": ""}, config)
            await graph.ainvoke(Command(resume="A"), config)
            final = await graph.ainvoke(Command(resume="B"), config)
            history = [s.next async for s in graph.aget_state_history(config)]
            results.append((final, (await graph.aget_state(config)).next, history))
        finally:
            if isinstance(saver, MemsvcSaver):
                await saver.aclose()
    assert results[0] == results[1]
    assert results[0][0] == {"out": "A/B"}


async def test_prune_refuses_a_lone_string(server: Server):
    """As LangGraph's PostgreSQL saver: "ab" is not the thread ids "a" and "b"."""
    async with MemsvcSaver(f"127.0.0.1:{server.port}", project_id=str(uuid.uuid4())) as saver:
        with pytest.raises(TypeError, match="thread_ids must be a sequence"):
            await saver.aprune("ab")
        with pytest.raises(TypeError, match="run_ids must be a sequence"):
            await saver.adelete_for_runs("ab")


async def test_a_saver_on_a_given_client_serves_async_methods_only(server: Server):
    """The given client's address and credentials are its own: a sync method would
    have made a client of the saver's defaults, another server (127.0.0.1:50051)."""
    project = str(uuid.uuid4())
    config: RunnableConfig = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        saver = MemsvcSaver(project_id=project, client=client)
        assert await saver.aget_tuple(config) is None
        with pytest.raises(RuntimeError, match="async methods only"):
            await asyncio.to_thread(saver.get_tuple, config)
        await saver.aclose()


async def test_a_listing_by_checkpoint_id_filters_as_a_listing_by_thread(server: Server):
    """alist with a checkpoint id reads that checkpoint and checks the filter
    itself: with the server's JSON rule, as a listing by thread (true is not 1, a
    key asked for with None must be there, 1.0 is 1)."""
    async with MemsvcSaver(f"127.0.0.1:{server.port}", project_id=str(uuid.uuid4())) as saver:
        thread: RunnableConfig = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
        stored = await saver.aput(thread, empty_checkpoint(), {"k": 1}, {})  # type: ignore[typeddict-unknown-key]
        for wanted, found in (({"k": True}, 0), ({"missing": None}, 0), ({"k": 1.0}, 1)):
            by_id = [c async for c in saver.alist(stored, filter=wanted)]
            by_thread = [c async for c in saver.alist(thread, filter=wanted)]
            assert (len(by_id), len(by_thread)) == (found, found), wanted


def _extend(state: list[str] | None, writes: Any) -> list[str]:
    return [*(state or []), *(item for write in writes for item in write)]


class Items(TypedDict):
    items: Annotated[list[str], DeltaChannel(_extend, snapshot_frequency=100)]


async def test_keep_latest_refuses_a_thread_with_a_delta_channel(server: Server):
    """As LangGraph's PostgreSQL saver: pruning to the latest checkpoint would empty a
    DeltaChannel, which rebuilds its value from older checkpoints' writes."""
    builder = StateGraph(Items)
    builder.add_node("add", lambda state: {"items": ["a"]})
    builder.add_edge(START, "add")
    builder.add_edge("add", END)
    thread_id, plain = f"delta-{uuid.uuid4()}", f"plain-{uuid.uuid4()}"
    async with MemsvcSaver(f"127.0.0.1:{server.port}", project_id=str(uuid.uuid4())) as saver:
        graph = builder.compile(checkpointer=saver)
        config: Any = {"configurable": {"thread_id": thread_id}}
        await graph.ainvoke({"items": ["x"]}, config)
        await graph.ainvoke({"items": ["y"]}, config)
        before = (await graph.aget_state(config)).values
        with pytest.raises(NotImplementedError, match="DeltaChannel"):
            await saver.aprune([thread_id])
        assert (await graph.aget_state(config)).values == before == {"items": ["x", "a", "y", "a"]}
        # A thread without one is pruned; "delete" needs no check.
        draft = compile_graph(saver)
        plain_config: Any = {"configurable": {"thread_id": plain}}
        await draft.ainvoke({"topic": "otters"}, plain_config)
        await saver.aprune([plain])
        assert len([c async for c in saver.alist(plain_config)]) == 1
        await saver.aprune([thread_id], strategy="delete")
        assert [c async for c in saver.alist(config)] == []


@pytest.mark.parametrize("ttl", [0, -5, float("nan"), float("inf")])
def test_a_ttl_that_is_not_a_positive_number_of_seconds_is_refused(ttl: float):
    """Made 1 ms, a ttl of 0 or less would have the thread forgotten at the next
    sweep (the proto's 0 means never: None says that here)."""
    with pytest.raises(ValueError, match="ttl must be a positive number of seconds"):
        MemsvcSaver(project_id=str(uuid.uuid4()), ttl=ttl)
    MemsvcSaver(project_id=str(uuid.uuid4()), ttl=0.5)  # half a second is a TTL


async def test_keep_latest_decides_in_memsvc_without_reading_the_threads(server: Server):
    """aprune sends the DeltaChannel's metadata keys with the prune; memsvc decides on
    the checkpoints' metadata in its store. A client that cannot receive one of the
    threads' checkpoints (64 KiB a message, values of 256 KiB) prunes them all the
    same, and is refused a thread with a DeltaChannel as before: none is pruned."""
    target = f"127.0.0.1:{server.port}"
    project = str(uuid.uuid4())
    async with MemsvcSaver(target, project_id=project) as writer:
        for thread_id in ("delta", "plain"):
            config: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
            version = None
            for step in range(4):
                version = writer.get_next_version(version, None)
                stored = empty_checkpoint()
                stored["channel_values"] = {"blob": random.randbytes(256 << 10)}
                stored["channel_versions"] = {"blob": version}
                metadata: dict[str, Any] = {"step": step}
                if thread_id == "delta" and step == 0:
                    # LangGraph drops it once a DeltaChannel snapshots: only older ones hold it.
                    metadata["counters_since_delta_snapshot"] = {"items": [1, 1]}
                config = await writer.aput(config, stored, metadata, {"blob": version})  # type: ignore[arg-type]

        async def count(thread_id: str) -> int:
            listed = writer.alist({"configurable": {"thread_id": thread_id}})
            return len([c async for c in listed])

        small = {"grpc.max_receive_message_length": 64 << 10}
        async with AsyncClient(target, channel_options=small) as client:
            saver = MemsvcSaver(project_id=project, client=client)
            with pytest.raises(NotImplementedError, match="'delta'"):
                await saver.aprune(["plain", "delta"])
            assert (await count("plain"), await count("delta")) == (4, 4)
            await saver.aprune(["plain"])
            assert await count("plain") == 1
        # The sync method sends the same prune.
        with pytest.raises(NotImplementedError, match="DeltaChannel"):
            await asyncio.to_thread(writer.prune, ["delta"])
        assert await count("delta") == 4


async def test_a_listing_by_checkpoint_id_searches_every_namespace_as_the_postgres_saver(
    server: Server, fresh_postgres_url: str
):
    """LangGraph's AsyncPostgresSaver filters alist by namespace only when the config
    has ``checkpoint_ns``: a checkpoint id alone finds the checkpoint in whichever
    namespaces hold it (a subgraph's, too). MemsvcSaver lists the same."""
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    thread_id = f"thread-{uuid.uuid4()}"
    root, sub, shared = (empty_checkpoint() for _ in range(3))
    puts = [
        ("", root, "root"),
        ("sub:1", sub, "loop"),
        ("", shared, "loop"),
        ("sub:2", shared, "input"),
    ]
    queries: list[tuple[dict[str, str], dict[str, Any] | None]] = [
        ({"checkpoint_id": sub["id"]}, None),
        ({"checkpoint_id": shared["id"]}, None),
        ({"checkpoint_id": shared["id"]}, {"source": "input"}),
        ({"checkpoint_id": sub["id"], "checkpoint_ns": ""}, None),
        ({"checkpoint_id": shared["id"], "checkpoint_ns": "sub:2"}, None),
        ({"checkpoint_id": root["id"]}, None),
    ]

    async def listings(saver: BaseCheckpointSaver[Any]) -> list[list[tuple[str, str]]]:
        for ns, stored, source in puts:
            config: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns}}
            await saver.aput(config, stored, {"source": source}, {})  # type: ignore[typeddict-item]
        found = []
        for wanted, metadata in queries:
            config = {"configurable": {"thread_id": thread_id, **wanted}}
            listed = [c async for c in saver.alist(config, filter=metadata)]
            # Sorted: the PostgreSQL saver orders one id's namespaces as it finds them.
            found.append(
                sorted(
                    (c.config["configurable"]["checkpoint_ns"], c.checkpoint["id"]) for c in listed
                )
            )
        return found

    async with (
        AsyncPostgresSaver.from_conn_string(fresh_postgres_url) as reference,
        MemsvcSaver(f"127.0.0.1:{server.port}", project_id=str(uuid.uuid4())) as saver,
    ):
        await reference.setup()
        expected = await listings(reference)
        assert expected[:2] == [
            [("sub:1", sub["id"])],
            [("", shared["id"]), ("sub:2", shared["id"])],
        ]
        assert await listings(saver) == expected
        # The sync method lists the same.
        config: RunnableConfig = {
            "configurable": {"thread_id": thread_id, "checkpoint_id": sub["id"]}
        }
        by_sync = await asyncio.to_thread(lambda: list(saver.list(config)))
        assert [c.config["configurable"]["checkpoint_ns"] for c in by_sync] == ["sub:1"]


class Inner(TypedDict, total=False):
    blob: str
    answer: str


class Outer(TypedDict, total=False):
    log: Annotated[list[str], operator.add]
    answer: str


def graph_with_a_subgraph(saver: BaseCheckpointSaver[Any], *, asks: bool) -> Any:
    """A root graph whose second node is a subgraph (a namespace 'sub:<task id>',
    new for each call), which may ask a human (an interrupt)."""
    inner = StateGraph(Inner)
    inner.add_node("fill", lambda state: {"blob": "y" * 1000})
    inner.add_node("ask", lambda state: {"answer": interrupt("go?") if asks else "auto"})
    inner.add_edge(START, "fill")
    inner.add_edge("fill", "ask")
    outer = StateGraph(Outer)
    outer.add_node("top", lambda state: {"log": ["t"]})
    outer.add_node("sub", inner.compile())
    outer.add_edge(START, "top")
    outer.add_edge("top", "sub")
    return outer.compile(checkpointer=saver)


async def test_keep_latest_deletes_finished_subgraph_calls_as_the_postgres_saver(server: Server):
    """Each call of a subgraph has a namespace of its own. keep_latest deletes those
    whose root checkpoint it does not keep (as LangGraph's PostgreSQL saver prunes):
    runs and prunes leave one checkpoint, not one per call; a call interrupted in
    the subgraph keeps its namespace (its root is the one kept) and resumes."""
    thread = f"subgraphs-{uuid.uuid4()}"
    config: Any = {"configurable": {"thread_id": thread}}
    everything: Any = {"configurable": {"thread_id": thread}}
    async with MemsvcSaver(f"127.0.0.1:{server.port}", project_id=str(uuid.uuid4())) as saver:
        graph = graph_with_a_subgraph(saver, asks=False)
        for _ in range(4):
            await graph.ainvoke({"log": ["i"]}, config)
            await saver.aprune([thread])
        left = [t.config["configurable"] async for t in saver.alist(everything)]
        assert [c["checkpoint_ns"] for c in left] == [""]
        assert (await graph.aget_state(config)).values["log"] == ["i", "t"] * 4
        asking = graph_with_a_subgraph(saver, asks=True)
        await asking.ainvoke({"log": ["i"]}, config)
        await saver.aprune([thread])
        namespaces = {
            t.config["configurable"]["checkpoint_ns"] async for t in saver.alist(everything)
        }
        assert "" in namespaces and any(ns.startswith("sub:") for ns in namespaces)
        final = await asking.ainvoke(Command(resume="yes"), config)
        assert final == {"log": ["i", "t"] * 5, "answer": "yes"}
        await saver.aprune([thread])
        assert [
            t.config["configurable"]["checkpoint_ns"] async for t in saver.alist(everything)
        ] == [""]
