"""WorkingMemoryService contract: bad input gets a clear error and changes nothing."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from google.protobuf.message import DecodeError

from memsvc.api._convert import _length_delimited
from memsvc.v1 import working_memory_pb2 as pb
from tests.helpers import expect_error, python, value

GOOD_UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"


@pytest.fixture(autouse=True)
async def _spawned(spawned: dict[str, str]) -> None:
    """Working memory belongs to a spawned session: every test here starts with one."""


def _bad_scopes() -> list[tuple[str, dict[str, str], str]]:
    return [
        ("project not a uuid", {"project_id": "project-1"}, "project_id"),
        ("project empty", {"project_id": ""}, "project_id"),
        ("agent no dashes", {"agent_instance_id": GOOD_UUID.replace("-", "")}, "agent_instance_id"),
        ("session empty", {"session_id": ""}, "session_id"),
        ("session with space", {"session_id": "my session"}, "session_id"),
        ("session too long", {"session_id": "s" * 129}, "session_id"),
        ("session non-ascii", {"session_id": "sessão"}, "session_id"),
    ]  # fmt: skip


@pytest.fixture
async def seeded(wm, scope):
    """A session holding one key, to prove that failed calls leave it untouched."""
    await wm.Set(pb.SetRequest(**scope, key="existing", value=value("original")))
    return scope


async def assert_unchanged(wm, scope) -> None:
    page = await wm.ListEntries(pb.ListEntriesRequest(**scope))
    assert [(e.key, python(e.value)) for e in page.entries] == [("existing", "original")]


@pytest.mark.parametrize(
    ("case", "override", "field"), _bad_scopes(), ids=[c[0] for c in _bad_scopes()]
)
async def test_bad_scope_is_invalid_argument_on_every_rpc(wm, seeded, case, override, field):
    """Every RPC refuses a malformed id, names the field, and writes nothing."""
    bad = dict(seeded, **override)
    calls = [
        wm.Set(pb.SetRequest(**bad, key="existing", value=value("changed"))),
        wm.Get(pb.GetRequest(**bad, key="existing")),
        wm.Delete(pb.DeleteRequest(**bad, key="existing")),
        wm.ListKeys(pb.ListKeysRequest(**bad)),
        wm.ListEntries(pb.ListEntriesRequest(**bad)),
        wm.BatchGet(pb.BatchGetRequest(**bad, keys=["existing"])),
        wm.BatchSet(
            pb.BatchSetRequest(**bad, entries=[pb.EntryInput(key="existing", value=value(0))])
        ),
        wm.BatchDelete(pb.BatchDeleteRequest(**bad, keys=["existing"])),
    ]
    for call in calls:
        error = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert error.reason == "ERROR_REASON_INVALID_ARGUMENT"
        assert field in error.violations, error.violations
        assert field in error.message
    if override.get("project_id", "").upper() != seeded["project_id"].upper():
        await assert_unchanged(wm, seeded)


def _bad_sets() -> list[tuple[str, dict[str, Any], str]]:
    return [
        ("empty key", {"key": ""}, "key"),
        ("key over 512 bytes", {"key": "é" * 257}, "key"),
        ("key with control character", {"key": "line\nbreak"}, "key"),
        ("missing value", {"value": None}, "value"),
        ("empty value", {"value": struct_pb2.Value()}, "value"),
        ("value over 1 MiB", {"value": value("x" * (1 << 20))}, "value"),
        ("negative ttl", {"ttl": duration_pb2.Duration(seconds=-1)}, "ttl"),
        ("negative sub-ms ttl", {"ttl": duration_pb2.Duration(nanos=-5)}, "ttl"),
        ("malformed ttl", {"ttl": duration_pb2.Duration(seconds=1, nanos=-1)}, "ttl"),
        # Past protobuf's Duration range: the parser accepts it.
        ("ttl over 10,000 years", {"ttl": duration_pb2.Duration(seconds=10**14)}, "ttl"),
        # Within it, but the expiry would pass year 9999 (no Timestamp holds it).
        ("ttl over 1,000 years", {"ttl": duration_pb2.Duration(seconds=31_557_600_001)}, "ttl"),
    ]


@pytest.mark.parametrize(("case", "fields", "field"), _bad_sets(), ids=[c[0] for c in _bad_sets()])
async def test_bad_set_is_invalid_argument_and_changes_nothing(wm, seeded, case, fields, field):
    request: dict[str, Any] = {"key": "existing", "value": value("changed")}
    request.update({k: v for k, v in fields.items() if v is not None})
    if fields.get("value", ...) is None:
        del request["value"]
    error = await expect_error(
        wm.Set(pb.SetRequest(**seeded, **request)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert list(error.violations) == [field]
    batch_error = await expect_error(
        wm.BatchSet(
            pb.BatchSetRequest(
                **seeded,
                entries=[pb.EntryInput(key="fresh", value=value(1)), pb.EntryInput(**request)],
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert list(batch_error.violations) == [f"entries[1].{field}"]
    await assert_unchanged(wm, seeded)


async def test_key_of_512_bytes_is_accepted(wm, scope):
    key = "é" * 256  # 512 bytes of UTF-8
    await wm.Set(pb.SetRequest(**scope, key=key, value=value(1)))
    assert (await wm.Get(pb.GetRequest(**scope, key=key))).entry.key == key


async def test_value_error_says_the_limit(wm, scope):
    error = await expect_error(
        wm.Set(pb.SetRequest(**scope, key="k", value=value("x" * (1 << 20)))),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "1048576" in error.violations["value"]


async def test_bad_keys_in_reads_are_invalid_argument(wm, seeded):
    for call, field in [
        (wm.Get(pb.GetRequest(**seeded, key="")), "key"),
        (wm.Delete(pb.DeleteRequest(**seeded, key="x" * 513)), "key"),
        (wm.BatchGet(pb.BatchGetRequest(**seeded, keys=["a", ""])), "keys[1]"),
        (wm.BatchDelete(pb.BatchDeleteRequest(**seeded, keys=["existing", "\x00"])), "keys[1]"),
    ]:
        error = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert field in error.violations
    await assert_unchanged(wm, seeded)


async def test_batches_refuse_duplicates_empty_and_oversize(wm, seeded):
    cases = [
        (wm.BatchGet(pb.BatchGetRequest(**seeded, keys=["a", "b", "a"])), "keys[2]"),
        (wm.BatchDelete(pb.BatchDeleteRequest(**seeded, keys=["existing", "existing"])), "keys[1]"),
        (
            wm.BatchSet(
                pb.BatchSetRequest(
                    **seeded,
                    entries=[
                        pb.EntryInput(key="n", value=value(1)),
                        pb.EntryInput(key="n", value=value(2)),
                    ],
                )
            ),
            "entries[1].key",
        ),
        (wm.BatchGet(pb.BatchGetRequest(**seeded, keys=[])), "keys"),
        (wm.BatchSet(pb.BatchSetRequest(**seeded, entries=[])), "entries"),
        (wm.BatchGet(pb.BatchGetRequest(**seeded, keys=[f"k{i}" for i in range(1001)])), "keys"),
        (
            wm.BatchDelete(pb.BatchDeleteRequest(**seeded, keys=[f"k{i}" for i in range(1001)])),
            "keys",
        ),
    ]
    for call, field in cases:
        error = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert field in error.violations, error.violations
    await assert_unchanged(wm, seeded)


async def test_a_thousand_bad_keys_get_a_bounded_report(wm, seeded):
    """Every key bad: the first 20 are named, then how many more; the status still fits
    gRPC's trailers, and the server carries on."""
    keys = [f"{i:03d}" + "x" * 600 for i in range(1000)]  # each past the 512-byte limit
    error = await expect_error(
        wm.BatchGet(pb.BatchGetRequest(**seeded, keys=keys)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert len(error.violations) == 21
    assert "keys[0]" in error.violations and "keys[19]" in error.violations
    assert error.violations[""] == "and 980 more violation(s) like these"
    assert "980" not in error.message and "997 more" in error.message
    await assert_unchanged(wm, seeded)


async def test_bad_pagination_is_invalid_argument(wm, seeded, scope):
    error = await expect_error(
        wm.ListKeys(pb.ListKeysRequest(**seeded, page_size=-1)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "page_size" in error.violations
    error = await expect_error(
        wm.ListEntries(pb.ListEntriesRequest(**seeded, page_token="not-a-token")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_token" in error.violations
    await wm.Set(pb.SetRequest(**seeded, key="second", value=value(2)))
    page = await wm.ListKeys(pb.ListKeysRequest(**seeded, page_size=1))
    assert page.next_page_token
    other_session = dict(seeded, session_id=seeded["session_id"] + "-other")
    error = await expect_error(
        wm.ListKeys(pb.ListKeysRequest(**other_session, page_token=page.next_page_token)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "another session" in error.violations["page_token"]


def _nested(lists: int) -> struct_pb2.Value:
    """A one-field object inside ``lists`` lists."""
    nested = struct_pb2.Value()
    nested.struct_value.fields["a"].string_value = "x"
    for _ in range(lists):
        outer = struct_pb2.Value()
        outer.list_value.values.add().CopyFrom(nested)
        nested = outer
    return nested


async def test_set_accepts_only_values_every_read_can_send_back(wm, scope):
    """A SetRequest holds its value a level nearer the top than the responses that
    carry it, and protobuf refuses messages nested past 100 levels: a value Set
    takes must come back through Get and ListEntries, with the keys beside it."""
    await wm.Set(pb.SetRequest(**scope, key="plain", value=value(1)))
    accepted, refused = [], []
    for lists in range(44, 60):
        key = f"deep{lists}"
        try:
            request = pb.SetRequest(**scope, key=key, value=_nested(lists))
        except DecodeError:
            break  # too deep for any request: the client cannot even build it
        try:
            await wm.Set(request)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
            assert "nests too deep" in str(error.details())
            refused.append(lists)
            continue
        accepted.append(lists)
        got = await wm.Get(pb.GetRequest(**scope, key=key))
        assert got.entry.value == _nested(lists)
    assert accepted and refused and max(accepted) < min(refused)
    page = await wm.ListEntries(pb.ListEntriesRequest(**scope))
    assert sorted(e.key for e in page.entries) == sorted(
        ["plain", *(f"deep{lists}" for lists in accepted)]
    )


async def test_unknown_fields_inside_a_value_are_not_stored(wm, scope, channel):
    """Found by a review: a bool Value followed by unknown groups nested 99 deep was
    stored as sent, and then no Get, page or checkpoint holding it could be parsed
    (protobuf's 100 levels). A Value has no fields beyond its own: they are dropped."""
    raw_set = channel.unary_unary(
        "/memsvc.v1.WorkingMemoryService/Set",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.SetResponse.FromString,
    )
    groups = 99
    poisoned = b"\x20\x01" + b"\x7b" * groups + b"\x7c" * groups  # bool_value, group 15...
    value_field = pb.SetRequest.DESCRIPTOR.fields_by_name["value"].number
    request = pb.SetRequest(**scope, key="odd").SerializeToString() + _length_delimited(
        value_field, poisoned
    )
    await raw_set(request)
    got = await wm.Get(pb.GetRequest(**scope, key="odd"))
    assert got.entry.value == struct_pb2.Value(bool_value=True)
    page = await wm.ListEntries(pb.ListEntriesRequest(**scope))
    assert [e.key for e in page.entries] == ["odd"]
