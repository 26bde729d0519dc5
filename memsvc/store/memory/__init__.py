"""In-process adapters (the embedded default)."""

from memsvc.store.memory._working_memory import InMemoryWorkingMemoryStore, wall_clock_ms

__all__ = ["InMemoryWorkingMemoryStore", "wall_clock_ms"]
