"""Identifier rules, value conversions and page tokens."""

from __future__ import annotations

import uuid

import pytest
from google.protobuf import duration_pb2
from hypothesis import given
from hypothesis import strategies as st

from memsvc.api._convert import ttl_ms
from memsvc.domain import FieldViolation, InvalidArgument, SessionRef
from memsvc.domain._ids import check_key, check_session_id, check_uuid
from memsvc.domain._lifecycle_results import uuid7
from memsvc.domain._pagination import decode_page_token, encode_page_token, fingerprint
from memsvc.store.redis import session_keys

session_ids = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=128
)
uuids = st.uuids().map(str)


def violations_of(check, value: str) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    check(value, "f", found)
    return found


@given(session_ids)
def test_every_printable_ascii_session_id_is_valid(session_id):
    assert violations_of(check_session_id, session_id) == []


@pytest.mark.parametrize("bad", ["", " ", "a b", "tab\t", "é", "s" * 129])
def test_bad_session_ids(bad):
    assert len(violations_of(check_session_id, bad)) == 1


def test_uuid_rules():
    assert (
        check_uuid("0F8FAD5B-D9CB-469F-A165-70867728950E", "f", [])
        == "0f8fad5b-d9cb-469f-a165-70867728950e"
    )
    for bad in [
        "",
        "0f8fad5bd9cb469fa16570867728950e",
        "{0f8fad5b-d9cb-469f-a165-70867728950e}",
        "x" * 36,
    ]:
        assert len(violations_of(check_uuid, bad)) == 1, bad


def test_key_rules():
    assert violations_of(check_key, "é" * 256) == []
    for bad in ["", "é" * 257, "a\x00b", "a\x7fb", "a\u0085b"]:
        assert len(violations_of(check_key, bad)) == 1, repr(bad)


@given(uuids, uuids, session_ids, uuids, uuids, session_ids)
def test_redis_keys_are_injective_and_share_one_hash_tag(p1, a1, s1, p2, a2, s2):
    """Two different sessions never share a Redis key; all four keys share one slot."""
    keys1 = session_keys(SessionRef(p1, a1, s1))
    keys2 = session_keys(SessionRef(p2, a2, s2))
    if (p1, a1, s1) != (p2, a2, s2):
        assert not set(keys1) & set(keys2)
    tags = {k[k.index("{") + 1 : k.index("}")] for k in keys1}
    assert len(tags) == 1
    (tag,) = tags
    assert "{" not in tag and "}" not in tag and tag


@pytest.mark.parametrize(
    ("seconds", "nanos", "expected"),
    [(0, 0, None), (1, 0, 1000), (0, 1, 1), (0, 1_500_000, 2), (-1, 0, -1000), (0, -1, -1)],
)
def test_ttl_milliseconds_round_up_and_keep_their_sign(seconds, nanos, expected):
    assert ttl_ms(duration_pb2.Duration(seconds=seconds, nanos=nanos), True, "ttl") == expected


def test_ttl_absent_and_malformed():
    assert ttl_ms(duration_pb2.Duration(), False, "ttl") is None
    with pytest.raises(InvalidArgument) as error:
        ttl_ms(duration_pb2.Duration(seconds=1, nanos=-1), True, "entries[0].ttl")
    assert error.value.violations[0].field == "entries[0].ttl"


@given(st.text(max_size=600))
def test_page_tokens_round_trip(after):
    scope = fingerprint("a", "b")
    assert decode_page_token(encode_page_token(after, scope), scope) == after


@pytest.mark.parametrize("token", ["x", "!!!", "eyJ2IjoyfQ", encode_page_token("k", "other")])
def test_bad_page_tokens_are_invalid_argument(token):
    with pytest.raises(InvalidArgument) as error:
        decode_page_token(token, fingerprint("a"))
    assert error.value.violations[0].field == "page_token"


def test_uuid7_ids_of_one_millisecond_sort_in_the_order_they_were_made():
    """Found by a review: the bits below the millisecond were random, so episodes
    recorded in one millisecond were listed in a random order, not newest first."""
    ms = 1_765_000_000_000
    made = [uuid7(ms) for _ in range(1000)]
    assert made == sorted(made) and len(set(made)) == len(made)
    for text in (made[0], made[-1], uuid7()):
        parsed = uuid.UUID(text)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert all(int(uuid.UUID(text)) >> 80 == ms for text in made)
    # Another millisecond starts from random bits, and still sorts by its time.
    later = uuid7(ms + 1)
    assert later > made[-1] and int(uuid.UUID(later)) >> 80 == ms + 1
