"""Helpers for tests of memsvc and of code that talks to it (not used in serving)."""

from memsvc.testing._backends import (
    BackendUnreachable,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    require_backend,
)
from memsvc.testing._cluster import PrivateRedisCluster
from memsvc.testing._processes import PrivateRedis, wait_for_port
from memsvc.testing._wire import WireCounts, WireMeter

__all__ = [
    "BackendUnreachable",
    "PrivateRedis",
    "PrivateRedisCluster",
    "WireCounts",
    "WireMeter",
    "create_postgres_database",
    "drop_postgres_database",
    "free_port",
    "require_backend",
    "wait_for_port",
]
