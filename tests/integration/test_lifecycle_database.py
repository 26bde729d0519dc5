"""The durable store's lifecycle side, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from memsvc.domain import SessionRef
from memsvc.domain._lifecycle_records import (
    CheckpointRecord,
    EpisodeRecord,
    EventRecord,
    EventType,
    RequestIdReused,
    SessionRecord,
    SessionState,
)
from memsvc.domain._pagination import wire_size
from memsvc.domain._session_memory import SnapshotEntry
from memsvc.domain._snapshot import decode_snapshot, encode_snapshot
from memsvc.domain._watch import EventFilter
from memsvc.store._episodes_sql import _weight as _episode_weight
from tests.helpers import durable_store_at

# A list page's byte budget that none of these small rows comes near.
BUDGET = 1 << 20


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Any]:
    store = durable_store_at(database_url)
    await store.open()
    await store.migrate()
    yield store
    await store.aclose()


def new_session(state: SessionState = SessionState.ACTIVE) -> SessionRecord:
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s:{1}")
    return SessionRecord(
        ref, None, state, {"k": [1, "v"]}, 1, "epoch-1", None, 1_700_000_000_123, 1_700_000_000_123
    )


def event_for(ref: SessionRef, kind: EventType = EventType.SPAWNED) -> EventRecord:
    return EventRecord(str(uuid.uuid4()), kind, ref, None, 1_700_000_000_000)


async def test_sessions_round_trip_and_are_unique(db):
    record = new_session()
    async with db.transaction() as tx:
        assert await tx.insert_session(record)
        assert not await tx.insert_session(record)
    assert await db.get_session(record.ref) == record
    async with db.transaction() as tx:
        locked = await tx.lock_session(record.ref)
        assert locked == record
        await tx.update_session(
            SessionRecord(**{**_fields(record), "state": SessionState.PAUSED, "version": 2})
        )
    stored = await db.get_session(record.ref)
    assert (stored.state, stored.version) == (SessionState.PAUSED, 2)


def _fields(record: SessionRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}


async def test_uncommitted_changes_are_invisible_and_rolled_back(db):
    record = new_session()
    with pytest.raises(RuntimeError, match="boom"):
        async with db.transaction() as tx:
            await tx.insert_session(record)
            await tx.append_event(event_for(record.ref))
            assert await db.get_session(record.ref) is None, "not visible before commit"
            raise RuntimeError("boom")
    assert await db.get_session(record.ref) is None
    async with db.transaction() as tx:
        await tx.append_event(event_for(record.ref))
    assert [e.sequence for e in tx.appended] == [1], "the rolled-back sequence is reused"


async def test_checkpoints_are_unique_and_listed_newest_first(db):
    record = new_session()
    async with db.transaction() as tx:
        await tx.insert_session(record)
        for i, created in enumerate([1000, 3000, 2000, 3000]):
            checkpoint = CheckpointRecord(record.ref, f"c{i}", created, i, 10 * i, {"i": i})
            contents = encode_snapshot([SnapshotEntry(f"k{i}", b"v", i or None)])
            await tx.insert_checkpoint(checkpoint, contents, 1 if i else 0)
    async with db.transaction() as tx:
        taken = await tx.lock_session_for_checkpoint(record.ref, "c0", count=True)
        assert (taken.record, taken.checkpoints, taken.id_taken) == (record, 4, True)
        free = await tx.lock_session_for_checkpoint(record.ref, "c9", count=False)
        assert (free.checkpoints, free.id_taken) == (0, False)
        assert await tx.lock_session_for_checkpoint(new_session().ref, None, True) is None
    newest, _ = await db.list_checkpoints(record.ref, None, 2, BUDGET)
    assert [c.checkpoint_id for c in newest] == ["c3", "c1"]
    rest, _ = await db.list_checkpoints(
        record.ref, (newest[-1].create_ms, newest[-1].checkpoint_id), 10, BUDGET
    )
    assert [c.checkpoint_id for c in rest] == ["c2", "c0"]
    found = await db.read_checkpoint(record.ref, "c2")
    assert found is not None
    assert found[0].metadata == {"i": 2}
    assert decode_snapshot(found[1]) == [SnapshotEntry("k2", b"v", 2)]
    assert await db.read_checkpoint(record.ref, "nope") is None
    async with db.transaction() as tx:
        locked, named = await tx.lock_session_reading_checkpoint(record.ref, "c1")
        assert locked == record
        assert named is not None and named[0].checkpoint_id == "c1"
        assert await tx.lock_session_reading_checkpoint(record.ref, None) == (record, None), (
            "an ACTIVE session has no resume checkpoint"
        )
        await tx.delete_checkpoints(record.ref)
    assert await db.list_checkpoints(record.ref, None, 10, BUDGET) == ([], False)


# Metadata of every JSON kind, nested, with non-Latin keys and values, the
# characters JSON escapes, and the shapes that take the most bytes in a response
# for their JSON text (small numbers, empty strings and containers, in arrays).
WEIGHED_METADATA: list[dict[str, Any]] = [
    {},
    {"k": [1, "v"]},
    {"note": "é" * 40, "ключ": "值", "emoji": "🙂", "": ""},
    {"escapes": '\x01"\\\n', "flags": [True, False, None], "n": [1, 1.5, -0.0, 10**15]},
    {"deep": {"a": [{"b": [[], {}]}, "c"], "d": {}}, "list": [[1], [], ["x", {"y": 2}]]},
    {"a": [0] * 1000},
    {"e": [[]] * 300, "o": [{}] * 300, "s": [""] * 300},
    {"": 0},
]


async def test_rows_written_without_their_metadata_size_are_never_weighed_light(db):
    """A row written before migration 0012 (SQLite 0010), or by an older replica,
    has no metadata_bytes: its page's budget then weighs its metadata by a bound
    from its JSON text, which must never fall below what memsvc's wire_size counts
    (a page would read more than it sends) nor grow faster than the value (an exact
    count in SQL took 10 s for an array of 300,000 numbers: a review)."""
    records = [
        SessionRecord(**{**_fields(new_session()), "metadata": metadata})
        for metadata in WEIGHED_METADATA
    ]
    async with db.transaction() as tx:
        for record in records:
            await tx.insert_session(record)

    async def weighed(conn: Any, dialect: Any, ref: SessionRef) -> list[Any]:
        cursor = await conn.execute(
            dialect.sql(
                f"SELECT metadata_bytes, {dialect.json_wire_bound('metadata')} FROM sessions"
                " WHERE project_id = ? AND agent_instance_id = ? AND session_id = ?"
            ),
            (ref.project_id, ref.agent_instance_id, ref.session_id),
        )
        return list(await cursor.fetchone())

    for record in records:
        stored, bound = await db._query(weighed, record.ref)
        expected = wire_size(record.metadata)
        assert stored == expected, record.metadata
        assert expected <= int(bound) <= 8 * expected + 1, (expected, bound, record.metadata)


async def test_episodes_recorded_without_their_size_are_never_weighed_light(db):
    """An episode recorded before response_bytes is weighed in SQL as
    EpisodeRecord.size counts it (its fixed bytes, every text and its framing, a
    bound of its JSON), never below: a review found the fixed part missing, pages
    of such episodes reading ten rows for each one they sent."""
    project = str(uuid.uuid4())
    records = [
        EpisodeRecord(
            str(uuid.uuid4()),
            SessionRef(project, str(uuid.uuid4()), "s" * index),
            "t",
            "d" * index,
            1,
            "é" * index,
            [metadata] * index,
            "",
            ["lesson"] * index,
            1.0,
            1,
            0.5,
            metadata,
            1_700_000_000_000 + index,
        )
        for index, metadata in enumerate(WEIGHED_METADATA)
    ]
    async with db.transaction() as tx:
        for record in records:
            await tx.insert_episode(record)
        await tx._write("UPDATE episodes SET response_bytes = NULL WHERE project_id = ?", [project])

    async def weighed(conn: Any, dialect: Any) -> dict[str, int]:
        cursor = await conn.execute(
            dialect.sql(f"SELECT e.episode_id, {_episode_weight(dialect, False)} FROM episodes e"
                        " WHERE e.project_id = ?"),
            (project,),
        )  # fmt: skip
        return {str(row[0]): int(row[1]) for row in await cursor.fetchall()}

    weights = await db._query(weighed)
    for record in records:
        assert weights[record.episode_id] >= record.size_without_embedding(), record


async def test_the_resume_checkpoint_is_read_with_the_lock(db):
    record = new_session()
    paused = SessionRecord(
        **{**_fields(record), "state": SessionState.PAUSED, "resume_checkpoint_id": "c1"}
    )
    contents = {c: encode_snapshot([SnapshotEntry(c, b"v", None)]) for c in ("c0", "c1")}
    async with db.transaction() as tx:
        await tx.insert_session(paused)
        for checkpoint_id in ("c0", "c1"):
            await tx.insert_checkpoint(
                CheckpointRecord(record.ref, checkpoint_id, 1000, 1, 3), contents[checkpoint_id], 0
            )
    async with db.transaction() as tx:
        locked, found = await tx.lock_session_reading_checkpoint(record.ref, None)
        assert locked == paused
        assert found is not None and found[0].checkpoint_id == "c1"
        assert found[1] is None, "the paused memory most likely holds its resume checkpoint"
        assert await tx.read_contents(record.ref, "c1") == contents["c1"]
        assert await tx.read_contents(record.ref, "nope") is None
        _, named = await tx.lock_session_reading_checkpoint(record.ref, "c1")
        assert named is not None and named[1] is None
        _, older = await tx.lock_session_reading_checkpoint(record.ref, "c0")
        assert older is not None and older[1] == contents["c0"], "not the resume checkpoint"
    async with db.transaction() as tx:
        assert await tx.lock_session_reading_checkpoint(new_session().ref, "c1") == (None, None)


@pytest.mark.parametrize("timed_keys", [1, None], ids=["a key with a TTL", "taken before 0008"])
async def test_the_resume_checkpoint_is_read_when_the_memory_cannot_hold_it(db, timed_keys):
    """Keys that expire may have gone while paused; an older checkpoint's are unknown."""
    record = new_session()
    paused = SessionRecord(
        **{**_fields(record), "state": SessionState.PAUSED, "resume_checkpoint_id": "c1"}
    )
    contents = encode_snapshot([SnapshotEntry("k", b"v", 60_000)])
    async with db.transaction() as tx:
        await tx.insert_session(paused)
        await tx.insert_checkpoint(
            CheckpointRecord(record.ref, "c1", 1000, 1, 2), contents, timed_keys
        )
    async with db.transaction() as tx:
        _, found = await tx.lock_session_reading_checkpoint(record.ref, None)
    assert found is not None and found[1] == contents


async def test_request_ids_return_the_first_answer(db):
    project = str(uuid.uuid4())
    scope = SessionRef(project, str(uuid.uuid4()), "s")
    async with db.transaction() as tx:
        assert await (await tx.send_claim(scope, "r1", "Pause", "hash-a")).answer() is None
        await tx.remember_response(project, "r1", b"answer")
    async with db.transaction() as tx:
        pending = await tx.send_claim(scope, "r1", "Pause", "hash-a")
        assert await tx.lock_session(scope) is None, "a statement sent after the claim"
        assert await pending.answer() == b"answer"
        with pytest.raises(RequestIdReused):
            await (await tx.send_claim(scope, "r1", "Pause", "hash-b")).answer()
    other_project = SessionRef(str(uuid.uuid4()), "", "")
    async with db.transaction() as tx:
        assert await (await tx.send_claim(other_project, "r1", "Pause", "hash-b")).answer() is None


async def test_a_claim_whose_answer_is_forgotten_meanwhile_claims_the_id_again(
    fresh_postgres_url: str,
) -> None:
    """PostgreSQL (READ COMMITTED): the claim's INSERT meets a remembered answer that
    the sweep forgets before the claim reads it. The id is claimed again (the call
    runs as new, as after expiry), not refused as reused by another call."""
    store = durable_store_at(fresh_postgres_url)
    await store.open()
    await store.migrate()
    try:
        project = str(uuid.uuid4())
        scope = SessionRef(project, str(uuid.uuid4()), "s")
        async with store.transaction() as tx:
            assert await (await tx.send_claim(scope, "r1", "Pause", "hash-a")).answer() is None
            await tx.remember_response(project, "r1", b"answer")
        async with store.transaction() as tx:
            pending = await tx.send_claim(scope, "r1", "Pause", "hash-a")
            assert await tx.lock_session(scope) is None, "sent after the claim: it ran"
            async with store.transaction() as sweep:
                assert await sweep.forget_requests(time.time_ns() // 1_000_000 + 60_000, 10) == 1
            assert await pending.answer() is None
        async with store.transaction() as tx:
            with pytest.raises(RequestIdReused):  # this call holds the id now
                await (await tx.send_claim(scope, "r1", "Pause", "hash-b")).answer()
    finally:
        await store.aclose()


async def test_the_request_sweep_leaves_answers_a_purge_holds_to_the_next_sweep(
    fresh_postgres_url: str,
) -> None:
    """Found by a review: a purge locks its project's answers in the table's order,
    the sweep of expired request ids locked them in its own, and PostgreSQL aborted
    one of the two as deadlocked (a whole PurgeData rolled back, or the interval's
    sweeps skipped). The sweep now skips what a purge holds; it never waits."""
    store = durable_store_at(fresh_postgres_url)
    await store.open()
    await store.migrate()
    try:
        purged, other = str(uuid.uuid4()), str(uuid.uuid4())
        for project in (purged, other):
            async with store.transaction() as tx:
                scope = SessionRef(project, str(uuid.uuid4()), "s")
                for request_id in ("r1", "r2"):
                    await (await tx.send_claim(scope, request_id, "Pause", "h")).answer()
                    await tx.remember_response(project, request_id, b"answer")
        expired = time.time_ns() // 1_000_000 + 60_000
        async with store.transaction() as purge:
            assert await purge.purge_requests(SessionRef(purged, "", ""), "") == 2
            async with store.transaction() as sweep:
                # Bounded only so that a sweep that waits fails instead of hanging.
                forgotten = await asyncio.wait_for(sweep.forget_requests(expired, 10), 10)
            assert forgotten == 2, "the other project's answers, not the purge's"
        async with store.transaction() as sweep:
            assert await sweep.forget_requests(expired, 10) == 2, "the next sweep's"
    finally:
        await store.aclose()


async def test_event_sequences_are_gap_free_across_concurrent_writers(database_url, db):
    """Eight stores (own connections) appending at once: sequences 1..N, each once."""
    stores = [durable_store_at(database_url) for _ in range(8)]
    for store in stores:
        await store.open()
    ref = new_session().ref

    async def append_ten(store: Any) -> list[int]:
        sequences = []
        for _ in range(10):
            async with store.transaction() as tx:
                await tx.append_event(event_for(ref))
            sequences += [event.sequence for event in tx.appended]
        return sequences

    try:
        results = await asyncio.gather(*(append_ten(store) for store in stores))
    finally:
        for store in stores:
            await store.aclose()
    assert sorted(s for result in results for s in result) == list(range(1, 81))


async def test_appended_events_take_consecutive_sequences_in_order(db):
    """Many events appended at once (more than one statement carries) between
    two single appends: every one stored, numbered in the order given, with no
    gap, and each as given."""
    ref = new_session().ref
    many = [
        EventRecord(str(uuid.uuid4()), EventType.CHECKPOINT_DELETED, ref, None,
                    1_700_000_000_000 + i, checkpoint_id=f"c-{i}", metadata={"i": i})
        for i in range(2_345)
    ]  # fmt: skip
    async with db.transaction() as tx:
        await tx.append_event(event_for(ref))
        await tx.append_events(many)
        await tx.append_event(event_for(ref, EventType.TERMINATED))
    sequences = [stored.sequence for stored in tx.appended]
    assert sequences == list(range(sequences[0], sequences[0] + len(many) + 2))
    assert [stored.event for stored in tx.appended[1:-1]] == many
    stored = await db.read_events(sequences[0] - 1, 5_000, EventFilter(project_id=ref.project_id))
    assert [(e.sequence, e.event.event_id) for e in stored] == [
        (e.sequence, e.event.event_id) for e in tx.appended
    ]
    assert [e.event.metadata for e in stored[1:-1]] == [{"i": i} for i in range(len(many))]


async def test_a_read_of_events_stops_at_its_window(db):
    """``until`` bounds the sequences one read may cover (a filtered catch-up reads
    a large log window by window): matching events past it wait for the next read."""
    ours, other = new_session().ref, new_session().ref
    async with db.transaction() as tx:
        for ref in (ours, other, ours, other, ours):
            await tx.append_event(event_for(ref))
    first = tx.appended[0].sequence
    ours_only = EventFilter(project_id=ours.project_id)
    window = await db.read_events(first - 1, 500, ours_only, until=first + 3)
    assert [e.sequence for e in window] == [first, first + 2]
    rest = await db.read_events(first + 3, 500, ours_only, until=first + 4)
    assert [e.sequence for e in rest] == [first + 4]
    unbounded = await db.read_events(first - 1, 500, EventFilter())
    assert [e.sequence for e in unbounded] == list(range(first, first + 5))


async def test_a_read_with_the_logs_ends_gives_both_as_the_separate_reads_do(db):
    """A catch-up reads its events and the log's ends in one statement (one
    snapshot): the same events and bounds as read_events and event_bounds, with
    the bounds also when nothing matches, and each event's metadata intact."""
    ours, other = new_session().ref, new_session().ref
    async with db.transaction() as tx:
        for ref in (ours, other, ours):
            await tx.append_event(event_for(ref))
    first = tx.appended[0].sequence
    ours_only = EventFilter(project_id=ours.project_id)
    events, oldest, latest = await db.read_events_in_bounds(first - 1, 500, ours_only)
    assert events == await db.read_events(first - 1, 500, ours_only)
    assert [e.sequence for e in events] == [first, first + 2]
    assert (oldest, latest) == await db.event_bounds()
    window, *ends = await db.read_events_in_bounds(first - 1, 1, ours_only, until=first + 1)
    assert [e.sequence for e in window] == [first]
    nothing, *still = await db.read_events_in_bounds(first + 2, 500, ours_only)
    assert nothing == [] and still == ends == [oldest, latest]


async def test_compaction_removes_only_a_prefix_of_the_log(db):
    """Event times are not in sequence order (stamped before the sequence is taken,
    by replicas whose clocks differ): an expired event behind one that is not stays,
    since a watch resuming at the oldest retained position would skip the hole."""
    ref = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "s")
    t = 1_700_000_000_000
    # sequence 1 expired, 2 stamped late (not expired), 3 expired, 4 not
    for stamp in (t, t + 500, t + 10, t + 900):
        async with db.transaction() as tx:
            await tx.append_event(
                EventRecord(str(uuid.uuid4()), EventType.SPAWNED, ref, None, stamp)
            )
    oldest, latest = await db.event_bounds()
    async with db.transaction() as tx:
        assert await tx.compact_events(t + 100, 0, 1000) == 1  # sequence 1 only
    assert await db.event_bounds() == (oldest + 1, latest)
    async with db.transaction() as tx:
        assert await tx.compact_events(t + 600, 0, 1000) == 2  # then 2 and 3
    assert await db.event_bounds() == (oldest + 3, latest)
    # The count limit is a prefix too, and stops at the first event it keeps.
    async with db.transaction() as tx:
        assert await tx.compact_events(0, 1, 1000) == 0  # only the newest left


# Ids that sort in another order under a language's collation than byte-wise.
TIED_IDS = ["Session-B", "session-a", "s_1", "s-2"]


async def test_ids_of_one_millisecond_list_byte_wise_in_any_collation() -> None:
    """Found by a review: on a PostgreSQL database whose collation is a language's
    (en-US here, through ICU), sessions and checkpoints of one millisecond were
    listed in that collation's order (s_1 < s-2 < session-a < Session-B), not in
    SQLite's byte-wise one, so the same contract gave other pages (and keep_last
    kept other checkpoints). The ids sort byte-wise now (migration 0011)."""
    from memsvc.testing._backends import create_postgres_database, drop_postgres_database
    from tests.conftest import DATABASE_URL, need

    need(DATABASE_URL)
    url = create_postgres_database(DATABASE_URL, icu_locale="en-US")
    store = durable_store_at(url)
    try:
        await store.open()
        await store.migrate()
        project, agent = str(uuid.uuid4()), str(uuid.uuid4())
        async with store.transaction() as tx:
            for session_id in TIED_IDS:
                ref = SessionRef(project, agent, session_id)
                await tx.insert_session(
                    SessionRecord(ref, None, SessionState.ACTIVE, {}, 1, "e", None, 1000, 1000)
                )
            for checkpoint_id in TIED_IDS:
                checkpoint = CheckpointRecord(ref, checkpoint_id, 2000, 0, 0)
                await tx.insert_checkpoint(checkpoint, encode_snapshot([]), 0)
        byte_wise_newest_first = sorted(TIED_IDS, reverse=True)
        sessions, _ = await store.list_sessions(project, None, None, None, 10, BUDGET)
        assert [s.ref.session_id for s in sessions] == byte_wise_newest_first
        first, _ = await store.list_sessions(project, None, None, None, 2, BUDGET)
        last = first[-1]
        rest, _ = await store.list_sessions(
            project, None, None, (last.create_ms, agent, last.ref.session_id), 10, BUDGET
        )
        assert [s.ref.session_id for s in first + rest] == byte_wise_newest_first
        checkpoints, _ = await store.list_checkpoints(ref, None, 10, BUDGET)
        assert [c.checkpoint_id for c in checkpoints] == byte_wise_newest_first
    finally:
        await store.aclose()
        drop_postgres_database(DATABASE_URL, url)


@pytest.mark.parametrize("page_size", [1, 2, 5])
async def test_pages_of_tied_rows_neither_skip_nor_repeat(db, page_size):
    """Sessions and checkpoints tied on their time, and sessions on their agent
    too, walked page by page from each page's last row: every row once, newest
    first, ties byte-wise. (The next page's condition became a range on the time
    plus the ties within it, so that deep pages start from the index.)"""
    project = str(uuid.uuid4())
    agents = sorted(str(uuid.uuid4()) for _ in range(2))
    refs = [
        SessionRef(project, agent, session_id) for agent in agents for session_id in ("a", "b", "c")
    ]
    async with db.transaction() as tx:
        for i, ref in enumerate(refs):
            moment = 1_000 + 1_000 * (i % 2)  # two times, each with both agents
            await tx.insert_session(
                SessionRecord(ref, None, SessionState.ACTIVE, {}, 1, "e", None, moment, moment)
            )
        for i, checkpoint_id in enumerate(["x", "y", "z", "w"]):
            checkpoint = CheckpointRecord(refs[0], checkpoint_id, 5_000 + 1_000 * (i % 2), 0, 0)
            await tx.insert_checkpoint(checkpoint, encode_snapshot([]), 0)

    walked: list[SessionRecord] = []
    cursor: tuple[int, str, str] | None = None
    for _ in range(len(refs) + 1):  # bounded: a cursor that repeats pages must fail, not spin
        page, _ = await db.list_sessions(project, None, None, cursor, page_size, BUDGET)
        walked += page
        if len(page) < page_size:
            break
        last = page[-1]
        cursor = (last.create_ms, last.ref.agent_instance_id, last.ref.session_id)
    newest_first = sorted(
        ((s.create_ms, s.ref.agent_instance_id, s.ref.session_id) for s in walked), reverse=True
    )
    assert [(s.create_ms, s.ref.agent_instance_id, s.ref.session_id) for s in walked] == (
        newest_first
    )
    assert len(walked) == len(refs) and {s.ref for s in walked} == set(refs)

    checkpoints: list[CheckpointRecord] = []
    before: tuple[int, str] | None = None
    for _ in range(5):
        found, _ = await db.list_checkpoints(refs[0], before, page_size, BUDGET)
        checkpoints += found
        if len(found) < page_size:
            break
        before = (found[-1].create_ms, found[-1].checkpoint_id)
    assert [(c.create_ms, c.checkpoint_id) for c in checkpoints] == [
        (6_000, "y"), (6_000, "w"), (5_000, "z"), (5_000, "x"),
    ]  # fmt: skip
