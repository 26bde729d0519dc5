"""CreateCheckpoint under load: what one lifecycle commit costs memsvc and PostgreSQL,
two memsvc commits compared in interleaved rounds.

For a change to the commit path (the PostgreSQL transaction, the event append):
each ``--refs`` commit runs as ``memsvc serve`` from a ``git archive`` (working
memory in process, or where ``--working-memory-url`` says, such as the local Redis
as in production; a private PostgreSQL database each), and ``--writers`` closed-loop
callers make CreateCheckpoint calls on as many ACTIVE sessions for ``--seconds``
after a 1 s warm-up. Per call: memsvc's CPU (all its threads, /proc schedstat), the
CPU of the PostgreSQL backends connected to its database, and calls per second.
Rounds alternate the commits (``--rounds``), since this shared machine drifts by
more than the effects measured; the table gives each round and the medians.
Checkpoints are deleted between rounds (as bench/watch.py does), so no session
holds more than one round's checkpoints. Rerun::

    .venv/bin/python -m bench.commit_load --refs d15579e,HEAD --rounds 3
    .venv/bin/python -m bench.commit_load --refs HEAD --working-memory-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
from google.protobuf import struct_pb2

from bench.costs import backend_pids
from bench.lifecycle import POSTGRES_ADMIN_URL, _memsvc_at, cpu_ns
from bench.working_memory import SessionIds, _delete_redis_keys
from memsvc.testing import (
    create_postgres_database,
    drop_postgres_database,
    free_port,
    wait_for_port,
)
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub

WARMUP_SECONDS = 1.0


@contextlib.contextmanager
def _memsvc(ref: str, workdir: Path, working_memory_url: str) -> Iterator[tuple[int, int, str]]:
    """memsvc at ``ref`` on a database of its own: (pid, port, database name)."""
    url = create_postgres_database(POSTGRES_ADMIN_URL, "memsvc_commit_load")
    name = f"{ref.replace('/', '_')}-{uuid.uuid4().hex[:6]}"
    command = _memsvc_at(ref, workdir / name)
    port = free_port()
    data = workdir / f"{name}-data"
    data.mkdir()
    argv = [*command, "serve", "--health-listen=", "--metrics-listen=",
            "--listen", f"127.0.0.1:{port}", "--data-dir", str(data),
            "--database-url", url, "--working-memory-url", working_memory_url,
            # Thousands of checkpoints per session in a long round: not what is measured.
            "--max-checkpoints-per-session", "1000000000"]  # fmt: skip
    server = subprocess.Popen(argv, env={**os.environ, "MEMSVC_LOG_LEVEL": "warning"})
    try:
        wait_for_port(port, 30)
        yield server.pid, port, url.rsplit("/", 1)[1]
    finally:
        server.terminate()
        server.wait(30)
        drop_postgres_database(POSTGRES_ADMIN_URL, url)


async def _round(
    pid: int, port: int, database: str, writers: int, seconds: float, project: str
) -> dict[str, float]:
    """Closed-loop CreateCheckpoint calls by ``writers`` callers after a warm-up, on
    sessions of ``project``: calls/s and the CPU per call of memsvc and of its
    PostgreSQL backends."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = LifecycleServiceStub(channel)
        agent = str(uuid.uuid4())
        sessions = [
            SessionIds(project_id=project, agent_instance_id=agent, session_id=f"c-{i:02d}")
            for i in range(writers)
        ]
        for ids in sessions:
            await stub.Spawn(lc.SpawnRequest(**ids))
        calls = 0

        async def caller(ids: SessionIds, until: float) -> None:
            nonlocal calls
            while time.monotonic() < until:
                metadata = struct_pb2.Struct()
                metadata["sent"] = time.time()
                await stub.CreateCheckpoint(lc.CreateCheckpointRequest(**ids, metadata=metadata))
                calls += 1

        until = time.monotonic() + WARMUP_SECONDS
        await asyncio.gather(*(caller(ids, until) for ids in sessions))
        before = {p: cpu_ns(p) for p in [pid, *backend_pids(database)]}
        calls = 0
        started = time.monotonic()
        await asyncio.gather(*(caller(ids, started + seconds) for ids in sessions))
        elapsed = time.monotonic() - started
        # A backend that connected meanwhile counts whole.
        spent = {p: cpu_ns(p) - before.get(p, 0) for p in [pid, *backend_pids(database)]}
    with psycopg.connect(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}") as conn:
        conn.execute("DELETE FROM checkpoints")
    return {
        "calls_per_s": calls / elapsed,
        "server_us": spent.pop(pid) / calls / 1e3,
        "postgres_us": sum(spent.values()) / calls / 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--refs", default="HEAD~1,HEAD", help="commits to compare, comma-separated")
    parser.add_argument("--writers", type=int, default=16, help="concurrent callers")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--working-memory-url",
        default="memory://",
        help="the servers' working memory (default in process; redis://... as in "
        "production, where the run's keys are deleted at the end)",
    )
    args = parser.parse_args(argv)
    project = str(uuid.uuid4())
    refs = args.refs.split(",")
    results: dict[str, list[dict[str, float]]] = {ref: [] for ref in refs}
    with (
        tempfile.TemporaryDirectory(prefix="memsvc-commit-load-") as workdir,
        contextlib.ExitStack() as stack,
    ):
        if args.working_memory_url.startswith("redis://"):
            stack.callback(_delete_redis_keys, project, args.working_memory_url)
        servers = {
            ref: stack.enter_context(_memsvc(ref, Path(workdir), args.working_memory_url))
            for ref in refs
        }
        for number in range(args.rounds):
            order = refs if number % 2 == 0 else refs[::-1]
            for ref in order:
                # One project for the run, so its Redis keys are found at the end;
                # each round spawns sessions of its own within it.
                result = asyncio.run(_round(*servers[ref], args.writers, args.seconds, project))
                results[ref].append(result)
                print(
                    f"round {number + 1} {ref:>12}: {result['calls_per_s']:6.0f} calls/s,"
                    f" memsvc {result['server_us']:6.0f} µs/call,"
                    f" PostgreSQL {result['postgres_us']:5.0f} µs/call",
                    flush=True,
                )
    print("\n| memsvc | Calls/s | memsvc CPU (µs/call) | PostgreSQL CPU (µs/call) |")
    print("|---|--:|--:|--:|")
    for ref in refs:
        rows = results[ref]
        medians = [statistics.median(r[k] for r in rows) for k in rows[0]]
        print(f"| {ref} | {medians[0]:,.0f} | {medians[1]:,.0f} | {medians[2]:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
