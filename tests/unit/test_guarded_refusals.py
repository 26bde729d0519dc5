"""Why a working-memory call was refused comes from the lifecycle (the guard),
also when the first refusal was a transitional marker that it healed."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from memsvc.domain import (
    EntryWrite,
    MemsvcError,
    SessionNotWritable,
    SessionRef,
    WorkingMemory,
    WriteResult,
)
from memsvc.domain._working_memory import WorkingMemoryLimits
from memsvc.store.memory import InMemoryWorkingMemoryStore

SESSION = SessionRef(
    "0f8fad5b-d9cb-469f-a165-70867728950e", "7c9e6679-7425-40de-944b-e07fc1f90ae7", "s"
)


class RefusingStore(InMemoryWorkingMemoryStore):
    """Refuses every write, as a session in each of ``states`` in turn would."""

    def __init__(self, states: Sequence[str]) -> None:
        super().__init__(max_session_keys=100, max_session_bytes=1 << 20)
        self.states = list(states)

    async def set_entries(
        self, session: SessionRef, writes: Sequence[EntryWrite]
    ) -> list[WriteResult]:
        raise SessionNotWritable(session.session_id, self.states.pop(0))


class Guard:
    """Heals transitional markers (None); explains what the database says otherwise."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def refusal(self, session: SessionRef, state: str, write: bool) -> MemsvcError | None:
        self.asked.append(state)
        if state in ("terminating", "pausing"):
            return None
        return SessionNotWritable(session.session_id, "terminated")


async def refused(states: Sequence[str]) -> tuple[SessionNotWritable, list[str]]:
    guard = Guard()
    memory = WorkingMemory(RefusingStore(states), WorkingMemoryLimits(), guard)
    with pytest.raises(SessionNotWritable) as raised:
        await memory.set(SESSION, "k", b'"v"', None)
    return raised.value, guard.asked


async def test_a_write_after_a_healed_terminate_is_told_terminated():
    # Met 'terminating', healed it (the Terminate had committed and cleared the
    # marker), tried again and met no marker: the database says why.
    error, asked = await refused(["terminating", "missing"])
    assert error.metadata["state"] == "terminated"
    assert asked == ["terminating", "missing"]


async def test_a_write_that_meets_a_new_operation_after_a_heal_says_so():
    error, asked = await refused(["terminating", "pausing"])
    assert error.metadata["state"] == "pausing"
    assert asked == ["terminating", "pausing"]
