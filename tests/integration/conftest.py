"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from memsvc.config import Config
from tests.helpers import local_server_config


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty durable store: a SQLite file, or a PostgreSQL database of the test's own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/memsvc.db"
    url: str = request.getfixturevalue("fresh_postgres_url")
    return url


@pytest.fixture
def local_config(tmp_path: Path, database_url: str) -> Config:
    """A server on a free local port over ``database_url``, without the health and
    metrics listeners (for tests that bring their own working-memory store)."""
    return local_server_config(tmp_path, database_url)
