"""The durable store port: where everything that must survive a restart lives."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

from memsvc.domain._episodes import EpisodeDatabase, EpisodeTransaction
from memsvc.domain._graph_checkpoints import GraphDatabase, GraphTransaction
from memsvc.domain._lifecycle_records import LifecycleDatabase, LifecycleTransaction
from memsvc.domain._purge import PurgeDatabase, PurgeTransaction
from memsvc.domain._watch import EventSource


class DurableTransaction(
    LifecycleTransaction, EpisodeTransaction, PurgeTransaction, GraphTransaction, Protocol
):
    """One durable-store transaction: every feature's writes."""


class DurableStore(
    LifecycleDatabase, EpisodeDatabase, PurgeDatabase, GraphDatabase, EventSource, Protocol
):
    """SQLite (embedded default) or PostgreSQL (production): connection,
    migrations and health here, each feature's data through the base ports."""

    backend_name: str

    @property
    def readers(self) -> int:
        """Reads that can run at once outside a write transaction (connections)."""

    def transaction(self) -> AbstractAsyncContextManager[DurableTransaction]:
        """A transaction that commits when the block ends normally."""

    async def open(self) -> None:
        """Connect; nothing connects in ``__init__``."""

    async def aclose(self) -> None:
        """Close every connection."""

    async def ping(self) -> None:
        """Raise ``BackendUnavailable`` unless the database answers now."""

    async def migrate(self) -> list[int]:
        """Apply pending migrations exactly once, even with many processes at once.

        Returns the versions this call applied.
        """

    async def schema_version(self) -> int:
        """The highest migration version applied to the database (0 for none)."""

    def bundled_schema_version(self) -> int:
        """The highest migration version this memsvc brings: the schema it needs."""
