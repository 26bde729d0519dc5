"""Memory benchmark: what a burst of the largest calls makes memsvc hold.

Each call in flight holds its request until it is served or refused, so the
resident memory a sidecar needs grows with the large calls its clients send at
once. This starts ``memsvc serve`` on the embedded default in its own process
for each ``--calls`` value (``--max-concurrent-calls`` set to ``--limit``), sends
that many concurrent BatchSets of about 4 MB (four values of 1 MB, to a session
that does not exist: refused, after being received and parsed) over 8 channels,
and reads the process's peak resident memory (VmHWM) from /proc, against its
resident memory when idle. A ``--limit`` below ``--calls`` shows what
``max_concurrent_calls`` bounds: not this (gRPC receives and parses a request
before memsvc counts the call).

Rerun (about 30 seconds; see docs/deployment.md, "Sizing")::

    flock /tmp/memsvc-bench.lock .venv/bin/python -m bench.memory_burst --calls 32,64,256
    flock /tmp/memsvc-bench.lock .venv/bin/python -m bench.memory_burst --calls 256 --limit 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import grpc
from google.protobuf import struct_pb2

from memsvc.testing import free_port, wait_for_port
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub

CHANNELS = 8
VALUE = "x" * (1_000_000 - 200)
MESSAGE_LIMIT = [("grpc.max_send_message_length", 8 << 20)]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


async def burst(port: int, calls: int) -> Counter[str]:
    """``calls`` concurrent BatchSets of about 4 MB; the status codes they got."""
    request = pb.BatchSetRequest(
        project_id=str(uuid.uuid4()),
        agent_instance_id=str(uuid.uuid4()),
        session_id="never-spawned",
        entries=[
            pb.EntryInput(key=f"k{i}", value=struct_pb2.Value(string_value=VALUE)) for i in range(4)
        ],
    )
    codes: Counter[str] = Counter()
    channels = [
        # Distinct channel ids: separate connections, as several clients would use.
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[*MESSAGE_LIMIT, ("id", i)])
        for i in range(CHANNELS)
    ]

    async def one(index: int) -> None:
        stub = WorkingMemoryServiceStub(channels[index % CHANNELS])
        try:
            await stub.BatchSet(request, timeout=120)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as error:
            codes[error.code().name] += 1

    try:
        await asyncio.gather(*(one(i) for i in range(calls)))
    finally:
        for channel in channels:
            await channel.close()
    return codes


def measure(calls: int, limit: int, workdir: Path) -> None:
    port, health = free_port(), free_port()
    argv = [
        sys.executable, "-m", "memsvc", "serve",
        f"--listen=127.0.0.1:{port}", f"--health-listen=127.0.0.1:{health}",
        "--metrics-listen=", "--working-memory-url=memory://",
        f"--data-dir={workdir / str(calls)}", f"--max-concurrent-calls={limit}",
    ]  # fmt: skip
    log = workdir / f"memsvc-{calls}.log"
    with log.open("wb") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 30, server, log)
        idle = memory_kib(server.pid)["VmRSS"]
        codes = asyncio.run(burst(port, calls))
        peak = memory_kib(server.pid)["VmHWM"]
        print(
            f"{calls:>5} calls (limit {limit}): idle {idle / 1024:6.0f} MiB,"
            f" peak {peak / 1024:6.0f} MiB (+{(peak - idle) / 1024 / calls:.1f} MiB a call);"
            f" {dict(codes)}"
        )
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(30)
        if server.poll() is None:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", default="64,256", help="comma-separated concurrent calls")
    parser.add_argument(
        "--limit", type=int, default=256, help="memsvc's --max-concurrent-calls (its default)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memsvc-memory-") as workdir:
        for calls in (int(c) for c in args.calls.split(",")):
            measure(calls, args.limit, Path(workdir))


if __name__ == "__main__":
    main()
