"""A working-memory store that holds one lifecycle step 3 until the test lets it go."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from memsvc.domain import SessionRef
from memsvc.server import Server
from memsvc.store.memory import InMemoryWorkingMemoryStore
from tests.helpers import embedded_config


class HeldStep3(InMemoryWorkingMemoryStore):
    """Holds the first step 3 (``finish``) that ``holds`` picks, by its final state
    and whether it swaps staging in, until ``release`` is set; ``reached`` is set
    when it arrives. ``outcomes`` says how the held one ended: "settled", or the
    name of what it raised (LostOperation: another caller had settled it)."""

    def __init__(self, holds: Callable[[str | None, bool], bool]) -> None:
        super().__init__(max_session_keys=100, max_session_bytes=1 << 20)
        self._picks = holds
        self.release = asyncio.Event()
        self.reached = asyncio.Event()
        self.held = 0
        self.outcomes: list[str] = []

    async def finish(
        self, session: SessionRef, op: str, final_state: str | None, swap: bool, clear: bool
    ) -> None:
        if self.held or not self._picks(final_state, swap):
            await super().finish(session, op, final_state, swap, clear)
            return
        self.held += 1
        self.reached.set()
        await self.release.wait()
        try:
            await super().finish(session, op, final_state, swap, clear)
        except Exception as error:
            self.outcomes.append(type(error).__name__)
            raise
        self.outcomes.append("settled")


@contextlib.asynccontextmanager
async def serving(
    holds: Callable[[str | None, bool], bool], data_dir: Path
) -> AsyncIterator[tuple[Server, HeldStep3, grpc.aio.Channel]]:
    """An embedded server over a HeldStep3 store that holds what ``holds`` picks,
    and a channel to it."""
    store = HeldStep3(holds)
    async with (
        Server(embedded_config(data_dir), working_memory=store) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield server, store, channel
