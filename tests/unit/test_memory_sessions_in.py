"""The in-process store's part of a purge: the sessions of a scope it holds working
memory of, whether the database knows them or not (a Spawn that died after its
first step leaves one it does not)."""

from __future__ import annotations

import uuid

import pytest

from memsvc.domain import EntryWrite, SessionRef
from memsvc.store.memory import InMemoryWorkingMemoryStore


async def spawned(store: InMemoryWorkingMemoryStore, session: SessionRef) -> None:
    await store.begin_spawn(session, "op", "epoch", [EntryWrite("a", b"1", None)])
    await store.finish(session, "op", "active", swap=False, clear=False)


@pytest.mark.parametrize(
    ("scope_of", "found"),
    [
        (lambda s: SessionRef(s.project_id, "", ""), {"orphan", "sibling", "known", "cousin"}),
        (
            lambda s: SessionRef(s.project_id, s.agent_instance_id, ""),
            {"orphan", "sibling", "known"},
        ),
        (lambda s: s, {"orphan"}),
    ],
    ids=["project", "agent_instance", "session"],
)
async def test_sessions_in_a_scope(scope_of, found) -> None:
    store = InMemoryWorkingMemoryStore(max_session_keys=10, max_session_bytes=1 << 20)
    project, agent = str(uuid.uuid4()), str(uuid.uuid4())
    sessions = {
        "orphan": SessionRef(project, agent, "orphan"),
        "sibling": SessionRef(project, agent, "sibling"),
        "known": SessionRef(project, agent, "known"),
        "cousin": SessionRef(project, str(uuid.uuid4()), "cousin"),
        "stranger": SessionRef(str(uuid.uuid4()), agent, "stranger"),
    }
    for session in sessions.values():
        await spawned(store, session)

    scope = scope_of(sessions["orphan"])
    assert set(await store.sessions_in(scope)) == {sessions[name] for name in found}
