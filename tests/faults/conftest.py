"""Fixtures of the fault suite: private backends, proxies and memsvc processes.

Nothing here touches the shared Redis or PostgreSQL: every test gets a
redis-server and a PostgreSQL cluster (initdb) of its own on free ports, and
memsvc runs as a separate process so that it can be killed for real. A missing
redis-server or PostgreSQL server binary skips the test on a laptop and fails it
under CI=true.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from memsvc.testing import PrivateRedis, free_port
from memsvc.testing._postgres import PrivatePostgres, postgres_bindir
from memsvc.testing._proxy import TcpProxy
from tests.conftest import IN_CI
from tests.faults._support import DATABASE_OPTIONS, AofRedis, MemsvcProcess


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true and the fault suite cannot run: {what}")
    pytest.skip(what)


class Rig:
    """One memsvc process on private backends, optionally behind TCP proxies."""

    def __init__(self, tmp_path: Path, *, redis_keeps_data: bool, proxies: bool) -> None:
        self.tmp_path = tmp_path
        self.postgres = PrivatePostgres()
        redis_class = AofRedis if redis_keeps_data else PrivateRedis
        self.redis: PrivateRedis = redis_class(free_port(), tmp_path / "redis")
        self.redis_proxy: TcpProxy | None = None
        self.postgres_proxy: TcpProxy | None = None
        self.memsvc: MemsvcProcess | None = None
        self._proxies = proxies

    def start(
        self, failpoints: str = "", env: dict[str, str] | None = None, args: list[str] | None = None
    ) -> MemsvcProcess:
        self.postgres.start()
        self.redis.start()
        redis_port, postgres_port = self.redis.port, self.postgres.port
        if self._proxies:
            self.redis_proxy = TcpProxy(self.redis.port)
            self.redis_proxy.start()
            self.postgres_proxy = TcpProxy(self.postgres.port)
            self.postgres_proxy.start()
            redis_port, postgres_port = self.redis_proxy.port, self.postgres_proxy.port
        self.memsvc = MemsvcProcess(
            self.tmp_path / "memsvc",
            f"redis://127.0.0.1:{redis_port}/0",
            self.postgres.url_for("postgres", port=postgres_port) + DATABASE_OPTIONS,
        )
        self.memsvc.start(failpoints, env=env, args=args or [])
        return self.memsvc

    def close(self) -> None:
        if self.memsvc is not None:
            self.memsvc.kill()
        for proxy in (self.redis_proxy, self.postgres_proxy):
            if proxy is not None:
                proxy.close()
        self.redis.kill()
        self.postgres.close()


RigFactory = Callable[..., Rig]


@pytest.fixture
def make_rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RigFactory]:
    """``make_rig(redis_keeps_data=False, proxies=False)``: backends made (not started)."""
    if shutil.which("redis-server") is None:
        _missing("redis-server is not installed")
    try:
        postgres_bindir()
    except FileNotFoundError as error:
        _missing(str(error))
    rigs: list[Rig] = []

    def make(*, redis_keeps_data: bool = False, proxies: bool = False) -> Rig:
        rig = Rig(tmp_path, redis_keeps_data=redis_keeps_data, proxies=proxies)
        rigs.append(rig)
        return rig

    yield make
    failed = any(
        getattr(request.node, f"rep_{when}", None) is not None
        and getattr(request.node, f"rep_{when}").failed
        for when in ("setup", "call")
    )
    for rig in rigs:
        if failed and rig.memsvc is not None:
            print(f"--- memsvc log ({rig.memsvc.log_path}):\n{rig.memsvc.log_tail(120)}")
            print(f"--- PostgreSQL log:\n{rig.postgres.log()[-4000:]}")
        rig.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so teardown knows whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
