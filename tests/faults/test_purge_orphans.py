"""A purge forgets the working memory of a Spawn that died after its first step.

Such a Spawn leaves the session's entries and a 'spawning' marker in Redis, and no
row in the database. Nothing lists the session, and nothing would heal the marker
unless the same id were spawned again, so only the purge of its scope can remove
the entries. It must, and it must leave other scopes' memory alone.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
import redis

from memsvc.domain import SessionRef
from memsvc.failpoints import CRASH_EXIT_STATUS
from memsvc.store.redis import session_keys
from memsvc.v1 import data_removal_pb2 as dr
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.data_removal_pb2_grpc import DataRemovalServiceStub
from tests.faults._support import Stubs, expect_code, wait_serving
from tests.faults.conftest import Rig, RigFactory
from tests.helpers import value


def keys_of(rig: Rig, project_id: str) -> list[bytes]:
    """Every Redis key of the project's working memory (its sessions' hash tags
    start with the project id's 32 hex digits)."""
    with redis.Redis(port=rig.redis.port, socket_timeout=5) as client:
        return list(client.scan_iter(match=f"*{{{project_id.replace('-', '')}.*"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scope", ["project", "agent_instance", "session"])
async def test_a_purge_forgets_the_memory_a_crashed_spawn_left(make_rig: RigFactory, scope: str):
    rig = make_rig()
    memsvc = rig.start(failpoints="spawn.after_prepare=crash")
    project, agent = str(uuid.uuid4()), str(uuid.uuid4())
    orphan: dict[str, Any] = {
        "project_id": project,
        "agent_instance_id": agent,
        "session_id": "orphan",
    }
    entries = [pb.EntryInput(key="secret", value=value("forget me"))]
    async with grpc.aio.insecure_channel(memsvc.target) as channel:
        await expect_code(
            Stubs(channel).life.Spawn(lc.SpawnRequest(**orphan, initial_entries=entries)),
            grpc.StatusCode.UNAVAILABLE,
        )
    assert memsvc.wait(30) == CRASH_EXIT_STATUS, memsvc.log_tail()
    assert keys_of(rig, project), "the crashed Spawn left its working memory"

    memsvc.start()
    # Spawned for real: a session of the same agent instance, one of another agent
    # instance of the project, and one of another project, which no purge here touches.
    known = {**orphan, "session_id": "known"}
    cousin = {**orphan, "agent_instance_id": str(uuid.uuid4()), "session_id": "cousin"}
    other = {**orphan, "project_id": str(uuid.uuid4())}
    async with grpc.aio.insecure_channel(memsvc.target) as channel:
        stubs = Stubs(channel)
        await wait_serving(stubs)
        for ids in (known, cousin, other):
            await stubs.life.Spawn(lc.SpawnRequest(**ids, initial_entries=entries))
        request = dr.PurgeDataRequest(
            project_id=project,
            agent_instance_id=agent if scope != "project" else "",
            session_id="orphan" if scope == "session" else "",
        )
        report = await DataRemovalServiceStub(channel).PurgeData(request)
    purged = {"project": ["known", "cousin"], "agent_instance": ["known"], "session": []}[scope]
    assert report.sessions_deleted == len(purged)
    # The orphan's working memory too: no row named it.
    assert report.working_memories_deleted == len(purged) + 1
    remaining = {tag_of(key) for key in keys_of(rig, project)}
    expected = {tag_of_ids(ids) for ids in (known, cousin) if ids["session_id"] not in purged}
    assert remaining == expected
    assert keys_of(rig, other["project_id"]), "another project's memory was touched"


def tag_of(key: bytes) -> str:
    return key.decode().split("{", 1)[1].split("}", 1)[0]


def tag_of_ids(ids: dict[str, Any]) -> str:
    return tag_of(session_keys(SessionRef(**ids))[0].encode())
