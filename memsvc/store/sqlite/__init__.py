"""SQLite adapters (the embedded default)."""

from memsvc.store.sqlite._store import SqliteDurableStore, sqlite_path

__all__ = ["SqliteDurableStore", "sqlite_path"]
