"""PostgreSQL adapters."""

from memsvc.store.postgres._store import PostgresDurableStore

__all__ = ["PostgresDurableStore"]
