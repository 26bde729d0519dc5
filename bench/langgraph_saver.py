"""LangGraph persistence: MemsvcSaver against LangGraph's AsyncPostgresSaver on one PostgreSQL.

Three systems, measured in one run, the calls interleaved round by round:

* ``memsvc``: ``memsvc serve`` in its own process (durable store: a private
  PostgreSQL database made for the run), called through ``memsvc.langgraph.MemsvcSaver``
  in this process: ``aput`` and ``aget_tuple``.
* ``postgres``: LangGraph's ``AsyncPostgresSaver`` in this process, on another private
  database of the same PostgreSQL server, after ``setup()``.
* ``echo``: a bare grpc.aio server in its own process (bench/_lifecycle_echo.py) that
  receives the very bytes MemsvcSaver's put sends (``aput``) and answers with the
  very bytes memsvc's get answers (``aget_tuple``), with identity (de)serializers.

``postgres`` plus ``echo`` is the floor (storing the checkpoint directly, plus the one
unavoidable gRPC hop); the target is MemsvcSaver within 1.5x of it. Two states:
``small`` (10 channels of ~100-byte dicts) and ``large`` (1,000 such channels); each
``aput`` writes a checkpoint whose every channel has a new version (the whole state
is stored), each ``aget_tuple`` reads the thread's latest checkpoint with every value.
The ratio is computed within each round and its median shown.

Storage: 100 steps of a growing state, as a chat agent's: a ``messages`` list that
gains one ~200-byte message a step, a step counter, and 20 channels set once (a
2,000-character system prompt, 9 strings of 150 characters, 10 small dicts), the
text varied as real text is (so compression hides no copies); each step a
checkpoint with new versions of the changed channels only.
Then the bytes each saver's tables grew by (``pg_total_relation_size``: pages,
TOAST, indexes; less what the empty tables take) and their rows' bytes as stored
(``pg_column_size``, compressed).

Rerun (about a minute; results in bench/results/langgraph_saver.json, see
docs/performance.md)::

    .venv/bin/python -m bench.langgraph_saver
    .venv/bin/python -m bench.langgraph_saver --rounds 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg

from bench._echo_server import identity
from bench._lifecycle_echo import (
    CHANNEL_OPTIONS,
    LOAD_METHOD,
    SMALL,
)
from bench._lifecycle_echo import PAUSE_METHOD as PUT_METHOD
from bench._lifecycle_echo import RESUME_METHOD as GET_METHOD
from bench.working_memory import MEMSVC, ROOT, _server
from memsvc.testing import (
    BackendUnreachable,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    require_backend,
)
from memsvc.v1 import graph_checkpoint_pb2 as pb

RESULTS = ROOT / "bench" / "results" / "langgraph_saver.json"
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
SIZES = {"small": 10, "large": 1000}
TARGET_RATIO = 1.5
STEPS = 100
MEMSVC_TABLES = ("graph_threads", "graph_checkpoints", "graph_values", "graph_writes")
POSTGRES_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")


def channel_value(i: int) -> dict[str, Any]:
    return {"id": i, "text": f"value {i:06d} " + "x" * 80}


class Thread:
    """A thread of checkpoints on one saver: each put gives every channel a new version."""

    def __init__(self, saver: Any, channels: int) -> None:
        from langgraph.checkpoint.base import empty_checkpoint

        self.saver = saver
        self.values = {f"ch{i:04d}": channel_value(i) for i in range(channels)}
        self.config: dict[str, Any] = {
            "configurable": {"thread_id": f"bench-{uuid.uuid4()}", "checkpoint_ns": ""}
        }
        self._empty = empty_checkpoint
        self.step = 0
        self.versions: dict[str, str] = {}

    def next_put(self) -> tuple[Any, Any, Any, Any]:
        from langgraph.checkpoint.base.id import uuid6

        self.step += 1
        checkpoint = self._empty()
        checkpoint["id"] = str(uuid6(clock_seq=self.step))
        self.versions = {
            ch: self.saver.get_next_version(self.versions.get(ch), None) for ch in self.values
        }
        checkpoint["channel_values"] = dict(self.values)
        checkpoint["channel_versions"] = dict(self.versions)
        metadata = {"source": "loop", "step": self.step, "parents": {}}
        return self.config, checkpoint, metadata, dict(self.versions)

    async def put(self) -> None:
        self.config = await self.saver.aput(*self.next_put())

    async def get(self) -> None:
        found = await self.saver.aget_tuple(self.config)
        assert found is not None
        assert len(found.checkpoint["channel_values"]) == len(self.values)


async def _echo(put: Any, get: Any, op: str, payload: bytes) -> None:
    await (put(payload) if op == "aput" else get(SMALL))


async def _timed(call: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter_ns()
    await call()
    return (time.perf_counter_ns() - started) / 1e6


async def measure_latency(
    memsvc: Any, postgres: Any, echo: grpc.aio.Channel, rounds: int
) -> list[dict[str, Any]]:
    """Interleaved rounds per state size; one row per (size, op, system) with medians."""
    put_echo = echo.unary_unary(
        PUT_METHOD, request_serializer=identity, response_deserializer=identity
    )
    get_echo = echo.unary_unary(
        GET_METHOD, request_serializer=identity, response_deserializer=identity
    )
    load_echo = echo.unary_unary(
        LOAD_METHOD, request_serializer=identity, response_deserializer=identity
    )
    rows: list[dict[str, Any]] = []
    for size_name, channels in SIZES.items():
        threads = {"memsvc": Thread(memsvc, channels), "postgres": Thread(postgres, channels)}
        for thread in threads.values():  # warm up: a put and a get each
            await thread.put()
            await thread.get()
        # The echo's payloads: what MemsvcSaver sends for a put, what memsvc answers a get.
        message, _ = memsvc._put_request(*threads["memsvc"].next_put())
        put_payload = pb.PutGraphCheckpointRequest(
            project_id=memsvc.project_id, checkpoint=message
        ).SerializeToString()
        stored = await memsvc._agraphs.get_checkpoint(
            threads["memsvc"].config["configurable"]["thread_id"]
        )
        get_payload = pb.GetGraphCheckpointResponse(checkpoint=stored).SerializeToString()
        await load_echo(get_payload)
        samples: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):
            for op in ("aput", "aget_tuple"):
                for system in ("memsvc", "postgres", "echo"):
                    call: Callable[[], Awaitable[None]]
                    if system == "echo":
                        call = functools.partial(_echo, put_echo, get_echo, op, put_payload)
                    else:
                        thread = threads[system]
                        call = thread.put if op == "aput" else thread.get
                    samples.setdefault((op, system), []).append(await _timed(call))
        for op in ("aput", "aget_tuple"):
            ratios = [
                m / (p + e)
                for m, p, e in zip(
                    samples[(op, "memsvc")],
                    samples[(op, "postgres")],
                    samples[(op, "echo")],
                    strict=True,
                )
            ]
            row = {
                "size": size_name,
                "channels": channels,
                "op": op,
                "payload_bytes": len(put_payload if op == "aput" else get_payload),
                "ratio_to_floor": statistics.median(ratios),
            }
            for system in ("memsvc", "postgres", "echo"):
                values = sorted(samples[(op, system)])
                row[f"{system}_median_ms"] = statistics.median(values)
                row[f"{system}_p99_ms"] = values[min(len(values) - 1, int(len(values) * 0.99))]
            rows.append(row)
    return rows


_WORDS = [
    "agent",
    "tool",
    "search",
    "result",
    "plan",
    "step",
    "memory",
    "thread",
    "answer",
    "question",
    "draft",
    "review",
    "summary",
    "source",
    "paper",
    "citation",
    "context",
    "model",
    "token",
    "budget",
    "error",
    "retry",
    "user",
    "note",
]


def prose(seed: int, length: int) -> str:
    """About ``length`` characters of text, as varied as real messages are (no long
    runs that a compressor would fold)."""
    rng = random.Random(seed)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < length:
        number = str(rng.randrange(1000)) if rng.random() < 0.3 else ""
        words.append(rng.choice(_WORDS) + number)
    return " ".join(words)


class GrowingState:
    """A chat-like state: messages grow by one a step, a counter changes, the rest is set once."""

    def __init__(self, saver: Any) -> None:
        from langgraph.checkpoint.base import empty_checkpoint

        self.saver = saver
        self._empty = empty_checkpoint
        self.values: dict[str, Any] = {f"profile_{i}": prose(i, 150) for i in range(9)}
        self.values["instructions"] = prose(99, 2000)  # a system prompt
        self.values.update(
            {f"context_{i}": {"doc": i, "text": prose(100 + i, 150)} for i in range(10)}
        )
        self.values["messages"] = []
        self.values["step"] = 0
        self.versions: dict[str, str] = {}
        self.config: dict[str, Any] = {
            "configurable": {"thread_id": f"grow-{uuid.uuid4()}", "checkpoint_ns": ""}
        }

    async def run(self, steps: int) -> None:
        from langgraph.checkpoint.base.id import uuid6

        for step in range(steps):
            changed = list(self.values) if step == 0 else ["messages", "step"]
            self.values["messages"] = [
                *self.values["messages"],
                {"role": "user" if step % 2 else "ai", "content": prose(1000 + step, 180)},
            ]
            self.values["step"] = step
            for channel in changed:
                self.versions[channel] = self.saver.get_next_version(
                    self.versions.get(channel), None
                )
            checkpoint = self._empty()
            checkpoint["id"] = str(uuid6(clock_seq=step))
            checkpoint["channel_values"] = dict(self.values)
            checkpoint["channel_versions"] = dict(self.versions)
            metadata = {"source": "loop", "step": step, "parents": {}}
            new_versions = {channel: self.versions[channel] for channel in changed}
            self.config = await self.saver.aput(self.config, checkpoint, metadata, new_versions)


async def table_bytes(url: str, tables: tuple[str, ...]) -> tuple[int, int]:
    """(bytes of the tables' rows as stored, bytes of the tables in all)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("VACUUM ANALYZE")
        rows = total = 0
        for table in tables:
            cursor = await conn.execute(
                f"SELECT pg_total_relation_size('{table}'),"
                f" (SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM {table} t)"
            )
            row = await cursor.fetchone()
            assert row is not None
            total += int(row[0])
            rows += int(row[1])
    return rows, total


async def run_all(
    args: argparse.Namespace, memsvc_port: int, echo_port: int, urls: dict[str, str]
) -> dict[str, Any]:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    from memsvc.langgraph import MemsvcSaver

    async with (
        MemsvcSaver(f"127.0.0.1:{memsvc_port}", project_id=str(uuid.uuid4())) as memsvc,
        AsyncPostgresSaver.from_conn_string(urls["postgres"]) as postgres,
        grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}", options=CHANNEL_OPTIONS) as echo,
    ):
        await postgres.setup()
        latency = await measure_latency(memsvc, postgres, echo, args.rounds)
        # Storage: only the growing thread is counted, so the latency threads go first.
        await _truncate(urls["memsvc"], MEMSVC_TABLES)
        await _truncate(urls["postgres"], POSTGRES_TABLES)
        # What the empty tables take (pages, indexes' roots) is not stored state.
        _, memsvc_empty = await table_bytes(urls["memsvc"], MEMSVC_TABLES)
        _, postgres_empty = await table_bytes(urls["postgres"], POSTGRES_TABLES)
        for saver in (memsvc, postgres):
            await GrowingState(saver).run(STEPS)
        memsvc_rows, memsvc_total = await table_bytes(urls["memsvc"], MEMSVC_TABLES)
        postgres_rows, postgres_total = await table_bytes(urls["postgres"], POSTGRES_TABLES)
        storage = {
            "steps": STEPS,
            "memsvc_row_bytes": memsvc_rows,
            "postgres_row_bytes": postgres_rows,
            "memsvc_bytes": memsvc_total - memsvc_empty,
            "postgres_bytes": postgres_total - postgres_empty,
        }
    return {"latency": latency, "storage": storage}


async def _truncate(url: str, tables: tuple[str, ...]) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"TRUNCATE {', '.join(tables)}")
        await conn.execute("VACUUM FULL")


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| state | op | payload | MemsvcSaver median (p99) | AsyncPostgresSaver | echo | "
        "ratio to floor (median per round) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["latency"]:
        lines.append(
            f"| {row['size']} ({row['channels']} channels) | `{row['op']}` | "
            f"{row['payload_bytes']:,} B | {row['memsvc_median_ms']:.2f} ms "
            f"({row['memsvc_p99_ms']:.2f}) | {row['postgres_median_ms']:.2f} ms | "
            f"{row['echo_median_ms']:.2f} ms | {row['ratio_to_floor']:.2f}x |"
        )
    storage = results["storage"]
    lines += [
        "",
        f"Storage after {storage['steps']} steps of a growing state (growth of the tables: "
        f"pages, TOAST, indexes): MemsvcSaver {storage['memsvc_bytes']:,} bytes, "
        f"AsyncPostgresSaver {storage['postgres_bytes']:,} bytes "
        f"({storage['memsvc_bytes'] / storage['postgres_bytes']:.2f}x); rows as stored: "
        f"{storage['memsvc_row_bytes']:,} and {storage['postgres_row_bytes']:,} bytes "
        f"({storage['memsvc_row_bytes'] / storage['postgres_row_bytes']:.2f}x).",
    ]
    return "\n".join(lines)


def verdict(results: dict[str, Any]) -> str:
    worst = max(row["ratio_to_floor"] for row in results["latency"])
    storage = results["storage"]
    less = (
        storage["memsvc_bytes"] < storage["postgres_bytes"]
        and storage["memsvc_row_bytes"] < storage["postgres_row_bytes"]
    )
    met = worst <= TARGET_RATIO and less
    return (
        f"Target {'met' if met else 'NOT met'}: worst latency ratio {worst:.2f}x "
        f"(target <= {TARGET_RATIO}x); storage {'less' if less else 'NOT less'} than the "
        "direct saver's."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=200, help="interleaved rounds per state")
    args = parser.parse_args(argv)
    try:
        require_backend(POSTGRES_ADMIN_URL)
        import langgraph.checkpoint.postgres.aio  # noqa: F401
    except (BackendUnreachable, ImportError) as error:
        print(f"{error}; this benchmark needs PostgreSQL and the dev extra", file=sys.stderr)
        return 2
    started = datetime.now(UTC)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="memsvc-bench-")))
        urls = {}
        for name in ("memsvc", "postgres"):
            url = create_postgres_database(POSTGRES_ADMIN_URL, f"lgsaver_{name}")
            stack.callback(drop_postgres_database, POSTGRES_ADMIN_URL, url)
            urls[name] = url
        port = free_port()
        data_dir = workdir / "memsvc"
        data_dir.mkdir()
        memsvc_argv = [
            str(MEMSVC), "serve", "--health-listen=", "--metrics-listen=",
            "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
            "--working-memory-url", "memory://", "--database-url", urls["memsvc"],
        ]  # fmt: skip
        stack.enter_context(_server("memsvc", memsvc_argv, workdir, port))
        echo_port = free_port()
        echo_argv = [sys.executable, "-m", "bench._lifecycle_echo", str(echo_port)]
        stack.enter_context(_server("echo", echo_argv, workdir, echo_port))
        results = asyncio.run(run_all(args, port, echo_port, urls))
    results["started"] = started.isoformat()
    results["rounds"] = args.rounds
    print(markdown(results))
    print(verdict(results))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
