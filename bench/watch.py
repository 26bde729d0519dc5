"""Watch benchmark: memsvc's lifecycle event commits and WatchLifecycle fan-out
against a bare grpc.aio fan-out server, in the same run.

Four servers, each in its own process, on 127.0.0.1:

* ``bare``: a naive grpc.aio pub/sub (bench/_watch_fanout.py): one unbounded
  asyncio queue per subscribed stream; a unary Publish puts its request bytes
  into every queue. No protobuf work on the server; the message is the bytes of
  a real memsvc ``WatchLifecycleResponse`` (one CHECKPOINT_CREATED event taken
  from memsvc at the start of the run), so both deliver the same size.
* ``memsvc`` replica 1 and replica 2: ``memsvc serve --max-watchers 5000`` on
  one private PostgreSQL database made for the run (dropped at the end),
  working memory in the local Redis as in production (``--working-memory-url``;
  the project's keys are deleted at the end). Events come from
  ``CreateCheckpoint`` on ACTIVE sessions of replica 1 (one session per writer
  slot, 16 in all), which snapshots the session's working memory each time (empty
  here: the commit costs its least, the fan-out is what is measured).

What is measured:

* **Commits**: 1 and 16 (``--writers``) closed-loop writers for ``--seconds``
  after a 1 s warm-up, no subscribers: memsvc ``CreateCheckpoint`` (one event
  each) events/s and call latency, beside bare Publish calls (to nobody).
* **Fan-out** to 100 and 1,000 subscribers (``--subscribers``), which live in
  ``--processes`` subscriber processes (bench/_watch_subscriber.py), each with
  ``--channels`` channels. Targets: ``bare``; ``memsvc-same`` (writer
  and watchers on replica 1); ``memsvc-cross`` (writer on replica 1, watchers
  on replica 2, which learns of commits by PostgreSQL LISTEN/NOTIFY); and, unless
  ``--max-events-per-message 0``, the same three with batches:
  ``bare-batched`` (the bare server sends what waits in a stream's queue, up to
  that many, as one message) and ``memsvc-same-batched`` and
  ``memsvc-cross-batched`` (streams that ask for that many events per message),
  measured against ``bare-batched``. Each event of a batch counts as a
  delivery, with its own latency.
  The writer puts its wall-clock send time into the event (memsvc: the
  request's ``metadata``, copied into the event; bare: the same field of the
  published message); a subscriber's latency is its receive time minus that.
  For memsvc, a second latency starts at the event's ``event_time``, which the
  writer's transaction stamps before it commits: the issue's commit-to-delivery,
  over-estimated by the rest of the transaction (and by up to 1 ms: the time is
  kept in milliseconds), without the writer's call before it.

  - *Burst*: ``--burst-deliveries`` / subscribers events (400 at 100, 40 at
    1,000) published by ``--burst-writers`` concurrent writers as fast as they
    go; deliveries/s = all deliveries / (last delivery - first send).
  - *Paced*: the burst of the same round's bare target (bare, or bare-batched for
    the batched targets) gives the bare capacity (its deliveries/s /
    subscribers, in events/s); the targets measured against it are then paced at
    half of it for ``--seconds`` (at least 20 events), one event per tick, and
    the send-to-delivery latency p50/p99 over all deliveries is recorded (from
    the writer's send: it includes the writer's whole call, the commit too), and
    for memsvc the same from the event's time. The verdict takes the first, the
    stricter: bare has no commit, and its latencies start at its send.

Targets (from the issue): in a burst, memsvc reaches at least 0.7x the bare
deliveries/s; paced, memsvc's p99 exceeds the bare p99 by at most 25 ms on the
same replica and 150 ms across replicas. Rounds are interleaved (commits, then
per subscriber count each bare target, then the memsvc targets measured against
it), ``--rounds`` times; the
tables show medians over rounds, and ratios and differences to bare are taken
within each round. The 2-core machine is shared by the servers, PostgreSQL, the
subscriber processes and this process: only figures of one run compare.

memsvc runs from the work tree. Rerun (about 11 minutes with the default 3 rounds,
18 with 5, 5 without the batched targets; results in bench/results/watch.json, see
docs/performance.md)::

    .venv/bin/python -m bench.watch --rounds 5
    .venv/bin/python -m bench.watch --subscribers 100,1000 --rounds 3 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypedDict

import grpc
import psycopg
from google.protobuf import struct_pb2

from bench._echo_server import identity
from bench._watch_fanout import PUBLISH_METHOD, SUBSCRIBE_BATCHED_METHOD, SUBSCRIBE_METHOD
from bench.working_memory import (
    REDIS_URL,
    Target,
    _cpu_seconds,
    _delete_redis_keys,
    _memsvc,
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
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "watch.json"
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
WATCH_METHOD = "/memsvc.v1.LifecycleService/WatchLifecycle"
WARMUP_SECONDS = 1.0
SESSIONS = 16
MIN_EVENTS = 20
BURST_RATIO_TARGET = 0.7
SAME_REPLICA_P99_MS = 25.0
CROSS_REPLICA_P99_MS = 150.0
TARGETS = ("bare", "memsvc-same", "memsvc-cross")
# The same three, with streams that take batches: bare's server sends what waits in
# a stream's queue as one message, memsvc's streams ask for max_events_per_message.
# Each batched memsvc target is measured against bare-batched, like for like.
BATCHED_TARGETS = ("bare-batched", "memsvc-same-batched", "memsvc-cross-batched")
ALL_TARGETS = TARGETS + BATCHED_TARGETS


def baseline_of(target: str) -> str:
    """The bare target a target is measured against (itself for a bare one)."""
    return "bare-batched" if target.endswith("-batched") else "bare"


class SessionIds(TypedDict):
    project_id: str
    agent_instance_id: str
    session_id: str


class Writer(Protocol):
    """Publishes one event stamped with its send time; ``slot`` picks the session."""

    async def publish(self, slot: int) -> None: ...


class BareWriter:
    def __init__(self, channel: grpc.aio.Channel, template: lc.WatchLifecycleResponse) -> None:
        self._call = channel.unary_unary(
            PUBLISH_METHOD, request_serializer=identity, response_deserializer=identity
        )
        self._message = lc.WatchLifecycleResponse()
        self._message.CopyFrom(template)

    async def publish(self, slot: int) -> None:
        # A sequence of its own, increasing, as memsvc's events have: subscribers
        # check each stream's order for both targets alike.
        self._message.event.sequence += 1
        self._message.event.metadata.fields["sent"].number_value = time.time()
        await self._call(self._message.SerializeToString())


class MemsvcWriter:
    def __init__(self, channel: grpc.aio.Channel, sessions: list[SessionIds]) -> None:
        self._stub = LifecycleServiceStub(channel)
        self._sessions = sessions

    async def publish(self, slot: int) -> None:
        metadata = struct_pb2.Struct()
        metadata["sent"] = time.time()
        request = lc.CreateCheckpointRequest(
            **self._sessions[slot % len(self._sessions)], metadata=metadata
        )
        await self._stub.CreateCheckpoint(request)


@dataclass(frozen=True)
class Watched:
    """Where the subscribers of one target connect."""

    name: str
    server: Target
    method: str
    request: bytes


@dataclass(frozen=True)
class CommitSample:
    round: int
    target: str
    writers: int
    events: int
    events_per_s: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class FanoutSample:
    round: int
    target: str
    subscribers: int
    mode: str  # burst or paced
    events: int
    rate: float | None  # paced events/s
    deliveries: int
    expected: int
    exact: bool  # every stream got every event once (memsvc: in sequence order too)
    seconds: float  # first send to last delivery
    deliveries_per_s: float
    p50_ms: float
    p99_ms: float
    stamped_p50_ms: float  # from the event's time (memsvc: just before its commit)
    stamped_p99_ms: float
    write_p50_ms: float  # the writer's calls (CreateCheckpoint or Publish)
    write_p99_ms: float
    server_cpu_us: float  # CPU of the server the subscribers watch, per delivery
    message_bytes: int
    messages: int  # stream messages that carried the deliveries
    subscribe_seconds: float


class Workers:
    """The subscriber processes, driven by JSON lines."""

    def __init__(self, processes: int, channels: int) -> None:
        self._count = processes
        self._channels = channels
        self._procs: list[asyncio.subprocess.Process] = []
        self._streams: list[int] = []

    async def start(self) -> None:
        for _ in range(self._count):
            self._procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench._watch_subscriber",
                    cwd=ROOT,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    limit=1 << 28,
                )
            )

    async def stop(self) -> None:
        for proc in self._procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self._procs:
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self._procs = []

    async def _ask(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for proc, command in zip(self._procs, commands, strict=True):
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(command).encode() + b"\n")
        await asyncio.gather(*(proc.stdin.drain() for proc in self._procs if proc.stdin))

        async def reply(proc: asyncio.subprocess.Process) -> dict[str, Any]:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError("a subscriber process ended")
            answer: dict[str, Any] = json.loads(line)
            if "error" in answer:
                raise RuntimeError(answer["error"])
            return answer

        return list(await asyncio.gather(*(reply(proc) for proc in self._procs)))

    async def subscribe(self, watched: Watched, subscribers: int) -> float:
        """Open the streams; return the seconds it took."""
        base, extra = divmod(subscribers, self._count)
        self._streams = [base + (1 if i < extra else 0) for i in range(self._count)]
        request = base64.b64encode(watched.request).decode()
        answers = await self._ask(
            [
                {
                    "op": "subscribe",
                    "target": f"127.0.0.1:{watched.server.port}",
                    "method": watched.method,
                    "request": request,
                    "streams": streams,
                    "channels": self._channels,
                }
                for streams in self._streams
            ]
        )
        return max(float(answer["seconds"]) for answer in answers)

    async def expect(self, events: int) -> None:
        await self._ask([{"op": "expect", "events": events}] * self._count)

    async def collect(self, wait_seconds: float) -> list[dict[str, Any]]:
        return await self._ask([{"op": "collect", "timeout": wait_seconds}] * self._count)

    async def close(self) -> None:
        await self._ask([{"op": "close"}] * self._count)


def _percentiles_ms(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 of latencies in seconds, in ms (nan when empty)."""
    if len(latencies) < 2:
        return math.nan, math.nan
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49] * 1e3, cuts[98] * 1e3


async def _drive(writer: Writer, writers: int, seconds: float) -> list[float]:
    """Closed loop: the latencies of the calls that ended within ``seconds``."""
    end = time.perf_counter() + seconds
    latencies: list[float] = []

    async def one(slot: int) -> None:
        while (started := time.perf_counter()) < end:
            await writer.publish(slot)
            if (ended := time.perf_counter()) <= end:
                latencies.append(ended - started)

    await asyncio.gather(*(one(slot) for slot in range(writers)))
    return latencies


async def _commits(
    round_: int, target: str, writer: Writer, writers: int, seconds: float
) -> CommitSample:
    await _drive(writer, writers, WARMUP_SECONDS)
    latencies = await _drive(writer, writers, seconds)
    p50, p99 = _percentiles_ms(latencies)
    return CommitSample(
        round=round_,
        target=target,
        writers=writers,
        events=len(latencies),
        events_per_s=len(latencies) / seconds,
        p50_ms=p50,
        p99_ms=p99,
    )


async def _timed(writer: Writer, slot: int, latencies: list[float]) -> None:
    started = time.perf_counter()
    await writer.publish(slot)
    latencies.append(time.perf_counter() - started)


async def _burst(writer: Writer, events: int, writers: int) -> list[float]:
    """Publish ``events`` events with ``writers`` concurrent writers, as fast as they go;
    return the latencies of the writers' calls."""
    left = events
    latencies: list[float] = []

    async def one(slot: int) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await _timed(writer, slot, latencies)

    await asyncio.gather(*(one(slot) for slot in range(min(writers, events))))
    return latencies


async def _paced(writer: Writer, events: int, rate: float) -> list[float]:
    """Publish one event every 1/rate seconds, not waiting for the previous one;
    return the latencies of the writer's calls."""
    start = time.perf_counter()
    latencies: list[float] = []
    calls: list[asyncio.Task[None]] = []
    for index in range(events):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        calls.append(asyncio.create_task(_timed(writer, index, latencies)))
    await asyncio.gather(*calls)
    return latencies


@dataclass(frozen=True)
class Phase:
    round: int
    watched: Watched
    subscribers: int
    subscribe_seconds: float


async def _phase(
    phase: Phase,
    workers: Workers,
    publish: Callable[[], Awaitable[list[float]]],
    mode: str,
    events: int,
    rate: float | None,
    wait_seconds: float,
) -> FanoutSample:
    await workers.expect(events)
    pid = phase.watched.server.pid
    cpu0 = _cpu_seconds(pid)
    started = time.time()
    write_p50, write_p99 = _percentiles_ms(await publish())
    answers = await workers.collect(wait_seconds)
    cpu = _cpu_seconds(pid) - cpu0
    deliveries = sum(int(a["deliveries"]) for a in answers)
    expected = sum(int(a["expected"]) for a in answers)
    last = max((float(a["last"]) for a in answers if a["deliveries"]), default=started)
    latencies = [us / 1e6 for a in answers for us in a["latencies_us"]]
    errors = [e for a in answers for e in a["errors"]]
    streams_off = sum(int(a["streams_off"]) for a in answers)
    disordered = sum(int(a["disordered"]) for a in answers)
    repeated = sum(int(a["repeated"]) for a in answers)
    # Order is memsvc's promise (one log, sequences in commit order). The bare
    # fan-out makes none: its server may take concurrent Publish calls in another
    # order than the publisher numbered them, and hands every stream that order.
    ordered = not disordered or phase.watched.name.startswith("bare")
    exact = deliveries == expected and ordered and not (errors or streams_off or repeated)
    if not exact:
        print(
            f"  ! {phase.watched.name} {mode}: {deliveries}/{expected} delivered, "
            f"{streams_off} streams off, {disordered} out of order, {repeated} repeated "
            f"{errors[:2]}",
            file=sys.stderr,
        )
    p50, p99 = _percentiles_ms(latencies)
    stamped_p50, stamped_p99 = _percentiles_ms(
        [us / 1e6 for a in answers for us in a["stamped_us"]]
    )
    seconds = max(last - started, 1e-9)
    return FanoutSample(
        round=phase.round,
        target=phase.watched.name,
        subscribers=phase.subscribers,
        mode=mode,
        events=events,
        rate=rate,
        deliveries=deliveries,
        expected=expected,
        exact=exact,
        seconds=seconds,
        deliveries_per_s=deliveries / seconds,
        p50_ms=p50,
        p99_ms=p99,
        stamped_p50_ms=stamped_p50,
        stamped_p99_ms=stamped_p99,
        write_p50_ms=write_p50,
        write_p99_ms=write_p99,
        server_cpu_us=cpu / max(deliveries, 1) * 1e6,
        message_bytes=max(int(a["message_bytes"]) for a in answers),
        messages=sum(int(a["messages"]) for a in answers),
        subscribe_seconds=phase.subscribe_seconds,
    )


async def _fanout(
    args: argparse.Namespace,
    round_: int,
    watched: Watched,
    writer: Writer,
    workers: Workers,
    subscribers: int,
    rate: float | None,
) -> list[FanoutSample]:
    """Burst, then paced at ``rate`` (None: half the capacity this burst shows)."""
    subscribe_seconds = await workers.subscribe(watched, subscribers)
    phase = Phase(round_, watched, subscribers, subscribe_seconds)
    try:
        events = max(MIN_EVENTS, math.ceil(args.burst_deliveries / subscribers))
        burst = await _phase(
            phase,
            workers,
            lambda: _burst(writer, events, args.burst_writers),
            "burst",
            events,
            None,
            args.timeout,
        )
        _report(burst)
        if rate is None:
            rate = 0.5 * burst.deliveries_per_s / subscribers
        paced_rate = rate
        paced_events = max(MIN_EVENTS, round(rate * args.seconds))
        paced = await _phase(
            phase,
            workers,
            lambda: _paced(writer, paced_events, paced_rate),
            "paced",
            paced_events,
            rate,
            args.timeout,
        )
        _report(paced)
        return [burst, paced]
    finally:
        await workers.close()


def _report(sample: FanoutSample) -> None:
    rate = f" @ {sample.rate:6.1f} ev/s" if sample.rate is not None else ""
    stamped = (
        ""
        if sample.target == baseline_of(sample.target)
        else f" (from event time p50 {sample.stamped_p50_ms:.1f} p99 {sample.stamped_p99_ms:.1f})"
    )
    print(
        f"round {sample.round} {sample.target:12} x{sample.subscribers:<5} {sample.mode}{rate}: "
        f"{sample.deliveries_per_s:8.0f} deliveries/s  p50 {sample.p50_ms:7.1f} ms  "
        f"p99 {sample.p99_ms:7.1f} ms{stamped}  ({sample.deliveries}/{sample.expected}, "
        f"server {sample.server_cpu_us:.0f} µs CPU/delivery, "
        f"write p50 {sample.write_p50_ms:.1f} p99 {sample.write_p99_ms:.1f} ms)",
        file=sys.stderr,
    )


@dataclass(frozen=True)
class Setup:
    watched: dict[str, Watched]
    writers: dict[str, Writer]  # by target name
    template: lc.WatchLifecycleResponse


async def _setup(
    bare: Target,
    replica1: Target,
    replica2: Target,
    project_id: str,
    channels: list[grpc.aio.Channel],
    max_events_per_message: int,
) -> Setup:
    """Spawn the writer sessions and take one real event as the bare message."""
    memsvc_channel, bare_channel = channels
    agent = str(uuid.uuid4())
    sessions = [
        SessionIds(project_id=project_id, agent_instance_id=agent, session_id=f"w-{i:02d}")
        for i in range(SESSIONS)
    ]
    life = LifecycleServiceStub(memsvc_channel)
    for ids in sessions:
        await life.Spawn(lc.SpawnRequest(**ids))
    memsvc_writer = MemsvcWriter(memsvc_channel, sessions)
    call = life.WatchLifecycle(lc.WatchLifecycleRequest(project_id=project_id))
    first = await call.read()
    assert first.HasField("progress"), first
    await memsvc_writer.publish(0)
    template = await call.read()
    assert template.HasField("event"), template
    call.cancel()
    watch_request = lc.WatchLifecycleRequest(project_id=project_id).SerializeToString()
    batched_request = lc.WatchLifecycleRequest(
        project_id=project_id, max_events_per_message=max_events_per_message
    ).SerializeToString()
    watched = {
        "bare": Watched("bare", bare, SUBSCRIBE_METHOD, b""),
        "memsvc-same": Watched("memsvc-same", replica1, WATCH_METHOD, watch_request),
        "memsvc-cross": Watched("memsvc-cross", replica2, WATCH_METHOD, watch_request),
    }
    if max_events_per_message:
        watched["bare-batched"] = Watched(
            "bare-batched", bare, SUBSCRIBE_BATCHED_METHOD, str(max_events_per_message).encode()
        )
        for name, replica in zip(BATCHED_TARGETS[1:], (replica1, replica2), strict=True):
            watched[name] = Watched(name, replica, WATCH_METHOD, batched_request)
    bare_writer = BareWriter(bare_channel, template)
    return Setup(
        watched=watched,
        writers={
            name: bare_writer if name.startswith("bare") else memsvc_writer for name in watched
        },
        template=template,
    )


def _forget_checkpoints(database_url: str, project_id: str) -> None:
    """Delete the run's checkpoints in the database, behind memsvc's back (no events).

    Every event of the run is a CreateCheckpoint on one of a few sessions, so they
    would pile up thousands of checkpoints each, and memsvc counts a session's
    checkpoints (for its limit) on every CreateCheckpoint: a cost that grows with
    the pile, which a session under the default limit of 1,000 never sees.
    Emptied before every measured phase, a session holds at most the checkpoints
    of one phase.
    """
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM checkpoints WHERE project_id = %s", (project_id,))


async def _run(
    args: argparse.Namespace,
    bare: Target,
    replica1: Target,
    replica2: Target,
    database_url: str,
    project_id: str,
) -> tuple[list[CommitSample], list[FanoutSample], int]:
    workers = Workers(args.processes, args.channels)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{replica1.port}") as memsvc_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{bare.port}") as bare_channel,
    ):
        setup = await _setup(
            bare,
            replica1,
            replica2,
            project_id,
            [memsvc_channel, bare_channel],
            args.max_events_per_message,
        )
        targets = list(setup.watched)
        message_bytes = setup.template.ByteSize()
        print(
            f"message: {message_bytes} bytes (WatchLifecycleResponse with one event)",
            file=sys.stderr,
        )
        await workers.start()
        try:
            # Warm-up, not recorded: connections, first calls, the memsvc tails.
            for name in targets:
                await workers.subscribe(setup.watched[name], min(args.subscribers))
                await workers.expect(MIN_EVENTS)
                await _burst(setup.writers[name], MIN_EVENTS, args.burst_writers)
                await workers.collect(args.timeout)
                await workers.close()
            commits: list[CommitSample] = []
            fanouts: list[FanoutSample] = []
            for round_ in range(1, args.rounds + 1):
                for name in ("bare", "memsvc-same"):
                    for writers in args.writers:
                        _forget_checkpoints(database_url, project_id)
                        sample = await _commits(
                            round_, name.split("-")[0], setup.writers[name], writers, args.seconds
                        )
                        commits.append(sample)
                        print(
                            f"round {round_} {sample.target:12} commits x{writers:<3} "
                            f"{sample.events_per_s:8.0f} events/s  p50 {sample.p50_ms:6.2f} ms  "
                            f"p99 {sample.p99_ms:6.2f} ms",
                            file=sys.stderr,
                        )
                for subscribers in args.subscribers:
                    rates: dict[str, float | None] = {}
                    for name in targets:
                        _forget_checkpoints(database_url, project_id)
                        samples = await _fanout(
                            args,
                            round_,
                            setup.watched[name],
                            setup.writers[name],
                            workers,
                            subscribers,
                            # Paced at half its baseline's capacity: a bare target's
                            # own burst (None), before the targets measured against it.
                            rates.get(baseline_of(name)),
                        )
                        fanouts.extend(samples)
                        rates.setdefault(name, samples[1].rate)
        finally:
            await workers.stop()
    return commits, fanouts, message_bytes


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def summarize(
    commits: list[CommitSample], fanouts: list[FanoutSample]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Medians over the rounds; ratios and differences to bare within each round."""
    commit_groups: dict[tuple[str, int], list[CommitSample]] = {}
    for c in commits:
        commit_groups.setdefault((c.target, c.writers), []).append(c)
    commit_rows = [
        {
            "target": target,
            "writers": writers,
            "events_per_s": _median([c.events_per_s for c in group]),
            "p50_ms": _median([c.p50_ms for c in group]),
            "p99_ms": _median([c.p99_ms for c in group]),
        }
        for (target, writers), group in commit_groups.items()
    ]
    bare = {
        (f.target, f.round, f.subscribers, f.mode): f
        for f in fanouts
        if f.target == baseline_of(f.target)
    }
    groups: dict[tuple[int, str], dict[str, list[FanoutSample]]] = {}
    for f in fanouts:
        groups.setdefault((f.subscribers, f.target), {}).setdefault(f.mode, []).append(f)
    rows: list[dict[str, Any]] = []
    for (subscribers, target), modes in groups.items():
        burst, paced = modes["burst"], modes["paced"]
        baseline = baseline_of(target)
        ratios = [
            b.deliveries_per_s / bare[baseline, b.round, subscribers, "burst"].deliveries_per_s
            for b in burst
        ]
        excess = [p.p99_ms - bare[baseline, p.round, subscribers, "paced"].p99_ms for p in paced]
        rows.append(
            {
                "subscribers": subscribers,
                "target": target,
                "burst_events": burst[0].events,
                "burst_deliveries_per_s": _median([b.deliveries_per_s for b in burst]),
                "burst_ratio": _median(ratios),
                "burst_ratio_min": min(ratios),
                "burst_ratio_max": max(ratios),
                "burst_p50_ms": _median([b.p50_ms for b in burst]),
                "burst_p99_ms": _median([b.p99_ms for b in burst]),
                "burst_server_cpu_us": _median([b.server_cpu_us for b in burst]),
                "paced_rate": _median([p.rate or 0.0 for p in paced]),
                "paced_events": _median([float(p.events) for p in paced]),
                "paced_deliveries_per_s": _median([p.deliveries_per_s for p in paced]),
                "paced_p50_ms": _median([p.p50_ms for p in paced]),
                "paced_p99_ms": _median([p.p99_ms for p in paced]),
                "paced_stamped_p50_ms": _median([p.stamped_p50_ms for p in paced]),
                "paced_stamped_p99_ms": _median([p.stamped_p99_ms for p in paced]),
                "paced_write_p50_ms": _median([p.write_p50_ms for p in paced]),
                "paced_write_p99_ms": _median([p.write_p99_ms for p in paced]),
                "p99_excess_ms": _median(excess),
                "p99_excess_min_ms": min(excess),
                "p99_excess_max_ms": max(excess),
                # Every stream of this target, and of its baseline in the same rounds
                # (the ratios and differences are taken against it), got every event.
                "complete": all(
                    s.exact and bare[(baseline, s.round, s.subscribers, s.mode)].exact
                    for s in burst + paced
                ),
                "message_bytes": max(s.message_bytes for s in burst + paced),
                "burst_events_per_message": _median(
                    [b.deliveries / max(b.messages, 1) for b in burst]
                ),
            }
        )
    rows.sort(key=lambda r: (r["subscribers"], ALL_TARGETS.index(r["target"])))
    return commit_rows, rows


def markdown_tables(commit_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    lines = [
        "| Target | Writers | Events/s | p50 (ms) | p99 (ms) |",
        "|---|--:|--:|--:|--:|",
    ]
    for r in sorted(commit_rows, key=lambda r: (r["writers"], r["target"])):
        target = (
            "memsvc CreateCheckpoint"
            if r["target"] == "memsvc"
            else "bare Publish (no subscribers)"
        )
        lines.append(
            f"| {target} | {r['writers']} | {r['events_per_s']:,.0f} "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
        )
    lines += [
        "",
        "| Subscribers | Target | Burst deliveries/s | Burst / its bare target (range) "
        "| Server CPU (µs/delivery) | Paced events/s | Paced p50 (ms) | Paced p99 (ms) "
        "| p99 - its bare p99 (ms, range) | Paced from the event's time p50 / p99 (ms) "
        "| Paced write call p50 / p99 (ms) | Burst events/message |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if r["target"] == baseline_of(r["target"]):
            ratio, excess = "baseline", "baseline"
            stamped = "-"  # bare sends a copy of one old memsvc event: its time says nothing
        else:
            stamped = f"{r['paced_stamped_p50_ms']:.1f} / {r['paced_stamped_p99_ms']:.1f}"
            ratio = (
                f"{r['burst_ratio']:.2f} ({r['burst_ratio_min']:.2f}-{r['burst_ratio_max']:.2f})"
            )
            excess = (
                f"{r['p99_excess_ms']:+.1f} ({r['p99_excess_min_ms']:+.1f} to "
                f"{r['p99_excess_max_ms']:+.1f})"
            )
        incomplete = "" if r["complete"] else " (incomplete)"
        lines.append(
            f"| {r['subscribers']:,} | {r['target']}{incomplete} "
            f"| {r['burst_deliveries_per_s']:,.0f} "
            f"| {ratio} | {r['burst_server_cpu_us']:.0f} | {r['paced_rate']:.1f} "
            f"| {r['paced_p50_ms']:.1f} | {r['paced_p99_ms']:.1f} | {excess} | {stamped} "
            f"| {r['paced_write_p50_ms']:.1f} / {r['paced_write_p99_ms']:.1f} "
            f"| {r['burst_events_per_message']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict[str, Any]]) -> str:
    parts: list[str] = []
    for r in rows:
        if r["target"] == baseline_of(r["target"]):
            continue
        same = r["target"].startswith("memsvc-same")
        limit = SAME_REPLICA_P99_MS if same else CROSS_REPLICA_P99_MS
        # A run that lost, repeated or reordered an event meets nothing.
        burst_ok = r["burst_ratio"] >= BURST_RATIO_TARGET and r["complete"]
        paced_ok = r["p99_excess_ms"] <= limit and r["complete"]
        incomplete = "" if r["complete"] else " (INCOMPLETE: events lost, repeated or reordered)"
        parts.append(
            f"{r['target']} x{r['subscribers']} (against {baseline_of(r['target'])}){incomplete}: "
            f"burst {r['burst_ratio']:.2f}x "
            f"(>= {BURST_RATIO_TARGET}: {'met' if burst_ok else 'NOT met'}), "
            f"paced p99 {r['p99_excess_ms']:+.1f} ms "
            f"(<= {limit:.0f}: {'met' if paced_ok else 'NOT met'})"
        )
    return "\n".join(parts)


def _int_list(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--subscribers", type=_int_list, default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median shown)")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="commit measurement and paced duration"
    )
    parser.add_argument("--writers", type=_int_list, default=[1, 16], help="commit writers")
    parser.add_argument("--burst-writers", type=int, default=16)
    parser.add_argument(
        "--burst-deliveries",
        type=int,
        default=40_000,
        help="a burst publishes this many deliveries / subscribers events (at least 20)",
    )
    parser.add_argument(
        "--max-events-per-message",
        type=int,
        default=100,
        help="also measure memsvc streams that ask for up to this many events per message "
        "(targets memsvc-same-batched and memsvc-cross-batched); 0: not",
    )
    parser.add_argument("--processes", type=int, default=4, help="subscriber processes")
    parser.add_argument(
        "--working-memory-url",
        default=REDIS_URL,
        help="the replicas' working memory: redis://... (default: the local Redis, as in "
        "production; the run's keys are deleted at the end) or memory://",
    )
    parser.add_argument("--channels", type=int, default=4, help="channels per subscriber process")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="longest wait for a phase's deliveries"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        require_backend(POSTGRES_ADMIN_URL)
        if args.working_memory_url.startswith("redis://"):
            require_backend(args.working_memory_url)
    except BackendUnreachable as error:
        print(f"{error}; the watch benchmark needs it (or --working-memory-url)", file=sys.stderr)
        return 2
    project_id = str(uuid.uuid4())
    started = datetime.now(UTC)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="memsvc-watch-")))
        database_url = create_postgres_database(POSTGRES_ADMIN_URL, "memsvc_bench_watch")
        # Registered first, so they run after both replicas have stopped.
        stack.callback(drop_postgres_database, POSTGRES_ADMIN_URL, database_url)
        if args.working_memory_url.startswith("redis://"):
            stack.callback(_delete_redis_keys, project_id, args.working_memory_url)
        port = free_port()
        bare_argv = [sys.executable, "-m", "bench._watch_fanout", str(port)]
        bare = stack.enter_context(_server("bare", bare_argv, workdir, port))
        # The writers make every event with CreateCheckpoint on a few sessions: up to
        # thousands of checkpoints each within one phase (see _forget_checkpoints), past
        # the default limit, which is not what is measured.
        flags = ("--database-url", database_url, "--max-watchers", "5000",
                 "--max-checkpoints-per-session", "1000000000",
                 "--working-memory-url", args.working_memory_url)  # fmt: skip
        # One after the other: the first applies the schema migrations.
        replica1 = stack.enter_context(_memsvc("memsvc-1", workdir, *flags))
        replica2 = stack.enter_context(_memsvc("memsvc-2", workdir, *flags))
        commits, fanouts, message_bytes = asyncio.run(
            _run(args, bare, replica1, replica2, database_url, project_id)
        )
    commit_rows, rows = summarize(commits, fanouts)
    tables = markdown_tables(commit_rows, rows)
    print(tables)
    print(verdict(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    document = {
        "started": started.isoformat(timespec="seconds"),
        "memsvc": commit,
        "machine": machine(),
        "settings": {**vars(args), "warmup_seconds": WARMUP_SECONDS, "sessions": SESSIONS},
        "message_bytes": message_bytes,
        "commits": commit_rows,
        "fanout": rows,
        "commit_samples": [asdict(c) for c in commits],
        "fanout_samples": [asdict(f) for f in fanouts],
        "tables": tables,
    }
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"JSON results: {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
