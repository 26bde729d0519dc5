"""Soak: many agents loop through the lifecycle while watchers follow, for minutes.

One ``memsvc serve`` process on the production deployment: working memory in the
local Redis (127.0.0.1:6379), durable store in a fresh PostgreSQL database made
for the run (dropped at the end, with the Redis keys of the run's project), auth
off, no probe or metrics port. Retention is shortened so that it runs during a
soak: checkpoints expire after ``--checkpoint-max-age`` s, request ids after
``--request-id-ttl`` s, events after ``--event-max-age`` s, swept every
``--retention-interval`` s. (Sessions and episodes have no retention, so the
database grows all the same; its size is reported.)

``--agents`` agents (asyncio tasks in this process, on ``--channels`` shared
channels) each loop, closed-loop (``--think-ms`` between calls, 0 by default),
one new session per loop:

    Spawn (5 seeded entries) -> Set x3, Get x3, BatchSet (10 keys) ->
    CreateCheckpoint -> Pause -> Resume -> Set x2, Get x2, BatchSet (10 keys) ->
    Terminate (records an episode)

Every lifecycle call carries a request id. No call is retried: every failed call
(any status, ``--call-timeout`` deadline) is an error, counted by method and code,
and its session is abandoned for the next one.

``--watchers`` watchers follow ``WatchLifecycle`` for the run's project from the
oldest event (one channel each). The database holds that project alone, so every
event matches the filter and each watcher must see sequences 1, 2, 3... without a
gap, repetition or reordering. At the end (after the agents finish their loops),
each watcher catches up to the head, and must have seen every acknowledged
lifecycle call's event exactly once (by request id) and no event of a call that
was not acknowledged; any other event would be the retention sweep's
CHECKPOINT_DELETED (none in this loop: Terminate deletes a session's
checkpoints). A stream that ends is an error; the watcher then resumes
from its cursor, as a client would.

Every ``--interval`` seconds one line: calls/s by method, errors by code, memsvc's
RSS (VmRSS of /proc/<pid>/status), Redis used_memory and the project's key count,
the database size and row counts, the watchers' delivery lag (receive time
minus the event's ``event_time``, p99 and max over the interval) and the load
average. RSS is sampled
every second. At the end: totals, the zero-errors verdict, and memory growth
after warm-up: the median RSS of the last minute against the median of the
minute after ``--warmup-minutes``. The run fails (exit status 1) on any error, on
any watcher discrepancy, or when that growth exceeds ``--rss-growth-limit``
(10% by default: docs/performance.md, "Soak", says why).

Rerun (results in bench/results/soak.json, see docs/performance.md)::

    .venv/bin/python -m bench.soak --minutes 10 --agents 20 --watchers 4  # under flock, see docs
    .venv/bin/python -m bench.soak --minutes 1.5 --warmup-minutes 0.25 --interval 5  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
import redis.asyncio as aioredis
from google.protobuf import duration_pb2, struct_pb2

from bench.working_memory import (
    REDIS_URL,
    ROOT,
    SessionIds,
    Target,
    _delete_redis_keys,
    _memsvc,
    machine,
)
from memsvc.testing import (
    BackendUnreachable,
    create_postgres_database,
    drop_postgres_database,
    require_backend,
)
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub

RESULTS = ROOT / "bench" / "results" / "soak.json"
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
TABLES = {  # table: its name in the lines
    "sessions": "sessions",
    "checkpoints": "ckpts",
    "lifecycle_events": "events",
    "request_log": "reqids",
    "episodes": "episodes",
}
AGENT_TYPE_ID = str(uuid.uuid4())
SEED_KEYS = 5
BATCH_KEYS = 10
CATCH_UP_SECONDS = 60.0
MIB = 1024 * 1024
OPS = (
    "Spawn",
    "Set",
    "Get",
    "BatchSet",
    "CreateCheckpoint",
    "Pause",
    "Resume",
    "Terminate",
)
SHORT = {
    "Spawn": "spawn",
    "Set": "set",
    "Get": "get",
    "BatchSet": "bset",
    "CreateCheckpoint": "ckpt",
    "Pause": "pause",
    "Resume": "resume",
    "Terminate": "term",
}


class CallFailed(Exception):
    """A call failed; it is already counted."""


@dataclass
class Stats:
    """What the agents and watchers did, for the whole run and the current interval."""

    calls: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # "Method CODE"
    interval_calls: Counter[str] = field(default_factory=Counter)
    interval_errors: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)  # whole run, seconds
    error_details: list[str] = field(default_factory=list)
    acknowledged: dict[str, str] = field(default_factory=dict)  # request id -> method
    sessions: int = 0

    def ok(self, op: str, seconds: float) -> None:
        self.calls[op] += 1
        self.interval_calls[op] += 1
        self.latencies.setdefault(op, []).append(seconds)

    def error(self, op: str, code: str, detail: str) -> None:
        key = f"{op} {code}"
        self.errors[key] += 1
        self.interval_errors[key] += 1
        if len(self.error_details) < 50:  # the first ones, printed and kept with the results
            stamp = datetime.now(UTC).strftime("%H:%M:%S")
            self.error_details.append(f"{stamp} {key}: {detail}")
            print(f"  ! {stamp} {key}: {detail}", file=sys.stderr)


@dataclass
class Watcher:
    """One WatchLifecycle follower and what it checked."""

    name: str
    last_sequence: int = 0
    events: int = 0
    seen: Counter[str] = field(default_factory=Counter)  # request id -> events
    other_events: Counter[str] = field(default_factory=Counter)  # no request id, by type
    anomalies: list[str] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)  # this interval, seconds
    max_lag: float = 0.0
    reconnects: int = 0

    def anomaly(self, text: str) -> None:
        if len(self.anomalies) < 20:
            self.anomalies.append(text)
        print(f"  ! watcher {self.name}: {text}", file=sys.stderr)


def _value(data: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if isinstance(data, dict):
        value.struct_value.update(data)
    else:
        value.string_value = str(data)
    return value


def _note(i: int, loop: int) -> struct_pb2.Value:
    return _value({"step": i, "loop": loop, "text": f"observation {i} of loop {loop} " * 4})


class Agent:
    """One agent: a new session per loop, through the whole lifecycle."""

    def __init__(
        self, channel: grpc.aio.Channel, project_id: str, stats: Stats, args: argparse.Namespace
    ) -> None:
        self._life = LifecycleServiceStub(channel)
        self._memory = WorkingMemoryServiceStub(channel)
        self._project_id = project_id
        self._agent_id = str(uuid.uuid4())
        self._agent_type_id = AGENT_TYPE_ID
        self._stats = stats
        self._timeout = args.call_timeout
        self._think = args.think_ms / 1000

    async def _call(
        self, op: str, method: Callable[..., Awaitable[Any]], request: Any, request_id: str = ""
    ) -> None:
        if self._think:
            await asyncio.sleep(self._think)
        started = time.perf_counter()
        try:
            await method(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            self._stats.error(op, error.code().name, error.details() or "")
            raise CallFailed from None
        self._stats.ok(op, time.perf_counter() - started)
        if request_id:
            self._stats.acknowledged[request_id] = op

    async def run(self, end: float) -> None:
        loop = 0
        while time.monotonic() < end:
            loop += 1
            try:
                await self._session(loop)
            except CallFailed:
                await asyncio.sleep(0.1)  # the session is abandoned; do not spin on a failure

    async def _session(self, loop: int) -> None:
        life, memory = self._life, self._memory
        ids = SessionIds(
            project_id=self._project_id,
            agent_instance_id=self._agent_id,
            session_id=f"soak-{loop:06d}",
        )
        self._stats.sessions += 1
        seed = [pb.EntryInput(key=f"seed-{i}", value=_note(i, loop)) for i in range(SEED_KEYS)]
        rid = str(uuid.uuid4())
        spawn = lc.SpawnRequest(
            **ids, agent_type_id=self._agent_type_id, initial_entries=seed, request_id=rid
        )
        await self._call("Spawn", life.Spawn, spawn, rid)
        ttl = duration_pb2.Duration(seconds=3600)
        for i in range(3):
            request = pb.SetRequest(**ids, key=f"note-{i}", value=_note(i, loop), ttl=ttl)
            await self._call("Set", memory.Set, request)
        for key in ("note-0", "note-1", "seed-0"):
            await self._call("Get", memory.Get, pb.GetRequest(**ids, key=key))
        batch = [pb.EntryInput(key=f"batch-{i}", value=_note(i, loop)) for i in range(BATCH_KEYS)]
        await self._call("BatchSet", memory.BatchSet, pb.BatchSetRequest(**ids, entries=batch))
        rid = str(uuid.uuid4())
        checkpoint = lc.CreateCheckpointRequest(**ids, request_id=rid)
        await self._call("CreateCheckpoint", life.CreateCheckpoint, checkpoint, rid)
        rid = str(uuid.uuid4())
        await self._call("Pause", life.Pause, lc.PauseRequest(**ids, request_id=rid), rid)
        rid = str(uuid.uuid4())
        await self._call("Resume", life.Resume, lc.ResumeRequest(**ids, request_id=rid), rid)
        for i in range(3, 5):
            request = pb.SetRequest(**ids, key=f"note-{i}", value=_note(i, loop))
            await self._call("Set", memory.Set, request)
        for key in ("note-3", "batch-0"):
            await self._call("Get", memory.Get, pb.GetRequest(**ids, key=key))
        batch = [pb.EntryInput(key=f"late-{i}", value=_note(i, loop)) for i in range(BATCH_KEYS)]
        await self._call("BatchSet", memory.BatchSet, pb.BatchSetRequest(**ids, entries=batch))
        rid = str(uuid.uuid4())
        terminate = lc.TerminateRequest(
            **ids,
            task_description=f"soak loop {loop}",
            outcome=lc.OUTCOME_SUCCESS,
            lessons_learned=["checkpoint before pausing", f"loop {loop} went fine"],
            request_id=rid,
        )
        await self._call("Terminate", life.Terminate, terminate, rid)


def _event_seconds(event: lc.LifecycleEvent) -> float:
    return event.event_time.seconds + event.event_time.nanos / 1e9


async def follow(target: str, project_id: str, watcher: Watcher, stats: Stats) -> None:
    """Follow the project's events from the oldest until cancelled; reconnect from
    the cursor when the stream ends."""
    async with grpc.aio.insecure_channel(target) as channel:
        life = LifecycleServiceStub(channel)
        while True:
            request = lc.WatchLifecycleRequest(
                project_id=project_id,
                progress_interval=duration_pb2.Duration(seconds=1),
            )
            if watcher.last_sequence:
                request.after_sequence = watcher.last_sequence
            else:
                request.start = lc.WATCH_START_OLDEST
            try:
                async for response in life.WatchLifecycle(request):
                    if response.HasField("event"):
                        _observe(watcher, response.event)
                stats.error("WatchLifecycle", "OK", f"watcher {watcher.name}: the stream ended")
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.CANCELLED:
                    raise asyncio.CancelledError from None
                stats.error("WatchLifecycle", error.code().name, error.details() or "")
            watcher.reconnects += 1
            await asyncio.sleep(0.5)


def _observe(watcher: Watcher, event: lc.LifecycleEvent) -> None:
    now = time.time()
    expected = watcher.last_sequence + 1
    if event.sequence != expected:
        watcher.anomaly(f"sequence {event.sequence} where {expected} was due")
    watcher.last_sequence = max(watcher.last_sequence, event.sequence)
    watcher.events += 1
    if event.request_id:
        watcher.seen[event.request_id] += 1
    else:
        watcher.other_events[lc.EventType.Name(event.event_type)] += 1
    lag = max(0.0, now - _event_seconds(event))
    watcher.lags.append(lag)
    watcher.max_lag = max(watcher.max_lag, lag)


async def head_sequence(target: str, project_id: str) -> int:
    """The newest event's sequence: the position a watch starting now starts after."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = LifecycleServiceStub(channel).WatchLifecycle(
            lc.WatchLifecycleRequest(project_id=project_id, start=lc.WATCH_START_NOW)
        )
        first = await call.read()
        call.cancel()
    if not isinstance(first, lc.WatchLifecycleResponse) or not first.HasField("progress"):
        raise RuntimeError(f"a watch did not start with a progress: {first}")
    return int(first.progress.sequence)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Backends:
    """Readings of Redis and the run's database."""

    redis: aioredis.Redis
    database: psycopg.AsyncConnection[Any]
    project_pattern: str

    async def redis_reading(self) -> tuple[int, int]:
        """used_memory, and how many keys the run's project holds."""
        info = await self.redis.info("memory")
        keys = 0
        async for _ in self.redis.scan_iter(match=self.project_pattern, count=1000):
            keys += 1
        return int(info["used_memory"]), keys

    async def database_reading(self) -> tuple[int, dict[str, int]]:
        """pg_database_size, and the row count of each table of TABLES."""
        size_row = await (
            await self.database.execute("SELECT pg_database_size(current_database())")
        ).fetchone()
        counts = {}
        for table in TABLES:
            row = await (await self.database.execute(f"SELECT count(*) FROM {table}")).fetchone()
            counts[table] = int(row[0]) if row else -1
        return int(size_row[0]) if size_row else -1, counts


@dataclass
class Reading:
    elapsed: float
    calls_per_s: dict[str, float]
    errors: dict[str, int]
    rss: int
    redis_used_memory: int
    redis_project_keys: int
    database_bytes: int
    rows: dict[str, int]
    lag_p99_ms: float
    lag_max_ms: float
    sessions: int
    load: float  # the machine's 1-minute load average


def _p99(values: list[float]) -> float:
    if not values:
        return math.nan
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[98]


async def report(
    server: Target,
    backends: Backends,
    stats: Stats,
    watchers: list[Watcher],
    started: float,
    interval: float,
    rss_samples: list[tuple[float, int]],
    readings: list[Reading],
) -> None:
    """Sample RSS every second; every ``interval`` seconds print a line (until cancelled)."""
    next_line = started + interval
    last_line = started
    while True:
        await asyncio.sleep(1.0 - (time.monotonic() - started) % 1.0)
        now = time.monotonic()
        rss_samples.append((now - started, rss_bytes(server.pid)))
        if now < next_line:
            continue
        next_line += interval
        seconds, last_line = now - last_line, now
        used_memory, project_keys = await backends.redis_reading()
        database_bytes, rows = await backends.database_reading()
        lags = [lag for w in watchers for lag in w.lags]
        for w in watchers:
            w.lags = []
        reading = Reading(
            elapsed=now - started,
            calls_per_s={op: stats.interval_calls[op] / seconds for op in OPS},
            errors=dict(stats.interval_errors),
            rss=rss_samples[-1][1],
            redis_used_memory=used_memory,
            redis_project_keys=project_keys,
            database_bytes=database_bytes,
            rows=rows,
            lag_p99_ms=_p99(lags) * 1e3,
            lag_max_ms=max(lags, default=math.nan) * 1e3,
            sessions=stats.sessions,
            load=os.getloadavg()[0],
        )
        stats.interval_calls.clear()
        stats.interval_errors.clear()
        readings.append(reading)
        print(_line(reading), flush=True)


def _line(r: Reading) -> str:
    total = sum(r.calls_per_s.values())
    by_op = " ".join(f"{SHORT[op]} {r.calls_per_s[op]:.0f}" for op in OPS)
    errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "0"
    rows = " ".join(f"{TABLES[t]} {n}" for t, n in r.rows.items())
    return (
        f"[{r.elapsed:5.0f}s] {total:6.0f} calls/s ({by_op}) errors {errors} | "
        f"memsvc RSS {r.rss / MIB:6.1f} MiB | redis {r.redis_used_memory / MIB:5.1f} MiB "
        f"{r.redis_project_keys} keys | db {r.database_bytes / MIB:5.1f} MiB ({rows}) | "
        f"watch lag p99 {r.lag_p99_ms:5.0f} ms max {r.lag_max_ms:5.0f} ms | load {r.load:.1f}"
    )


def _window_median(samples: list[tuple[float, int]], start: float, end: float) -> float:
    values = [rss for t, rss in samples if start <= t < end]
    return float(statistics.median(values)) if values else math.nan


def _slope_mib_per_min(samples: list[tuple[float, int]], start: float) -> float:
    points = [(t / 60, rss / MIB) for t, rss in samples if t >= start]
    if len(points) < 3:
        return math.nan
    mean_t = statistics.fmean(t for t, _ in points)
    mean_r = statistics.fmean(r for _, r in points)
    num = sum((t - mean_t) * (r - mean_r) for t, r in points)
    den = sum((t - mean_t) ** 2 for t, _ in points)
    return num / den if den else math.nan


def check_watchers(watchers: list[Watcher], stats: Stats, head: int) -> list[str]:
    """What the watchers got wrong: gaps, repeats, missing or unacknowledged events."""
    problems: list[str] = []
    acknowledged = stats.acknowledged
    for w in watchers:
        problems += [f"watcher {w.name}: {text}" for text in w.anomalies]
        if w.last_sequence < head:
            problems.append(f"watcher {w.name}: at sequence {w.last_sequence}, head {head}")
        missing = [rid for rid in acknowledged if w.seen[rid] == 0]
        repeated = [rid for rid, n in w.seen.items() if n > 1]
        unknown = [rid for rid in w.seen if rid not in acknowledged]
        if missing:
            problems.append(
                f"watcher {w.name}: {len(missing)} acknowledged call(s) without an event, "
                f"e.g. {acknowledged[missing[0]]} {missing[0]}"
            )
        if repeated:
            problems.append(f"watcher {w.name}: {len(repeated)} request id(s) seen twice or more")
        if unknown:
            problems.append(
                f"watcher {w.name}: {len(unknown)} event(s) of calls not acknowledged "
                f"(failed calls that committed?), e.g. {unknown[0]}"
            )
    return problems


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the agents loop")
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--watchers", type=int, default=4)
    parser.add_argument("--channels", type=int, default=4, help="channels the agents share")
    parser.add_argument("--think-ms", type=float, default=0.0, help="pause before each call")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between lines")
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument(
        "--rss-growth-limit",
        type=float,
        default=0.10,
        help="largest accepted RSS growth after warm-up, as a fraction (default 0.10)",
    )
    parser.add_argument("--call-timeout", type=float, default=10.0, help="deadline of each call")
    parser.add_argument("--retention-interval", type=float, default=10.0)
    parser.add_argument("--checkpoint-max-age", type=int, default=60)
    parser.add_argument("--request-id-ttl", type=int, default=120)
    parser.add_argument("--event-max-age", type=int, default=120)
    return parser.parse_args(argv)


@dataclass
class Outcome:
    readings: list[Reading]
    rss_samples: list[tuple[float, int]]
    watchers: list[Watcher]
    head: int
    seconds: float
    leftover_redis_keys: int


async def _catch_up(watchers: list[Watcher], head: int) -> None:
    """Wait (at most CATCH_UP_SECONDS) until every watcher has reached ``head``."""
    deadline = time.monotonic() + CATCH_UP_SECONDS
    behind = [w for w in watchers if w.last_sequence < head]
    while behind and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        behind = [w for w in behind if w.last_sequence < head]


async def _soak(
    args: argparse.Namespace, server: Target, project_id: str, database_url: str, stats: Stats
) -> Outcome:
    target = f"127.0.0.1:{server.port}"
    watchers = [Watcher(f"w{i}") for i in range(args.watchers)]
    rss_samples: list[tuple[float, int]] = []
    readings: list[Reading] = []
    pattern = f"memsvc:wm:{{{project_id.replace('-', '')}.*"
    redis_client = aioredis.Redis.from_url(REDIS_URL)
    database = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    backends = Backends(redis_client, database, pattern)
    channels = [grpc.aio.insecure_channel(target) for _ in range(args.channels)]
    try:
        follows = [asyncio.create_task(follow(target, project_id, w, stats)) for w in watchers]
        started = time.monotonic()
        reporter = asyncio.create_task(
            report(server, backends, stats, watchers, started, args.interval, rss_samples, readings)
        )
        end = started + args.minutes * 60
        agents = [
            Agent(channels[i % len(channels)], project_id, stats, args) for i in range(args.agents)
        ]
        await asyncio.gather(*(agent.run(end) for agent in agents))
        seconds = time.monotonic() - started
        head = await head_sequence(target, project_id)
        await _catch_up(watchers, head)
        for task in [*follows, reporter]:
            task.cancel()
        await asyncio.gather(*follows, reporter, return_exceptions=True)
        _, leftover = await backends.redis_reading()
        return Outcome(readings, rss_samples, watchers, head, seconds, leftover)
    finally:
        for channel in channels:
            await channel.close()
        await database.close()
        await redis_client.aclose()


def summarize(args: argparse.Namespace, stats: Stats, outcome: Outcome) -> tuple[str, bool]:
    lines: list[str] = []
    total_calls = sum(stats.calls.values())
    lines.append(
        f"{outcome.seconds:.0f} s, {args.agents} agents, {args.watchers} watchers: "
        f"{total_calls:,} calls ({total_calls / outcome.seconds:,.0f}/s), "
        f"{stats.sessions:,} sessions, {outcome.head:,} events"
    )
    for op in OPS:
        lat = stats.latencies.get(op, [])
        cuts = (
            statistics.quantiles(lat, n=100, method="inclusive")
            if len(lat) > 1
            else [math.nan] * 99
        )
        lines.append(
            f"  {op:16} {stats.calls[op]:8,} calls {stats.calls[op] / outcome.seconds:7.1f}/s "
            f"p50 {cuts[49] * 1e3:6.1f} ms p99 {cuts[98] * 1e3:6.1f} ms"
        )
    errors = sum(stats.errors.values())
    lines.append(f"errors: {errors}" + (f" {dict(stats.errors)}" if errors else ""))
    problems = check_watchers(outcome.watchers, stats, outcome.head)
    for w in outcome.watchers:
        lines.append(
            f"  watcher {w.name}: {w.events:,} events up to sequence {w.last_sequence:,} "
            f"(head {outcome.head:,}), {sum(w.seen.values()):,} of acknowledged calls "
            f"({len(stats.acknowledged):,} acknowledged), others {dict(w.other_events)}, "
            f"max lag {w.max_lag * 1e3:.0f} ms, reconnects {w.reconnects}"
        )
    lines.append(f"watchers: {problems if problems else 'every event once, in order, gap-free'}")
    warm = args.warmup_minutes * 60
    baseline = _window_median(outcome.rss_samples, warm, warm + 60)
    last = outcome.rss_samples[-1][0] if outcome.rss_samples else 0.0
    final = _window_median(outcome.rss_samples, last - 60, last + 1)
    growth = (final - baseline) / baseline if baseline else math.nan
    slope = _slope_mib_per_min(outcome.rss_samples, warm)
    peak = max((rss for _, rss in outcome.rss_samples), default=0)
    first = outcome.rss_samples[0][1] if outcome.rss_samples else 0
    rss_ok = not math.isnan(growth) and growth <= args.rss_growth_limit
    lines.append(
        f"memsvc RSS: {first / MIB:.1f} MiB at 1 s, {baseline / MIB:.1f} MiB after warm-up "
        f"(median of minute {args.warmup_minutes:g}-{args.warmup_minutes + 1:g}), "
        f"{final / MIB:.1f} MiB at the end (median of the last minute), peak {peak / MIB:.1f} MiB; "
        f"growth {growth * 100:+.1f}% (limit {args.rss_growth_limit * 100:.0f}%), "
        f"trend after warm-up {slope:+.2f} MiB/min"
    )
    if outcome.readings:
        r0, r1 = outcome.readings[0], outcome.readings[-1]
        lines.append(
            f"redis used_memory {r0.redis_used_memory / MIB:.1f} -> "
            f"{r1.redis_used_memory / MIB:.1f} MiB; "
            f"project keys after the agents stopped: {outcome.leftover_redis_keys}; "
            f"database {r0.database_bytes / MIB:.1f} -> {r1.database_bytes / MIB:.1f} MiB, "
            f"rows {r1.rows}"
        )
    passed = errors == 0 and not problems and rss_ok
    lines.append(
        "VERDICT: "
        + ("PASS" if passed else "FAIL")
        + f" (errors {errors}, watcher problems {len(problems)}, "
        + f"RSS growth {growth * 100:+.1f}% {'<=' if rss_ok else '>'} "
        + f"{args.rss_growth_limit * 100:.0f}%)"
    )
    return "\n".join(lines), passed


def _write_results(
    args: argparse.Namespace, started: datetime, stats: Stats, outcome: Outcome, summary: str
) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    document = {
        "started": started.isoformat(timespec="seconds"),
        "memsvc": commit,
        "machine": machine(),
        "settings": vars(args),
        "calls": dict(stats.calls),
        "errors": dict(stats.errors),
        "error_details": stats.error_details,
        "sessions": stats.sessions,
        "head_sequence": outcome.head,
        "watchers": [
            {
                "name": w.name,
                "events": w.events,
                "last_sequence": w.last_sequence,
                "other_events": dict(w.other_events),
                "anomalies": w.anomalies,
                "max_lag_ms": w.max_lag * 1e3,
                "reconnects": w.reconnects,
            }
            for w in outcome.watchers
        ],
        "readings": [r.__dict__ for r in outcome.readings],
        "rss_samples": outcome.rss_samples,
        "summary": summary,
    }
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"JSON results: {RESULTS.relative_to(ROOT)}", file=sys.stderr)


def _log_lines(log_path: Path) -> list[str]:
    """memsvc's warning and error log lines (it logs at warning and above here)."""
    if not log_path.exists():
        return []
    return [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        require_backend(REDIS_URL)
        require_backend(POSTGRES_ADMIN_URL)
    except BackendUnreachable as error:
        print(f"{error}; the soak needs Redis and PostgreSQL", file=sys.stderr)
        return 2
    project_id = str(uuid.uuid4())
    stats = Stats()
    started = datetime.now(UTC)
    print(
        f"soak: {args.minutes:g} min, {args.agents} agents, {args.watchers} watchers, "
        f"project {project_id}, started {started:%H:%M:%S} UTC",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="memsvc-soak-")))
        log_lines: list[str] = []
        # Runs once memsvc has stopped (so its shutdown is logged too), before the
        # temporary directory goes.
        stack.callback(lambda: log_lines.extend(_log_lines(workdir / "memsvc.log")))
        database_url = create_postgres_database(POSTGRES_ADMIN_URL, "memsvc_bench_soak")
        # Registered before the server starts, so they run after it has stopped.
        stack.callback(drop_postgres_database, POSTGRES_ADMIN_URL, database_url)
        stack.callback(_delete_redis_keys, project_id)
        server = stack.enter_context(
            _memsvc(
                "memsvc",
                workdir,
                *("--working-memory-url", REDIS_URL, "--database-url", database_url),
                *("--retention-interval-seconds", str(args.retention_interval)),
                *("--checkpoint-max-age-seconds", str(args.checkpoint_max_age)),
                *("--request-id-ttl-seconds", str(args.request_id_ttl)),
                *("--event-max-age-seconds", str(args.event_max_age)),
            )
        )
        outcome = asyncio.run(_soak(args, server, project_id, database_url, stats))
    summary, passed = summarize(args, stats, outcome)
    if log_lines:
        summary += f"\nmemsvc logged {len(log_lines)} warning/error line(s), the first:\n  " + (
            "\n  ".join(line[:400] for line in log_lines[:5])
        )
    print(summary, flush=True)
    _write_results(args, started, stats, outcome, summary)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
