"""The lifecycle and watch contract suites, again, through PgBouncer in transaction mode.

One private PgBouncer per test run (``memsvc.testing.PrivatePgBouncer``) pools the
shared PostgreSQL; memsvc's ``database_url`` goes through it, as at scale every
sidecar's does. The event tail cannot LISTEN through a transaction pooler, so
``database_listen_url`` is the direct URL, except in modules that set
``LISTEN = "off"``, where the tail polls. Working memory is the shared Redis.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from memsvc.config import Config
from memsvc.testing import free_port
from memsvc.testing._pgbouncer import PrivatePgBouncer
from tests.conftest import IN_CI, Deployment
from tests.contract.conftest import spawned

__all__ = ["spawned"]  # the contract suite's fixture, here too

POOLER = Deployment("pooler", "redis", "postgres")


@pytest.fixture(scope="session")
def pgbouncer() -> Iterator[PrivatePgBouncer]:
    # Not under pytest's tmp_path: PgBouncer runs as the postgres user, which
    # cannot enter root's private temporary directories.
    workdir = Path(tempfile.mkdtemp(prefix="memsvc-pgbouncer-"))
    bouncer = PrivatePgBouncer(free_port(), workdir)
    try:
        try:
            bouncer.start()
        except FileNotFoundError as error:
            if IN_CI:
                pytest.fail(f"CI=true and the PgBouncer tests cannot run: {error}")
            pytest.skip(str(error))
        yield bouncer
    finally:
        bouncer.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(params=["pooler"])
def deployment() -> Deployment:
    return POOLER


@pytest.fixture
def base_config(
    base_config: Config,
    pgbouncer: PrivatePgBouncer,
    postgres_url: str,
    request: pytest.FixtureRequest,
) -> Config:
    """tests/conftest.py's production configuration, its database through the pooler."""
    database = urlsplit(postgres_url).path.lstrip("/")
    listen = getattr(request.module, "LISTEN", "direct")
    return replace(
        base_config,
        database_url=pgbouncer.url(database),
        database_listen_url=postgres_url if listen == "direct" else "off",
        # PgBouncer 1.18 (Debian's) in transaction mode cannot keep prepared statements.
        database_prepared_statements=False,
        event_poll_interval_seconds=1.0 if listen == "direct" else 0.1,
    )
