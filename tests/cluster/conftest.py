"""The working-memory and lifecycle contract suites, again, on a 3-master Redis Cluster.

The modules here reuse the contract modules (see ``_reuse.py``); the fixtures
below replace the ``deployment`` of tests/conftest.py with one deployment,
``cluster``: working memory on a private Redis Cluster started once per test
run (``redis-server --cluster-enabled yes`` on free ports, joined with
``redis-cli --cluster create``), durable store on PostgreSQL. No test here
touches the shared Redis (the cleanup of tests/conftest.py finds nothing there);
the private cluster is flushed after each test instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from memsvc.config import Config
from memsvc.testing import PrivateRedisCluster
from tests.conftest import IN_CI, Deployment
from tests.contract.conftest import spawned

__all__ = ["spawned"]  # the contract suite's fixture, offered here too

CLUSTER = Deployment("cluster", "redis-cluster", "postgres")


def start_cluster(workdir: Path) -> PrivateRedisCluster:
    """A running private cluster; skips (fails under CI=true) without redis-server."""
    cluster = PrivateRedisCluster(workdir)
    try:
        cluster.start()
    except FileNotFoundError as error:
        if IN_CI:
            pytest.fail(f"CI=true and Redis Cluster tests cannot run: {error}")
        pytest.skip(str(error))
    return cluster


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedisCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(params=["cluster"])
def deployment() -> Deployment:
    return CLUSTER


@pytest.fixture
def base_config(base_config: Config, redis_cluster: PrivateRedisCluster) -> Config:
    """tests/conftest.py's configuration (PostgreSQL), with working memory on the cluster."""
    return replace(base_config, working_memory_url=redis_cluster.url)


@pytest.fixture(autouse=True)
def _flush_cluster(redis_cluster: PrivateRedisCluster) -> Iterator[None]:
    yield
    redis_cluster.flush()
