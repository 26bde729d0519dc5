"""Shared fixtures: backends (real ones, never mocks) and servers on ephemeral ports.

Backends come from MEMSVC_TEST_REDIS_URL and MEMSVC_TEST_DATABASE_URL (defaults:
the local Redis and PostgreSQL). When one is unreachable its tests skip with the
reason on a laptop; under CI=true they fail instead, so CI can never go green by
skipping.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import redis

from memsvc.config import Config
from memsvc.server import Server, task_stacks
from memsvc.store.redis._working_memory import KEY_PREFIX
from memsvc.testing import (
    BackendUnreachable,
    create_postgres_database,
    drop_postgres_database,
    require_backend,
)
from memsvc.v1 import working_memory_pb2_grpc

REDIS_URL = os.environ.get("MEMSVC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get(
    "MEMSVC_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# Outcomes that, under CI=true, fail a run whose tests otherwise passed: CI must
# never go green by skipping, expecting a failure, or leaving tests out.
_NOT_RUN_IN_CI = ("skipped", "xfailed", "xpassed", "deselected")


@pytest.hookimpl(trylast=True)  # the status other plugins settled on, for the exit below
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI=true a test skipped, expected to fail or deselected fails the run."""
    _finished.append(session)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not IN_CI or reporter is None or session.exitstatus != 0:
        return
    counts = {outcome: len(reporter.stats.get(outcome, [])) for outcome in _NOT_RUN_IN_CI}
    found = ", ".join(f"{count} {outcome}" for outcome, count in counts.items() if count)
    if found:
        reporter.write_line(f"CI=true: {found}; failing the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# The session whose final status the exit below reports.
_finished: list[pytest.Session] = []
LINGERING_THREADS_SECONDS = 10.0


def _lingering_threads() -> list[threading.Thread]:
    return [
        thread
        for thread in threading.enumerate()
        if thread is not threading.main_thread() and not thread.daemon and thread.is_alive()
    ]


@pytest.hookimpl(trylast=True)  # after every other plugin's (output capture stopped)
def pytest_unconfigure(config: pytest.Config) -> None:
    """A test that fails before stopping its server leaves the server's non-daemon
    threads running (aiosqlite's workers, an HTTP listener), and the interpreter
    would wait for them for ever: a run that must fail loudly would hang instead.
    They get a moment to end; then the run exits, failed (a leak is a defect too),
    after the exit handlers (which stop the private backends tests started)."""
    deadline = time.monotonic() + LINGERING_THREADS_SECONDS
    for thread in _lingering_threads():
        thread.join(max(0.0, deadline - time.monotonic()))
    lingering = _lingering_threads()
    if not lingering:
        return
    names = ", ".join(sorted(thread.name for thread in lingering))
    print(f"\nthreads left running by the tests: {names}; exiting without them", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    status = int(_finished[-1].exitstatus) if _finished else 0
    os._exit(status or pytest.ExitCode.TESTS_FAILED)


# Projects whose working memory a test may have put in the shared Redis: those of the
# `scope` fixture and any a test names with track_project. Their keys are deleted after
# each test (once its servers have stopped: the autouse fixture below is set up first,
# so torn down last) and, for what a late write may add, again at the end of the run.
_TEST_PROJECTS: set[str] = set()
_RUN_PROJECTS: set[str] = set()


def track_project(project_id: str) -> str:
    """Have this test's Redis keys of ``project_id`` deleted after it; returns the id."""
    _TEST_PROJECTS.add(project_id)
    _RUN_PROJECTS.add(project_id)
    return project_id


def delete_project_keys(projects: set[str]) -> None:
    """Delete the shared Redis's memsvc keys of these projects (one SCAN of memsvc's
    keys, whatever the number of projects); nothing when Redis is not there."""
    if not projects:
        return
    tags = {project.lower().replace("-", "") for project in projects}
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        doomed = [
            key
            for key in client.scan_iter(match=f"{KEY_PREFIX}:{{*", count=1000)
            if key.decode().partition("{")[2].partition(".")[0] in tags
        ]
        for start in range(0, len(doomed), 1000):
            client.delete(*doomed[start : start + 1000])
    except redis.ConnectionError:
        pass  # no shared Redis, so nothing of these projects in it
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _forget_test_projects() -> Iterator[None]:
    _TEST_PROJECTS.clear()
    yield
    delete_project_keys(_TEST_PROJECTS)
    _TEST_PROJECTS.clear()


@pytest.fixture(scope="session", autouse=True)
def _forget_run_projects() -> Iterator[None]:
    yield
    delete_project_keys(_RUN_PROJECTS)


def need(url: str) -> None:
    """Skip (or, under CI=true, fail) when the backend at ``url`` is unreachable."""
    try:
        require_backend(url)
    except BackendUnreachable as error:
        if IN_CI:
            pytest.fail(f"CI=true and a required backend is missing: {error}")
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of its own for this test run, dropped at the end."""
    need(DATABASE_URL)
    url = create_postgres_database(DATABASE_URL)
    yield url
    drop_postgres_database(DATABASE_URL, url)


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """An empty database for one test (migration tests)."""
    need(DATABASE_URL)
    url = create_postgres_database(DATABASE_URL)
    yield url
    drop_postgres_database(DATABASE_URL, url)


@dataclass(frozen=True)
class Deployment:
    """A pair of backends the contract suite runs against."""

    name: str
    working_memory: str
    durable: str


DEPLOYMENTS = {
    "embedded": Deployment("embedded", "memory", "sqlite"),
    "production": Deployment("production", "redis", "postgres"),
}


@pytest.fixture(params=sorted(DEPLOYMENTS))
def deployment(request: pytest.FixtureRequest) -> Deployment:
    return DEPLOYMENTS[request.param]


@pytest.fixture
def base_config(deployment: Deployment, tmp_path: Path, request: pytest.FixtureRequest) -> Config:
    """Configuration of a server on a free port, on the deployment's backends."""
    working_memory_url = "memory://"
    database_url = ""
    if deployment.working_memory == "redis":
        need(REDIS_URL)
        working_memory_url = REDIS_URL
    if deployment.durable == "postgres":
        database_url = request.getfixturevalue("postgres_url")
    return Config(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path / "data"),
        working_memory_url=working_memory_url,
        database_url=database_url,
        health_interval_seconds=0.2,
        shutdown_grace_seconds=2,
        # The probe and metrics ports are off unless a test turns them on.
        health_listen="",
        metrics_listen="",
    )


async def stop_or_explain(server: Server, limit: float = 30) -> None:
    """Stop a test server; if that hangs, fail with every task's stack, not a bare timeout."""
    try:
        await asyncio.wait_for(server.stop(), limit)
    except TimeoutError:
        stacks = task_stacks(asyncio.all_tasks())
        pytest.fail(f"Server.stop() did not finish in {limit}s; tasks:\n{stacks}")


@pytest.fixture
def config_overrides() -> dict[str, object]:
    """Override in a test module (or with indirect parametrization) to change limits."""
    return {}


@pytest.fixture
async def server(base_config: Config, config_overrides: dict[str, object]) -> AsyncIterator[Server]:
    running = Server(replace(base_config, **config_overrides))  # type: ignore[arg-type]
    await running.start()
    try:
        yield running
    finally:
        await stop_or_explain(running)


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan


@pytest.fixture
def wm(channel: grpc.aio.Channel) -> working_memory_pb2_grpc.WorkingMemoryServiceStub:
    return working_memory_pb2_grpc.WorkingMemoryServiceStub(channel)


@pytest.fixture
def scope() -> dict[str, str]:
    """Fresh scope ids for one test, so tests never see each other's data."""
    return {
        "project_id": track_project(str(uuid.uuid4())),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": f"session-{uuid.uuid4().hex[:8]}",
    }
