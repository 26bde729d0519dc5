"""Storage adapters, chosen by URL (see docs/configuration.md)."""

from __future__ import annotations

from memsvc.config import Config
from memsvc.domain import DurableStore, MemoryStore
from memsvc.store.memory import InMemoryWorkingMemoryStore
from memsvc.store.postgres import PostgresDurableStore
from memsvc.store.redis import RedisWorkingMemoryStore
from memsvc.store.sqlite import SqliteDurableStore


def working_memory_store(config: Config) -> MemoryStore:
    """The working-memory store named by ``config.working_memory_url`` (not yet open).

    ``memory://``: in this process. ``redis://``, ``rediss://``, ``unix://``: one
    Redis. ``redis+cluster://``, ``rediss+cluster://``: a Redis Cluster, with the
    same store and scripts on redis-py's cluster client (ADR 0007).
    """
    url = config.working_memory_url
    if url.startswith("memory://"):
        return InMemoryWorkingMemoryStore(
            max_session_keys=config.max_session_keys, max_session_bytes=config.max_session_bytes
        )
    return RedisWorkingMemoryStore(
        url,
        max_session_keys=config.max_session_keys,
        max_session_bytes=config.max_session_bytes,
        max_connections=config.redis_max_connections,
    )


def durable_store(config: Config) -> DurableStore:
    """The durable store named by ``config.database_url`` (not yet open)."""
    url = config.database_url
    if url.startswith("sqlite://"):
        return SqliteDurableStore(url)
    return PostgresDurableStore(
        url,
        max_connections=config.database_max_connections,
        listen_url=config.database_listen_url or None,
        prepared_statements=config.database_prepared_statements,
    )


__all__ = ["durable_store", "working_memory_store"]
