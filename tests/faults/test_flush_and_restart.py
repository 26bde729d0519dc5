"""A PAUSED session's checkpoint survives the loss of all working memory (a FLUSHALL
of Redis, or a Redis restarted empty) together with a restart of memsvc.

Issue 4's test of "a checkpoint that survives a flush of Redis and a restart of
memsvc; lost working memory reported; TTL carried through pause and resume", on
the private Redis and PostgreSQL of the rig (never the shared ones). Two sessions
lose their memory: one PAUSED, one ACTIVE. After the restart:

- GetSession reports both LOST, in their states; the PAUSED one still has its
  protected resume checkpoint, and GetCheckpoint returns all of its entries, each
  with the TTL it had left at the Pause;
- working-memory calls on either fail with FAILED_PRECONDITION
  (ERROR_REASON_WORKING_MEMORY_LOST), never an empty session; so do Pause,
  CreateCheckpoint and a consolidating Terminate of the ACTIVE one (docs/api.md,
  "Lost working memory"), and they change nothing;
- Resume of the PAUSED one restores every key and value; a key with a TTL gets
  back exactly the TTL it had left at the Pause (frozen while paused), one without
  has none; writes work again;
- the event log holds exactly the calls that took effect, with their request ids.

TTLs are checked against the clocks' readings around each call (memsvc computes
expiries with Redis's clock, at millisecond resolution; Redis and this test share
the host's clock), never against how long anything took.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import duration_pb2

from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from tests.faults._support import Stubs, expect_code, read_log, wait_serving
from tests.faults.conftest import Rig, RigFactory
from tests.helpers import python, value

SHARED_REDIS_PORT = 6379
PAUSED_TTL_MS = {"scratch": 600_000, "lease": 600_000, "profile": 3_600_000}
# The paused session's working memory at the Pause: key -> value.
PAUSED_MEMORY: dict[str, Any] = {
    "plan": {"steps": ["search", "summarise"], "done": 0, "owner": "agent-7"},
    "scratch": "half-written draft",
    "notes": ["found 3 papers", "one is a preprint"],
    "lease": {"holder": "w1", "until": "later"},
    "profile": {"name": "Zoë", "tags": ["日本語", "🎉"], "nested": {"depth": 2, "ok": True}},
    "counter": 41,
    "flag": False,
    "nothing": None,
    # Set with a TTL, then again without one: a Set without TTL removes it.
    "was-timed": "now kept",
    "ключ/ünïcode key": "värde",
}
ACTIVE_MEMORY: dict[str, Any] = {"a": [1, 2, 3], "b": {"x": "y"}}
ACTIVE_TTL_MS = {"b": 600_000}


def ttl(ms: int) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(ms)
    return duration


def now_ms() -> float:
    return time.time() * 1000


# Entries as read back: key -> (value, expiry in Unix ms or None).
Entries = dict[str, tuple[Any, int | None]]


async def entries_of(stubs: Stubs, ids: dict[str, Any]) -> Entries:
    """A session's whole working memory, with each key's expiry."""
    found: Entries = {}
    token = ""
    while True:
        page = await stubs.wm.ListEntries(
            pb.ListEntriesRequest(**ids, page_size=4, page_token=token), timeout=10
        )
        for entry in page.entries:
            expiry = entry.expire_time.ToMilliseconds() if entry.HasField("expire_time") else None
            found[entry.key] = (python(entry.value), expiry)
        token = page.next_page_token
        if not token:
            return found


# Checkpoint entries: key -> (value, remaining TTL in ms or None).
async def checkpoint_entries(
    stubs: Stubs, ids: dict[str, Any], checkpoint_id: str
) -> tuple[lc.Checkpoint, Entries]:
    """A checkpoint and every entry it holds, read two to a page."""
    found: Entries = {}
    token = ""
    while True:
        reply = await stubs.life.GetCheckpoint(
            lc.GetCheckpointRequest(**ids, checkpoint_id=checkpoint_id, include_entries=True,
                                    page_size=2, page_token=token),
            timeout=10,
        )  # fmt: skip
        for entry in reply.entries:
            assert entry.key not in found, f"entry {entry.key!r} on two pages"
            remaining = (
                entry.remaining_ttl.ToMilliseconds() if entry.HasField("remaining_ttl") else None
            )
            found[entry.key] = (python(entry.value), remaining)
        token = reply.next_page_token
        if not token:
            return reply.checkpoint, found


def working_memory_calls(
    stubs: Stubs,
) -> list[tuple[str, Callable[[dict[str, Any]], Awaitable[Any]]]]:
    """A call of each working-memory RPC, given a session's ids."""
    wm = stubs.wm
    return [
        ("Get", lambda ids: wm.Get(pb.GetRequest(**ids, key="plan"), timeout=10)),
        ("ListEntries", lambda ids: wm.ListEntries(pb.ListEntriesRequest(**ids), timeout=10)),
        ("ListKeys", lambda ids: wm.ListKeys(pb.ListKeysRequest(**ids), timeout=10)),
        ("BatchGet", lambda ids: wm.BatchGet(pb.BatchGetRequest(**ids, keys=["plan"]), timeout=10)),
        ("Set", lambda ids: wm.Set(pb.SetRequest(**ids, key="new", value=value(1)), timeout=10)),
        ("Delete", lambda ids: wm.Delete(pb.DeleteRequest(**ids, key="plan"), timeout=10)),
        (
            "BatchSet",
            lambda ids: wm.BatchSet(
                pb.BatchSetRequest(**ids, entries=[pb.EntryInput(key="new", value=value(1))]),
                timeout=10,
            ),
        ),
    ]


async def get_session(stubs: Stubs, ids: dict[str, Any]) -> lc.Session:
    reply: lc.GetSessionResponse = await stubs.life.GetSession(
        lc.GetSessionRequest(**ids), timeout=10
    )
    return reply.session


async def expect_lost(call: Awaitable[Any], what: str) -> None:
    details = await expect_code(call, grpc.StatusCode.FAILED_PRECONDITION)
    assert details.reason == "ERROR_REASON_WORKING_MEMORY_LOST", (what, details)


def private_redis(rig: Rig) -> redis.Redis:
    assert rig.redis.port != SHARED_REDIS_PORT, "never the shared Redis"
    return redis.Redis(port=rig.redis.port, socket_timeout=5)


def lose_working_memory_and_restart_memsvc(rig: Rig, how: str) -> None:
    """Every key of the private Redis gone, and memsvc restarted on the same backends."""
    assert rig.memsvc is not None
    with private_redis(rig) as client:
        assert any(k.startswith(b"memsvc:wm:") for k in client.scan_iter()), "no memory to lose"
        if how == "flushall":
            # Flushed under a running memsvc, which is then SIGKILLed and restarted.
            assert client.flushall() is True
            assert rig.memsvc.kill() == -9
        else:
            # memsvc shut down; Redis SIGKILLed and restarted without persistence.
            rig.memsvc.stop()
            rig.redis.kill()
            rig.redis.start()
    with private_redis(rig) as client:
        assert client.dbsize() == 0
    rig.memsvc.start()


@pytest.mark.parametrize("how", ["flushall", "redis-restarted-empty"])
async def test_paused_checkpoint_survives_a_redis_flush_and_a_memsvc_restart(
    make_rig: RigFactory, how: str
) -> None:
    rig = make_rig(redis_keeps_data=False)
    memsvc = rig.start()
    project, agent = str(uuid.uuid4()), str(uuid.uuid4())
    paused: dict[str, Any] = {
        "project_id": project,
        "agent_instance_id": agent,
        "session_id": "paused",
    }
    active: dict[str, Any] = {
        "project_id": project,
        "agent_instance_id": agent,
        "session_id": "active",
    }
    rids = {name: str(uuid.uuid4()) for name in ("spawn-p", "spawn-a", "pause", "resume")}

    # Before: two sessions with keys, with and without TTL; one PAUSED. -------------
    async with grpc.aio.insecure_channel(memsvc.target) as channel:
        stubs = Stubs(channel)
        await wait_serving(stubs)
        await stubs.life.Spawn(
            lc.SpawnRequest(**paused, request_id=rids["spawn-p"], initial_entries=[
                pb.EntryInput(key="plan", value=value(PAUSED_MEMORY["plan"])),
                pb.EntryInput(key="scratch", value=value(PAUSED_MEMORY["scratch"]),
                              ttl=ttl(PAUSED_TTL_MS["scratch"])),
            ]),
            timeout=10,
        )  # fmt: skip
        await stubs.life.Spawn(
            lc.SpawnRequest(**active, request_id=rids["spawn-a"], initial_entries=[
                pb.EntryInput(key=k, value=value(v),
                              ttl=ttl(ACTIVE_TTL_MS[k]) if k in ACTIVE_TTL_MS else None)
                for k, v in ACTIVE_MEMORY.items()
            ]),
            timeout=10,
        )  # fmt: skip
        await stubs.wm.Set(
            pb.SetRequest(**paused, key="was-timed", value=value("timed"), ttl=ttl(600_000)),
            timeout=10,
        )
        for key in ("notes", "lease", "was-timed"):
            timed = ttl(PAUSED_TTL_MS[key]) if key in PAUSED_TTL_MS else None
            await stubs.wm.Set(
                pb.SetRequest(**paused, key=key, value=value(PAUSED_MEMORY[key]), ttl=timed),
                timeout=10,
            )
        await stubs.wm.BatchSet(
            pb.BatchSetRequest(**paused, entries=[
                pb.EntryInput(key=k, value=value(PAUSED_MEMORY[k]),
                              ttl=ttl(PAUSED_TTL_MS[k]) if k in PAUSED_TTL_MS else None)
                for k in ("profile", "counter", "flag", "nothing", "ключ/ünïcode key")
            ]),
            timeout=10,
        )  # fmt: skip
        before = await entries_of(stubs, paused)
        assert {k: v for k, (v, _) in before.items()} == PAUSED_MEMORY
        assert {k for k, (_, at) in before.items() if at is not None} == set(PAUSED_TTL_MS)
        assert {k: v for k, (v, _) in (await entries_of(stubs, active)).items()} == ACTIVE_MEMORY

        pause_sent = now_ms()
        paused_reply = await stubs.life.Pause(
            lc.PauseRequest(**paused, request_id=rids["pause"]), timeout=10
        )
        pause_answered = now_ms()
        checkpoint_id = paused_reply.checkpoint.checkpoint_id
        assert paused_reply.session.state == lc.SESSION_STATE_PAUSED

    # The loss: Redis emptied, memsvc restarted. -----------------------------------
    lose_working_memory_and_restart_memsvc(rig, how)

    async with grpc.aio.insecure_channel(memsvc.target) as channel:
        stubs = Stubs(channel)
        await wait_serving(stubs)

        # Both losses are reported; states, versions and the resume point are kept.
        session = await get_session(stubs, paused)
        assert session.state == lc.SESSION_STATE_PAUSED
        assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_LOST
        assert session.resume_checkpoint_id == checkpoint_id
        assert session.version == 2
        session = await get_session(stubs, active)
        assert session.state == lc.SESSION_STATE_ACTIVE
        assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_LOST
        assert session.version == 1

        # The checkpoint is intact in the durable store, still protected.
        checkpoint, stored = await checkpoint_entries(stubs, paused, checkpoint_id)
        assert checkpoint.key_count == len(PAUSED_MEMORY)
        assert not checkpoint.HasField("expire_time"), "the resume point is not protected"
        assert {k: v for k, (v, _) in stored.items()} == PAUSED_MEMORY
        remaining = {k: left for k, (_, left) in stored.items() if left is not None}
        assert set(remaining) == set(PAUSED_TTL_MS), "TTLs not recorded as they were"
        for key, left in remaining.items():
            expiry = before[key][1]
            assert expiry is not None
            # What the key had left while the Pause ran (Redis's clock, whole ms).
            assert expiry - math.ceil(pause_answered) <= left <= expiry - math.floor(pause_sent), (
                key,
                left,
            )
            assert 0 < left <= PAUSED_TTL_MS[key]

        # No working-memory call serves a lost memory as an empty one.
        for name, call in working_memory_calls(stubs):
            await expect_lost(call(active), f"{name} on the ACTIVE session")
            await expect_lost(call(paused), f"{name} on the PAUSED session")
        # Nor do the lifecycle calls that would snapshot or consolidate it.
        await expect_lost(
            stubs.life.Pause(lc.PauseRequest(**active, request_id=str(uuid.uuid4())), timeout=10),
            "Pause",
        )
        await expect_lost(
            stubs.life.CreateCheckpoint(
                lc.CreateCheckpointRequest(**active, request_id=str(uuid.uuid4())), timeout=10
            ),
            "CreateCheckpoint",
        )
        await expect_lost(
            stubs.life.Terminate(
                lc.TerminateRequest(**active, request_id=str(uuid.uuid4())), timeout=10
            ),
            "Terminate",
        )
        session = await get_session(stubs, active)
        assert (session.state, session.version) == (lc.SESSION_STATE_ACTIVE, 1)

        # Resume (from the resume point) restores every key, value and TTL. -------
        resume_sent = now_ms()
        resumed = await stubs.life.Resume(
            lc.ResumeRequest(**paused, request_id=rids["resume"]), timeout=10
        )
        assert resumed.checkpoint.checkpoint_id == checkpoint_id
        assert resumed.entries_restored == len(PAUSED_MEMORY)
        after = await entries_of(stubs, paused)
        read_answered = now_ms()
        assert {k: v for k, (v, _) in after.items()} == PAUSED_MEMORY
        assert {k for k, (_, at) in after.items() if at is not None} == set(PAUSED_TTL_MS), (
            "TTLs dropped, or given to keys without one"
        )
        for key, left in remaining.items():
            expiry = after[key][1]
            assert expiry is not None
            # The TTL left at the Pause again, counted from the Resume: never more, and
            # not run down while paused (the restart lies between Pause and Resume).
            assert 0 < expiry - read_answered < left, (key, expiry - read_answered, left)
            assert expiry >= math.floor(resume_sent) + left, (key, expiry - resume_sent, left)
        session = await get_session(stubs, paused)
        assert session.state == lc.SESSION_STATE_ACTIVE
        assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_INTACT
        assert session.version == 3

        # Writes work again.
        reply = await stubs.wm.Set(
            pb.SetRequest(**paused, key="after", value=value({"resumed": True})), timeout=10
        )
        assert reply.created
        await stubs.wm.Set(pb.SetRequest(**paused, key="counter", value=value(42)), timeout=10)
        deleted = await stubs.wm.Delete(pb.DeleteRequest(**paused, key="nothing"), timeout=10)
        assert deleted.existed
        wanted = {**PAUSED_MEMORY, "after": {"resumed": True}, "counter": 42}
        del wanted["nothing"]
        final = await entries_of(stubs, paused)
        assert {k: v for k, (v, _) in final.items()} == wanted
        assert final["counter"][1] is None and final["lease"][1] == after["lease"][1]
        # The other session is still lost: one Resume restores one session.
        await expect_lost(stubs.wm.Get(pb.GetRequest(**active, key="a"), timeout=10), "Get")

        # The event log: the calls that took effect, none of the refused ones.
        log = await read_log(stubs, project_id=project)
        assert [int(e.sequence) for e in log] == list(range(1, len(log) + 1))
        got = [(e.event_type, e.session_id, e.request_id, e.checkpoint_id) for e in log]
        assert got == [
            (lc.EVENT_TYPE_SESSION_SPAWNED, "paused", rids["spawn-p"], ""),
            (lc.EVENT_TYPE_SESSION_SPAWNED, "active", rids["spawn-a"], ""),
            (lc.EVENT_TYPE_SESSION_PAUSED, "paused", rids["pause"], checkpoint_id),
            (lc.EVENT_TYPE_SESSION_RESUMED, "paused", rids["resume"], checkpoint_id),
        ]
