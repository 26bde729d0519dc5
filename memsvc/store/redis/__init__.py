"""Redis adapters."""

from memsvc.store.redis._working_memory import RedisWorkingMemoryStore, session_keys

__all__ = ["RedisWorkingMemoryStore", "session_keys"]
