"""A Spawn in the project a purge is forgetting finishes before it or after it,
never in the middle.

A purge runs statement after statement (sessions, working memory, episodes,
request answers, events), each seeing what committed before it. A Spawn that
committed in between would survive as a session whose SPAWNED event was
tombstoned and whose request answer was forgotten, so a retry would spawn it
again. The store here starts a Spawn of a new session in the middle of the
purge (while it forgets the working memory) and gives it time to commit.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from memsvc.config import Config
from memsvc.domain import SessionRef
from memsvc.server import Server
from memsvc.store.memory import InMemoryWorkingMemoryStore
from memsvc.v1 import data_removal_pb2 as dr
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1.data_removal_pb2_grpc import DataRemovalServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.helpers import sql_rows


class SpawnDuringForget(InMemoryWorkingMemoryStore):
    """Runs ``during`` as a task when the purge forgets the working memory, and
    leaves it time to commit before the purge goes on."""

    def __init__(self) -> None:
        super().__init__(max_session_keys=100, max_session_bytes=1 << 20)
        self.during: Callable[[], Awaitable[Any]] | None = None
        self.started: asyncio.Future[Any] | None = None

    async def forget(self, sessions: Sequence[SessionRef]) -> int:
        if self.during is not None and self.started is None:
            self.started = asyncio.ensure_future(self.during())
            await asyncio.sleep(0.3)
        return await super().forget(sessions)


async def test_a_spawn_during_a_purge_is_not_half_purged(local_config: Config, database_url: str):
    store = SpawnDuringForget()
    project, agent = str(uuid.uuid4()), str(uuid.uuid4())
    async with (
        Server(local_config, working_memory=store) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        life = LifecycleServiceStub(channel)
        await life.Spawn(lc.SpawnRequest(project_id=project, agent_instance_id=agent,
                                         session_id="old"))  # fmt: skip
        request_id = str(uuid.uuid4())
        new = lc.SpawnRequest(project_id=project, agent_instance_id=agent, session_id="new",
                              request_id=request_id)  # fmt: skip
        store.during = lambda: life.Spawn(new)
        report = await DataRemovalServiceStub(channel).PurgeData(
            dr.PurgeDataRequest(project_id=project)
        )
        assert store.started is not None
        await asyncio.wait_for(store.started, 10)
        assert report.sessions_deleted == 1  # "old" only: "new" came after
        # The new session is whole: its event is not a tombstone, and a retry of
        # its Spawn returns the first answer instead of spawning it again.
        status = await life.GetSession(
            lc.GetSessionRequest(project_id=project, agent_instance_id=agent, session_id="new")
        )
        assert status.session.state == lc.SESSION_STATE_ACTIVE
        events = await sql_rows(
            database_url,
            "SELECT purged FROM lifecycle_events WHERE project_id = ? AND session_id = ?",
            project,
            "new",
        )
        assert [bool(row[0]) for row in events] == [False]
        again = await life.Spawn(new)  # ALREADY_EXISTS, were its answer forgotten
        assert again.session.session_id == "new"
