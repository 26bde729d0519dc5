"""Working-memory benchmark: memsvc Get and Set against a bare grpc.aio server.

Three servers run side by side, each in its own process, all on 127.0.0.1:

* ``echo``: a grpc.aio server with one generic unary handler that does no work
  and returns the bytes of a memsvc GetResponse (bench/_echo_server.py); the
  client sends the bytes of a GetRequest. It is the ceiling of any grpc.aio
  service on this machine, measured with the same client.
* ``memsvc-embedded``: ``memsvc serve`` with the in-process working memory.
* ``memsvc-redis``: ``memsvc serve --working-memory-url redis://127.0.0.1:6379/0``.

This process is the client: for each (target, operation, callers) it runs
``callers`` asyncio tasks sharing one grpc.aio channel, each calling in a closed
loop, first for a warm-up second and then for ``--seconds``. It reports QPS,
p50 and p99 latency, and the CPU time the server and the client spent per call.
Get reads one key holding a string value of ``--value-bytes`` characters; Set
writes the same value to one of 16 keys in turn. Rounds are interleaved (echo,
embedded, redis, then again) and the table shows the median of the rounds; the
ratio to echo is computed within each round, then its median (and range) shown.
The machine is shared and noisy: only ratios measured together mean anything.

Rerun (results in bench/results/working_memory.json, see docs/performance.md)::

    make bench ARGS="--seconds 5 --repeats 3"
    .venv/bin/python -m bench.working_memory --seconds 5 --repeats 3 [--skip-redis]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import grpc
import redis

from bench._echo_server import ECHO_METHOD, GET_KEY, bench_value, identity
from memsvc.testing import BackendUnreachable, free_port, require_backend
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "working_memory.json"
MEMSVC = Path(sys.executable).parent / "memsvc"
REDIS_URL = "redis://127.0.0.1:6379/0"
WARMUP_SECONDS = 1.0
SET_KEYS = 16
TARGET_RATIO = 0.7

Call = Callable[[], Awaitable[object]]


class SessionIds(TypedDict):
    project_id: str
    agent_instance_id: str
    session_id: str


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    pid: int


@dataclass(frozen=True)
class Sample:
    """One measurement of one (target, operation, callers) in one round."""

    round: int
    target: str
    op: str
    callers: int
    calls: int
    qps: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float  # server CPU time per call
    client_cpu_us: float  # this process's CPU time per call


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(call: Call, callers: int, seconds: float) -> tuple[list[float], int]:
    """Closed loop: latencies of the calls that ended within ``seconds``, and all calls made."""
    end = time.perf_counter() + seconds
    latencies: list[float] = []
    made = 0

    async def caller() -> None:
        nonlocal made
        while (started := time.perf_counter()) < end:
            await call()
            made += 1
            if (ended := time.perf_counter()) <= end:
                latencies.append(ended - started)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return latencies, made


async def _measure(
    round_: int, target: Target, op: str, call: Call, callers: int, seconds: float
) -> Sample:
    """Warm up, then drive ``call`` for ``seconds`` and sum up what was seen."""
    await _drive(call, callers, WARMUP_SECONDS)
    server0, client0 = _cpu_seconds(target.pid), time.process_time()
    latencies, made = await _drive(call, callers, seconds)
    server_cpu, client_cpu = _cpu_seconds(target.pid) - server0, time.process_time() - client0
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return Sample(
        round=round_,
        target=target.name,
        op=op,
        callers=callers,
        calls=len(latencies),
        qps=len(latencies) / seconds,
        p50_ms=cuts[49] * 1e3,
        p99_ms=cuts[98] * 1e3,
        server_cpu_us=server_cpu / made * 1e6,
        client_cpu_us=client_cpu / made * 1e6,
    )


async def _operations(
    target: Target, channel: grpc.aio.Channel, ids: SessionIds, value_bytes: int
) -> list[tuple[str, Call]]:
    get_request = pb.GetRequest(**ids, key=GET_KEY)
    if target.name == "echo":
        echo = channel.unary_unary(
            ECHO_METHOD, request_serializer=identity, response_deserializer=identity
        )
        payload = get_request.SerializeToString()
        return [("Get", lambda: echo(payload))]
    stub = WorkingMemoryServiceStub(channel)
    value = bench_value(value_bytes)
    try:  # working memory belongs to a spawned session; later rounds reuse it
        await LifecycleServiceStub(channel).Spawn(lc.SpawnRequest(**ids))
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    await stub.Set(pb.SetRequest(**ids, key=GET_KEY, value=value))
    set_requests = itertools.cycle(
        [pb.SetRequest(**ids, key=f"set-{i}", value=value) for i in range(SET_KEYS)]
    )
    return [
        ("Get", lambda: stub.Get(get_request)),
        ("Set", lambda: stub.Set(next(set_requests))),
    ]


async def _run_rounds(
    args: argparse.Namespace, targets: list[Target], ids: SessionIds
) -> list[Sample]:
    samples: list[Sample] = []
    for round_ in range(1, args.repeats + 1):
        for target in targets:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{target.port}") as channel:
                for op, call in await _operations(target, channel, ids, args.value_bytes):
                    for callers in args.callers:
                        sample = await _measure(round_, target, op, call, callers, args.seconds)
                        samples.append(sample)
                        print(
                            f"round {round_} {target.name:16} {op} x{callers:<3} "
                            f"{sample.qps:8.0f} qps  p50 {sample.p50_ms:6.2f} ms  "
                            f"p99 {sample.p99_ms:6.2f} ms",
                            file=sys.stderr,
                        )
    return samples


@contextlib.contextmanager
def _server(name: str, argv: list[str], workdir: Path, port: int) -> Iterator[Target]:
    """Run a server process until the block ends (SIGTERM, then wait)."""
    log_path = workdir / f"{name}.log"
    env = {**os.environ, "MEMSVC_LOG_LEVEL": "warning"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            time.sleep(0.05)
        yield Target(name, port, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _memsvc(name: str, workdir: Path, *extra: str) -> contextlib.AbstractContextManager[Target]:
    port = free_port()
    data_dir = workdir / name
    data_dir.mkdir()
    argv = [
        str(MEMSVC),
        "serve",
        "--health-listen=",
        "--metrics-listen=",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(data_dir),
    ]
    return _server(name, [*argv, *extra], workdir, port)


def _delete_redis_keys(project_id: str) -> None:
    """Remove every working-memory key of the benchmark's project from Redis."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        pattern = f"memsvc:wm:{{{project_id.replace('-', '')}.*"
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.unlink(*keys)
        print(f"deleted {len(keys)} Redis key(s) of project {project_id}", file=sys.stderr)
    finally:
        client.close()


def _median(samples: list[Sample], field: str) -> float:
    return float(statistics.median(getattr(sample, field) for sample in samples))


def summarize(samples: list[Sample]) -> list[dict[str, Any]]:
    """Medians over the rounds per (target, op, callers), with the ratio to echo."""
    echo = {(s.round, s.callers): s.qps for s in samples if s.target == "echo"}
    groups: dict[tuple[str, str, int], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.target, sample.op, sample.callers), []).append(sample)
    rows: list[dict[str, Any]] = []
    for (target, op, callers), group in groups.items():
        ratios = [s.qps / echo[s.round, s.callers] for s in group]
        row: dict[str, Any] = {"target": target, "op": op, "callers": callers}
        row.update({field: _median(group, field) for field in _MEDIAN_FIELDS})
        row.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        rows.append(row)
    return rows


_MEDIAN_FIELDS = ("qps", "p50_ms", "p99_ms", "server_cpu_us", "client_cpu_us")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| Target | Op | Callers | QPS | p50 (ms) | p99 (ms) | Server CPU (µs/call) "
        "| Client CPU (µs/call) | QPS / echo Get (range) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in sorted(rows, key=lambda r: (r["op"], r["callers"], r["target"] != "echo")):
        ratio = f"{row['ratio']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
        if row["target"] == "echo":
            ratio = "baseline"
        lines.append(
            f"| {row['target']} | {row['op']} | {row['callers']} | {row['qps']:,.0f} "
            f"| {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['server_cpu_us']:.0f} "
            f"| {row['client_cpu_us']:.0f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def _verdict(rows: list[dict[str, Any]]) -> str:
    found = [r for r in rows if r["target"] == "memsvc-embedded" and r["op"] == "Get"]
    parts = [
        f"{r['callers']} caller(s): {r['ratio']:.2f}x "
        f"({'met' if r['ratio'] >= TARGET_RATIO else 'NOT met'})"
        for r in found
    ]
    return f"Target: embedded Get >= {TARGET_RATIO}x echo QPS. " + "; ".join(parts)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per figure")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median shown)")
    parser.add_argument(
        "--callers",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 16],
        help="comma-separated concurrent callers (default 1,16)",
    )
    parser.add_argument("--skip-redis", action="store_true", help="leave out memsvc-redis")
    parser.add_argument(
        "--value-bytes", type=int, default=100, help="length of the stored string value"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not args.skip_redis:
        try:
            require_backend(REDIS_URL)
        except BackendUnreachable as error:
            print(f"{error}; start Redis or pass --skip-redis", file=sys.stderr)
            return 2
    project_id = str(uuid.uuid4())
    ids = SessionIds(project_id=project_id, agent_instance_id=str(uuid.uuid4()), session_id="bench")
    started = datetime.now(UTC)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="memsvc-bench-")))
        echo_port = free_port()
        echo_argv = [sys.executable, "-m", "bench._echo_server", str(echo_port)]
        targets = [
            stack.enter_context(
                _server("echo", [*echo_argv, str(args.value_bytes)], workdir, echo_port)
            ),
            stack.enter_context(_memsvc("memsvc-embedded", workdir)),
        ]
        if not args.skip_redis:
            # Registered first, so it runs after the Redis-backed server has stopped.
            stack.callback(_delete_redis_keys, project_id)
            redis_flags = ("--working-memory-url", REDIS_URL)
            targets.append(stack.enter_context(_memsvc("memsvc-redis", workdir, *redis_flags)))
        samples = asyncio.run(_run_rounds(args, targets, ids))
    rows = summarize(samples)
    table = markdown_table(rows)
    print(table)
    print(_verdict(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "started": started.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        },
        "settings": {
            "seconds": args.seconds,
            "warmup_seconds": WARMUP_SECONDS,
            "repeats": args.repeats,
            "callers": args.callers,
            "value_bytes": args.value_bytes,
            "set_keys": SET_KEYS,
        },
        "summary": rows,
        "samples": [asdict(sample) for sample in samples],
        "table": table,
    }
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"JSON results: {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
