"""The durable store port: where everything that must survive a restart lives."""

from __future__ import annotations

from typing import Protocol

from memsvc.domain._lifecycle_records import LifecycleDatabase
from memsvc.domain._watch import EventSource


class DurableStore(LifecycleDatabase, EventSource, Protocol):
    """SQLite (embedded default) or PostgreSQL (production): connection,
    migrations and health here, lifecycle and events through the base ports."""

    backend_name: str

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
