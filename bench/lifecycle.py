"""Lifecycle benchmark: pause and resume of a session, against three baselines.

For sessions of 10, 100, 1,000 and 10,000 keys (``--sizes``), each value a JSON
object of 200 bytes, one run measures a pause and a resume of the same state by:

* ``memsvc``: ``memsvc serve`` in its own process, working memory in the local
  Redis, durable store in a private PostgreSQL database made for the run,
  called through gRPC (``LifecycleService.Pause``, then ``Resume`` from the
  checkpoint the pause made), one session per size.
* ``reference``: the reference algorithm re-implemented with redis-py asyncio
  in this process (bench/_reference_lifecycle.py): SCAN for the session's keys,
  then one GET per key and a checkpoint JSON in Redis (pause); GET the
  checkpoint, one DEL per current key and one SET per checkpointed key
  (resume). One round trip per key, as the reference made.
* ``langgraph``: LangGraph's ``AsyncPostgresSaver`` in this process
  (bench/_langgraph_saver.py), the whole state in one channel: ``aput``
  (pause) and ``aget_tuple`` (resume), on another private PostgreSQL database.
* ``echo``: a bare grpc.aio server in its own process (bench/_lifecycle_echo.py)
  that receives the state's bytes (pause) or sends them (resume), the
  protobuf encoding of the session's entries, with identity (de)serializers.

memsvc's cycle has a third call, ``restore``: a Resume of the now ACTIVE session
from the checkpoint the pause made (a rollback). A Resume of a PAUSED session
from its Pause's checkpoint keeps the working memory that still holds it (ADR
0004); ``restore`` shows what a Resume costs when it has to move the checkpoint
back in (a rollback, or after Redis lost the memory). Its ratios are taken
against the other systems' resume.

``langgraph`` plus ``echo`` is the floor: storing the state durably once plus
moving it through gRPC once. Before measuring, 10,000 keys of other sessions
(``--noise-keys``) are written to the same Redis so that SCAN walks them.

For each size, every system is set up and warmed up with one cycle (pause, then
resume; the Redis commands that cycle caused are counted), then the cycles are
interleaved: one of memsvc, one of reference, one of langgraph, one of echo, and
again, ``--cycles`` times (100; ``--large-cycles``, 20, from 5,000 keys, where
the reference makes ``--reference-large-cycles``, 5, as each takes seconds).
With ``--warm-cycles K``, each measured cycle of a system comes right after K
unmeasured cycles of the same system ("warm"); without (0), after the other
systems' cycles ("cold": on this machine a process woken after tens of ms idle
runs each call up to 3x slower, and memsvc's call wakes four processes in turn).
Each call's latency is timed alone; the CPU time of this process, of the server
process (memsvc or echo), of Redis and of the run's PostgreSQL backends is read
around it from /proc. The tables show the median and p99 per (size, system,
op), the ratios (computed within each interleaved round, their median shown:
reference / memsvc, memsvc / floor, and reference / floor, which says how far
the unavoidable work itself is from the reference) and how memsvc's time grows
with the size against the floor's.

memsvc runs from the work tree, or with ``--git-ref REF`` as committed at REF
(``git archive`` into the temporary directory), so edits in progress in the
work tree do not change what is measured.

Rerun (a few minutes; results in bench/results/lifecycle.json, see
docs/performance.md)::

    .venv/bin/pip install 'langgraph-checkpoint-postgres==3.2.0'  # baseline (b), bench only
    .venv/bin/python -m bench.lifecycle --git-ref HEAD
    .venv/bin/python -m bench.lifecycle --sizes 10,1000 --cycles 20 --skip-reference
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import grpc
import psycopg
import redis
import redis.asyncio as aioredis
from google.protobuf import struct_pb2

from bench import _langgraph_saver as langgraph
from bench._echo_server import identity
from bench._lifecycle_echo import (
    CHANNEL_OPTIONS,
    LOAD_METHOD,
    PAUSE_METHOD,
    RESUME_METHOD,
    SMALL,
)
from bench._reference_lifecycle import DEFAULT_SCAN_COUNT, ReferenceLifecycle
from bench.working_memory import (
    MEMSVC,
    ROOT,
    SessionIds,
    Target,
    _delete_redis_keys,
    _server,
    machine,
)
from memsvc.testing import (
    BackendUnreachable,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    require_backend,
)
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub

RESULTS = ROOT / "bench" / "results" / "lifecycle.json"
REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
NOISE_PREFIX = "bench-noise"
VALUE_BYTES = 200
BATCH_SET_MAX = 1000
LARGE_SIZE = 5000
SYSTEMS = ("memsvc", "reference", "langgraph", "echo")
OPS = ("pause", "resume", "restore")
# The op of the other systems that an op of memsvc is compared with.
COMPARED_AS = {"restore": "resume"}
TARGET_SIZE = 1000
TARGET_SPEEDUP = 20.0
TARGET_FLOOR_RATIO = 1.5

State = dict[str, dict[str, Any]]


# --- the state ------------------------------------------------------------------


def entry_value(i: int) -> dict[str, Any]:
    """A JSON object whose compact encoding is VALUE_BYTES long."""
    value: dict[str, Any] = {
        "step": i,
        "kind": "observation",
        "tool": "web_search",
        "ok": i % 3 != 0,
        "score": round((i % 997) / 997, 4),
        "tags": ["plan", "memory", f"t{i % 10}"],
        "text": "",
    }
    pad = VALUE_BYTES - len(json.dumps(value, separators=(",", ":")))
    value["text"] = ("lorem ipsum dolor sit amet, consectetur adipiscing elit " * 8)[:pad]
    return value


def make_state(size: int) -> State:
    return {f"key-{i:05d}": entry_value(i) for i in range(size)}


def to_value(data: dict[str, Any]) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.struct_value.update(data)
    return value


def state_bytes(state: State) -> bytes:
    """The state as it crosses gRPC: the protobuf encoding of its entries."""
    entries = [lc.CheckpointEntry(key=key, value=to_value(v)) for key, v in state.items()]
    return lc.GetCheckpointResponse(entries=entries).SerializeToString()


# --- CPU time of the processes involved -------------------------------------------


def cpu_ns(pid: int) -> int:
    """Time on CPU of all threads of a process, in ns (/proc/<pid>/task/*/schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as stat:
            total += int(stat.read().split()[0])
    return total


def redis_pid() -> int | None:
    """The local redis-server's pid, when it runs on this host (it does here)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return pid if comm.read().startswith("redis") else None
    except OSError:
        return None


def postgres_pids(database_urls: list[str]) -> list[int]:
    """The PostgreSQL backends connected to the run's databases."""
    names = [url.rsplit("/", 1)[1] for url in database_urls]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = ANY(%s)", (names,)
        ).fetchall()
    pids = [int(row[0]) for row in rows]
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


@dataclass
class Meters:
    """Which processes' CPU time to read around each call."""

    redis: int | None
    postgres: list[int] = field(default_factory=list)

    def read(self, server: int | None) -> tuple[int, int | None, int | None, int | None]:
        def total(pids: list[int]) -> int | None:
            if not pids:
                return None
            return sum(_safe_cpu_ns(pid) for pid in pids)

        return (
            time.process_time_ns(),
            None if server is None else cpu_ns(server),
            None if self.redis is None else cpu_ns(self.redis),
            total(self.postgres),
        )


def _safe_cpu_ns(pid: int) -> int:
    try:
        return cpu_ns(pid)
    except OSError:
        return 0


# --- the systems ------------------------------------------------------------------


class System(Protocol):
    name: str
    server_pid: int | None

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...


def _ops(system: System) -> list[str]:
    """The ops of one cycle of ``system`` (only memsvc has ``restore``)."""
    return [op for op in OPS if hasattr(system, op)]


class MemsvcSystem:
    name = "memsvc"

    def __init__(self, channel: grpc.aio.Channel, ids: SessionIds, size: int, pid: int) -> None:
        self._life = LifecycleServiceStub(channel)
        self._wm = WorkingMemoryServiceStub(channel)
        self._ids = ids
        self._size = size
        self._pause = lc.PauseRequest(**ids)
        self._resume = lc.ResumeRequest(**ids)
        self._rollback = lc.ResumeRequest(**ids)  # named after each pause
        self.server_pid: int | None = pid

    async def setup(self, state: State) -> None:
        await self._life.Spawn(lc.SpawnRequest(**self._ids))
        items = list(state.items())
        for start in range(0, len(items), BATCH_SET_MAX):
            entries = [
                pb.EntryInput(key=key, value=to_value(value))
                for key, value in items[start : start + BATCH_SET_MAX]
            ]
            await self._wm.BatchSet(pb.BatchSetRequest(**self._ids, entries=entries))

    async def pause(self) -> None:
        reply = await self._life.Pause(self._pause)
        _expect(reply.checkpoint.key_count, self._size, "memsvc pause")
        self._rollback.checkpoint_id = reply.checkpoint.checkpoint_id

    async def resume(self) -> None:
        reply = await self._life.Resume(self._resume)
        _expect(reply.entries_restored, self._size, "memsvc resume")

    async def restore(self) -> None:
        reply = await self._life.Resume(self._rollback)
        _expect(reply.entries_restored, self._size, "memsvc restore")

    async def verify(self, state: State) -> None:
        """The working memory holds ``state``, every key and value (read outside the
        timed calls): a Resume whose answer counts the entries but that wrote none,
        or other values, fails the run."""
        held: dict[str, struct_pb2.Value] = {}
        token = ""
        while True:
            page = await self._wm.ListEntries(
                pb.ListEntriesRequest(**self._ids, page_size=1000, page_token=token)
            )
            held.update((entry.key, entry.value) for entry in page.entries)
            if not (token := page.next_page_token):
                break
        wrong = sorted(key for key in state.keys() | held.keys() if key not in held
                       or key not in state or held[key] != to_value(state[key]))  # fmt: skip
        if wrong:
            raise RuntimeError(
                f"memsvc's working memory does not hold the state after its cycles: "
                f"{len(wrong)} keys missing, extra or different (first: {wrong[0]!r})"
            )


class ReferenceSystem:
    name = "reference"
    server_pid: int | None = None

    def __init__(self, reference: ReferenceLifecycle, size: int) -> None:
        self._ref = reference
        self._size = size
        self._checkpoint = ""

    async def pause(self) -> None:
        self._checkpoint, saved = await self._ref.pause()
        _expect(saved, self._size, "reference pause")

    async def resume(self) -> None:
        _expect(await self._ref.resume(self._checkpoint), self._size, "reference resume")


class LangGraphSystem:
    name = "langgraph"
    server_pid: int | None = None

    def __init__(self, session: langgraph.SaverSession, size: int) -> None:
        self._session = session
        self._size = size
        self._config: dict[str, Any] = {}

    async def pause(self) -> None:
        self._config = await self._session.pause()

    async def resume(self) -> None:
        _expect(len(await self._session.resume(self._config)), self._size, "langgraph resume")


class EchoSystem:
    name = "echo"

    def __init__(self, channel: grpc.aio.Channel, payload: bytes, pid: int) -> None:
        def method(path: str) -> Any:
            return channel.unary_unary(
                path, request_serializer=identity, response_deserializer=identity
            )

        self._pause, self._resume, self._load = (
            method(PAUSE_METHOD),
            method(RESUME_METHOD),
            method(LOAD_METHOD),
        )
        self._payload = payload
        self.server_pid: int | None = pid

    async def setup(self) -> None:
        await self._load(self._payload)

    async def pause(self) -> None:
        await self._pause(self._payload)

    async def resume(self) -> None:
        _expect(len(await self._resume(SMALL)), len(self._payload), "echo resume")


def _expect(got: int, wanted: int, what: str) -> None:
    if got != wanted:
        raise RuntimeError(f"{what}: {got} keys (or bytes), expected {wanted}")


# --- measuring --------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One call of one op of one system at one size."""

    size: int
    system: str
    op: str
    cycle: int  # 0: warm-up (not in the summary)
    ms: float
    client_cpu_ms: float
    server_cpu_ms: float | None  # memsvc or echo process
    redis_cpu_ms: float | None
    postgres_cpu_ms: float | None  # backends connected to the run's databases


def _delta_ms(after: int | None, before: int | None) -> float | None:
    return None if after is None or before is None else (after - before) / 1e6


async def _timed(system: System, op: str, size: int, cycle: int, meters: Meters) -> Sample:
    call: Callable[[], Awaitable[None]] = getattr(system, op)
    before = meters.read(system.server_pid)
    started = time.perf_counter()
    await call()
    elapsed = time.perf_counter() - started
    after = meters.read(system.server_pid)
    return Sample(
        size=size,
        system=system.name,
        op=op,
        cycle=cycle,
        ms=elapsed * 1e3,
        client_cpu_ms=(after[0] - before[0]) / 1e6,
        server_cpu_ms=_delta_ms(after[1], before[1]),
        redis_cpu_ms=_delta_ms(after[2], before[2]),
        postgres_cpu_ms=_delta_ms(after[3], before[3]),
    )


async def _redis_calls(client: aioredis.Redis) -> dict[str, int]:
    """Calls per command so far (INFO commandstats; commands run by scripts included)."""
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def _calls_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta = {name: calls - before.get(name, 0) for name, calls in after.items()}
    delta["info"] = delta.get("info", 0) - 1  # the INFO that read `before`
    return {name: calls for name, calls in sorted(delta.items()) if calls > 0}


@dataclass
class Run:
    """What the measuring coroutine needs, and what it found."""

    args: argparse.Namespace
    memsvc: Target
    echo: Target
    project_id: str
    database_urls: list[str]
    langgraph_url: str | None
    samples: list[Sample] = field(default_factory=list)
    # "size/system/op" -> Redis calls per command during the warm-up cycle's op
    redis_commands: dict[str, dict[str, int]] = field(default_factory=dict)
    payload_bytes: dict[int, int] = field(default_factory=dict)


def _cycles(args: argparse.Namespace, size: int, system: str) -> int:
    if size < LARGE_SIZE:
        return int(args.cycles)
    if system == "reference":
        return int(args.reference_large_cycles)
    return int(args.large_cycles)


async def _measure_size(
    run: Run,
    size: int,
    memsvc_channel: grpc.aio.Channel,
    echo_channel: grpc.aio.Channel,
    client: aioredis.Redis,
    saver: Any,
    meters: Meters,
) -> None:
    args = run.args
    state = make_state(size)
    payload = state_bytes(state)
    run.payload_bytes[size] = len(payload)
    ids = SessionIds(
        project_id=run.project_id, agent_instance_id=str(uuid.uuid4()), session_id=f"bench-{size}"
    )
    memsvc = MemsvcSystem(memsvc_channel, ids, size, run.memsvc.pid)
    await memsvc.setup(state)
    echo = EchoSystem(echo_channel, payload, run.echo.pid)
    await echo.setup()
    systems: list[System] = [memsvc]
    reference = None
    if not args.skip_reference:
        reference = ReferenceLifecycle(
            client, ids["project_id"], ids["agent_instance_id"], ids["session_id"], args.scan_count
        )
        await reference.load(state)
        systems.append(ReferenceSystem(reference, size))
    if saver is not None:
        session = langgraph.SaverSession(saver, f"bench-{run.project_id}-{size}", state)
        systems.append(LangGraphSystem(session, size))
    systems.append(echo)
    meters.postgres = postgres_pids(run.database_urls)
    try:
        for system in systems:  # warm-up cycle, counting the Redis commands it causes
            for op in _ops(system):
                gc.collect()
                before = await _redis_calls(client)
                run.samples.append(await _timed(system, op, size, 0, meters))
                calls = _calls_delta(before, await _redis_calls(client))
                run.redis_commands[f"{size}/{system.name}/{op}"] = calls
        await memsvc.verify(state)
        rounds = max(_cycles(args, size, s.name) for s in systems)
        for cycle in range(1, rounds + 1):
            for system in systems:
                if cycle > _cycles(args, size, system.name):
                    continue
                gc.collect()
                for _ in range(args.warm_cycles):
                    for op in _ops(system):
                        await getattr(system, op)()
                for op in _ops(system):
                    sample = await _timed(system, op, size, cycle, meters)
                    run.samples.append(sample)
            last = [s for s in run.samples[-len(OPS) * len(systems) :] if s.cycle == cycle]
            print(
                f"{size:>6} keys  cycle {cycle:>3}  "
                + "  ".join(f"{s.system} {s.op} {s.ms:.2f}" for s in last),
                file=sys.stderr,
            )
        await memsvc.verify(state)
    finally:
        if reference is not None:
            await reference.drop()


async def _measure(run: Run) -> None:
    args = run.args
    client = aioredis.Redis.from_url(REDIS_URL)
    meters = Meters(redis=redis_pid())
    try:
        async with contextlib.AsyncExitStack() as stack:
            memsvc_channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(f"127.0.0.1:{run.memsvc.port}")
            )
            echo_channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(f"127.0.0.1:{run.echo.port}", options=CHANNEL_OPTIONS)
            )
            saver = None
            if run.langgraph_url is not None:
                saver = await stack.enter_async_context(langgraph.saver(run.langgraph_url))
            for size in args.sizes:
                await _measure_size(run, size, memsvc_channel, echo_channel, client, saver, meters)
    finally:
        await client.aclose()


# --- Redis background and clean-up -------------------------------------------------


def write_noise(run_id: str, keys: int) -> None:
    """Keys of other sessions, in the reference layout, for SCAN to walk."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(keys):
            pipe.set(
                f"{NOISE_PREFIX}:{run_id}:s{i // 100:03}:key-{i % 100:05}",
                json.dumps(entry_value(i)),
            )
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()
    finally:
        client.close()


def delete_noise(run_id: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        names = list(client.scan_iter(match=f"{NOISE_PREFIX}:{run_id}:*", count=1000))
        for start in range(0, len(names), 1000):
            client.unlink(*names[start : start + 1000])
        print(f"deleted {len(names)} background Redis key(s)", file=sys.stderr)
    finally:
        client.close()


# --- summary ---------------------------------------------------------------------


def _p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summarize(samples: list[Sample]) -> list[dict[str, Any]]:
    """Median, p99 and mean CPU per (size, system, op), warm-up left out."""
    groups: dict[tuple[int, str, str], list[Sample]] = {}
    for sample in samples:
        if sample.cycle > 0:
            groups.setdefault((sample.size, sample.system, sample.op), []).append(sample)
    rows = []
    for (size, system, op), group in sorted(
        groups.items(), key=lambda item: (item[0][0], SYSTEMS.index(item[0][1]), item[0][2])
    ):
        latencies = [s.ms for s in group]
        rows.append(
            {
                "size": size,
                "system": system,
                "op": op,
                "n": len(group),
                "median_ms": statistics.median(latencies),
                "p99_ms": _p99(latencies),
                "client_cpu_ms": _mean([s.client_cpu_ms for s in group]),
                "server_cpu_ms": _mean([s.server_cpu_ms for s in group]),
                "redis_cpu_ms": _mean([s.redis_cpu_ms for s in group]),
                "postgres_cpu_ms": _mean([s.postgres_cpu_ms for s in group]),
            }
        )
    return rows


def ratios(samples: list[Sample]) -> list[dict[str, Any]]:
    """Per (size, op), within rounds: reference / memsvc, memsvc / (langgraph + echo),
    and reference / (langgraph + echo): how much faster than the reference the floor
    itself is (a speed-up target above it would ask memsvc to beat the floor)."""
    by_cycle: dict[tuple[int, str, int], dict[str, float]] = {}
    for s in samples:
        if s.cycle > 0:
            by_cycle.setdefault((s.size, s.op, s.cycle), {})[s.system] = s.ms
    found: dict[tuple[int, str], dict[str, list[float]]] = {}
    for (size, op, cycle), times in by_cycle.items():
        if "memsvc" not in times:
            continue
        others = by_cycle.get((size, COMPARED_AS.get(op, op), cycle), {})
        lists = found.setdefault((size, op), {"speedup": [], "floor": [], "floor_speedup": []})
        if "reference" in others:
            lists["speedup"].append(others["reference"] / times["memsvc"])
        if "langgraph" in others and "echo" in others:
            floor = others["langgraph"] + others["echo"]
            lists["floor"].append(times["memsvc"] / floor)
            if "reference" in others:
                lists["floor_speedup"].append(others["reference"] / floor)
    rows = []
    for (size, op), lists in sorted(found.items()):
        row: dict[str, Any] = {"size": size, "op": op}
        for name, values in lists.items():
            if values:
                row[name] = statistics.median(values)
                row[f"{name}_min"], row[f"{name}_max"] = min(values), max(values)
                row[f"{name}_n"] = len(values)
        rows.append(row)
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def _commands_cell(calls: dict[str, int] | None) -> str:
    """All Redis commands run, then the scripts among them (one round trip each)."""
    if calls is None:
        return "-"
    scripts = sum(calls.get(name, 0) for name in ("evalsha", "eval", "evalsha_ro", "eval_ro"))
    return f"{sum(calls.values()):,} ({scripts})"


def markdown_table(rows: list[dict[str, Any]], commands: dict[str, dict[str, int]]) -> str:
    lines = [
        "| Keys | System | Op | n | p50 (ms) | p99 (ms) | Client CPU (ms) | Server CPU (ms) "
        "| Redis CPU (ms) | PostgreSQL CPU (ms) | Redis commands (scripts) |",
        "|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        calls = commands.get(f"{r['size']}/{r['system']}/{r['op']}")
        lines.append(
            f"| {r['size']:,} | {r['system']} | {r['op']} | {r['n']} | {_fmt(r['median_ms'])} "
            f"| {_fmt(r['p99_ms'])} | {_fmt(r['client_cpu_ms'])} | {_fmt(r['server_cpu_ms'])} "
            f"| {_fmt(r['redis_cpu_ms'])} | {_fmt(r['postgres_cpu_ms'])} "
            f"| {_commands_cell(calls)} |"
        )
    return "\n".join(lines) + "\n"


def _ratio_cell(row: dict[str, Any], name: str) -> str:
    if name not in row:
        return "-"
    return f"{row[name]:.1f}x ({row[f'{name}_min']:.1f}-{row[f'{name}_max']:.1f})"


def ratio_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| Keys | Op | reference / memsvc (range) | memsvc / (langgraph + echo) (range) "
        "| reference / (langgraph + echo) (range) |",
        "|--:|---|--:|--:|--:|",
    ]
    for r in rows:
        floor = "-"
        if "floor" in r:
            floor = f"{r['floor']:.2f} ({r['floor_min']:.2f}-{r['floor_max']:.2f})"
        lines.append(
            f"| {r['size']:,} | {r['op']} | {_ratio_cell(r, 'speedup')} | {floor} "
            f"| {_ratio_cell(r, 'floor_speedup')} |"
        )
    return "\n".join(lines) + "\n"


def scaling_table(rows: list[dict[str, Any]], payload_bytes: dict[int, int]) -> str:
    """memsvc's and the floor's cost per key and per byte, above the smallest size."""
    medians = {(r["size"], r["system"], r["op"]): r["median_ms"] for r in rows}
    sizes = sorted({r["size"] for r in rows})
    lines = [
        "| Op | Keys | State (bytes) | memsvc p50 (ms) | memsvc µs/key above "
        f"{sizes[0]:,} keys | memsvc MB/s above {sizes[0]:,} keys | floor p50 (ms) "
        "| floor µs/key above |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for op in OPS:
        base = medians.get((sizes[0], "memsvc", op))
        base_floor = _floor(medians, sizes[0], op)
        for size in sizes:
            ms = medians.get((size, "memsvc", op))
            if ms is None or base is None:
                continue
            floor = _floor(medians, size, op)
            extra_keys = size - sizes[0]
            extra_bytes = payload_bytes[size] - payload_bytes[sizes[0]]
            per_key = per_byte = floor_per_key = "-"
            if extra_keys > 0:
                per_key = f"{(ms - base) * 1e3 / extra_keys:.1f}"
                per_byte = f"{extra_bytes / ((ms - base) / 1e3) / 1e6:.0f}" if ms > base else "-"
                if floor is not None and base_floor is not None:
                    floor_per_key = f"{(floor - base_floor) * 1e3 / extra_keys:.1f}"
            lines.append(
                f"| {op} | {size:,} | {payload_bytes[size]:,} | {_fmt(ms)} | {per_key} "
                f"| {per_byte} | {_fmt(floor)} | {floor_per_key} |"
            )
    return "\n".join(lines) + "\n"


def _floor(medians: dict[tuple[int, str, str], float], size: int, op: str) -> float | None:
    op = COMPARED_AS.get(op, op)
    parts = [medians.get((size, "langgraph", op)), medians.get((size, "echo", op))]
    return None if None in parts else sum(p for p in parts if p is not None)


def verdict(ratio_rows: list[dict[str, Any]]) -> str:
    """The targets, for pause and resume, and for restore too: the benchmark's resume
    keeps a paused memory that still holds the checkpoint (nothing moves), while
    every baseline moves the state; restore is the Resume that moves it."""
    lines = []
    for r in ratio_rows:
        if r["size"] != TARGET_SIZE:
            continue
        op = f"{r['op']} (a Resume that writes the state back)" if r["op"] == "restore" else r["op"]
        if "speedup" in r:
            met = "met" if r["speedup"] >= TARGET_SPEEDUP else "NOT met"
            floor_speedup = ""
            if "floor_speedup" in r:
                floor_speedup = f"; the floor itself is {r['floor_speedup']:.1f}x faster"
            lines.append(
                f"{op} at {TARGET_SIZE:,} keys: {r['speedup']:.1f}x faster than the "
                f"reference (target >= {TARGET_SPEEDUP:.0f}x: {met}{floor_speedup})"
            )
        if "floor" in r:
            met = "met" if r["floor"] <= TARGET_FLOOR_RATIO else "NOT met"
            lines.append(
                f"{op} at {TARGET_SIZE:,} keys: {r['floor']:.2f}x langgraph + echo "
                f"(target <= {TARGET_FLOOR_RATIO}x: {met})"
            )
    return "\n".join(lines) if lines else f"(no figures at {TARGET_SIZE:,} keys)"


# --- main ------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[10, 100, 1000, 10000],
        help="comma-separated session sizes in keys (default 10,100,1000,10000)",
    )
    parser.add_argument(
        "--cycles", type=int, default=100, help=f"measured cycles below {LARGE_SIZE:,} keys"
    )
    parser.add_argument(
        "--large-cycles", type=int, default=20, help=f"measured cycles from {LARGE_SIZE:,} keys"
    )
    parser.add_argument(
        "--reference-large-cycles",
        type=int,
        default=5,
        help=f"measured cycles of the reference from {LARGE_SIZE:,} keys",
    )
    parser.add_argument(
        "--git-ref",
        default="",
        help="run memsvc as committed at this git ref (e.g. HEAD) instead of the work tree",
    )
    parser.add_argument(
        "--warm-cycles",
        type=int,
        default=0,
        help="unmeasured cycles of a system right before each of its measured ones",
    )
    parser.add_argument("--skip-reference", action="store_true", help="leave out (a)")
    parser.add_argument("--skip-langgraph", action="store_true", help="leave out (b)")
    parser.add_argument(
        "--noise-keys", type=int, default=10000, help="keys of other sessions in Redis"
    )
    parser.add_argument(
        "--scan-count",
        type=int,
        default=DEFAULT_SCAN_COUNT,
        help="SCAN COUNT of the reference's key listing",
    )
    return parser.parse_args(argv)


def _memsvc_at(ref: str, directory: Path) -> list[str]:
    """A command running memsvc as of a git commit (``git archive``), not the work tree."""
    directory.mkdir()
    archive = subprocess.run(
        ["git", "archive", ref, "memsvc"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    # env execs Python in place, so the server's pid is the one measured; -P keeps
    # the current directory (the work tree) off sys.path, ahead of PYTHONPATH.
    return ["env", f"PYTHONPATH={directory}", sys.executable, "-P", "-m", "memsvc"]


def _git_describe(ref: str) -> str:
    """The commit memsvc ran from; without a ref, HEAD and whether memsvc/ had changes."""
    found = subprocess.run(
        ["git", "rev-parse", "--short", ref or "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "memsvc"], cwd=ROOT, capture_output=True, text=True
    )
    commit = found.stdout.strip() or "unknown"
    if ref:
        return commit
    return f"{commit} work tree" + (
        ", with uncommitted changes in memsvc/" if dirty.stdout.strip() else ""
    )


@contextlib.contextmanager
def _database(prefix: str) -> Iterator[str]:
    url = create_postgres_database(POSTGRES_ADMIN_URL, prefix)
    try:
        yield url
    finally:
        drop_postgres_database(POSTGRES_ADMIN_URL, url)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        require_backend(REDIS_URL)
        require_backend(POSTGRES_ADMIN_URL)
    except BackendUnreachable as error:
        print(f"{error}; the lifecycle benchmark needs Redis and PostgreSQL", file=sys.stderr)
        return 2
    langgraph_version = None
    if not args.skip_langgraph:
        try:
            langgraph.load()
            langgraph_version = langgraph.version()
        except langgraph.LangGraphMissing as error:
            print(f"skipping the langgraph baseline: {error}", file=sys.stderr)
    project_id = str(uuid.uuid4())
    run_id = uuid.uuid4().hex[:12]
    started = datetime.now(UTC)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="memsvc-bench-")))
        stack.callback(delete_noise, run_id)
        write_noise(run_id, args.noise_keys)
        memsvc_url = stack.enter_context(_database("memsvc_bench"))
        database_urls = [memsvc_url]
        langgraph_url = None
        if langgraph_version is not None:
            langgraph_url = stack.enter_context(_database("langgraph_bench"))
            database_urls.append(langgraph_url)
        # Registered before the server starts, so it runs after the server has stopped.
        stack.callback(_delete_redis_keys, project_id)
        port = free_port()
        data_dir = workdir / "memsvc"
        data_dir.mkdir()
        command = [str(MEMSVC)]
        if args.git_ref:
            command = _memsvc_at(args.git_ref, workdir / "source")
        memsvc_argv = [
            *command, "serve", "--health-listen=", "--metrics-listen=",
            "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
            "--working-memory-url", REDIS_URL, "--database-url", memsvc_url,
            "--max-session-keys", "20000",
        ]  # fmt: skip
        memsvc = stack.enter_context(_server("memsvc", memsvc_argv, workdir, port))
        echo_port = free_port()
        echo_argv = [sys.executable, "-m", "bench._lifecycle_echo", str(echo_port)]
        echo = stack.enter_context(_server("echo", echo_argv, workdir, echo_port))
        run = Run(args, memsvc, echo, project_id, database_urls, langgraph_url)
        asyncio.run(_measure(run))
    rows = summarize(run.samples)
    ratio_rows = ratios(run.samples)
    table = markdown_table(rows, run.redis_commands)
    ratio_text = ratio_table(ratio_rows)
    scaling = scaling_table(rows, run.payload_bytes)
    print(table)
    print(ratio_text)
    print(scaling)
    print(verdict(ratio_rows))
    described = _git_describe(args.git_ref)
    print(f"memsvc {described}, langgraph-checkpoint-postgres {langgraph_version or '-'}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "started": started.isoformat(timespec="seconds"),
        "machine": {**machine(), "langgraph-checkpoint-postgres": langgraph_version},
        "memsvc": _git_describe(args.git_ref or "HEAD") + ("" if args.git_ref else " (work tree)"),
        "settings": {key: value for key, value in vars(args).items() if not key.startswith("_")}
        | {"value_bytes": VALUE_BYTES, "payload_bytes": run.payload_bytes},
        "summary": rows,
        "ratios": ratio_rows,
        "redis_commands": run.redis_commands,
        "samples": [asdict(sample) for sample in run.samples],
        "tables": [table, ratio_text, scaling],
    }
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"JSON results: {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
