"""An in-process working-memory store whose reads wait for a gate: calls held in
flight for as long as a test needs (shutdown, call limits, deadlines)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from memsvc.domain import BatchRead, SessionRef
from memsvc.store.memory import InMemoryWorkingMemoryStore


class GatedStore(InMemoryWorkingMemoryStore):
    """Reads wait for ``gate``; ``entered`` is set by the first, ``waiting`` counts
    the reads held now."""

    def __init__(self) -> None:
        super().__init__(max_session_keys=100, max_session_bytes=1 << 20)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.waiting = 0

    async def get_entries(
        self, session: SessionRef, keys: Sequence[str], budget_bytes: int
    ) -> BatchRead:
        self.entered.set()
        self.waiting += 1
        try:
            await self._wait_for_gate()
        finally:
            self.waiting -= 1
        return await super().get_entries(session, keys, budget_bytes)

    async def _wait_for_gate(self) -> None:
        await self.gate.wait()


class StubbornStore(GatedStore):
    """Reads that ignore their cancellation: a handler that never unwinds."""

    async def _wait_for_gate(self) -> None:
        while not self.gate.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self.gate.wait()
