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

With ``--compare-auth`` the echo is left out: each memsvc server (embedded, and
Redis unless ``--skip-redis``) runs twice, as is and with ``--auth-tokens-file``
holding one token bound to the benchmark's project (``<name>+auth``, whose calls
carry ``authorization: Bearer <token>``). Rounds are interleaved the same way and
the ratio shown is auth on / auth off within each round; the target is >= 0.90
(docs/performance.md, "Cost of safety: bearer tokens").

Rerun (results in bench/results/working_memory.json, see docs/performance.md)::

    make bench ARGS="--seconds 5 --repeats 3"
    .venv/bin/python -m bench.working_memory --seconds 5 --repeats 3 [--skip-redis]
    .venv/bin/python -m bench.working_memory --compare-auth --seconds 2 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, replace
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
AUTH_RESULTS = ROOT / "bench" / "results" / "working_memory_auth.json"
MEMSVC = Path(sys.executable).parent / "memsvc"
REDIS_URL = "redis://127.0.0.1:6379/0"
WARMUP_SECONDS = 1.0
SET_KEYS = 16
TARGET_RATIO = 0.7
AUTH_TARGET_RATIO = 0.9
AUTH_SUFFIX = "+auth"

Call = Callable[[], Awaitable[object]]
Metadata = tuple[tuple[str, str], ...]


class SessionIds(TypedDict):
    project_id: str
    agent_instance_id: str
    session_id: str


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    pid: int
    metadata: Metadata = ()  # sent with every call (the bearer token of an auth server)


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
    metadata = target.metadata
    try:  # working memory belongs to a spawned session; later rounds reuse it
        await LifecycleServiceStub(channel).Spawn(lc.SpawnRequest(**ids), metadata=metadata)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    await stub.Set(pb.SetRequest(**ids, key=GET_KEY, value=value), metadata=metadata)
    set_requests = itertools.cycle(
        [pb.SetRequest(**ids, key=f"set-{i}", value=value) for i in range(SET_KEYS)]
    )
    return [
        ("Get", lambda: stub.Get(get_request, metadata=metadata)),
        ("Set", lambda: stub.Set(next(set_requests), metadata=metadata)),
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


def machine() -> dict[str, Any]:
    """What a results file says of the machine and the libraries that ran it."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }


def _delete_redis_keys(project_id: str, url: str = REDIS_URL) -> None:
    """Remove every working-memory key of the benchmark's project from Redis."""
    client = redis.Redis.from_url(url)
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
    return _summarize(samples, lambda s: echo[s.round, s.callers])


def summarize_auth(samples: list[Sample]) -> list[dict[str, Any]]:
    """Medians over the rounds per (target, op, callers), with the ratio of each
    server's QPS to that of the same backend without tokens in the same round."""
    qps = {(s.target, s.op, s.callers, s.round): s.qps for s in samples}
    return _summarize(
        samples, lambda s: qps[s.target.removesuffix(AUTH_SUFFIX), s.op, s.callers, s.round]
    )


def _summarize(
    samples: list[Sample], baseline_qps: Callable[[Sample], float]
) -> list[dict[str, Any]]:
    """Medians per (target, op, callers); ``ratio`` is each round's QPS over
    ``baseline_qps`` of that sample, its median and range over the rounds."""
    groups: dict[tuple[str, str, int], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.target, sample.op, sample.callers), []).append(sample)
    rows: list[dict[str, Any]] = []
    for (target, op, callers), group in groups.items():
        ratios = [s.qps / baseline_qps(s) for s in group]
        row: dict[str, Any] = {"target": target, "op": op, "callers": callers}
        row.update({field: _median(group, field) for field in _MEDIAN_FIELDS})
        row.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        rows.append(row)
    return rows


_MEDIAN_FIELDS = ("qps", "p50_ms", "p99_ms", "server_cpu_us", "client_cpu_us")


def markdown_table(
    rows: list[dict[str, Any]],
    ratio_header: str = "QPS / echo Get",
    is_baseline: Callable[[str], bool] = lambda target: target == "echo",
) -> str:
    lines = [
        "| Target | Op | Callers | QPS | p50 (ms) | p99 (ms) | Server CPU (µs/call) "
        f"| Client CPU (µs/call) | {ratio_header} (range) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in sorted(rows, key=lambda r: (r["op"], r["callers"], r["target"] != "echo")):
        ratio = f"{row['ratio']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
        if is_baseline(row["target"]):
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


def _auth_verdict(rows: list[dict[str, Any]]) -> str:
    parts = [
        f"{r['target']} {r['op']} x{r['callers']}: {r['ratio']:.2f} "
        f"({'met' if r['ratio'] >= AUTH_TARGET_RATIO else 'NOT met'})"
        for r in sorted(rows, key=lambda r: (r["target"], r["op"], r["callers"]))
        if r["target"].endswith(AUTH_SUFFIX)
    ]
    return f"Target: QPS with tokens >= {AUTH_TARGET_RATIO}x without. " + "; ".join(parts)


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
    parser.add_argument(
        "--compare-auth",
        action="store_true",
        help="compare each memsvc server with and without bearer tokens (no echo)",
    )
    return parser.parse_args(argv)


def _start_targets(
    stack: contextlib.ExitStack, workdir: Path, args: argparse.Namespace, project_id: str
) -> list[Target]:
    """Start the servers to measure, in the order of each round; ``stack`` stops them.

    Normally the echo and each memsvc backend. With ``--compare-auth``, each memsvc
    backend twice: without tokens, then ``+auth`` with a tokens file of one token
    bound to ``project_id``, which the client sends with every call.
    """
    backends: list[tuple[str, tuple[str, ...]]] = [("memsvc-embedded", ())]
    if not args.skip_redis:
        # Registered before the servers start, so it runs after they have stopped.
        stack.callback(_delete_redis_keys, project_id)
        backends.append(("memsvc-redis", ("--working-memory-url", REDIS_URL)))
    targets: list[Target] = []
    if args.compare_auth:
        token = secrets.token_hex(32)
        tokens_file = workdir / "tokens"
        tokens_file.write_text(f"{token} {project_id}\n")
        auth_flags = ("--auth-tokens-file", str(tokens_file))
        metadata = (("authorization", f"Bearer {token}"),)
        for name, flags in backends:
            targets.append(stack.enter_context(_memsvc(name, workdir, *flags)))
            auth_name = name + AUTH_SUFFIX
            auth = stack.enter_context(_memsvc(auth_name, workdir, *flags, *auth_flags))
            targets.append(replace(auth, metadata=metadata))
        return targets
    echo_port = free_port()
    echo_argv = [sys.executable, "-m", "bench._echo_server", str(echo_port)]
    echo_argv.append(str(args.value_bytes))
    targets.append(stack.enter_context(_server("echo", echo_argv, workdir, echo_port)))
    targets.extend(stack.enter_context(_memsvc(name, workdir, *f)) for name, f in backends)
    return targets


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
        targets = _start_targets(stack, workdir, args, project_id)
        samples = asyncio.run(_run_rounds(args, targets, ids))
    if args.compare_auth:
        rows = summarize_auth(samples)
        table = markdown_table(
            rows, "QPS auth on / off", lambda target: not target.endswith(AUTH_SUFFIX)
        )
        verdict, results = _auth_verdict(rows), AUTH_RESULTS
    else:
        rows = summarize(samples)
        table = markdown_table(rows)
        verdict, results = _verdict(rows), RESULTS
    print(table)
    print(verdict)
    results.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "seconds": args.seconds,
            "warmup_seconds": WARMUP_SECONDS,
            "repeats": args.repeats,
            "callers": args.callers,
            "value_bytes": args.value_bytes,
            "set_keys": SET_KEYS,
            "compare_auth": args.compare_auth,
        },
        "summary": rows,
        "samples": [asdict(sample) for sample in samples],
        "table": table,
        "verdict": verdict,
    }
    results.write_text(json.dumps(document, indent=2) + "\n")
    print(f"JSON results: {results.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
