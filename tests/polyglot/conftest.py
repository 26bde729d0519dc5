"""Fixtures of the polyglot tests: a real `memsvc serve` process and the Node.js toolchain.

These tests talk to memsvc the way agents in other languages do: over TCP, to the
`memsvc` executable, never to an in-process Server, and with bearer tokens on (the
`memsvc` fixture; `embedded_memsvc` is `make serve`'s default, without them). Node.js
and npm are needed for the Node tests; like a missing backend (tests/conftest.py), a
missing toolchain skips them with the reason on a laptop and fails them under CI=true.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc
import pytest

from memsvc.testing import free_port, wait_for_port
from tests.client._credentials import Pki, new_token, write_token, write_tokens
from tests.conftest import IN_CI, REDIS_URL, Deployment, need, track_project

HERE = Path(__file__).resolve().parent
MEMSVC = Path(sys.executable).parent / "memsvc"
NODE_MAJOR_MINIMUM = 20  # as "engines" in package.json
NPM_CI_TIMEOUT_SECONDS = 50.0  # under the 60 s pytest timeout of the first test
SERVER_START_TIMEOUT_SECONDS = 20.0
SERVER_STOP_TIMEOUT_SECONDS = 15.0


# ------------------------------------------------------------------ memsvc serve


@dataclass(frozen=True)
class Security:
    """What a test server asks of its clients: a bearer token (bound to ``project`` if
    given) and TLS (mutual when ``pki`` is given with ``mutual``)."""

    token: str | None = None
    project: str | None = None
    pki: Pki | None = None
    mutual: bool = False

    def server_env(self, folder: Path) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.token is not None:
            line = self.token if self.project is None else f"{self.token} {self.project}"
            tokens = write_tokens(folder / "server-tokens", line)
            env["MEMSVC_AUTH_TOKENS_FILE"] = str(tokens)
        if self.pki is not None:
            env["MEMSVC_TLS_CERT_FILE"] = str(self.pki.server_cert)
            env["MEMSVC_TLS_KEY_FILE"] = str(self.pki.server_key)
            if self.mutual:
                env["MEMSVC_TLS_CLIENT_CA_FILE"] = str(self.pki.ca)
        return env

    def client_env(self, folder: Path) -> dict[str, str]:
        """The client variables (docs/cli.md) flow.mjs reads, as the CLI does."""
        env: dict[str, str] = {}
        if self.token is not None:
            env["MEMSVC_TOKEN_FILE"] = str(write_token(folder / "token", self.token))
        if self.pki is not None:
            env["MEMSVC_TLS_CA"] = str(self.pki.ca)
            if self.mutual:
                env["MEMSVC_TLS_CERT"] = str(self.pki.client_cert)
                env["MEMSVC_TLS_KEY"] = str(self.pki.client_key)
        return env


@dataclass
class RunningMemsvc:
    """A `memsvc serve` subprocess listening on 127.0.0.1:port."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    security: Security = Security()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        """A blocking gRPC channel with this server's TLS (if any)."""
        pki = self.security.pki
        if pki is None:
            return grpc.insecure_channel(self.address)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=pki.client_key.read_bytes() if self.security.mutual else None,
            certificate_chain=pki.client_cert.read_bytes() if self.security.mutual else None,
        )
        return grpc.secure_channel(self.address, credentials)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata carrying this server's token (if any)."""
        token = self.security.token
        return () if token is None else (("authorization", f"Bearer {token}"),)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for failure messages."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _server_environment(
    port: int, data_dir: Path, working_memory_url: str, database_url: str
) -> dict[str, str]:
    # memsvc refuses unknown MEMSVC_* variables (MEMSVC_TEST_* included), and a
    # developer's own MEMSVC_* settings must not leak into the test server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
    env |= {
        "MEMSVC_LISTEN": f"127.0.0.1:{port}",
        # By default these bind 127.0.0.1:8081 and 127.0.0.1:9464: two servers (or a
        # developer's own memsvc) would collide. The tests need neither.
        "MEMSVC_HEALTH_LISTEN": "",
        "MEMSVC_METRICS_LISTEN": "",
        "MEMSVC_DATA_DIR": str(data_dir),
        "MEMSVC_WORKING_MEMORY_URL": working_memory_url,
        "MEMSVC_SHUTDOWN_GRACE_SECONDS": "2",
    }
    if database_url:  # otherwise the embedded default: SQLite under the data dir
        env["MEMSVC_DATABASE_URL"] = database_url
    return env


def _wait_until_listening(server: RunningMemsvc) -> None:
    """Wait for the port, but give up at once (with the log) if memsvc exits."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
    while True:
        if server.process.poll() is not None:
            pytest.fail(
                f"memsvc serve exited with {server.process.returncode} before listening:\n"
                + server.log_tail()
            )
        try:
            wait_for_port(server.port, timeout=0.25)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                server.process.kill()
                server.process.wait()
                pytest.fail(
                    f"memsvc serve did not listen within {SERVER_START_TIMEOUT_SECONDS}s:\n"
                    + server.log_tail()
                )


def _stop(server: RunningMemsvc) -> None:
    """SIGTERM, as an orchestrator stops it; it must exit 0 within its grace period."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=SERVER_STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        pytest.fail(f"memsvc ignored SIGTERM for {SERVER_STOP_TIMEOUT_SECONDS}s")
    assert server.process.returncode == 0, (
        f"memsvc exited with {server.process.returncode} on SIGTERM:\n{server.log_tail()}"
    )


def start_memsvc(
    tmp_path: Path,
    working_memory_url: str = "memory://",
    database_url: str = "",
    security: Security = Security(),
) -> RunningMemsvc:
    """Start `memsvc serve` on a free port and wait until it listens."""
    port = free_port()
    log_path = tmp_path / "memsvc.log"
    env = _server_environment(port, tmp_path / "data", working_memory_url, database_url)
    env |= security.server_env(tmp_path)
    # The log goes to a file, not a pipe nobody reads while the test runs.
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(MEMSVC), "serve"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = RunningMemsvc(process, port, log_path, security)
    _wait_until_listening(server)
    return server


@contextmanager
def serving(
    tmp_path: Path,
    working_memory_url: str = "memory://",
    database_url: str = "",
    security: Security = Security(),
) -> Iterator[RunningMemsvc]:
    """A `memsvc serve` for the duration of the block, stopped with SIGTERM after it."""
    server = start_memsvc(tmp_path, working_memory_url, database_url, security)
    try:
        yield server
    finally:
        _stop(server)


@pytest.fixture
def flow_project() -> str:
    """The project the Node flow works in; the `memsvc` fixture's token is bound to it."""
    return track_project(str(uuid.uuid4()))


@pytest.fixture
def memsvc(
    deployment: Deployment, tmp_path: Path, request: pytest.FixtureRequest, flow_project: str
) -> Iterator[RunningMemsvc]:
    """`memsvc serve` on each deployment of the contract suite (tests/conftest.py), with
    a bearer token bound to ``flow_project``.

    embedded: in-process working memory and SQLite in tmp_path. production: the Redis
    at MEMSVC_TEST_REDIS_URL and a PostgreSQL database of this test's own, dropped after
    the server stops.
    """
    working_memory_url, database_url = "memory://", ""
    if deployment.working_memory == "redis":
        need(REDIS_URL)
        working_memory_url = REDIS_URL
    if deployment.durable == "postgres":
        database_url = request.getfixturevalue("fresh_postgres_url")
    security = Security(token=new_token(), project=flow_project)
    with serving(tmp_path, working_memory_url, database_url, security) as server:
        yield server


@pytest.fixture
def embedded_memsvc(tmp_path: Path) -> Iterator[RunningMemsvc]:
    """`memsvc serve` on the embedded default, as `make serve` runs it."""
    with serving(tmp_path) as server:
        yield server


# ------------------------------------------------------------------ Node.js


@dataclass(frozen=True)
class NodeToolchain:
    """Node.js, with tests/polyglot/node_modules installed from package-lock.json."""

    node: str
    version: str


def _toolchain_missing(reason: str) -> NoReturn:
    """Skip on a laptop; fail under CI=true, where a skip would hide the gap."""
    if IN_CI:
        pytest.fail(f"CI=true and the Node.js toolchain is missing: {reason}")
    pytest.skip(reason)


def _require_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        _toolchain_missing(
            f"`{name}` is not on PATH (the polyglot tests drive memsvc from Node.js)"
        )
    return found


def _node_version(node: str) -> str:
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    major = int(version.lstrip("v").split(".")[0])
    if major < NODE_MAJOR_MINIMUM:
        _toolchain_missing(f"Node.js {version} is older than {NODE_MAJOR_MINIMUM}")
    return version


# npm rewrites this "hidden lockfile" on every install, so its age is the age of the
# installed tree.
INSTALLED_MARKER = HERE / "node_modules" / ".package-lock.json"
MANIFESTS = (HERE / "package.json", HERE / "package-lock.json")


def _node_modules_current() -> bool:
    if not INSTALLED_MARKER.exists():
        return False
    installed = INSTALLED_MARKER.stat().st_mtime
    return all(installed >= manifest.stat().st_mtime for manifest in MANIFESTS)


@contextmanager
def _install_lock() -> Iterator[None]:
    """One `npm ci` at a time per checkout, should two pytest runs start together."""
    digest = hashlib.sha256(str(HERE).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"memsvc-polyglot-npm-{digest}.lock"
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _install_node_modules(npm: str) -> None:
    """`npm ci` when node_modules is missing or older than package(-lock).json."""
    with _install_lock():
        if _node_modules_current():
            return
        # npm ci installs exactly package-lock.json (and fails if package.json
        # disagrees with it). No install scripts: none of these packages needs one.
        command = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"]
        try:
            done = subprocess.run(
                command, cwd=HERE, capture_output=True, text=True, timeout=NPM_CI_TIMEOUT_SECONDS
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"`npm ci` in {HERE} took more than {NPM_CI_TIMEOUT_SECONDS}s")
        if done.returncode != 0:
            pytest.fail(
                f"`npm ci` in {HERE} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
            )


@pytest.fixture(scope="session")
def node_toolchain() -> NodeToolchain:
    """Node.js and the pinned @grpc/grpc-js and @grpc/proto-loader, installed once."""
    node = _require_tool("node")
    npm = _require_tool("npm")
    version = _node_version(node)
    _install_node_modules(npm)
    return NodeToolchain(node, version)
