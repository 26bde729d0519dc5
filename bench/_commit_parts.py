"""Where one lifecycle commit's CPU goes in memsvc's process, without gRPC: a breakdown.

Not a benchmark against a baseline (see bench/commit_load.py and bench/watch.py for
those): it starts a Server in this process (working memory where
``--working-memory-url`` says, the local Redis by default; a private PostgreSQL
database), spawns one empty session per caller, and has ``--callers`` concurrent
callers run, for ``--seconds`` each, what a CreateCheckpoint does, whole and in
parts, reading this process's CPU time (all its threads) per call:

- ``create_checkpoint``: ``Lifecycle.create_checkpoint``, the whole domain call;
- ``snapshot step``: its working-memory step alone (``begin_snapshot``, no marker);
- ``transaction + lock``: a durable-store transaction that takes the session's row
  lock and commits;
- ``empty transaction``: one that does nothing but begin and commit;
- ``redis-py MULTI/EXEC``: three plain commands in one MULTI/EXEC on a bare
  redis-py client (the library's own floor for the snapshot step).

Rerun::

    .venv/bin/python -m bench._commit_parts
    .venv/bin/python -m bench._commit_parts --working-memory-url memory:// --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from bench.lifecycle import POSTGRES_ADMIN_URL
from bench.working_memory import _delete_redis_keys
from memsvc.config import Config
from memsvc.domain._ids import SessionRef
from memsvc.server import Server
from memsvc.testing import create_postgres_database, drop_postgres_database

Call = Callable[[int], Awaitable[object]]


async def _cpu_per_call(call: Call, callers: int, seconds: float) -> tuple[float, float]:
    """(calls per second, µs of this process's CPU per call) of ``callers`` loops."""
    stop = time.perf_counter() + seconds
    calls = 0

    async def loop(caller: int) -> None:
        nonlocal calls
        while time.perf_counter() < stop:
            await call(caller)
            calls += 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop(caller) for caller in range(callers)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return calls / wall, cpu / max(calls, 1) * 1e6


async def _measure(args: argparse.Namespace, project: str, database_url: str) -> None:
    with tempfile.TemporaryDirectory(prefix="memsvc-commit-parts-") as data_dir:
        config = Config(
            listen="127.0.0.1:0",
            data_dir=data_dir,
            working_memory_url=args.working_memory_url,
            database_url=database_url,
            health_listen="",
            metrics_listen="",
        )
        async with Server(config) as server:
            lifecycle, database = server.lifecycle, server.durable_store
            assert lifecycle is not None
            memory = server.working_memory_store
            agent = str(uuid.uuid4())
            sessions = [SessionRef(project, agent, f"s{n}") for n in range(args.callers)]
            for session in sessions:
                await lifecycle.spawn(session, "", [], {}, "")
            bare = aioredis.Redis(
                connection_pool=aioredis.BlockingConnectionPool.from_url(
                    "redis://127.0.0.1:6379/0", max_connections=8
                )
            )

            async def create_checkpoint(caller: int) -> object:
                return await lifecycle.create_checkpoint(sessions[caller], "", {}, "")

            async def snapshot_step(caller: int) -> object:
                op = uuid.uuid4().hex
                return await memory.begin_snapshot(sessions[caller], op, None, False, {"active"})

            async def transaction_and_lock(caller: int) -> None:
                async with database.transaction() as tx:
                    await tx.lock_session(sessions[caller])

            async def empty_transaction(caller: int) -> None:
                async with database.transaction():
                    pass

            async def bare_multi_exec(caller: int) -> object:
                pipe = bare.pipeline(transaction=True)
                pipe.hget(f"bench:{project}:{caller}", "a")
                pipe.hgetall(f"bench:{project}:{caller}")
                pipe.zrange(f"bench:{project}:{caller}", 0, -1, withscores=True)
                return await pipe.execute()

            parts: list[tuple[str, Call]] = [
                ("create_checkpoint", create_checkpoint),
                ("snapshot step", snapshot_step),
                ("transaction + lock", transaction_and_lock),
                ("empty transaction", empty_transaction),
                ("redis-py MULTI/EXEC", bare_multi_exec),
            ]
            results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in parts}
            try:
                await _cpu_per_call(create_checkpoint, args.callers, 1.0)  # warm-up
                for number in range(args.rounds):
                    for name, call in parts:
                        measured = await _cpu_per_call(call, args.callers, args.seconds)
                        results[name].append(measured)
                        print(
                            f"round {number + 1} {name:<20} {measured[0]:7.0f} calls/s,"
                            f" {measured[1]:6.0f} µs of CPU a call",
                            flush=True,
                        )
            finally:
                await bare.aclose()
    print(f"\n{args.callers} callers, medians of {args.rounds} rounds")
    print("| Part | Calls/s | memsvc process CPU (µs/call) |")
    print("|---|--:|--:|")
    for name, rows in results.items():
        rate = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        print(f"| {name} | {rate:,.0f} | {cpu:,.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=16, help="concurrent callers")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (median shown)")
    parser.add_argument(
        "--working-memory-url",
        default="redis://127.0.0.1:6379/0",
        help="working memory: the local Redis (default, its keys deleted at the end) or memory://",
    )
    args = parser.parse_args(argv)
    project = str(uuid.uuid4())
    database_url = create_postgres_database(POSTGRES_ADMIN_URL, "memsvc_commit_parts")
    try:
        asyncio.run(_measure(args, project, database_url))
    finally:
        drop_postgres_database(POSTGRES_ADMIN_URL, database_url)
        if args.working_memory_url.startswith("redis://"):
            _delete_redis_keys(project, args.working_memory_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
