"""Where memsvc's Pause and Resume spend their time: wall-clock timers around each step.

Not a benchmark (the timers add a little to every step): a breakdown. It runs
``memsvc serve`` (Redis working memory, a private PostgreSQL database) in a
child process whose LifecycleServicer, Redis lifecycle scripts, SQL statements
and snapshot encoding are wrapped with timers (no memsvc file is changed), drives
``--cycles`` back-to-back Pause/Resume cycles of one session of ``--size`` keys,
and prints the mean wall time of each step per call::

    .venv/bin/python -m bench._lifecycle_probe --git-ref HEAD --size 1000 --cycles 100
    .venv/bin/python -m bench._lifecycle_probe --idle-ms 50   # each call after 50 ms idle

``servicer`` is the whole RPC handler; the rest of the client's latency is gRPC.
``redis.begin_snapshot+parse`` includes the script's round trip
(``redis.lifecycle_begin_snapshot``) and the packing of its reply into the
checkpoint format (``cpu.encode_flat``); Resume passes the checkpoint to its
script unparsed.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextvars
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc

_OP: contextvars.ContextVar[str] = contextvars.ContextVar("op", default="other")
_totals: dict[str, float] = defaultdict(float)
_counts: dict[str, int] = defaultdict(int)


def _add(step: str, seconds: float) -> None:
    _totals[f"{_OP.get()}:{step}"] += seconds
    _counts[f"{_OP.get()}:{step}"] += 1


def _time_async(owner: Any, name: str, label: str, op: str | None = None) -> None:
    original = getattr(owner, name, None)
    if original is None:  # a step the measured commit does not have
        return

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _OP.set(op) if op else None
        step = f"redis.{args[1]}" if name == "_run_lifecycle" else label
        started = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            _add(step, time.perf_counter() - started)
            if token is not None:
                _OP.reset(token)

    setattr(owner, name, wrapper)


def _time_sync(owner: Any, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _add(label, time.perf_counter() - started)

    setattr(owner, name, wrapper)


def _instrumented_serve(source: str, out: str, argv: list[str]) -> int:
    """memsvc serve (from ``source``) with timers; totals written to ``out`` at exit."""
    sys.path.insert(0, source)
    from memsvc import cli
    from memsvc.api import _lifecycle as api
    from memsvc.store import _lifecycle_sql as sql
    from memsvc.store.postgres import _store as pg
    from memsvc.store.redis import _working_memory as rwm

    _time_async(api.LifecycleServicer, "Pause", "servicer", op="pause")
    _time_async(api.LifecycleServicer, "Resume", "servicer", op="resume")
    redis_store = rwm.RedisWorkingMemoryStore
    _time_async(redis_store, "_run_lifecycle", "")
    _time_async(redis_store, "begin_snapshot", "redis.begin_snapshot+parse")
    _time_async(redis_store, "begin_restore", "redis.begin_restore+args")
    for method in (
        "lock_session",
        "lock_session_reading_checkpoint",
        "lock_session_for_checkpoint",
        "lock_session_counting_checkpoints",
        "insert_checkpoint",
        "read_checkpoint",
        "update_session",
        "append_event",
    ):
        _time_async(sql.SqlLifecycleTransaction, method, f"sql.{method}")
    _time_sync(rwm, "encode_flat", "cpu.encode_flat")
    transaction = pg.PostgresDurableStore.transaction

    def timed_transaction(self: Any) -> Any:
        manager = transaction(self)

        class Timed:
            async def __aenter__(self) -> Any:
                started = time.perf_counter()
                try:
                    return await manager.__aenter__()
                finally:
                    _add("sql.checkout+BEGIN", time.perf_counter() - started)

            async def __aexit__(self, *exc: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await manager.__aexit__(*exc)
                finally:
                    _add("sql.COMMIT+checkin", time.perf_counter() - started)

        return Timed()

    pg.PostgresDurableStore.transaction = timed_transaction  # type: ignore[method-assign]
    atexit.register(lambda: Path(out).write_text(json.dumps([_totals, _counts])))
    return int(cli.main(argv))


async def _drive(
    port: int, project_id: str, size: int, cycles: int, idle_ms: float
) -> dict[str, float]:
    """Mean client latency of Pause and Resume, each after ``idle_ms`` of idleness."""
    from bench.lifecycle import MemsvcSystem, make_state
    from bench.working_memory import SessionIds

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        ids = SessionIds(
            project_id=project_id, agent_instance_id=str(uuid.uuid4()), session_id="probe"
        )
        system = MemsvcSystem(channel, ids, size, 0)
        await system.setup(make_state(size))
        times: dict[str, list[float]] = {"pause": [], "resume": []}
        for _ in range(cycles):
            for op, call in (("pause", system.pause), ("resume", system.resume)):
                if idle_ms:
                    await asyncio.sleep(idle_ms / 1e3)
                started = time.perf_counter()
                await call()
                times[op].append(time.perf_counter() - started)
    return {op: statistics.fmean(values) for op, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "instrumented-serve":
        return _instrumented_serve(argv[1], argv[2], argv[3:])
    from bench.lifecycle import POSTGRES_ADMIN_URL, REDIS_URL, _memsvc_at
    from bench.working_memory import ROOT, _delete_redis_keys
    from memsvc.testing import (
        create_postgres_database,
        drop_postgres_database,
        free_port,
        wait_for_port,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--git-ref", default="HEAD", help="memsvc as committed at this ref")
    parser.add_argument("--size", type=int, default=1000, help="keys in the session")
    parser.add_argument("--cycles", type=int, default=100, help="Pause/Resume cycles")
    parser.add_argument(
        "--idle-ms",
        type=float,
        default=0,
        help="idle time before each call (0: back to back; the benchmark's calls come"
        " after tens of ms of other systems' work, which leaves every process cold)",
    )
    args = parser.parse_args(argv)
    project_id = str(uuid.uuid4())
    with tempfile.TemporaryDirectory(prefix="memsvc-probe-") as workdir:
        source = Path(workdir) / "source"
        _memsvc_at(args.git_ref, source)
        out = Path(workdir) / "totals.json"
        url = create_postgres_database(POSTGRES_ADMIN_URL, "memsvc_probe")
        port = free_port()
        serve = [
            "serve", "--health-listen=", "--metrics-listen=",
            "--listen", f"127.0.0.1:{port}", "--data-dir", workdir,
            "--working-memory-url", REDIS_URL, "--database-url", url,
            "--max-session-keys", "20000",
        ]  # fmt: skip
        command = [sys.executable, "-m", "bench._lifecycle_probe", "instrumented-serve"]
        env = {**os.environ, "MEMSVC_LOG_LEVEL": "warning"}
        server = subprocess.Popen([*command, str(source), str(out), *serve], cwd=ROOT, env=env)
        try:
            wait_for_port(port, 30)
            latency = asyncio.run(_drive(port, project_id, args.size, args.cycles, args.idle_ms))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
            drop_postgres_database(POSTGRES_ADMIN_URL, url)
            _delete_redis_keys(project_id)
        totals, counts = json.loads(out.read_text())
    for op in ("pause", "resume"):
        calls = counts[f"{op}:servicer"]
        print(f"{args.size:,} keys, {op}: client latency {latency[op] * 1e3:.2f} ms (mean)")
        steps = sorted(
            ((k, v) for k, v in totals.items() if k.startswith(f"{op}:")), key=lambda kv: -kv[1]
        )
        for key, total in steps:
            print(f"  {key.split(':', 1)[1]:32} {total / calls * 1e3:8.3f} ms/call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
