"""WorkingMemoryService contract: every RPC through a real gRPC channel, on every backend."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.contract.conftest import spawn
from tests.helpers import eventually, expect_error, python, value

JSON_VALUES: list[Any] = [
    {"plan": ["search", "summarise"], "step": 2, "done": False, "note": None},
    [1, 2.5, "three", [True, None], {"nested": {"deep": "ok"}}],
    "unicode: 東京 ✓ — ok",
    42.0,
    True,
    None,
    "",
    {},
]


@pytest.fixture(autouse=True)
async def _spawned(spawned: dict[str, str]) -> None:
    """Working memory belongs to a spawned session: every test here starts with one."""


async def keys_of(wm: WorkingMemoryServiceStub, scope: dict[str, str]) -> list[str]:
    """Every key of the session, following pagination to the end."""
    keys: list[str] = []
    token = ""
    while True:
        page = await wm.ListKeys(pb.ListKeysRequest(**scope, page_size=7, page_token=token))
        keys += [k.key for k in page.keys]
        token = page.next_page_token
        if not token:
            return keys


@pytest.mark.parametrize("stored", JSON_VALUES, ids=lambda v: type(v).__name__)
async def test_set_then_get_returns_the_value_exactly(wm, scope, stored):
    """A value comes back exactly as it was set, whatever its JSON type."""
    reply = await wm.Set(pb.SetRequest(**scope, key="k", value=value(stored)))
    assert reply.key == "k"
    assert reply.created
    assert not reply.HasField("expire_time")
    got = await wm.Get(pb.GetRequest(**scope, key="k"))
    assert got.entry.key == "k"
    assert python(got.entry.value) == stored
    assert not got.entry.HasField("expire_time")


async def test_set_overwrites_value_and_ttl(wm, scope):
    """A second Set replaces the value and its TTL; created is false."""
    await wm.Set(
        pb.SetRequest(**scope, key="k", value=value(1), ttl=duration_pb2.Duration(seconds=60))
    )
    reply = await wm.Set(pb.SetRequest(**scope, key="k", value=value(2)))
    assert not reply.created
    assert not reply.HasField("expire_time")
    got = await wm.Get(pb.GetRequest(**scope, key="k"))
    assert python(got.entry.value) == 2
    assert not got.entry.HasField("expire_time"), "a Set without TTL must clear the old TTL"


async def test_get_missing_key_is_not_found_with_details(wm, scope):
    """Get of an absent key: NOT_FOUND, reason KEY_NOT_FOUND, the key and the whole
    session's identity in metadata (a session id is unique only within its agent
    instance; a review found the metadata named the session id alone), in the
    canonical lower case however the request spelled the UUIDs."""
    shouted = dict(
        scope,
        project_id=scope["project_id"].upper(),
        agent_instance_id=scope["agent_instance_id"].upper(),
    )
    error = await expect_error(
        wm.Get(pb.GetRequest(**shouted, key="nope")), grpc.StatusCode.NOT_FOUND
    )
    assert error.reason == "ERROR_REASON_KEY_NOT_FOUND"
    assert error.metadata == {**scope, "key": "nope"}
    assert "nope" in error.message


async def test_delete_reports_whether_the_key_existed(wm, scope):
    """Delete is idempotent: the first call removes the key, the second says it was absent."""
    await wm.Set(pb.SetRequest(**scope, key="k", value=value("v")))
    assert (await wm.Delete(pb.DeleteRequest(**scope, key="k"))).existed
    assert not (await wm.Delete(pb.DeleteRequest(**scope, key="k"))).existed
    await expect_error(wm.Get(pb.GetRequest(**scope, key="k")), grpc.StatusCode.NOT_FOUND)


async def test_ids_are_case_insensitive_uuids(wm, scope):
    """Upper- and lower-case spellings of the same UUIDs name the same session."""
    upper = dict(
        scope,
        project_id=scope["project_id"].upper(),
        agent_instance_id=scope["agent_instance_id"].upper(),
    )
    await wm.Set(pb.SetRequest(**upper, key="k", value=value("v")))
    got = await wm.Get(pb.GetRequest(**scope, key="k"))
    assert python(got.entry.value) == "v"


async def test_sessions_are_isolated_even_with_delimiters_in_ids(wm, scope, channel):
    """Session ids and keys containing { } : never collide with one another."""
    pairs = [
        ("a:b", "c"),
        ("a", "b:c"),
        ("{a}", "b"),
        ("{a", "}b"),
        ("a}:{b", "c"),
        ("a", "}:{b:c"),
    ]
    for session_id in {s for s, _ in pairs}:
        await spawn(channel, dict(scope, session_id=session_id))
    for index, (session_id, key) in enumerate(pairs):
        await wm.Set(
            pb.SetRequest(**dict(scope, session_id=session_id), key=key, value=value(index))
        )
    for index, (session_id, key) in enumerate(pairs):
        session = dict(scope, session_id=session_id)
        got = await wm.Get(pb.GetRequest(**session, key=key))
        assert python(got.entry.value) == index
        assert await keys_of(wm, session) == sorted(k for s, k in pairs if s == session_id)
    other_agent = dict(scope, agent_instance_id="00000000-0000-4000-8000-000000000000")
    await expect_error(
        wm.Get(pb.GetRequest(**dict(other_agent, session_id="a"), key="b:c")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_ttl_expires_keys_everywhere(wm, scope):
    """A key with a TTL reports its expiry, then disappears from every read; others stay."""
    before_ms = time.time() * 1000
    reply = await wm.Set(
        pb.SetRequest(
            **scope, key="short", value=value(1), ttl=duration_pb2.Duration(nanos=300_000_000)
        )
    )
    await wm.Set(
        pb.SetRequest(**scope, key="long", value=value(2), ttl=duration_pb2.Duration(seconds=3600))
    )
    await wm.Set(pb.SetRequest(**scope, key="forever", value=value(3)))
    expire_ms = reply.expire_time.ToMilliseconds()
    # Same machine, so the clocks agree within a generous margin.
    assert before_ms + 300 - 1000 <= expire_ms <= time.time() * 1000 + 300 + 1000

    async def short_is_gone() -> bool:
        try:
            await wm.Get(pb.GetRequest(**scope, key="short"))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            return True
        return False

    await eventually(short_is_gone)
    assert await keys_of(wm, scope) == ["forever", "long"]
    batch = await wm.BatchGet(pb.BatchGetRequest(**scope, keys=["short", "long"]))
    assert [e.key for e in batch.entries] == ["long"]
    assert list(batch.missing_keys) == ["short"]
    entries = await wm.ListEntries(pb.ListEntriesRequest(**scope))
    assert {e.key: python(e.value) for e in entries.entries} == {"long": 2, "forever": 3}
    assert not (await wm.Delete(pb.DeleteRequest(**scope, key="short"))).existed
    again = await wm.Set(pb.SetRequest(**scope, key="short", value=value(4)))
    assert again.created, "an expired key counts as absent"


async def test_ttl_rounds_up_to_milliseconds(wm, scope):
    """A TTL below one millisecond still expires in the future, not immediately or never."""
    before_ms = time.time_ns() // 1_000_000
    reply = await wm.Set(
        pb.SetRequest(**scope, key="k", value=value(1), ttl=duration_pb2.Duration(nanos=1))
    )
    assert reply.HasField("expire_time")
    assert reply.expire_time.ToMilliseconds() >= before_ms + 1


async def test_list_keys_paginates_in_byte_order_without_gaps(wm, scope):
    """25 keys over pages of 10: byte order, no repeats, empty token on the last page."""
    names = [f"key-{i:02d}" for i in range(25)] + ["Äpfel", "zeta", "é"]
    await wm.BatchSet(
        pb.BatchSetRequest(**scope, entries=[pb.EntryInput(key=n, value=value(n)) for n in names])
    )
    pages = []
    token = ""
    while True:
        page = await wm.ListKeys(pb.ListKeysRequest(**scope, page_size=10, page_token=token))
        pages.append([k.key for k in page.keys])
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [10, 10, 8]
    listed = [k for p in pages for k in p]
    assert listed == sorted(names, key=lambda k: k.encode())
    first = await wm.ListKeys(pb.ListKeysRequest(**scope, page_size=1))
    assert first.keys[0].value_size_bytes == len(value(listed[0]).SerializeToString())


async def test_pagination_is_stable_while_keys_change(wm, scope):
    """Keys added or removed between pages neither repeat nor hide the unchanged keys."""
    await wm.BatchSet(
        pb.BatchSetRequest(
            **scope, entries=[pb.EntryInput(key=f"k{i:02d}", value=value(i)) for i in range(20)]
        )
    )
    first = await wm.ListKeys(pb.ListKeysRequest(**scope, page_size=5))
    seen = [k.key for k in first.keys]
    await wm.Delete(pb.DeleteRequest(**scope, key="k01"))  # before the cursor
    await wm.Delete(pb.DeleteRequest(**scope, key="k10"))  # after the cursor
    await wm.Set(pb.SetRequest(**scope, key="k00a", value=value(0)))  # before the cursor
    await wm.Set(pb.SetRequest(**scope, key="k15a", value=value(0)))  # after the cursor
    token = first.next_page_token
    while token:
        page = await wm.ListKeys(pb.ListKeysRequest(**scope, page_size=5, page_token=token))
        seen += [k.key for k in page.keys]
        token = page.next_page_token
    assert len(seen) == len(set(seen)), "no key may be listed twice"
    unchanged = {f"k{i:02d}" for i in range(20)} - {"k01", "k10"}
    assert unchanged <= set(seen)
    assert "k10" not in seen and "k15a" in seen


async def test_page_size_defaults_and_is_clamped(wm, scope):
    """page_size 0 means 100; above 1000 it is treated as 1000."""
    await wm.BatchSet(
        pb.BatchSetRequest(
            **scope, entries=[pb.EntryInput(key=f"k{i:04d}", value=value(i)) for i in range(1000)]
        )
    )
    await wm.BatchSet(
        pb.BatchSetRequest(
            **scope, entries=[pb.EntryInput(key=f"z{i:04d}", value=value(i)) for i in range(5)]
        )
    )
    default = await wm.ListKeys(pb.ListKeysRequest(**scope))
    assert len(default.keys) == 100
    assert default.next_page_token
    clamped = await wm.ListKeys(pb.ListKeysRequest(**scope, page_size=5000))
    assert len(clamped.keys) == 1000
    rest = await wm.ListKeys(
        pb.ListKeysRequest(**scope, page_size=5000, page_token=clamped.next_page_token)
    )
    assert [k.key for k in rest.keys] == [f"z{i:04d}" for i in range(5)]
    assert rest.next_page_token == ""


async def test_empty_session_lists_nothing(wm, scope):
    page = await wm.ListKeys(pb.ListKeysRequest(**scope))
    assert list(page.keys) == [] and page.next_page_token == ""
    entries = await wm.ListEntries(pb.ListEntriesRequest(**scope))
    assert list(entries.entries) == [] and entries.next_page_token == ""


async def test_list_entries_returns_values_and_ttls(wm, scope):
    await wm.Set(pb.SetRequest(**scope, key="a", value=value({"x": 1})))
    await wm.Set(
        pb.SetRequest(**scope, key="b", value=value([1]), ttl=duration_pb2.Duration(seconds=60))
    )
    page = await wm.ListEntries(pb.ListEntriesRequest(**scope))
    assert [(e.key, python(e.value), e.HasField("expire_time")) for e in page.entries] == [
        ("a", {"x": 1}, False),
        ("b", [1], True),
    ]


async def test_batch_get_keeps_request_order_and_reports_missing(wm, scope):
    await wm.BatchSet(
        pb.BatchSetRequest(
            **scope, entries=[pb.EntryInput(key=k, value=value(k)) for k in ("a", "b", "c")]
        )
    )
    reply = await wm.BatchGet(pb.BatchGetRequest(**scope, keys=["c", "x", "a", "y"]))
    assert [(e.key, python(e.value)) for e in reply.entries] == [("c", "c"), ("a", "a")]
    assert list(reply.missing_keys) == ["x", "y"]
    assert list(reply.unprocessed_keys) == []


async def test_batch_set_reports_each_entry(wm, scope):
    await wm.Set(pb.SetRequest(**scope, key="old", value=value(0)))
    reply = await wm.BatchSet(
        pb.BatchSetRequest(
            **scope,
            entries=[
                pb.EntryInput(key="old", value=value(1)),
                pb.EntryInput(key="new", value=value(2), ttl=duration_pb2.Duration(seconds=30)),
            ],
        )
    )
    assert [(r.key, r.created, r.HasField("expire_time")) for r in reply.results] == [
        ("old", False, False),
        ("new", True, True),
    ]


async def test_batch_delete_splits_deleted_and_absent(wm, scope):
    await wm.BatchSet(
        pb.BatchSetRequest(
            **scope, entries=[pb.EntryInput(key=k, value=value(k)) for k in ("a", "b")]
        )
    )
    reply = await wm.BatchDelete(pb.BatchDeleteRequest(**scope, keys=["b", "zz", "a"]))
    assert list(reply.deleted_keys) == ["b", "a"]
    assert list(reply.absent_keys) == ["zz"]
    assert await keys_of(wm, scope) == []


async def test_batch_set_is_atomic_when_one_entry_is_invalid(wm, scope):
    """One bad entry fails the whole batch, names its field, and writes nothing."""
    error = await expect_error(
        wm.BatchSet(
            pb.BatchSetRequest(
                **scope,
                entries=[
                    pb.EntryInput(key="good", value=value(1)),
                    pb.EntryInput(key="bad"),
                ],
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(error.violations) == {"entries[1].value"}
    assert await keys_of(wm, scope) == []
