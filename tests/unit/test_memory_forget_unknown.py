"""The in-process store's half of a purge: the scope's sessions the database does
not know (docs/decisions: a Spawn that died after its first step)."""

from __future__ import annotations

import uuid

import pytest

from memsvc.domain import EntryWrite, SessionRef
from memsvc.store.memory import InMemoryWorkingMemoryStore


async def spawned(store: InMemoryWorkingMemoryStore, session: SessionRef) -> None:
    await store.begin_spawn(session, "op", "epoch", [EntryWrite("a", b"1", None)])
    await store.finish(session, "op", "active", swap=False, clear=False)


@pytest.mark.parametrize(
    ("scope_of", "forgotten"),
    [
        (lambda s: SessionRef(s.project_id, "", ""), {"orphan", "sibling", "cousin"}),
        (lambda s: SessionRef(s.project_id, s.agent_instance_id, ""), {"orphan", "sibling"}),
        (lambda s: s, {"orphan"}),
    ],
    ids=["project", "agent_instance", "session"],
)
async def test_forget_unknown_takes_the_scope_but_not_the_known(scope_of, forgotten) -> None:
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
    assert await store.forget_unknown(scope, [sessions["known"]]) == len(forgotten)

    for name, session in sessions.items():
        assert (await store.read_marker(session) is None) == (name in forgotten), name
