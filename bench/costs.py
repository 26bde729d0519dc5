"""Cost benchmark: what each lifecycle call costs the shared backends, and the event-log ceiling.

The issue "Scale-out" asks for the unit costs docs/scaling.md derives 1,000 and
10,000 pods from (two cores cannot run many replicas). One run, production
deployment: ``memsvc serve`` in its own process, working memory in a private
``redis-server`` started for the run on a free port (so nothing else touches its
counters), durable store in a fresh database on the local PostgreSQL
(postgresql://postgres@127.0.0.1:5432/test), dropped afterwards.

Part 1, per call (``--sessions`` sessions per size, calls made one at a time).
memsvc reaches Redis and PostgreSQL, and the client reaches memsvc, through
counting proxies (memsvc/testing/_wire.py), which give per call: round trips, Redis
commands (a script call is one), PostgreSQL statements (Q/Execute messages, by
SQL verb) and bytes each way. CPU per call is read from /proc around each group
of calls: memsvc's process, the private Redis, and the PostgreSQL backends
connected to the run's database; memsvc's idle CPU and background traffic
(measured for 2 s before) are subtracted. Health probes and retention run every
hour in this run so that they stay out of the figures. Operations, at
``--sizes`` keys per session (default 100 and 1,000) of ``--value-bytes`` JSON
values (1 KiB, varied text), every lifecycle call with a ``request_id``:
Spawn (empty), BatchSet (filling, ``BATCH`` keys a call), Set and Get of one
key (``--wm-calls`` one at a time, then twice as many by 16 concurrent callers:
Redis's CPU per call drops when its event loop serves many clients at once),
CreateCheckpoint, Pause, Resume, Terminate with an
episode (the default) and without (``skip_consolidation``). Then the watch:
Spawn with 0, 1 and 10 unfiltered WatchLifecycle streams open; the differences
are the cost of delivering an event to the first watcher (the tail's read) and
to each further one. Baseline in the same run: a bare grpc.aio echo
(bench/_echo_server.py) answering a 1 KiB Get, for the CPU of any grpc.aio call.

Part 2, the event log's append ceiling: ``--writers`` concurrent writers for
``--seconds``, ``--repeats`` interleaved rounds, directly on PostgreSQL (no
proxy), into the same database:
``bare-insert`` (INSERT of an event row, sequence from a SEQUENCE: no counter
row, gaps possible), ``bare-counter`` (BEGIN; UPDATE counter RETURNING; INSERT;
COMMIT, the baseline of baselines.md), ``bare-append`` (memsvc's one-statement
append with pg_notify, in BEGIN/COMMIT, on copies of its tables),
``store-append`` (memsvc's PostgresDurableStore in this process: transaction
plus append_event) and ``grpc`` (Spawn then Terminate loops against a second
memsvc process connected directly, 2 events per loop; memsvc's default pools).
While each runs, pg_stat_activity is sampled every 20 ms: the mean number of
writers waiting on a lock (the counter row) says when the sequence is the
bottleneck.

Part 3: memsvc's resident memory (VmRSS, VmHWM from /proc): idle after start,
after part 1's sessions, and after part 2's load.

Rerun (about 4 minutes; results in bench/results/costs.json, see
docs/performance.md and docs/scaling.md)::

    flock /tmp/memsvc-bench.lock .venv/bin/python -m bench.costs
    .venv/bin/python -m bench.costs --sessions 5 --wm-calls 50 --seconds 1 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
import redis
from google.protobuf import struct_pb2

from bench._echo_server import ECHO_METHOD, GET_KEY, identity
from bench.lifecycle import _git_describe, _memsvc_at, cpu_ns
from bench.working_memory import MEMSVC, ROOT, SessionIds, _server, machine
from memsvc.domain import EventRecord, EventType, SessionRef
from memsvc.store.postgres import PostgresDurableStore
from memsvc.testing import (
    BackendUnreachable,
    PrivateRedis,
    WireCounts,
    WireMeter,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    require_backend,
)
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub

RESULTS = ROOT / "bench" / "results" / "costs.json"
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
POSTGRES_PORT = 5432
BATCH = 250
WM_KEYS = 16
WATCHERS = (0, 1, 10)
CONCURRENT_CALLERS = 16
IDLE_SECONDS = 2.0
SETTLE_SECONDS = 0.1
SAMPLE_SECONDS = 0.02
PATTERNS = ("bare-insert", "bare-counter", "bare-append", "store-append", "grpc")
QUIET = ("--health-interval-seconds", "3600", "--retention-interval-seconds", "3600")

_WORDS = (
    "agent", "plan", "tool", "search", "result", "page", "summary", "paper", "model", "token",
    "memory", "step", "retry", "answer", "source", "claim", "check", "table", "figure", "error",
    "cache", "index", "query", "user", "goal", "note", "draft", "final", "review", "budget",
    "latency", "cluster", "replica", "event", "order", "commit",
)  # fmt: skip


# --- the state ----------------------------------------------------------------------


def json_value(i: int, size: int, rng: random.Random) -> struct_pb2.Value:
    """A JSON object of about ``size`` bytes (compact encoding), with varied text."""
    data: dict[str, Any] = {"step": i, "kind": "observation", "ok": i % 3 != 0, "text": ""}
    room = size - len(json.dumps(data, separators=(",", ":")))
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < room:
        words.append(rng.choice(_WORDS))
    data["text"] = " ".join(words)[:room]
    value = struct_pb2.Value()
    value.struct_value.update(data)
    return value


# --- what is read around each group of calls ----------------------------------------


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(rest.split()[0])
    return found


def _safe_cpu_ns(pid: int) -> int:
    try:
        return cpu_ns(pid)
    except OSError:
        return 0


def backend_pids(database: str) -> list[int]:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,)
        ).fetchall()
    return [int(r[0]) for r in rows if os.path.exists(f"/proc/{r[0]}")]


@dataclass
class Reading:
    at: float
    memsvc_ns: int
    redis_ns: int
    postgres_ns: int
    redis: WireCounts
    postgres: WireCounts
    api: WireCounts


@dataclass
class Meters:
    memsvc_pid: int
    redis_pid: int
    database: str
    redis: WireMeter
    postgres: WireMeter
    api: WireMeter
    postgres_pids: list[int] = field(default_factory=list)

    def refresh(self) -> None:
        self.postgres_pids = backend_pids(self.database)

    def read(self) -> Reading:
        return Reading(
            time.perf_counter(),
            _safe_cpu_ns(self.memsvc_pid),
            _safe_cpu_ns(self.redis_pid),
            sum(_safe_cpu_ns(pid) for pid in self.postgres_pids),
            self.redis.snapshot(),
            self.postgres.snapshot(),
            self.api.snapshot(),
        )


@dataclass
class Rates:
    """Background per second (idle memsvc), subtracted from every group of calls."""

    memsvc_ns: float = 0.0
    redis_ns: float = 0.0
    postgres_ns: float = 0.0
    wire: dict[str, dict[str, float]] = field(default_factory=dict)


def _wire_numbers(counts: WireCounts) -> dict[str, float]:
    return {
        "round_trips": counts.round_trips,
        "commands": counts.commands,
        "bytes_up": counts.bytes_up,
        "bytes_down": counts.bytes_down,
    }


def rates_between(before: Reading, after: Reading) -> Rates:
    seconds = after.at - before.at
    wire = {
        name: {
            k: v / seconds
            for k, v in _wire_numbers(getattr(after, name).minus(getattr(before, name))).items()
        }
        for name in ("redis", "postgres", "api")
    }
    return Rates(
        (after.memsvc_ns - before.memsvc_ns) / seconds,
        (after.redis_ns - before.redis_ns) / seconds,
        (after.postgres_ns - before.postgres_ns) / seconds,
        wire,
    )


def per_call(
    op: str, keys: int, before: Reading, after: Reading, background: Rates, latencies: list[float]
) -> dict[str, Any]:
    """One row: the group's differences, less the background, divided by its calls."""
    calls = len(latencies)
    seconds = after.at - before.at
    row: dict[str, Any] = {
        "op": op,
        "keys": keys,
        "calls": calls,
        "p50_ms": statistics.median(latencies) * 1e3,
        "memsvc_cpu_us": max(
            0.0, (after.memsvc_ns - before.memsvc_ns - background.memsvc_ns * seconds) / calls / 1e3
        ),
        "redis_cpu_us": max(
            0.0, (after.redis_ns - before.redis_ns - background.redis_ns * seconds) / calls / 1e3
        ),
        "postgres_cpu_us": max(
            0.0,
            (after.postgres_ns - before.postgres_ns - background.postgres_ns * seconds)
            / calls
            / 1e3,
        ),
    }
    for name in ("redis", "postgres", "api"):
        delta = getattr(after, name).minus(getattr(before, name))
        idle = background.wire.get(name, {})
        for key, value in _wire_numbers(delta).items():
            row[f"{name}_{key}"] = max(0.0, (value - idle.get(key, 0.0) * seconds) / calls)
        row[f"{name}_by_name"] = {k: v / calls for k, v in sorted(delta.by_name.items())}
    return row


# --- part 1: per-call costs -----------------------------------------------------------


Call = Callable[[], Awaitable[object]]


@dataclass
class Part1:
    args: argparse.Namespace
    meters: Meters
    channel: grpc.aio.Channel
    project_id: str
    background: Rates = field(default_factory=Rates)
    rows: list[dict[str, Any]] = field(default_factory=list)
    rss: dict[str, dict[str, int]] = field(default_factory=dict)


async def _idle(meters: Meters) -> Rates:
    before = meters.read()
    await asyncio.sleep(IDLE_SECONDS)
    return rates_between(before, meters.read())


async def _group(
    run: Part1, op: str, keys: int, calls: list[Call], callers: int = 1
) -> dict[str, Any]:
    """The calls, ``callers`` at a time (each caller takes the next call in turn)."""
    gc.collect()
    run.meters.refresh()
    before = run.meters.read()
    latencies: list[float] = []
    queue = iter(calls)

    async def caller() -> None:
        for call in queue:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller() for _ in range(callers)))
    await asyncio.sleep(SETTLE_SECONDS)
    after = run.meters.read()
    row = per_call(op, keys, before, after, run.background, latencies)
    run.rows.append(row)
    print(
        f"{op:<28} {keys:>5} keys  {row['p50_ms']:7.2f} ms  memsvc {row['memsvc_cpu_us']:7.0f} µs"
        f"  redis rt {row['redis_round_trips']:.2f}  pg rt {row['postgres_round_trips']:.2f}"
        f"  pg stmts {row['postgres_commands']:.2f}",
        file=sys.stderr,
    )
    return row


def _rid() -> str:
    return str(uuid.uuid4())


async def _size(run: Part1, keys: int) -> None:
    args = run.args
    life = LifecycleServiceStub(run.channel)
    wm = WorkingMemoryServiceStub(run.channel)
    rng = random.Random(keys)
    sessions = [
        SessionIds(project_id=run.project_id, agent_instance_id=_rid(), session_id=f"s{keys}-{i}")
        for i in range(args.sessions)
    ]
    values = [json_value(i, args.value_bytes, rng) for i in range(keys)]

    def each(make: Callable[[SessionIds], Call]) -> list[Call]:
        return [make(ids) for ids in sessions]

    def spawn(ids: SessionIds) -> Call:
        return lambda: life.Spawn(lc.SpawnRequest(**ids, request_id=_rid()))

    await _group(run, "Spawn", 0, each(spawn))
    fills: list[Call] = []
    for ids in sessions:
        for start in range(0, keys, BATCH):
            entries = [
                pb.EntryInput(key=f"key-{i:05d}", value=values[i])
                for i in range(start, min(keys, start + BATCH))
            ]
            request = pb.BatchSetRequest(**ids, entries=entries)
            fills.append(lambda request=request: wm.BatchSet(request))  # type: ignore[misc]
    await _group(run, f"BatchSet ({min(BATCH, keys)} keys)", keys, fills)
    sets: list[Call] = []
    gets: list[Call] = []
    for j in range(args.wm_calls):
        ids = sessions[j % len(sessions)]
        set_request = pb.SetRequest(**ids, key=f"wm-{j % WM_KEYS:02d}", value=values[j % keys])
        get_request = pb.GetRequest(**ids, key=f"key-{j % keys:05d}")
        sets.append(lambda r=set_request: wm.Set(r))  # type: ignore[misc]
        gets.append(lambda r=get_request: wm.Get(r))  # type: ignore[misc]
    await _group(run, "Set (1 key)", keys, sets)
    await _group(run, "Get (1 key)", keys, gets)
    many = CONCURRENT_CALLERS
    await _group(run, f"Set (1 key), {many} callers", keys, [*sets, *sets], many)
    await _group(run, f"Get (1 key), {many} callers", keys, [*gets, *gets], many)

    def checkpoint(ids: SessionIds) -> Call:
        return lambda: life.CreateCheckpoint(lc.CreateCheckpointRequest(**ids, request_id=_rid()))

    def pause(ids: SessionIds) -> Call:
        return lambda: life.Pause(lc.PauseRequest(**ids, request_id=_rid()))

    def resume(ids: SessionIds) -> Call:
        return lambda: life.Resume(lc.ResumeRequest(**ids, request_id=_rid()))

    await _group(run, "CreateCheckpoint", keys, each(checkpoint))
    await _group(run, "Pause", keys, each(pause))
    await _group(run, "Resume", keys, each(resume))
    run.rss[f"after {args.sessions} sessions of {keys} keys"] = rss_kib(run.meters.memsvc_pid)
    half = len(sessions) // 2
    with_episode = [
        (lambda ids=ids: life.Terminate(lc.TerminateRequest(**ids, request_id=_rid())))
        for ids in sessions[:half]
    ]
    without = [
        (
            lambda ids=ids: life.Terminate(
                lc.TerminateRequest(**ids, skip_consolidation=True, request_id=_rid())
            )
        )
        for ids in sessions[half:]
    ]
    await _group(run, "Terminate, with episode", keys, with_episode)  # type: ignore[arg-type]
    await _group(run, "Terminate, no episode", keys, without)  # type: ignore[arg-type]


async def _watch(run: Part1) -> dict[int, dict[str, Any]]:
    """Spawn with 0, 1 and 10 unfiltered watchers open."""
    return {watchers: await _watch_group(run, watchers) for watchers in WATCHERS}


async def _watch_group(run: Part1, watchers: int) -> dict[str, Any]:
    life = LifecycleServiceStub(run.channel)
    calls_per_group = max(2 * run.args.sessions, 10)
    received = [0] * watchers
    done = asyncio.Event()
    ready = [asyncio.Event() for _ in range(watchers)]

    async def watch(index: int) -> None:
        stream = life.WatchLifecycle(lc.WatchLifecycleRequest(start=lc.WATCH_START_NOW))
        async for message in stream:
            if message.HasField("progress"):
                ready[index].set()
                continue
            received[index] += 1
            if all(n >= calls_per_group for n in received):
                done.set()

    def spawn(i: int) -> Call:
        request = lc.SpawnRequest(
            project_id=run.project_id,
            agent_instance_id=_rid(),
            session_id=f"w{watchers}-{i}",
            request_id=_rid(),
        )
        return lambda: life.Spawn(request)

    tasks = [asyncio.create_task(watch(i)) for i in range(watchers)]
    try:
        for event in ready:
            await asyncio.wait_for(event.wait(), 10)
        await asyncio.sleep(0.5)
        run.meters.refresh()  # the event tail's LISTEN connection, if any
        background = await _idle(run.meters) if watchers else run.background
        calls = [spawn(i) for i in range(calls_per_group)]
        gc.collect()
        before = run.meters.read()
        latencies = []
        for call in calls:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)
        if watchers:
            await asyncio.wait_for(done.wait(), 30)
        await asyncio.sleep(SETTLE_SECONDS)
        after = run.meters.read()
        row = per_call(f"Spawn, {watchers} watchers", 0, before, after, background, latencies)
        print(
            f"Spawn with {watchers:>2} watchers: memsvc {row['memsvc_cpu_us']:.0f} µs/event",
            file=sys.stderr,
        )
        return row
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def watch_rows(found: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per event: the first watcher (W1 - W0) and each further one ((W10 - W1) / 9)."""
    numeric = [k for k, v in found[0].items() if isinstance(v, float) and k != "p50_ms"]
    first = {k: max(0.0, found[1][k] - found[0][k]) for k in numeric}
    further = {k: max(0.0, (found[10][k] - found[1][k]) / 9) for k in numeric}
    return [
        {"what": "first watcher (event tail read + delivery)", **first},
        {"what": "each further watcher", **further},
    ]


async def _echo(port: int, pid: int, calls: int) -> float:
    """Server CPU µs per call of a bare grpc.aio echo of a 1 KiB Get."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = channel.unary_unary(
            ECHO_METHOD, request_serializer=identity, response_deserializer=identity
        )
        payload = pb.GetRequest(
            project_id=_rid(), agent_instance_id=_rid(), session_id="s", key=GET_KEY
        ).SerializeToString()
        for _ in range(50):
            await echo(payload)
        before = cpu_ns(pid)
        for _ in range(calls):
            await echo(payload)
        return (cpu_ns(pid) - before) / calls / 1e3


async def part1(run: Part1, echo_port: int, echo_pid: int) -> dict[str, Any]:
    life = LifecycleServiceStub(run.channel)
    warm = SessionIds(project_id=run.project_id, agent_instance_id=_rid(), session_id="warm")
    await life.Spawn(lc.SpawnRequest(**warm))
    await life.Terminate(lc.TerminateRequest(**warm))
    await asyncio.sleep(0.5)
    run.meters.refresh()
    run.background = await _idle(run.meters)
    for keys in run.args.sizes:
        await _size(run, keys)
    watch = watch_rows(await _watch(run))
    echo_us = await _echo(echo_port, echo_pid, run.args.wm_calls)
    return {"watch": watch, "echo_cpu_us": echo_us}


# --- part 2: the append ceiling ---------------------------------------------------------


_COLUMNS = (
    "sequence, event_id, event_type, project_id, agent_instance_id, session_id,"
    " agent_type_id, checkpoint_id, episode_id, request_id, metadata, event_time"
)
_VALUES = "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now()"
BARE_SETUP = """
CREATE TABLE bench_events (LIKE lifecycle_events INCLUDING ALL);
CREATE TABLE bench_free_events (LIKE lifecycle_events INCLUDING ALL);
CREATE TABLE bench_counter (LIKE event_sequence INCLUDING ALL);
INSERT INTO bench_counter VALUES (1, 0);
CREATE SEQUENCE bench_seq;
"""
BARE_INSERT = f"INSERT INTO bench_free_events ({_COLUMNS}) VALUES (nextval('bench_seq'), {_VALUES})"
BARE_COUNTER = "UPDATE bench_counter SET last_sequence = last_sequence + 1 RETURNING last_sequence"
BARE_COUNTER_INSERT = f"INSERT INTO bench_events ({_COLUMNS}) VALUES (%s, {_VALUES})"
BARE_APPEND = (
    "WITH s AS (UPDATE bench_counter SET last_sequence = last_sequence + 1"
    " RETURNING last_sequence), ins AS (INSERT INTO bench_events"
    f" ({_COLUMNS}) SELECT s.last_sequence, {_VALUES} FROM s RETURNING sequence)"
    " SELECT sequence, pg_notify('bench_events', sequence::text) FROM ins"
)


def _event_params(project: str) -> tuple[Any, ...]:
    return (_rid(), 1, project, _rid(), "s", None, None, None, None, "{}")


@dataclass
class Sampler:
    """pg_stat_activity of the run's database, every SAMPLE_SECONDS."""

    database: str
    samples: list[tuple[int, int, int]] = field(default_factory=list)  # active, lock, WAL/IO

    async def run(self, stop: asyncio.Event) -> None:
        async with await psycopg.AsyncConnection.connect(
            POSTGRES_ADMIN_URL, autocommit=True
        ) as conn:
            while not stop.is_set():
                cursor = await conn.execute(
                    "SELECT count(*) FILTER (WHERE state = 'active'),"
                    " count(*) FILTER (WHERE wait_event_type = 'Lock'),"
                    " count(*) FILTER (WHERE wait_event_type = 'IO'"
                    " OR wait_event IN ('WALWrite', 'WALInsert'))"
                    " FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'",
                    (self.database,),
                )
                row = await cursor.fetchone()
                assert row is not None
                self.samples.append((int(row[0]), int(row[1]), int(row[2])))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)

    def means(self) -> tuple[float, float, float]:
        if not self.samples:
            return 0.0, 0.0, 0.0
        return (
            statistics.fmean(s[0] for s in self.samples),
            statistics.fmean(s[1] for s in self.samples),
            statistics.fmean(s[2] for s in self.samples),
        )


@dataclass
class Part2:
    args: argparse.Namespace
    database_url: str
    database: str
    memsvc_port: int
    memsvc_pid: int
    project_id: str
    connections: list[psycopg.AsyncConnection[Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


async def _drive(
    writers: int, seconds: float, one: Callable[[int], Awaitable[int]]
) -> tuple[int, list[float], float]:
    """``writers`` closed loops of ``one(writer)`` (events it committed); warm-up first."""
    latencies: list[float] = []
    events = 0
    measuring = False
    end = 0.0

    async def loop(index: int) -> None:
        nonlocal events
        while (started := time.perf_counter()) < end:
            made = await one(index)
            if measuring and (ended := time.perf_counter()) <= end:
                events += made
                latencies.append(ended - started)

    end = time.perf_counter() + 0.5
    await asyncio.gather(*(loop(i) for i in range(writers)))
    measuring = True
    start = time.perf_counter()
    end = start + seconds
    await asyncio.gather(*(loop(i) for i in range(writers)))
    return events, latencies, seconds


async def _point(run: Part2, pattern: str, writers: int, round_: int) -> dict[str, Any]:
    project = run.project_id
    conns = run.connections
    store: PostgresDurableStore | None = None
    channel: grpc.aio.Channel | None = None

    async def bare_insert(i: int) -> int:
        async with conns[i].transaction():
            await conns[i].execute(BARE_INSERT, _event_params(project))
        return 1

    async def bare_counter(i: int) -> int:
        async with conns[i].transaction():
            cursor = await conns[i].execute(BARE_COUNTER)
            row = await cursor.fetchone()
            assert row is not None
            await conns[i].execute(BARE_COUNTER_INSERT, (row[0], *_event_params(project)))
        return 1

    async def bare_append(i: int) -> int:
        async with conns[i].transaction():
            cursor = await conns[i].execute(BARE_APPEND, _event_params(project))
            await cursor.fetchone()
        return 1

    async def store_append(i: int) -> int:
        assert store is not None
        ref = SessionRef(project, _rid(), "s")
        async with store.transaction() as tx:
            await tx.append_event(
                EventRecord(_rid(), EventType.SPAWNED, ref, None, time.time_ns() // 1_000_000)
            )
        return 1

    async def grpc_pair(i: int) -> int:
        assert channel is not None
        life = LifecycleServiceStub(channel)
        ids = SessionIds(project_id=project, agent_instance_id=_rid(), session_id="g")
        await life.Spawn(lc.SpawnRequest(**ids, request_id=_rid()))
        await life.Terminate(lc.TerminateRequest(**ids, skip_consolidation=True, request_id=_rid()))
        return 2

    loops: dict[str, Callable[[int], Awaitable[int]]] = {
        "bare-insert": bare_insert,
        "bare-counter": bare_counter,
        "bare-append": bare_append,
        "store-append": store_append,
        "grpc": grpc_pair,
    }
    async with contextlib.AsyncExitStack() as stack:
        if pattern == "store-append":
            store = PostgresDurableStore(run.database_url, max_connections=writers)
            await store.open()
            stack.push_async_callback(store.aclose)
        if pattern == "grpc":
            channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(f"127.0.0.1:{run.memsvc_port}")
            )
        gc.collect()
        pids = backend_pids(run.database)
        sampler = Sampler(run.database)
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stop))
        cpu0 = (time.process_time(), cpu_ns(run.memsvc_pid), sum(map(_safe_cpu_ns, pids)))
        events, latencies, seconds = await _drive(writers, run.args.seconds, loops[pattern])
        pids_after = set(backend_pids(run.database)) | set(pids)
        cpu1 = (time.process_time(), cpu_ns(run.memsvc_pid), sum(map(_safe_cpu_ns, pids_after)))
        stop.set()
        await sampling
    active, lock, wal = sampler.means()
    elapsed = seconds + 0.5  # CPU was read around warm-up and measurement
    row = {
        "round": round_,
        "pattern": pattern,
        "writers": writers,
        "events_per_s": events / seconds,
        "p50_ms": statistics.median(latencies) * 1e3 if latencies else None,
        "active": active,
        "waiting_lock": lock,
        "waiting_wal": wal,
        "client_cores": (cpu1[0] - cpu0[0]) / elapsed,
        "memsvc_cores": (cpu1[1] - cpu0[1]) / 1e9 / elapsed if pattern == "grpc" else None,
        "postgres_cores": (cpu1[2] - cpu0[2]) / 1e9 / elapsed,
    }
    print(
        f"round {round_} {pattern:<13} x{writers:<3} {row['events_per_s']:8.0f} events/s"
        f"  p50 {row['p50_ms'] or 0:6.2f} ms  waiting on lock {lock:5.2f} of {active:5.2f} active",
        file=sys.stderr,
    )
    return row


async def part2(run: Part2) -> None:
    async with await psycopg.AsyncConnection.connect(run.database_url, autocommit=True) as conn:
        await conn.execute(BARE_SETUP)
    most = max(run.args.writers)
    for _ in range(most):
        run.connections.append(
            await psycopg.AsyncConnection.connect(
                run.database_url, autocommit=True, prepare_threshold=None
            )
        )
    try:
        for round_ in range(1, run.args.repeats + 1):
            for writers in run.args.writers:
                for pattern in PATTERNS:
                    run.rows.append(await _point(run, pattern, writers, round_))
    finally:
        for conn in run.connections:
            await conn.close()


def ceiling_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over rounds; the ratio to bare-counter computed within each round."""
    base = {
        (r["round"], r["writers"]): r["events_per_s"]
        for r in rows
        if r["pattern"] == "bare-counter"
    }
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["writers"], r["pattern"]), []).append(r)
    out = []
    for (writers, pattern), group in sorted(
        groups.items(), key=lambda g: (g[0][0], PATTERNS.index(g[0][1]))
    ):
        ratios = [r["events_per_s"] / base[r["round"], writers] for r in group]
        summary: dict[str, Any] = {"writers": writers, "pattern": pattern, "rounds": len(group)}
        for name in ("events_per_s", "p50_ms", "active", "waiting_lock", "waiting_wal",
                     "client_cores", "memsvc_cores", "postgres_cores"):  # fmt: skip
            present = [r[name] for r in group if r[name] is not None]
            summary[name] = statistics.median(present) if present else None
        summary.update(
            ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios)
        )
        out.append(summary)
    return out


# --- tables ------------------------------------------------------------------------------


def _n(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def cost_table(rows: list[dict[str, Any]], echo_us: float) -> str:
    lines = [
        "| Op | Keys | Calls | p50 (ms) | memsvc CPU (µs) | Redis round trips | Redis commands "
        "| Redis bytes out / in | Redis CPU (µs) | PG round trips | PG statements "
        "| PG bytes out / in | PG CPU (µs) | API bytes in / out |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        f"| echo (bare grpc.aio, 1 KiB Get) | - | - | - | {echo_us:.0f} | - | - | - | - | - | - "
        "| - | - | - |",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['keys']:,} | {r['calls']} | {r['p50_ms']:.2f} "
            f"| {_n(r['memsvc_cpu_us'], 0)} | {_n(r['redis_round_trips'], 2)} "
            f"| {_n(r['redis_commands'], 2)} "
            f"| {_n(r['redis_bytes_up'], 0)} / {_n(r['redis_bytes_down'], 0)} "
            f"| {_n(r['redis_cpu_us'], 0)} | {_n(r['postgres_round_trips'], 2)} "
            f"| {_n(r['postgres_commands'], 2)} "
            f"| {_n(r['postgres_bytes_up'], 0)} / {_n(r['postgres_bytes_down'], 0)} "
            f"| {_n(r['postgres_cpu_us'], 0)} "
            f"| {_n(r['api_bytes_up'], 0)} / {_n(r['api_bytes_down'], 0)} |"
        )
    return "\n".join(lines) + "\n"


def statement_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| Op | Keys | PostgreSQL statements per call | Redis commands per call |",
        "|---|--:|---|---|",
    ]
    for r in rows:
        pg = ", ".join(f"{k} {v:.2g}" for k, v in r["postgres_by_name"].items() if v >= 0.05)
        rd = ", ".join(f"{k} {v:.2g}" for k, v in r["redis_by_name"].items() if v >= 0.05)
        lines.append(f"| {r['op']} | {r['keys']:,} | {pg or '-'} | {rd or '-'} |")
    return "\n".join(lines) + "\n"


def watch_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| Per event delivered | memsvc CPU (µs) | PG round trips | PG statements "
        "| PG bytes out / in | PG CPU (µs) | API bytes out |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['what']} | {_n(r['memsvc_cpu_us'], 0)} | {_n(r['postgres_round_trips'], 2)} "
            f"| {_n(r['postgres_commands'], 2)} "
            f"| {_n(r['postgres_bytes_up'], 0)} / {_n(r['postgres_bytes_down'], 0)} "
            f"| {_n(r['postgres_cpu_us'], 0)} | {_n(r['api_bytes_down'], 0)} |"
        )
    return "\n".join(lines) + "\n"


def ceiling_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| Writers | Pattern | Events/s | p50 (ms) | Active backends | Waiting on a lock "
        "| Waiting on WAL/IO | Client cores | memsvc cores | PostgreSQL cores "
        "| / bare-counter (range) |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
        if r["pattern"] == "bare-counter":
            ratio = "baseline"
        lines.append(
            f"| {r['writers']} | {r['pattern']} | {r['events_per_s']:,.0f} | {_n(r['p50_ms'], 2)} "
            f"| {_n(r['active'], 2)} | {_n(r['waiting_lock'], 2)} | {_n(r['waiting_wal'], 2)} "
            f"| {_n(r['client_cores'], 2)} | {_n(r['memsvc_cores'], 2)} "
            f"| {_n(r['postgres_cores'], 2)} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def rss_table(rss: dict[str, dict[str, int]]) -> str:
    lines = ["| memsvc process | VmRSS (MiB) | VmHWM, peak (MiB) |", "|---|--:|--:|"]
    for when, found in rss.items():
        lines.append(
            f"| {when} | {found.get('VmRSS', 0) / 1024:.1f} | {found.get('VmHWM', 0) / 1024:.1f} |"
        )
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", type=_ints, default=[100, 1000], help="keys per session")
    parser.add_argument("--value-bytes", type=int, default=1024, help="JSON value size")
    parser.add_argument("--sessions", type=int, default=20, help="sessions per size (part 1)")
    parser.add_argument("--wm-calls", type=int, default=300, help="Set and Get calls per size")
    parser.add_argument("--writers", type=_ints, default=[1, 4, 16], help="concurrent writers")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per ceiling figure")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved ceiling rounds")
    parser.add_argument("--skip-ceiling", action="store_true", help="leave out part 2")
    parser.add_argument(
        "--git-ref", default="", help="run memsvc as committed at this ref instead of the work tree"
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def _database() -> Iterator[str]:
    url = create_postgres_database(POSTGRES_ADMIN_URL, "memsvc_costs")
    try:
        yield url
    finally:
        drop_postgres_database(POSTGRES_ADMIN_URL, url)


def _memsvc_argv(
    command: list[str], port: int, data_dir: Path, redis_url: str, db_url: str
) -> list[str]:
    data_dir.mkdir(exist_ok=True)
    return [
        *command, "serve", "--health-listen=", "--metrics-listen=",
        "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
        "--working-memory-url", redis_url, "--database-url", db_url, *QUIET,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        require_backend(POSTGRES_ADMIN_URL)
    except BackendUnreachable as error:
        print(f"{error}; the cost benchmark needs PostgreSQL", file=sys.stderr)
        return 2
    started = datetime.now(UTC)
    project_id = _rid()
    results: dict[str, Any] = {}
    rss: dict[str, dict[str, int]] = {}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="memsvc-costs-")))
        private = PrivateRedis(free_port(), workdir / "redis")
        private.start()
        stack.callback(private.kill)
        database_url = stack.enter_context(_database())
        database = database_url.rsplit("/", 1)[1]
        command = [str(MEMSVC)]
        if args.git_ref:
            command = _memsvc_at(args.git_ref, workdir / "source")
        redis_meter = stack.enter_context(WireMeter(private.port, "redis"))
        pg_meter = stack.enter_context(WireMeter(POSTGRES_PORT, "postgres"))
        with redis.Redis.from_url(private.url) as client:
            redis_pid = int(client.info("server")["process_id"])
        echo_port = free_port()
        echo_argv = [
            sys.executable,
            "-m",
            "bench._echo_server",
            str(echo_port),
            str(args.value_bytes),
        ]
        echo = stack.enter_context(_server("echo", echo_argv, workdir, echo_port))
        # Part 1: memsvc through the meters.
        port = free_port()
        metered_db = f"postgresql://postgres@127.0.0.1:{pg_meter.port}/{database}?sslmode=disable"
        argv1 = _memsvc_argv(
            command, port, workdir / "m1", f"redis://127.0.0.1:{redis_meter.port}/0", metered_db
        )
        with _server("memsvc-metered", argv1, workdir, port) as memsvc, WireMeter(port) as api:
            time.sleep(2.0)
            rss["idle, 2 s after start"] = rss_kib(memsvc.pid)
            meters = Meters(memsvc.pid, redis_pid, database, redis_meter, pg_meter, api)

            async def run_part1() -> tuple[Part1, dict[str, Any]]:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{api.port}") as channel:
                    run = Part1(args, meters, channel, project_id)
                    extra = await part1(run, echo.port, echo.pid)
                    return run, extra

            run1, extra = asyncio.run(run_part1())
            rss.update(run1.rss)
            rss["after part 1 (all sessions terminated)"] = rss_kib(memsvc.pid)
        results["background_per_s"] = {
            "memsvc_cpu_us": run1.background.memsvc_ns / 1e3,
            "wire": run1.background.wire,
        }
        results["per_call"] = run1.rows
        results["watch"] = extra["watch"]
        results["echo_cpu_us"] = extra["echo_cpu_us"]
        # Part 2: a second memsvc connected directly, and writers in this process.
        if not args.skip_ceiling:
            port2 = free_port()
            argv2 = _memsvc_argv(command, port2, workdir / "m2", private.url, database_url)
            with _server("memsvc-direct", argv2, workdir, port2) as direct:
                time.sleep(1.0)
                rss["second process, idle"] = rss_kib(direct.pid)
                run2 = Part2(args, database_url, database, port2, direct.pid, project_id)
                asyncio.run(part2(run2))
                rss["second process, after part 2 (grpc writers)"] = rss_kib(direct.pid)
            results["ceiling_rows"] = run2.rows
            results["ceiling"] = ceiling_summary(run2.rows)
    tables = [
        cost_table(results["per_call"], results["echo_cpu_us"]),
        statement_table(results["per_call"]),
        watch_table(results["watch"]),
        rss_table(rss),
    ]
    if "ceiling" in results:
        tables.append(ceiling_table(results["ceiling"]))
    for table in tables:
        print(table)
    described = _git_describe(args.git_ref)
    print(f"memsvc {described}")
    document = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "memsvc": described,
        "settings": vars(args),
        "rss_kib": rss,
        **results,
        "tables": tables,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"JSON results: {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
