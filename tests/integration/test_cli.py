"""The `memsvc` command: serve until SIGTERM, --no-migrate, configuration errors."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionRequest
from grpc_reflection.v1alpha.reflection_pb2_grpc import ServerReflectionStub

from memsvc.store.sqlite import SqliteDurableStore
from memsvc.testing import free_port, wait_for_port
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.client._credentials import make_pki
from tests.conftest import REDIS_URL, need
from tests.helpers import python, value

MEMSVC = str(Path(sys.executable).parent / "memsvc")
# What memsvc logs each time it retries a backend (memsvc/store/_retry.py).
RETRYING = "backend error, retrying"


def run_to_end(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``memsvc serve`` that is expected to exit by itself."""
    return subprocess.run(
        [MEMSVC, "serve", "--health-listen=", "--metrics-listen=",
         "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path), *args],
        capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")},
    )  # fmt: skip


def start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
    process = subprocess.Popen(
        [
            MEMSVC,
            "serve",
            "--health-listen=",
            "--metrics-listen=",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp_path),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for_port(port, timeout=30)
    except TimeoutError:
        process.kill()
        raise AssertionError(process.communicate()[1]) from None
    return process, port


async def test_serve_answers_then_exits_cleanly_on_sigterm(tmp_path):
    """`memsvc serve` on the embedded default serves, and SIGTERM ends it with status 0.
    Its start says where it listens, the probe and metrics ports too (here chosen
    by the system: port 0)."""
    process, port = start(tmp_path, "--health-listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            wm = WorkingMemoryServiceStub(channel)
            ids: dict[str, Any] = {
                "project_id": str(uuid.uuid4()),
                "agent_instance_id": str(uuid.uuid4()),
                "session_id": "cli",
            }
            await LifecycleServiceStub(channel).Spawn(lc.SpawnRequest(**ids))
            await wm.Set(pb.SetRequest(**ids, key="k", value=value({"a": 1})))
            assert python((await wm.Get(pb.GetRequest(**ids, key="k"))).entry.value) == {"a": 1}
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    messages = [r["message"] for r in records]
    serving = [m for m in messages if m.startswith(f"memsvc serving on 127.0.0.1:{port}, ")]
    assert len(serving) == 1, messages
    assert re.search(r", probes on port [1-9]\d*, metrics on port [1-9]\d* \(", serving[0])
    assert messages[-1] == "stopped"
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert (tmp_path / "memsvc.db").exists(), "the embedded store lives under --data-dir"


async def test_no_migrate_leaves_the_schema_alone_and_needs_it_migrated(tmp_path):
    """--no-migrate on a store nobody migrated: memsvc leaves it alone and exits,
    saying what to run; once migrated, it serves."""
    refused = run_to_end(tmp_path, "--no-migrate")
    assert refused.returncode == 1, refused.stderr
    assert "schema is at version 0" in refused.stderr, refused.stderr
    assert "run `memsvc migrate`" in refused.stderr
    # Found by a review: nothing else, as if it had served (a lease release that
    # failed on the missing table, "shutting down", "stopped").
    assert "lease" not in refused.stderr and "stopped" not in refused.stderr, refused.stderr
    store = SqliteDurableStore(f"sqlite:///{tmp_path}/memsvc.db")
    await store.open()
    try:
        assert await store.schema_version() == 0
        await store.migrate()
    finally:
        await store.aclose()
    process, _ = start(tmp_path, "--no-migrate")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr


@pytest.mark.parametrize(
    ("args", "env", "complaint"),
    [
        ([], {"MEMSVC_LISTN": "x"}, "unknown environment variable(s) MEMSVC_LISTN"),
        ([], {"MEMSVC_MAX_VALUE_BYTES": "lots"}, "MEMSVC_MAX_VALUE_BYTES"),
        (["--working-memory-url", "mongodb://x"], {}, "working_memory_url must start with"),
        (["--max-value-bytes", "0"], {}, "must be from 1 to"),
    ],
)
def test_configuration_errors_exit_2_with_a_message(args, env, complaint):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
    done = subprocess.run(
        [MEMSVC, "serve", *args], capture_output=True, text=True, timeout=30, env={**clean, **env}
    )
    assert done.returncode == 2
    assert complaint in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        # libpq took "Horse-Battery@127.0.0.1" for the host: logged at every retry, exit 1.
        ["--database-url", "postgresql://memsvc:S3cretPW@Horse-Battery@127.0.0.1:5432/x"],
        ["--working-memory-url", "redis+cluster://:S3cretPW@"],
        ["--database-url", "postgresql://u:S3cretPW x@127.0.0.1/x"],
        ["--database-url", "postgresql://u@127.0.0.1/x?password=S3cretPW x"],
    ],
)
def test_a_bad_url_exits_2_without_its_password_on_stderr(args):
    """Found by a review: each of these put its password (or part of it) on stderr."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
    done = subprocess.run(
        [MEMSVC, "serve", *args], capture_output=True, text=True, timeout=60, env=clean
    )
    assert done.returncode == 2, done.stderr
    assert "configuration error" in done.stderr
    assert "S3cretPW" not in done.stderr + done.stdout
    assert "Horse-Battery" not in done.stderr + done.stdout


def test_serve_warns_of_client_variables_set_for_server_ones(tmp_path):
    """Found by a review: MEMSVC_TOKEN_FILE (the client commands' variable, not the
    server's MEMSVC_AUTH_TOKENS_FILE) was ignored without a word, and the server
    served without tokens. It still serves (a container may set the client variables
    for its own memsvc commands), but says which variable it reads instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
    env["MEMSVC_TOKEN_FILE"] = str(tmp_path / "token")
    process = subprocess.Popen(
        [MEMSVC, "serve", "--health-listen=", "--metrics-listen=", "--log-format=text",
         "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        said = read_stderr_until(process, "memsvc serving on")
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        process.kill()
    warning = next(line for line in said.splitlines() if "MEMSVC_TOKEN_FILE is set" in line)
    assert "WARNING" in warning and "MEMSVC_AUTH_TOKENS_FILE" in warning
    assert "MEMSVC_TLS_CERT_FILE" not in said  # no client TLS variable set


def test_start_up_failures_say_what_to_fix_without_a_traceback(tmp_path):
    """An address in use, a data dir that is a file: exit 1 and one error line naming
    the address or path (a traceback is for bugs)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
    process, port = start(tmp_path / "first")
    try:
        taken = subprocess.run(
            [MEMSVC, "serve", "--health-listen=", "--metrics-listen=",
             "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "second")],
            capture_output=True, text=True, timeout=60, env=clean,
        )  # fmt: skip
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    (tmp_path / "a-file").write_text("")
    not_a_dir = subprocess.run(
        [MEMSVC, "serve", "--health-listen=", "--metrics-listen=",
         "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "a-file")],
        capture_output=True, text=True, timeout=60, env=clean,
    )  # fmt: skip
    # Found by a review: these two printed a traceback. A database whose migration
    # history differs from this build's (its first migration's checksum altered)...
    migrated = tmp_path / "migrated"
    subprocess.run([MEMSVC, "migrate", "--data-dir", str(migrated)], check=True, env=clean)
    with sqlite3.connect(migrated / "memsvc.db") as db:
        db.execute("UPDATE schema_migrations SET checksum = 'other' WHERE version = 1")
    db.close()
    changed = subprocess.run(
        [MEMSVC, "migrate", "--data-dir", str(migrated)],
        capture_output=True, text=True, timeout=60, env=clean,
    )  # fmt: skip
    for done, says in (
        (taken, f"cannot listen on 127.0.0.1:{port} for the gRPC API"),
        (not_a_dir, str(tmp_path / "a-file")),
        (changed, "0001_installation was changed after it was applied"),
    ):
        assert done.returncode == 1, done.stderr
        assert says in done.stderr
        assert "Traceback" not in done.stderr
    # Found by an ops review: gRPC's C core wrote a line of its own first (its
    # format, not JSON) into the one-JSON-object-per-line log.
    assert [json.loads(line)["level"] for line in taken.stderr.splitlines()][-1] == "error"


@pytest.mark.parametrize(
    ("url_of", "says"),
    [
        (
            lambda url: f"{url.rsplit('/', 1)[0]}/99999",
            "Redis refused memsvc's connection (DB index is out of range): check "
            "working_memory_url (its database number",
        ),
        (
            lambda url: url.replace("redis://", "redis://nobody:wrong@", 1),
            "Redis refused memsvc's credentials (invalid username-password pair",
        ),
    ],
    ids=["database-number", "credentials"],
)
def test_a_redis_url_to_fix_stops_start_up_in_one_line(
    tmp_path: Path, url_of: Callable[[str], str], says: str
):
    """Found by reviews: a database number past the Redis server's `databases`
    printed a traceback, and wrong credentials let memsvc serve, NOT_SERVING, every
    call UNAVAILABLE. No retry helps either: start-up stops, the URL named without
    its password."""
    need(REDIS_URL)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
    done = subprocess.run(
        [MEMSVC, "serve", "--health-listen=", "--metrics-listen=",
         "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path),
         "--working-memory-url", url_of(REDIS_URL)],
        capture_output=True, text=True, timeout=30, env=clean,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert says in done.stderr
    assert "wrong" not in done.stderr
    assert "Traceback" not in done.stderr


def read_stderr_until(process: subprocess.Popen[str], text: str, timeout: float = 30) -> str:
    """What ``process`` wrote to stderr up to ``text``; fails if it ends, or says
    nothing of the kind within ``timeout`` (a bound for a broken test, not a measure).
    Read from the pipe's descriptor, past Python's buffer, as communicate() reads."""
    assert process.stderr is not None
    descriptor, said = process.stderr.fileno(), b""
    deadline = time.monotonic() + timeout
    while text.encode() not in said:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([descriptor], [], [], left)[0]:
            raise AssertionError(f"no {text!r} within {timeout}s: {said.decode()}")
        chunk = os.read(descriptor, 65536)
        if not chunk:
            raise AssertionError(f"ended before saying {text!r}: {said.decode()}")
        said += chunk
    return said.decode(errors="replace")


def test_sigterm_during_start_up_stops_at_once(tmp_path):
    """Start-up retries an unreachable database for about 15 s; SIGTERM ends it now."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
    process = subprocess.Popen(
        [MEMSVC, "serve", "--health-listen=", "--metrics-listen=",
         "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path),
         "--database-url", f"postgresql://postgres@127.0.0.1:{free_port()}/x"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean,
    )  # fmt: skip
    try:
        read_stderr_until(process, RETRYING)  # start-up is retrying the database now
        assert process.poll() is None, "start-up ended by itself before the signal"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=5)  # not the ~15 s of retries
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "stopped during start-up" in stderr


@pytest.mark.parametrize(("stop", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_migrate_does_not_exit_0(stop, status):
    """Found by reviews: Ctrl-C during `memsvc migrate` (here while it retries an
    unreachable database) exited 0, so a script took the migrations as applied; and
    SIGTERM had no handler, which a container's PID 1 (a migration Job) ignores, so
    a stop waited out the grace period. Both end it, each with its own status."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
    process = subprocess.Popen(
        [MEMSVC, "migrate", "--database-url", f"postgresql://postgres@127.0.0.1:{free_port()}/x"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean,
    )  # fmt: skip
    try:
        read_stderr_until(process, RETRYING)  # retrying the database now
        assert process.poll() is None, "migrate ended by itself before the signal"
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == status, stderr


async def test_reflection_describes_the_error_reasons(tmp_path):
    """Every error carries a memsvc.v1.ErrorReason name in its ErrorInfo; a client
    that knows only reflection (grpcurl) can look the enum up. Asked of a `memsvc
    serve` process: in the suite's own process a test may have loaded it already."""
    process, port = start(tmp_path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = ServerReflectionStub(channel).ServerReflectionInfo()
            asked = ServerReflectionRequest(file_containing_symbol="memsvc.v1.ErrorReason")
            await call.write(asked)
            reply = await call.read()
            await call.done_writing()
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert reply.HasField("file_descriptor_response"), reply.error_response.error_message
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    errors = next(f for f in files if f.name == "memsvc/v1/errors.proto")
    reasons = {value.name for value in errors.enum_type[0].value}
    assert {"ERROR_REASON_SESSION_NOT_FOUND", "ERROR_REASON_WORKING_MEMORY_LOST"} <= reasons


def test_every_line_of_a_json_log_is_json_even_from_grpc_s_core(tmp_path):
    """gRPC's C core logs a line of its own format for every failed TLS handshake:
    `memsvc serve` keeps it to errors (GRPC_VERBOSITY, unless set), so plaintext
    connections to a TLS port leave the log one JSON object per line."""
    pki = make_pki(tmp_path / "pki")
    process, port = start(
        tmp_path, "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key)
    )
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as plaintext:
                plaintext.sendall(b"GET / HTTP/1.1\r\nHost: memsvc\r\n\r\n")
                plaintext.recv(100)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    lines = stderr.splitlines()
    assert [line for line in lines if not line.startswith("{")] == []
    assert json.loads(lines[-1])["message"] == "stopped"
