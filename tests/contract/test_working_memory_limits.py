"""WorkingMemoryService contract: per-session limits and response budgets."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2

from memsvc.v1 import working_memory_pb2 as pb
from tests.helpers import eventually, expect_error, python, value

# Small limits so the tests reach them quickly: 5 keys, 4 KiB per session,
# values up to 1 KiB, and 4 KiB messages (so 3 KiB of values per response).
SMALL: dict[str, object] = {
    "max_session_keys": 5,
    "max_session_bytes": 4096,
    "max_value_bytes": 1024,
    "max_message_bytes": 4096,
}


@pytest.fixture(autouse=True)
async def _spawned(spawned: dict[str, str]) -> None:
    """Working memory belongs to a spawned session: every test here starts with one."""


@pytest.fixture
def config_overrides() -> dict[str, object]:
    return SMALL


def blob(size: int) -> struct_pb2.Value:
    """A string value whose protobuf encoding is exactly ``size`` bytes."""
    text = "x" * (size - 3)  # tag byte + 2-byte length prefix for sizes 128..16383
    assert len(value(text).SerializeToString()) == size
    return value(text)


async def test_key_limit_refuses_the_extra_key_and_writes_nothing(wm, scope):
    """The sixth key is RESOURCE_EXHAUSTED with the limit in the details; nothing changes."""
    await wm.BatchSet(
        pb.BatchSetRequest(
            **scope, entries=[pb.EntryInput(key=f"k{i}", value=value(i)) for i in range(5)]
        )
    )
    error = await expect_error(
        wm.Set(pb.SetRequest(**scope, key="k5", value=value(5))), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert error.reason == "ERROR_REASON_SESSION_KEY_LIMIT"
    assert error.metadata == {"limit": "5", "current": "5", "requested": "6"}
    assert error.quota_subjects == ["session keys"]
    await wm.Set(pb.SetRequest(**scope, key="k0", value=value("overwrite is fine")))
    await expect_error(wm.Get(pb.GetRequest(**scope, key="k5")), grpc.StatusCode.NOT_FOUND)
    await wm.Delete(pb.DeleteRequest(**scope, key="k1"))
    await wm.Set(pb.SetRequest(**scope, key="k5", value=value(5)))


async def test_batch_over_the_key_limit_is_all_or_nothing(wm, scope):
    await wm.BatchSet(
        pb.BatchSetRequest(
            **scope, entries=[pb.EntryInput(key=f"k{i}", value=value(i)) for i in range(3)]
        )
    )
    await expect_error(
        wm.BatchSet(
            pb.BatchSetRequest(
                **scope, entries=[pb.EntryInput(key=f"n{i}", value=value(i)) for i in range(3)]
            )
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    page = await wm.ListKeys(pb.ListKeysRequest(**scope))
    assert [k.key for k in page.keys] == ["k0", "k1", "k2"]


async def test_byte_limit_counts_keys_and_values(wm, scope):
    """Bytes are keys plus encoded values; replacing a value counts only the new size."""
    for i in range(4):
        await wm.Set(pb.SetRequest(**scope, key=f"b{i}", value=blob(1000)))  # 4 x 1002 bytes
    error = await expect_error(
        wm.Set(pb.SetRequest(**scope, key="b4", value=blob(1000))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert error.reason == "ERROR_REASON_SESSION_SIZE_LIMIT"
    assert error.metadata == {"limit": "4096", "current": "4008", "requested": "5010"}
    await wm.Set(pb.SetRequest(**scope, key="b0", value=blob(1000)))  # same size: allowed
    await wm.Set(pb.SetRequest(**scope, key="b4", value=value(1)))  # small: fits


async def test_expired_keys_do_not_count_against_limits(wm, scope):
    await wm.BatchSet(
        pb.BatchSetRequest(
            **scope,
            entries=[
                pb.EntryInput(
                    key=f"k{i}", value=value(i), ttl=duration_pb2.Duration(nanos=200_000_000)
                )
                for i in range(5)
            ],
        )
    )

    async def room_again() -> bool:
        try:
            await wm.Set(pb.SetRequest(**scope, key="after", value=value(1)))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False
        return True

    await eventually(room_again)
    page = await wm.ListKeys(pb.ListKeysRequest(**scope))
    assert [k.key for k in page.keys] == ["after"]


async def test_list_entries_pages_by_bytes(wm, scope):
    """Pages stop before 3 KiB of entries (values, keys and their framing) and still
    list every entry exactly once."""
    for i in range(4):  # one by one: a batch of them would pass the 4 KiB message limit
        await wm.Set(pb.SetRequest(**scope, key=f"k{i}", value=blob(900)))
    sizes = []
    seen = []
    token = ""
    while True:
        page = await wm.ListEntries(pb.ListEntriesRequest(**scope, page_size=100, page_token=token))
        sizes.append(len(page.entries))
        seen += [e.key for e in page.entries]
        token = page.next_page_token
        if not token:
            break
    assert sizes == [3, 1]
    assert seen == ["k0", "k1", "k2", "k3"]


async def test_batch_get_returns_unprocessed_keys_past_the_budget(wm, scope):
    for i in range(4):  # one by one: a batch of them would pass the 4 KiB message limit
        await wm.Set(pb.SetRequest(**scope, key=f"k{i}", value=blob(900)))
    reply = await wm.BatchGet(pb.BatchGetRequest(**scope, keys=["k3", "none", "k2", "k1", "k0"]))
    assert [e.key for e in reply.entries] == ["k3", "k2", "k1"]
    assert list(reply.missing_keys) == ["none"]
    assert list(reply.unprocessed_keys) == ["k0"]
    rest = await wm.BatchGet(pb.BatchGetRequest(**scope, keys=list(reply.unprocessed_keys)))
    assert [e.key for e in rest.entries] == ["k0"]
    assert python(rest.entries[0].value) == "x" * 897


LONG_KEYS = {"max_message_bytes": 1 << 20, "max_value_bytes": 256 << 10}


@pytest.mark.parametrize("config_overrides", [LONG_KEYS], ids=["1 MiB messages"])
async def test_long_keys_count_against_the_response_budget(wm, scope, config_overrides):
    """1,000 keys of 512 bytes are half a megabyte of a response by themselves:
    pages and batches count them, and stay within the message limit."""
    keys = [f"{i:04}".ljust(512, "k") for i in range(1000)]
    for start in range(0, 1000, 250):
        entries = [pb.EntryInput(key=key, value=blob(690)) for key in keys[start : start + 250]]
        await wm.BatchSet(pb.BatchSetRequest(**scope, entries=entries))
    listed, token = [], ""
    while True:
        page = await wm.ListEntries(
            pb.ListEntriesRequest(**scope, page_size=1000, page_token=token)
        )
        listed += [e.key for e in page.entries]
        token = page.next_page_token
        if not token:
            break
    assert listed == keys
    got = []
    for start in range(0, 1000, 250):  # 1,000 such keys at once are refused (below)
        pending = keys[start : start + 250]
        while pending:
            reply = await wm.BatchGet(pb.BatchGetRequest(**scope, keys=pending))
            got += [e.key for e in reply.entries]
            pending = list(reply.unprocessed_keys)
    assert got == keys


LARGE_VALUES = {"max_message_bytes": 1 << 20, "max_value_bytes": 700_000}


@pytest.mark.parametrize("config_overrides", [LARGE_VALUES], ids=["700 KB values"])
async def test_a_batch_whose_keys_leave_no_room_for_a_value_is_refused(wm, scope, config_overrides):
    """1,000 keys of 512 bytes beside a value of 700 KB would pass a 1 MiB message
    (every key comes back, found, missing or unprocessed): refused, fewer work."""
    keys = [f"{i:04}".ljust(512, "k") for i in range(1000)]
    await wm.Set(pb.SetRequest(**scope, key=keys[0], value=value("x" * 600_000)))
    error = await expect_error(
        wm.BatchGet(pb.BatchGetRequest(**scope, keys=keys)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert set(error.violations) == {"keys"} and "fewer keys" in error.message
    reply = await wm.BatchGet(pb.BatchGetRequest(**scope, keys=keys[:100]))
    assert [e.key for e in reply.entries] == [keys[0]] and len(reply.missing_keys) == 99


NEAR_THE_BUDGET = {"max_message_bytes": 4096, "max_value_bytes": 3060}


@pytest.mark.parametrize("config_overrides", [NEAR_THE_BUDGET], ids=["3060-byte values"])
async def test_one_key_always_goes(wm, scope, config_overrides):
    """A value just under the budget: a BatchGet of its key alone is never refused."""
    await wm.Set(pb.SetRequest(**scope, key="k", value=blob(3050)))
    reply = await wm.BatchGet(pb.BatchGetRequest(**scope, keys=["k"]))
    assert [e.key for e in reply.entries] == ["k"]
