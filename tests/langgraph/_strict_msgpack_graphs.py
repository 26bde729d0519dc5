"""Run by test_saver.py in a process of its own, with LANGGRAPH_STRICT_MSGPACK=true:
LangGraph reads the variable once, when it is imported (its default serializer is made
then), so only a fresh interpreter runs as an application with it set does.

``python -m tests.langgraph._strict_msgpack_graphs TARGET PROJECT`` compiles three
graphs on one MemsvcSaver, runs each (async, then sync on another saver), closes the
savers and prints what it saw as JSON.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import threading
import warnings
from typing import Any, TypedDict

from langgraph.graph import END, START, StateGraph

from memsvc.langgraph import MemsvcSaver

GRAPHS = 3


class Count(TypedDict):
    n: int


def compile_graphs(saver: MemsvcSaver) -> list[Any]:
    builder = StateGraph(Count)
    builder.add_node("add", lambda state: {"n": state["n"] + 1})
    builder.add_edge(START, "add")
    builder.add_edge("add", END)
    return [builder.compile(checkpointer=saver) for _ in range(GRAPHS)]


def copies(saver: MemsvcSaver, graphs: list[Any]) -> int:
    """How many graphs LangGraph gave a copy of the saver (with_allowlist)."""
    return sum(graph.checkpointer is not saver for graph in graphs)


def client_threads() -> int:
    """The blocking clients' loop threads running in this process."""
    return sum(thread.name == "memsvc-client" for thread in threading.enumerate())


async def run_async(target: str, project: str) -> dict[str, Any]:
    saver = MemsvcSaver(target, project_id=project)
    graphs = compile_graphs(saver)
    results = [
        await graph.ainvoke({"n": i}, {"configurable": {"thread_id": f"async-{i}"}})
        for i, graph in enumerate(graphs)
    ]
    await saver.aclose()
    return {"async_copies": copies(saver, graphs), "async_results": [r["n"] for r in results]}


def run_sync(target: str, project: str) -> dict[str, Any]:
    saver = MemsvcSaver(target, project_id=project)
    graphs = compile_graphs(saver)
    results = [
        graph.invoke({"n": i}, {"configurable": {"thread_id": f"sync-{i}"}})
        for i, graph in enumerate(graphs)
    ]
    running = client_threads()
    saver.close()
    return {
        "sync_copies": copies(saver, graphs),
        "sync_results": [r["n"] for r in results],
        "client_threads_running": running,
        "client_threads_left": client_threads(),
    }


def main() -> None:
    target, project = sys.argv[1:3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = asyncio.run(run_async(target, project))
        report.update(run_sync(target, project))
        # A client left open by a copy of a saver says so when collected.
        gc.collect()
    report["unclosed"] = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
