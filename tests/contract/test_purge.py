"""DataRemovalService.PurgeData: a purge forgets its scope in every store."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2

from memsvc.domain._lifecycle_records import NIL_UUID
from memsvc.server import Server
from memsvc.store.redis._working_memory import session_keys, staging_keys
from memsvc.v1 import data_removal_pb2 as dr
from memsvc.v1 import episodic_pb2 as ep
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as wm_pb
from memsvc.v1.data_removal_pb2_grpc import DataRemovalServiceStub
from memsvc.v1.episodic_pb2_grpc import EpisodicMemoryServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.conftest import REDIS_URL
from tests.helpers import expect_error, sql_rows, value


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.lifecycle = LifecycleServiceStub(channel)
        self.wm = WorkingMemoryServiceStub(channel)
        self.episodic = EpisodicMemoryServiceStub(channel)
        self.removal = DataRemovalServiceStub(channel)


@pytest.fixture
def stubs(channel: grpc.aio.Channel) -> Stubs:
    return Stubs(channel)


async def populate(stubs: Stubs, session: dict[str, Any], *, paused: bool) -> None:
    """A session with working memory, checkpoints, an episode and a remembered answer."""
    await stubs.lifecycle.Spawn(lc.SpawnRequest(**session, request_id=str(uuid.uuid4())))
    await stubs.wm.Set(wm_pb.SetRequest(**session, key="plan", value=value({"step": 1})))
    await stubs.lifecycle.CreateCheckpoint(lc.CreateCheckpointRequest(**session))
    await stubs.episodic.RecordEpisode(
        ep.RecordEpisodeRequest(
            episode=ep.Episode(
                **session,
                task_type="research",
                task_description="purgeable findings about otters",
                outcome=lc.OUTCOME_SUCCESS,
            ),
            request_id=str(uuid.uuid4()),
        )
    )
    if paused:
        await stubs.lifecycle.Pause(lc.PauseRequest(**session))


async def stored_traces(server: Server, scope: dict[str, Any]) -> dict[str, int]:
    """Rows that still name the scope's agent instance, straight from the database."""
    url = server.config.database_url
    agent = scope["agent_instance_id"]
    counts = {}
    for table in ("sessions", "checkpoints", "episodes", "request_log", "lifecycle_events"):
        rows = await sql_rows(
            url, f"SELECT count(*) FROM {table} WHERE agent_instance_id = ?", agent
        )
        counts[table] = int(rows[0][0])
    if url.startswith("sqlite"):
        # Index entries of the doomed agent's episodes, or of no episode at all.
        rows = await sql_rows(
            url,
            "SELECT count(*) FROM episodes_fts WHERE episodes_fts MATCH 'otters' AND rowid NOT IN"
            " (SELECT search_rowid FROM episodes WHERE agent_instance_id <> ?)",
            agent,
        )
    else:
        rows = await sql_rows(
            url,
            "SELECT count(*) FROM episodes WHERE agent_instance_id = ?"
            " AND search_document @@ to_tsquery('english', 'otters')",
            agent,
        )
    counts["search_index"] = int(rows[0][0])
    return counts


async def redis_keys(server: Server, sessions: list[dict[str, Any]]) -> int:
    if not server.config.working_memory_url.startswith("redis"):
        return 0
    from memsvc.domain import SessionRef

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        total = 0
        for session in sessions:
            ref = SessionRef(**session)
            total += int(await client.exists(*session_keys(ref), *staging_keys(ref)))
        return total
    finally:
        await client.aclose()


async def latest_sequence(stubs: Stubs) -> int:
    """The log's latest sequence: the first progress message of a watch from now."""
    call = stubs.lifecycle.WatchLifecycle(lc.WatchLifecycleRequest())
    async for response in call:
        call.cancel()
        return int(response.progress.sequence)
    raise AssertionError("the watch ended without a progress message")


async def events_after(stubs: Stubs, after: int) -> list[lc.LifecycleEvent]:
    """Every event after ``after`` up to the latest one now."""
    latest = await latest_sequence(stubs)
    start = lc.WATCH_START_OLDEST if after == 0 else lc.WATCH_START_UNSPECIFIED
    call = stubs.lifecycle.WatchLifecycle(
        lc.WatchLifecycleRequest(after_sequence=after, start=start)
    )
    events: list[lc.LifecycleEvent] = []
    async for response in call:
        if response.HasField("event"):
            events.append(response.event)
        if events and events[-1].sequence >= latest:
            break
    else:  # a stream that ends early would return only part of the events
        raise AssertionError(
            f"the watch ended before event {latest}: {[e.sequence for e in events]}"
        )
    call.cancel()
    return events


async def test_purging_an_agent_forgets_it_everywhere_and_spares_the_rest(
    stubs: Stubs, scope: dict[str, Any], server: Server
):
    doomed = [scope, {**scope, "session_id": "second"}]
    kept = {**scope, "agent_instance_id": str(uuid.uuid4())}
    await populate(stubs, doomed[0], paused=False)
    await populate(stubs, doomed[1], paused=True)
    await populate(stubs, kept, paused=False)
    before = await stored_traces(server, scope)
    assert all(count > 0 for count in before.values()), before

    report = await stubs.removal.PurgeData(
        dr.PurgeDataRequest(
            project_id=scope["project_id"], agent_instance_id=scope["agent_instance_id"]
        )
    )
    assert report.sessions_deleted == 2
    assert report.working_memories_deleted == 2
    assert report.checkpoints_deleted == 3  # two created, one by the pause
    assert report.episodes_deleted == 2
    assert report.request_answers_deleted == 4  # two spawns, two records
    assert report.events_tombstoned == before["lifecycle_events"]

    after = await stored_traces(server, scope)
    assert after == {key: 0 for key in after}, after
    assert await redis_keys(server, doomed) == 0
    for session in doomed:
        await expect_error(
            stubs.lifecycle.GetSession(lc.GetSessionRequest(**session)), grpc.StatusCode.NOT_FOUND
        )
        await expect_error(
            stubs.wm.Set(wm_pb.SetRequest(**session, key="k", value=value(1))),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
    search = await stubs.episodic.SearchEpisodes(
        ep.SearchEpisodesRequest(project_id=scope["project_id"], query="otters")
    )
    assert [r.episode.agent_instance_id for r in search.results] == [kept["agent_instance_id"]]
    # The other agent is untouched.
    got = await stubs.wm.Get(wm_pb.GetRequest(**kept, key="plan"))
    assert got.entry.key == "plan"
    checkpoints = await stubs.lifecycle.ListCheckpoints(lc.ListCheckpointsRequest(**kept))
    assert len(checkpoints.checkpoints) == 1


async def test_events_become_tombstones_and_the_log_stays_gap_free(
    stubs: Stubs, scope: dict[str, Any], server: Server
):
    kept = {**scope, "agent_instance_id": str(uuid.uuid4())}
    before = await latest_sequence(stubs)
    await populate(stubs, scope, paused=True)
    await populate(stubs, kept, paused=False)
    await stubs.removal.PurgeData(dr.PurgeDataRequest(project_id=scope["project_id"],
                                                      agent_instance_id=scope["agent_instance_id"],
                                                      session_id=scope["session_id"]))  # fmt: skip
    events = await events_after(stubs, before)
    sequences = [e.sequence for e in events]
    assert sequences == list(range(before + 1, before + 1 + len(sequences)))
    mine = [e for e in events if e.purged]
    assert len(mine) == 3  # spawned, checkpoint created, paused
    for tombstone in mine:
        assert tombstone.event_id and tombstone.HasField("event_time")
        assert tombstone.event_type != lc.EVENT_TYPE_UNSPECIFIED
        assert (tombstone.project_id, tombstone.agent_instance_id, tombstone.session_id) == (
            "",
            "",
            "",
        )
        assert not tombstone.checkpoint_id and not tombstone.metadata.fields
    assert not any(e.agent_instance_id == scope["agent_instance_id"] for e in events)
    assert sum(e.agent_instance_id == kept["agent_instance_id"] for e in events) == 2
    # A subscriber filtering by the purged project no longer sees them; nor does one
    # filtering by the nil UUID, the ids a tombstone is left with: it would see the
    # purged events of every project.
    for ids in (
        {"project_id": scope["project_id"], "agent_instance_id": scope["agent_instance_id"]},
        {"project_id": NIL_UUID},
    ):
        await expect_no_event(stubs, ids, after=before, until=sequences[-1])


async def expect_no_event(stubs: Stubs, ids: dict[str, Any], after: int, until: int) -> None:
    """A watch filtering by ``ids`` from ``after`` gets only progress up to ``until``."""
    call = stubs.lifecycle.WatchLifecycle(
        lc.WatchLifecycleRequest(
            **ids,
            after_sequence=after,
            start=lc.WATCH_START_OLDEST if after == 0 else lc.WATCH_START_UNSPECIFIED,
            progress_interval=duration_pb2.Duration(nanos=100_000_000),
        )
    )
    async for response in call:
        assert response.HasField("progress"), response
        if response.progress.sequence >= until:
            break
    else:  # a stream that ends early has shown nothing of the events up to ``until``
        raise AssertionError(f"the watch ended before progress reached {until}")
    call.cancel()


async def test_purge_is_idempotent_and_a_request_id_returns_the_first_report(
    stubs: Stubs, scope: dict[str, Any]
):
    await populate(stubs, scope, paused=False)
    request: dict[str, Any] = {"project_id": scope["project_id"], "request_id": str(uuid.uuid4())}
    first = await stubs.removal.PurgeData(dr.PurgeDataRequest(**request))
    assert first.sessions_deleted == 1
    assert await stubs.removal.PurgeData(dr.PurgeDataRequest(**request)) == first
    shouted = {**request, "request_id": request["request_id"].upper()}
    assert await stubs.removal.PurgeData(dr.PurgeDataRequest(**shouted)) == first
    again = await stubs.removal.PurgeData(dr.PurgeDataRequest(project_id=scope["project_id"]))
    # Nothing left to forget: a purge's own report holds only counts, and stays, so
    # a retry of the first purge still gets its first report.
    assert again == dr.PurgeDataResponse()
    assert await stubs.removal.PurgeData(dr.PurgeDataRequest(**request)) == first
    # The purged session id may be spawned again, afresh.
    await stubs.lifecycle.Spawn(lc.SpawnRequest(**scope))
    keys = await stubs.wm.ListKeys(wm_pb.ListKeysRequest(**scope))
    assert list(keys.keys) == []


async def test_a_retry_after_a_purge_does_not_bring_the_data_back(
    stubs: Stubs, scope: dict[str, Any]
):
    """A call that committed, then lost its answer, is retried with its request id
    after a purge of its scope: it is not run again (that would spawn the session or
    record the episode anew), and says why."""
    spawn = lc.SpawnRequest(**scope, request_id=str(uuid.uuid4()))
    await stubs.lifecycle.Spawn(spawn)
    episode = ep.RecordEpisodeRequest(
        episode=ep.Episode(**scope, task_type="research", outcome=lc.OUTCOME_SUCCESS),
        request_id=str(uuid.uuid4()),
    )
    recorded = await stubs.episodic.RecordEpisode(
        ep.RecordEpisodeRequest(
            episode=ep.Episode(**scope, task_type="research", outcome=lc.OUTCOME_SUCCESS)
        )
    )
    delete = ep.DeleteEpisodeRequest(
        project_id=scope["project_id"],
        episode_id=recorded.episode.episode_id,
        request_id=str(uuid.uuid4()),
    )
    await stubs.episodic.DeleteEpisode(delete)
    await stubs.episodic.RecordEpisode(episode)
    report = await stubs.removal.PurgeData(
        dr.PurgeDataRequest(project_id=scope["project_id"], session_id=scope["session_id"],
                            agent_instance_id=scope["agent_instance_id"])
    )  # fmt: skip
    assert report.request_answers_deleted == 2
    for retry in (stubs.lifecycle.Spawn(spawn), stubs.episodic.RecordEpisode(episode)):
        error = await expect_error(retry, grpc.StatusCode.FAILED_PRECONDITION)
        assert error.reason == "ERROR_REASON_REQUEST_PURGED"
    # A delete's answer holds no data: its retry still gets it, even past a purge of
    # the whole project (its request id is the project's).
    await stubs.removal.PurgeData(dr.PurgeDataRequest(project_id=scope["project_id"]))
    await stubs.episodic.DeleteEpisode(delete)
    await expect_error(
        stubs.lifecycle.GetSession(lc.GetSessionRequest(**scope)), grpc.StatusCode.NOT_FOUND
    )
    listed = await stubs.episodic.ListEpisodes(
        ep.ListEpisodesRequest(project_id=scope["project_id"])
    )
    assert list(listed.episodes) == []
    # A new call (a new request id) spawns the purged id afresh.
    await stubs.lifecycle.Spawn(lc.SpawnRequest(**scope, request_id=str(uuid.uuid4())))


async def test_bad_purge_requests_change_nothing(stubs: Stubs, scope: dict[str, Any]):
    await populate(stubs, scope, paused=False)
    for request, field in [
        (dr.PurgeDataRequest(), "project_id"),
        (dr.PurgeDataRequest(project_id="nope"), "project_id"),
        (dr.PurgeDataRequest(project_id=scope["project_id"], session_id="s"), "session_id"),
        (
            dr.PurgeDataRequest(project_id=scope["project_id"], agent_instance_id="bad"),
            "agent_instance_id",
        ),
        (dr.PurgeDataRequest(project_id=scope["project_id"], request_id="r"), "request_id"),
    ]:
        details = await expect_error(
            stubs.removal.PurgeData(request), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert field in details.violations
    status = await stubs.lifecycle.GetSession(lc.GetSessionRequest(**scope))
    assert status.session.state == lc.SESSION_STATE_ACTIVE
