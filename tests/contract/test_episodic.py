"""EpisodicMemoryService through gRPC, on every deployment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from memsvc.domain import _episodes as episodes_module
from memsvc.server import Server
from memsvc.store import _episodes_sql
from memsvc.v1 import episodic_pb2 as ep
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as wm
from memsvc.v1.episodic_pb2_grpc import EpisodicMemoryServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.helpers import expect_error, forge_page_token, results_of, sql_rows, value


@pytest.fixture
def episodic(channel: grpc.aio.Channel) -> EpisodicMemoryServiceStub:
    return EpisodicMemoryServiceStub(channel)


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(data)
    return message


def nested(depth: int) -> dict[str, Any]:
    """An object ``depth`` levels deep: {"a": {"a": ... 1}}."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return dict(value)


def episode(scope: dict[str, str], **fields: Any) -> ep.Episode:
    """A valid episode of the test's session, with ``fields`` overriding."""
    values: dict[str, Any] = {
        "project_id": scope["project_id"],
        "agent_instance_id": scope["agent_instance_id"],
        "session_id": scope["session_id"],
        "task_type": "code_review",
        "task_description": "Review the pull request",
        "outcome": lc.OUTCOME_SUCCESS,
        "importance": 0.5,
    }
    values.update(fields)
    return ep.Episode(**values)


async def record(stub: EpisodicMemoryServiceStub, message: ep.Episode, **kw: Any) -> ep.Episode:
    response: ep.RecordEpisodeResponse = await stub.RecordEpisode(
        ep.RecordEpisodeRequest(episode=message, **kw)
    )
    return response.episode


async def list_all(
    stub: EpisodicMemoryServiceStub, project_id: str, page_size: int = 0, **filters: Any
) -> list[ep.Episode]:
    found: list[ep.Episode] = []
    token = ""
    while True:
        page = await stub.ListEpisodes(
            ep.ListEpisodesRequest(
                project_id=project_id,
                filter=ep.EpisodeFilter(**filters),
                page_size=page_size,
                page_token=token,
            )
        )
        found += page.episodes
        token = page.next_page_token
        if not token:
            return found


async def search_ids(stub: EpisodicMemoryServiceStub, project_id: str, query: str) -> list[str]:
    response = await stub.SearchEpisodes(
        ep.SearchEpisodesRequest(project_id=project_id, query=query, page_size=100)
    )
    return [r.episode.episode_id for r in response.results]


async def test_record_then_get_returns_every_field(episodic, scope):
    sent = episode(
        scope,
        task_description="Migrate the billing service to PostgreSQL 15",
        outcome=lc.OUTCOME_PARTIAL,
        outcome_details="two of three tables moved",
        actions=[struct({"tool": "psql", "args": ["-c", "\\dt"]}), struct({"tool": "git"})],
        context_summary="The billing service ran on MySQL 5.7.",
        lessons_learned=["take a dump first", "check the collations"],
        duration=duration_pb2.Duration(seconds=90, nanos=500_000_000),
        tokens_used=12_345,
        importance=0.75,
        metadata=struct({"ticket": "OPS-42", "tags": ["db"]}),
        embedding=[0.5, -1.0, 2.0],
    )
    stored = await record(episodic, sent)
    assert uuid.UUID(stored.episode_id).version == 7
    assert stored.HasField("create_time")
    assert stored.embedding_dimensions == 3
    assert list(stored.embedding) == []  # not echoed back

    got = (
        await episodic.GetEpisode(
            ep.GetEpisodeRequest(
                project_id=scope["project_id"], episode_id=stored.episode_id, include_embedding=True
            )
        )
    ).episode
    expected = ep.Episode()
    expected.CopyFrom(sent)
    expected.episode_id = stored.episode_id
    expected.create_time.CopyFrom(stored.create_time)
    expected.embedding_dimensions = 3
    assert got == expected

    plain = await episodic.GetEpisode(
        ep.GetEpisodeRequest(project_id=scope["project_id"], episode_id=stored.episode_id)
    )
    assert list(plain.episode.embedding) == []
    assert plain.episode.embedding_dimensions == 3


async def test_unknown_episodes_are_not_found_in_any_project(episodic, scope):
    stored = await record(episodic, episode(scope))
    details = await expect_error(
        episodic.GetEpisode(
            ep.GetEpisodeRequest(project_id=str(uuid.uuid4()), episode_id=stored.episode_id)
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details.reason == "ERROR_REASON_EPISODE_NOT_FOUND"
    assert details.metadata == {"episode_id": stored.episode_id}
    await expect_error(
        episodic.GetEpisode(
            ep.GetEpisodeRequest(project_id=scope["project_id"], episode_id=str(uuid.uuid4()))
        ),
        grpc.StatusCode.NOT_FOUND,
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"importance": 1.5}, "episode.importance"),
        ({"importance": -0.1}, "episode.importance"),
        ({"importance": float("nan")}, "episode.importance"),
        ({"outcome": 9}, "episode.outcome"),
        ({"outcome": lc.OUTCOME_UNSPECIFIED}, "episode.outcome"),
        ({"task_type": ""}, "episode.task_type"),
        ({"task_description": "x" * 10_001}, "episode.task_description"),
        ({"context_summary": "x" * 100_001}, "episode.context_summary"),
        ({"lessons_learned": ["l"] * 101}, "episode.lessons_learned"),
        ({"lessons_learned": ["x" * 2_001]}, "episode.lessons_learned[0]"),
        ({"actions": [struct({"a": "x" * (1 << 20)})]}, "episode.actions"),
        ({"project_id": "not-a-uuid"}, "episode.project_id"),
        ({"agent_instance_id": ""}, "episode.agent_instance_id"),
        ({"session_id": "has space"}, "episode.session_id"),
        ({"episode_id": str(uuid.uuid4())}, "episode.episode_id"),
        ({"create_time": timestamp_pb2.Timestamp(seconds=1_700_000_000)}, "episode.create_time"),
        # Set, though to the Unix epoch (within its first millisecond): still set.
        ({"create_time": timestamp_pb2.Timestamp()}, "episode.create_time"),
        ({"create_time": timestamp_pb2.Timestamp(nanos=999_999)}, "episode.create_time"),
        ({"tokens_used": -1}, "episode.tokens_used"),
        ({"duration": duration_pb2.Duration(seconds=-1)}, "episode.duration"),
        ({"duration": duration_pb2.Duration(seconds=5, nanos=-1)}, "episode.duration"),
        ({"embedding": [float("inf")]}, "episode.embedding"),
        ({"embedding": [0.1] * 4_097}, "episode.embedding"),
        # No direction (as float32, 1e-50 is 0): it would score 0 against any query,
        # above every episode pointing away from it.
        ({"embedding": [0.0, -0.0, 1e-50]}, "episode.embedding"),
        # Past protobuf's Duration range: stored, it could never be sent back.
        ({"duration": duration_pb2.Duration(seconds=10**15)}, "episode.duration"),
        # NUL: PostgreSQL stores no U+0000 in text or jsonb.
        ({"task_description": "a\x00b"}, "episode.task_description"),
        ({"lessons_learned": ["a\x00b"]}, "episode.lessons_learned[0]"),
        ({"metadata": struct({"k": "a\x00b"})}, "episode.metadata"),
        ({"actions": [struct({"a\x00": 1})]}, "episode.actions[0]"),
        # Nested so deep that SearchEpisodes, which holds them deepest, could not send
        # them (protobuf's 100 levels), though the request itself parses.
        ({"metadata": struct(nested(33))}, "episode.metadata"),
        ({"actions": [struct(nested(33))]}, "episode.actions[0]"),
    ],
)
async def test_every_bad_field_is_refused_and_nothing_is_written(episodic, scope, fields, field):
    details = await expect_error(
        record(episodic, episode(scope, **fields)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert field in details.violations, details.violations
    assert await list_all(episodic, scope["project_id"]) == []


async def test_the_deepest_metadata_and_actions_accepted_come_back_from_search(episodic, scope):
    deepest = struct({"word": "zebrafish", **nested(32)})
    await record(episodic, episode(scope, metadata=deepest, actions=[deepest]))
    response = await episodic.SearchEpisodes(
        ep.SearchEpisodesRequest(project_id=scope["project_id"], query="review")
    )
    [result] = response.results
    assert result.episode.metadata == deepest
    assert list(result.episode.actions) == [deepest]


async def test_json_limits_count_bytes_of_utf8(episodic, scope):
    """Metadata (64 KiB) and actions (1 MiB) are measured in bytes of UTF-8 JSON,
    not of ASCII escapes (which count an emoji 12 bytes instead of 4)."""
    emoji = "\U0001f600" * 12_000  # 48,000 bytes
    stored = await record(episodic, episode(scope, metadata=struct({"note": emoji})))
    assert stored.metadata["note"] == emoji
    details = await expect_error(
        record(episodic, episode(scope, metadata=struct({"note": emoji * 2}))),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details.violations) == {"episode.metadata"}


async def test_one_error_names_every_bad_field(episodic, scope):
    details = await expect_error(
        record(episodic, episode(scope, importance=2, outcome=7, task_type="")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {"episode.importance", "episode.outcome", "episode.task_type"} <= set(details.violations)


async def test_a_retried_record_returns_the_first_answer(episodic, scope):
    request_id = str(uuid.uuid4())
    first = await record(episodic, episode(scope), request_id=request_id)
    again = await record(episodic, episode(scope), request_id=request_id)
    assert again == first
    assert await record(episodic, episode(scope), request_id=request_id.upper()) == first
    details = await expect_error(
        record(episodic, episode(scope, importance=0.9), request_id=request_id),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.reason == "ERROR_REASON_REQUEST_ID_REUSED"
    assert [e.episode_id for e in await list_all(episodic, scope["project_id"])] == [
        first.episode_id
    ]


async def test_a_retried_delete_answers_as_the_first_call_did(episodic, scope, server):
    first = await record(episodic, episode(scope))
    second = await record(episodic, episode(scope))
    request_id = str(uuid.uuid4())

    def delete(episode_id: str, rid: str = request_id) -> Any:
        return episodic.DeleteEpisode(
            ep.DeleteEpisodeRequest(
                project_id=scope["project_id"], episode_id=episode_id, request_id=rid
            )
        )

    await delete(first.episode_id)
    await delete(first.episode_id)  # gone, yet the retry answers OK as the first did
    details = await expect_error(delete(second.episode_id), grpc.StatusCode.INVALID_ARGUMENT)
    assert details.reason == "ERROR_REASON_REQUEST_ID_REUSED"
    # A refused call claims no id: its retry is refused the same way.
    missing = str(uuid.uuid4())
    other = str(uuid.uuid4())
    for _ in range(2):
        await expect_error(delete(missing, other), grpc.StatusCode.NOT_FOUND)
    claimed = await sql_rows(
        server.config.database_url, "SELECT count(*) FROM request_log WHERE request_id = ?", other
    )
    assert claimed[0][0] == 0
    details = await expect_error(delete(first.episode_id, "nope"), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(details.violations) == {"request_id"}
    assert [e.episode_id for e in await list_all(episodic, scope["project_id"])] == [
        second.episode_id
    ]


async def test_concurrent_retries_record_one_episode(episodic, scope):
    request_id = str(uuid.uuid4())
    answers = await asyncio.gather(
        *(record(episodic, episode(scope), request_id=request_id) for _ in range(8))
    )
    assert len({a.episode_id for a in answers}) == 1
    assert len(await list_all(episodic, scope["project_id"])) == 1


async def test_list_filters_and_orders_newest_first(episodic, scope):
    other_agent = {**scope, "agent_instance_id": str(uuid.uuid4())}
    other_session = {**scope, "session_id": "other-session"}
    a = await record(episodic, episode(scope, importance=0.2))
    b = await record(episodic, episode(other_agent, outcome=lc.OUTCOME_FAILURE, importance=0.9))
    c = await record(episodic, episode(other_session, task_type="planning", importance=0.6))
    project = scope["project_id"]

    async def ids(**filters: Any) -> list[str]:
        return [e.episode_id for e in await list_all(episodic, project, **filters)]

    assert await ids() == [c.episode_id, b.episode_id, a.episode_id]
    assert await ids(agent_instance_id=scope["agent_instance_id"]) == [c.episode_id, a.episode_id]
    assert await ids(
        agent_instance_id=scope["agent_instance_id"], session_id=scope["session_id"]
    ) == [a.episode_id]
    assert await ids(outcome=lc.OUTCOME_FAILURE) == [b.episode_id]
    assert await ids(task_type="planning") == [c.episode_id]
    assert await ids(min_importance=0.6) == [c.episode_id, b.episode_id]

    # Episodes may share a millisecond: the expectation follows their times.
    def ms(e: ep.Episode) -> int:
        return e.create_time.ToMilliseconds()

    since_b = {e.episode_id for e in (a, b, c) if ms(e) >= ms(b)}
    assert set(await ids(start_time=b.create_time)) == since_b
    assert (
        set(await ids(end_time=b.create_time))
        == {a.episode_id, b.episode_id, c.episode_id} - since_b
    )
    assert await ids(end_time=a.create_time) == []
    future = timestamp_pb2.Timestamp(seconds=c.create_time.seconds + 3600)
    assert await ids(start_time=future) == []
    # Page by page under an end time (a next page's cursor stands in for the end).
    walked = await list_all(episodic, project, page_size=1, end_time=future)
    assert [e.episode_id for e in walked] == [c.episode_id, b.episode_id, a.episode_id]


async def test_time_filters_between_milliseconds_keep_their_meaning(episodic, scope):
    """Episodes are stamped to the millisecond; a bound finer than that must still
    mean "at or after" and "before": rounded down, an episode of millisecond T
    passed a start of T + 0.5 ms and failed an end of T + 0.5 ms."""
    made = await record(episodic, episode(scope))
    at = made.create_time.seconds * 1_000_000_000 + made.create_time.nanos

    def moment(nanos: int) -> timestamp_pb2.Timestamp:
        return timestamp_pb2.Timestamp(seconds=nanos // 10**9, nanos=nanos % 10**9)

    async def found(start: int, end: int | None = None) -> bool:
        bounds: dict[str, Any] = {"start_time": moment(start)}
        if end is not None:
            bounds["end_time"] = moment(end)
        listed = await list_all(episodic, scope["project_id"], **bounds)
        return made.episode_id in {e.episode_id for e in listed}

    half_ms = 500_000
    assert not await found(at + half_ms)  # created before that start
    assert await found(at - half_ms, at + half_ms)
    assert await found(at - 1, at + 1)
    assert not await found(at + 1, at + 2)  # within one millisecond: empty, not refused
    assert not await found(at - 2 * half_ms, at)  # the end is exclusive
    # The latest Timestamp there is, a common "no end", rounds up past year 9999
    # but stays a valid end.
    latest = 253_402_300_799 * 10**9 + 999_999_999
    assert await found(at - half_ms, latest)


async def test_pages_neither_skip_nor_repeat_while_episodes_arrive(episodic, scope):
    project = scope["project_id"]
    original = {(await record(episodic, episode(scope))).episode_id for _ in range(23)}
    arrived: set[str] = set()
    paging_done = asyncio.Event()

    async def keep_recording() -> None:
        # Concurrent writers, while the pages are read.
        while not paging_done.is_set():
            stored = await asyncio.gather(*(record(episodic, episode(scope)) for _ in range(3)))
            arrived.update(e.episode_id for e in stored)

    writer = asyncio.create_task(keep_recording())
    seen: list[str] = []
    token = ""
    try:
        while True:
            page = await episodic.ListEpisodes(
                ep.ListEpisodesRequest(project_id=project, page_size=4, page_token=token)
            )
            seen += [e.episode_id for e in page.episodes]
            token = page.next_page_token
            await asyncio.sleep(0.01)  # let the writers land episodes between pages
            if not token:
                break
    finally:
        paging_done.set()
        await writer
    assert arrived, "no episode arrived while paging; the test proved nothing"
    assert len(seen) == len(set(seen)), "an episode was repeated"
    assert original <= set(seen), "an episode was skipped"
    assert set(seen) <= original | arrived


async def test_bad_list_requests_are_refused(episodic, scope):
    project = scope["project_id"]
    for request, field in [
        (ep.ListEpisodesRequest(project_id="x"), "project_id"),
        (ep.ListEpisodesRequest(project_id=project, page_size=-1), "page_size"),
        (ep.ListEpisodesRequest(project_id=project, page_token="garbage!"), "page_token"),
        (
            ep.ListEpisodesRequest(project_id=project, filter=ep.EpisodeFilter(session_id="s")),
            "filter.session_id",
        ),
        (
            ep.ListEpisodesRequest(project_id=project, filter=ep.EpisodeFilter(min_importance=2)),
            "filter.min_importance",
        ),
        (
            ep.ListEpisodesRequest(
                project_id=project,
                filter=ep.EpisodeFilter(outcome=8),  # type: ignore[arg-type]
            ),
            "filter.outcome",
        ),
        (
            ep.ListEpisodesRequest(
                project_id=project,
                filter=ep.EpisodeFilter(start_time=timestamp_pb2.Timestamp(seconds=10**12)),
            ),
            "filter.start_time",
        ),
        (
            ep.ListEpisodesRequest(project_id=project, filter=ep.EpisodeFilter(task_type="a\x00")),
            "filter.task_type",
        ),
        # Malformed Timestamps (protobuf: 0 <= nanos < 1e9), not read as other times.
        (
            ep.ListEpisodesRequest(
                project_id=project,
                filter=ep.EpisodeFilter(start_time=timestamp_pb2.Timestamp(nanos=-5)),
            ),
            "filter.start_time",
        ),
        (
            ep.ListEpisodesRequest(
                project_id=project,
                filter=ep.EpisodeFilter(end_time=timestamp_pb2.Timestamp(nanos=2_000_000_000)),
            ),
            "filter.end_time",
        ),
    ]:
        details = await expect_error(
            episodic.ListEpisodes(request), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert field in details.violations, (field, details.violations)
    for _ in range(3):
        await record(episodic, episode(scope))
    page = await episodic.ListEpisodes(ep.ListEpisodesRequest(project_id=project, page_size=2))
    assert page.next_page_token
    # A token is bound to its filter; an unset one (null) is not the text "None".
    for task_type in ("other", "None"):
        details = await expect_error(
            episodic.ListEpisodes(
                ep.ListEpisodesRequest(
                    project_id=project,
                    page_size=2,
                    page_token=page.next_page_token,
                    filter=ep.EpisodeFilter(task_type=task_type),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "page_token" in details.violations, (task_type, details.violations)


CORPUS = [
    ("Deploy the payment service to production", "Kubernetes rollout", ["use canary releases"]),
    ("Write unit tests for the parser", "pytest and hypothesis", ["property tests find edges"]),
    ("Fix flaky integration tests", "CI was red", ["deployment order matters"]),
    ("Summarize the quarterly report", "finance documents", ["ask for the raw numbers"]),
    ("Rotate database credentials", "vault secrets", ["automate the rotation"]),
]


async def record_corpus(stub: EpisodicMemoryServiceStub, scope: dict[str, str]) -> list[str]:
    ids = []
    for description, summary, lessons in CORPUS:
        stored = await record(
            stub,
            episode(
                scope,
                task_description=description,
                context_summary=summary,
                lessons_learned=lessons,
            ),
        )
        ids.append(stored.episode_id)
    return ids


async def test_search_ranks_the_relevant_episode_first(episodic, scope):
    ids = await record_corpus(episodic, scope)
    project = scope["project_id"]
    # Stemming: "deploying" finds "Deploy", "testing" finds "tests".
    assert await search_ids(episodic, project, "deploying payment") == [ids[0]]
    assert set(await search_ids(episodic, project, "testing")) == {ids[1], ids[2]}
    # Both match "tests" (which ranks first is each backend's rank); adding a word
    # only one of them has, "property", finds that one alone.
    assert set(await search_ids(episodic, project, "tests")) == {ids[1], ids[2]}
    assert await search_ids(episodic, project, "testing property") == [ids[1]]
    assert await search_ids(episodic, project, "raw numbers") == [ids[3]]
    assert await search_ids(episodic, project, '"unit tests"') == [ids[1]]
    assert await search_ids(episodic, project, '"tests unit"') == []
    assert await search_ids(episodic, project, "vault") == [ids[4]]
    assert await search_ids(episodic, project, "nonexistentword") == []
    # Another project sees nothing.
    assert await search_ids(episodic, str(uuid.uuid4()), "vault") == []


async def test_control_characters_in_an_episode_do_not_raise_its_rank(episodic, scope):
    """SQLite marks each match with U+0001 to count them: an episode holding that
    character itself was counted a match per copy, and ranked first for any query
    it matched at all. Padded with it or with spaces (neither is a word), an
    episode scores the same."""
    padded = {}
    for pad in ("\x01", " "):
        padded[pad] = await record(
            episodic,
            episode(scope, task_description="apple " + pad * 300, context_summary=pad * 500),
        )
    response = await episodic.SearchEpisodes(
        ep.SearchEpisodesRequest(project_id=scope["project_id"], query="apple", page_size=10)
    )
    scores = {result.episode.episode_id: result.score for result in response.results}
    assert scores[padded["\x01"].episode_id] == pytest.approx(scores[padded[" "].episode_id])


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("main.py", {0}),
        ("main", {0}),  # a word of a file name
        ("v1.2.3", {0}),
        ("example.com", {1}),
        ("alice@example.com", {1}),
        ("3.14", {3}),
        ("snake_case", {3}),
        ("case", {3}),
        ("the", {0, 2}),  # no stop words: "the" is a word like any other
        ("was not", {2}),
        ('"build was"', {2}),
    ],
)
async def test_search_sees_the_same_words_on_every_backend(episodic, scope, query, expected):
    """Text is words of letters and digits on both databases: PostgreSQL's parser
    alone would index "main.py" or "alice@example.com" as one token that no word
    of a query matches, and drop stop words."""
    texts = [
        "Fix the bug in main.py for release v1.2.3",
        "Mail alice@example.com about example.com",
        "The build was not green",
        "Pi is 3.14 in snake_case",
    ]
    ids = [
        (await record(episodic, episode(scope, task_description=text))).episode_id for text in texts
    ]
    found = await search_ids(episodic, scope["project_id"], query)
    assert {ids.index(episode_id) for episode_id in found} == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("sugar ¾", {0}),  # ¾ is no word, on either database
        ("alpha ½", {1}),
        ('"alpha ① release"', {1}),
        ("x", {2}),  # x² is the word x
        ("H O", {2}),  # H₂O: H and O
        ("alpha " + "あ" * 600, set()),  # a long word (1,800 bytes) is a word
        ("release", {1, 3}),  # found by its other words: the 2,100-byte one is left out
        ("二〇二四年", {4}),  # U+3007 is a letter number (Nl): part of the word, on both
        ("Ⅻ", set()),  # ... and so is Ⅻ: no word of its own
    ],
)
async def test_numbers_that_are_not_digits_and_very_long_words_are_no_words(
    episodic, scope, query, expected
):
    """Found by a review: PostgreSQL's parser drops ½, ², ① and words over 2,047
    bytes, and a query term that came to nothing stopped being required there,
    so `sugar ¾` found episodes without ¾ on PostgreSQL and none on SQLite. Both
    now see the same words: letters and digits, each at most 2,047 bytes."""
    texts = [
        "add ½ cup of sugar",
        "alpha release notes",
        "x² and H₂O",
        "release " + "あ" * 700,
        "二〇二四年 Ⅻ世紀",
    ]
    ids = [
        (await record(episodic, episode(scope, task_description=text))).episode_id for text in texts
    ]
    found = await search_ids(episodic, scope["project_id"], query)
    assert {ids.index(episode_id) for episode_id in found} == expected


async def test_a_query_word_over_2047_bytes_is_refused(episodic, scope):
    """No episode can be found by it: PostgreSQL indexes no longer words."""
    request = ep.SearchEpisodesRequest(project_id=scope["project_id"], query="alpha " + "あ" * 700)
    details = await expect_error(episodic.SearchEpisodes(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert "over 2047 bytes" in details.message, details.message


async def test_search_pages_hold_while_episodes_are_recorded(episodic, scope):
    """A score comes from its episode alone: episodes recorded between two pages
    (here in another project, and ones not matching in this one) move no page
    position. FTS5's bm25 moved every score with the corpus, and the next page
    came back empty."""
    project = scope["project_id"]
    wanted = set()
    for index in range(6):
        text = f"quarterly zebrafish audit {'notes ' * index}"
        wanted.add((await record(episodic, episode(scope, task_description=text))).episode_id)
    request = ep.SearchEpisodesRequest(project_id=project, query="zebrafish", page_size=3)
    first = await episodic.SearchEpisodes(request)
    other = dict(scope, project_id=str(uuid.uuid4()))
    for index in range(40):
        await record(episodic, episode(other, task_description=f"unrelated work {index}"))
        await record(episodic, episode(scope, task_description=f"another audit {index}"))
    request.page_token = first.next_page_token
    second = await episodic.SearchEpisodes(request)
    seen = [r.episode.episode_id for r in (*first.results, *second.results)]
    assert sorted(seen) == sorted(wanted) and not second.next_page_token


async def test_a_query_without_a_word_is_refused(episodic, scope):
    for query in ("___", "_", "... !!"):
        details = await expect_error(
            episodic.SearchEpisodes(
                ep.SearchEpisodesRequest(project_id=scope["project_id"], query=query)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert set(details.violations) == {"query"}, query


async def test_the_longest_episodes_are_recorded_and_found(episodic, scope):
    """Every text at its limit, in distinct words of 4-byte characters (the most a
    text index holds per character): recorded on both databases, and found."""
    counter = iter(range(10**6))

    def words(chars: int) -> str:
        out: list[str] = []
        while len(out) * 5 < chars - 5:
            n = next(counter)
            out.append("".join(chr(0x20000 + (n >> shift) % 4096) for shift in (0, 12, 24, 36)))
        return " ".join(out)

    description = "findme " + words(9_990)
    stored = await record(
        episodic,
        episode(
            scope,
            task_description=description,
            lessons_learned=[words(2_000) for _ in range(100)],
            context_summary=words(100_000),
        ),
    )
    assert await search_ids(episodic, scope["project_id"], "findme") == [stored.episode_id]


async def test_search_applies_filters_and_pages_without_repeats(episodic, scope):
    project = scope["project_id"]
    wanted = set()
    for index in range(12):
        stored = await record(
            episodic,
            episode(
                scope,
                task_description=f"incident {'review ' * (index % 4 + 1)}number {index}",
                importance=0.9 if index % 2 else 0.1,
            ),
        )
        if index % 2:
            wanted.add(stored.episode_id)
    seen: list[str] = []
    scores: list[float] = []
    token = ""
    while True:
        page = await episodic.SearchEpisodes(
            ep.SearchEpisodesRequest(
                project_id=project,
                query="review incident",
                filter=ep.EpisodeFilter(min_importance=0.5),
                page_size=4,
                page_token=token,
            )
        )
        seen += [r.episode.episode_id for r in page.results]
        scores += [r.score for r in page.results]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(wanted)
    assert scores == sorted(scores, reverse=True)


async def test_pages_end_before_they_outgrow_a_response(episodic, scope):
    """Five episodes of about 1 MB each: a page of the default size (20) would be
    5 MB, past gRPC's 4 MiB; pages end early instead, and no episode is lost."""
    project = scope["project_id"]
    actions = [struct({"step": i, "output": "x" * 1000}) for i in range(900)]
    recorded = [
        (await record(
            episodic,
            episode(scope, task_description=f"bulky {n}", actions=actions,
                    context_summary="incident " * 10_000),
        )).episode_id
        for n in range(5)
    ]  # fmt: skip
    listed = await list_all(episodic, project)
    assert sorted(e.episode_id for e in listed) == sorted(recorded)
    found, token, pages = [], "", 0
    while True:
        page = await episodic.SearchEpisodes(
            ep.SearchEpisodesRequest(project_id=project, query="incident", page_token=token)
        )
        found += [r.episode.episode_id for r in page.results]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert sorted(found) == sorted(recorded) and pages > 1


@pytest.mark.parametrize("output", ["random", "repetitive"])
async def test_a_page_reads_only_the_episodes_that_fit(episodic, scope, monkeypatch, output):
    """Twelve episodes of about 600 KB each, asked for in pages of up to 1,000 (100
    for search): memsvc reads from its store about the episodes a page can carry
    (4 of them in 3 MiB), not all twelve (a page of 1,000 large episodes would
    otherwise be read whole into memory to send four). Repetitive ones too, which
    PostgreSQL stores compressed to a fraction of what a response carries."""
    project = scope["project_id"]
    recorded = []
    for n in range(12):
        actions = [
            struct({"step": i, "output": secrets.token_urlsafe(750) if output == "random"
                    else "retry the flaky test " * 50})
            for i in range(600)
        ]  # fmt: skip
        message = episode(scope, task_description=f"bulky incident {n}", actions=actions,
                          embedding=[1.0, float(n + 1)])  # fmt: skip
        recorded.append((await record(episodic, message)).episode_id)
    read = results_of(monkeypatch, _episodes_sql, "episode_from_row", lambda e: e.episode_id)

    async def every_page(call: Any, request: Any, ids: Any) -> list[str]:
        seen: list[str] = []
        while True:
            read.clear()
            page = await call(request)
            returned = ids(page)
            # The crossing one, and one more: the store weighs JSON as it stores it
            # (text, jsonb), the page as protobuf, a few percent apart.
            assert returned and len(read) <= len(returned) + 2, (len(read), len(returned))
            seen += returned
            if not page.next_page_token:
                return seen
            request.page_token = page.next_page_token

    def results(page: Any) -> list[str]:
        return [r.episode.episode_id for r in page.results]

    listed = await every_page(
        episodic.ListEpisodes,
        ep.ListEpisodesRequest(project_id=project, page_size=1000),
        lambda page: [e.episode_id for e in page.episodes],
    )
    assert listed == recorded[::-1]
    found = await every_page(
        episodic.SearchEpisodes,
        ep.SearchEpisodesRequest(project_id=project, query="incident", page_size=100),
        results,
    )
    assert sorted(found) == sorted(recorded)
    similar = await every_page(
        episodic.SearchEpisodes,
        ep.SearchEpisodesRequest(project_id=project, query_embedding=[0.0, 1.0], page_size=100),
        results,
    )
    assert similar == recorded[::-1]  # the larger n, the nearer to (0, 1)


async def test_forged_page_tokens_are_invalid_argument(episodic, scope):
    """A token's position replaced (its fingerprint still matches) is refused."""
    project = scope["project_id"]
    for _ in range(2):
        await record(episodic, episode(scope, task_description="incident review"))
    listing = ep.ListEpisodesRequest(project_id=project, page_size=1)
    search = ep.SearchEpisodesRequest(project_id=project, query="incident", page_size=1)
    for call, request, positions in (
        # An episode id that is not a UUID (PostgreSQL compares a uuid column with it).
        (episodic.ListEpisodes, listing, ('[99999999999999999999, "x"]', '[1.5, "x"]',
                                           '[1700000000000, "zzz"]')),
        (episodic.SearchEpisodes, search, ('["NaN", "x"]', '[1e400, "x"]', '[1, "\\u0000"]',
                                           '[1.0, "zzz"]', f'[1{"0" * 400}, "{uuid.uuid4()}"]')),
    ):  # fmt: skip
        token = (await call(request)).next_page_token
        assert token
        for position in ('"x"', "[1]", *positions):
            request.page_token = forge_page_token(token, position)
            error = await expect_error(call(request), grpc.StatusCode.INVALID_ARGUMENT)
            assert "page_token" in error.violations, position


async def test_bad_search_requests_are_refused(episodic, scope):
    project = scope["project_id"]
    for request, field in [
        (ep.SearchEpisodesRequest(project_id=project), "query"),
        (ep.SearchEpisodesRequest(project_id=project, query="!!! ???"), "query"),
        (ep.SearchEpisodesRequest(project_id=project, query="x" * 1001), "query"),
        (
            ep.SearchEpisodesRequest(project_id=project, query_embedding=[float("nan")]),
            "query_embedding",
        ),
        # With an embedding the query filters: one with no word would filter nothing.
        (
            ep.SearchEpisodesRequest(project_id=project, query="???", query_embedding=[1.0]),
            "query",
        ),
        # No direction: every cosine would be undefined.
        (
            ep.SearchEpisodesRequest(project_id=project, query_embedding=[0.0, -0.0]),
            "query_embedding",
        ),
        (ep.SearchEpisodesRequest(project_id=project, query="a", page_size=-3), "page_size"),
        (
            ep.SearchEpisodesRequest(
                project_id=project,
                query="a",
                filter=ep.EpisodeFilter(
                    start_time=timestamp_pb2.Timestamp(seconds=10**10, nanos=-999_999_999)
                ),
            ),
            "filter.start_time",
        ),
    ]:
        details = await expect_error(
            episodic.SearchEpisodes(request), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert field in details.violations, (field, details.violations)


async def test_similarity_scores_every_candidate_of_a_large_scope(episodic, scope):
    """More candidates than the server scores at once (it works in slices): every
    score is the cosine, whichever slice the episode fell in."""
    angles = [index * math.pi / 100 for index in range(100)]
    stored = [
        await record(episodic, episode(scope, embedding=[math.cos(a), math.sin(a), 0.0]))
        for a in angles
    ]
    response = await episodic.SearchEpisodes(
        ep.SearchEpisodesRequest(
            project_id=scope["project_id"], query_embedding=[1.0, 0.0, 0.0], page_size=100
        )
    )
    scores = {r.episode.episode_id: r.score for r in response.results}
    assert len(scores) == 100
    for stored_episode, angle in zip(stored, angles, strict=True):
        assert scores[stored_episode.episode_id] == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("config_overrides", [{"max_similarity_candidates": 25}])
async def test_similarity_reads_its_candidates_a_slice_at_a_time(
    episodic, scope, server: Server, monkeypatch
):
    """The scope's embeddings are read from the store a slice at a time (the whole
    scope at once held 164 MB at 10,000 x 4,096 per search), ranked as one, and
    counted as one against max_similarity_candidates."""
    monkeypatch.setattr(episodes_module, "_CANDIDATES_AT_ONCE", 7)
    store = server.durable_store
    read_embeddings = store.embeddings
    reads: list[int] = []

    async def counted(*args: Any, **kwargs: Any) -> Any:
        candidates = await read_embeddings(*args, **kwargs)
        reads.append(len(candidates))
        return candidates

    monkeypatch.setattr(store, "embeddings", counted)
    angles = [index * math.pi / 25 for index in range(25)]
    stored = [
        await record(episodic, episode(scope, embedding=[math.cos(a), math.sin(a)])) for a in angles
    ]
    request = ep.SearchEpisodesRequest(
        project_id=scope["project_id"], query_embedding=[1.0, 0.0], page_size=100
    )
    response = await episodic.SearchEpisodes(request)
    assert [r.episode.episode_id for r in response.results] == [e.episode_id for e in stored]
    assert reads == [7, 7, 7, 4]
    await record(episodic, episode(scope, embedding=[0.0, 1.0]))  # the 26th
    details = await expect_error(
        episodic.SearchEpisodes(request), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details.reason == "ERROR_REASON_SIMILARITY_SCOPE_TOO_LARGE"


class AtOnce:
    """Counts how many calls of ``owner.name`` (an async method) run at once. The
    first ``expected`` wait for each other (up to 10 s) before they go on, so that
    many overlap however slowly they arrive; later ones go on at once."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, expected: int
    ) -> None:
        self.running = self.most = 0
        together = asyncio.Event()
        call = getattr(owner, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.running += 1
            self.most = max(self.most, self.running)
            if self.running >= expected:
                together.set()
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(together.wait(), 10)
                await asyncio.sleep(0.01)  # room for any call past the limit to come in
                return await call(*args, **kwargs)
            finally:
                self.running -= 1

        monkeypatch.setattr(owner, name, counted)


async def test_similarity_searches_score_a_few_at_a_time(
    episodic, scope, server: Server, monkeypatch
):
    """Each similarity search holds a slice of embeddings and its ranking: 200 at
    once took a gigabyte. A few read and score at once; the others wait their turn
    and are answered as well. Found by a review."""
    limit = episodes_module.SIMILARITY_SEARCHES_AT_ONCE
    reads = AtOnce(monkeypatch, server.durable_store, "embeddings", limit)
    near = await record(episodic, episode(scope, embedding=[1.0, 0.0]))
    await record(episodic, episode(scope, embedding=[0.0, 1.0]))
    request = ep.SearchEpisodesRequest(
        project_id=scope["project_id"], query_embedding=[1.0, 0.1], page_size=1
    )
    searches = 4 * limit
    answers = await asyncio.gather(*(episodic.SearchEpisodes(request) for _ in range(searches)))
    assert all(a.results[0].episode.episode_id == near.episode_id for a in answers)
    assert reads.most == limit


async def test_text_searches_take_half_the_readers_at_most(
    episodic, scope, server: Server, monkeypatch
):
    """A full-text search ranks every match (on SQLite rereading each one's text),
    holding one of the readers every other read shares: half the readers at most
    (2 of 4 on SQLite), leaving the others to them. Found by a review: four broad
    searches held GetEpisode up for 20 s."""
    assert server.episodes is not None
    limit = server.episodes.text_searches_at_once
    assert limit == server.durable_store.readers // 2
    searching = AtOnce(monkeypatch, server.durable_store, "search_episodes", limit)
    recorded = await record(episodic, episode(scope, task_description="review the parser"))
    request = ep.SearchEpisodesRequest(project_id=scope["project_id"], query="parser")
    searches = 4 * limit
    answers = await asyncio.gather(*(episodic.SearchEpisodes(request) for _ in range(searches)))
    assert all([r.episode.episode_id for r in a.results] == [recorded.episode_id] for a in answers)
    assert searching.most == limit


async def test_similarity_ranks_by_cosine_within_the_filtered_scope(episodic, scope):
    project = scope["project_id"]
    near = await record(episodic, episode(scope, embedding=[1.0, 0.1, 0.0]))
    far = await record(episodic, episode(scope, embedding=[-1.0, 0.0, 0.0]))
    middle = await record(episodic, episode(scope, embedding=[0.5, 0.5, 0.0]))
    await record(episodic, episode(scope, embedding=[1.0, 0.0]))  # other dimensions
    await record(episodic, episode(scope))  # no embedding
    filtered_out = await record(
        episodic, episode(scope, embedding=[1.0, 0.0, 0.0], task_type="other")
    )
    response = await episodic.SearchEpisodes(
        ep.SearchEpisodesRequest(
            project_id=project,
            query_embedding=[2.0, 0.0, 0.0],
            filter=ep.EpisodeFilter(task_type="code_review"),
        )
    )
    ranked = [r.episode.episode_id for r in response.results]
    assert ranked == [near.episode_id, middle.episode_id, far.episode_id]
    assert filtered_out.episode_id not in ranked
    assert response.results[0].score == pytest.approx(1 / (1.01**0.5), rel=1e-5)
    assert response.results[-1].score == pytest.approx(-1.0, rel=1e-5)
    # Paged one by one, the same order.
    token, paged = "", []
    while True:
        page = await episodic.SearchEpisodes(
            ep.SearchEpisodesRequest(
                project_id=project,
                query_embedding=[2.0, 0.0, 0.0],
                filter=ep.EpisodeFilter(task_type="code_review"),
                page_size=1,
                page_token=token,
            )
        )
        paged += [r.episode.episode_id for r in page.results]
        token = page.next_page_token
        if not token:
            break
    assert paged == ranked


async def test_a_ranked_episode_deleted_before_its_page_is_read_is_replaced(
    episodic, scope, server: Server, monkeypatch
):
    """Deleted between the ranking read and the page's read, an episode leaves the
    page to the next in the ranking: a short page would say that no more follow."""
    project = scope["project_id"]
    angles = [0.0, 0.1, 0.2, 0.3]  # in ranking order for the query [1, 0, 0]
    stored = [
        await record(episodic, episode(scope, embedding=[math.cos(a), math.sin(a), 0.0]))
        for a in angles
    ]
    store = server.durable_store
    read_embeddings = store.embeddings

    async def then_delete_the_first(*args: Any, **kwargs: Any) -> Any:
        candidates = await read_embeddings(*args, **kwargs)
        async with store.transaction() as tx:
            await tx.delete_episode(project, stored[0].episode_id)
        monkeypatch.setattr(store, "embeddings", read_embeddings)  # once
        return candidates

    monkeypatch.setattr(store, "embeddings", then_delete_the_first)
    first = await episodic.SearchEpisodes(
        ep.SearchEpisodesRequest(project_id=project, query_embedding=[1.0, 0.0, 0.0], page_size=2)
    )
    assert [r.episode.episode_id for r in first.results] == [e.episode_id for e in stored[1:3]]
    assert first.next_page_token, "more follow"
    rest = await episodic.SearchEpisodes(
        ep.SearchEpisodesRequest(
            project_id=project,
            query_embedding=[1.0, 0.0, 0.0],
            page_size=2,
            page_token=first.next_page_token,
        )
    )
    assert [r.episode.episode_id for r in rest.results] == [stored[3].episode_id]
    assert not rest.next_page_token


@pytest.mark.parametrize("config_overrides", [{"max_similarity_candidates": 2}])
async def test_similarity_over_too_many_candidates_asks_to_narrow(episodic, scope):
    for _ in range(3):
        await record(episodic, episode(scope, embedding=[1.0, 0.0]))
    details = await expect_error(
        episodic.SearchEpisodes(
            ep.SearchEpisodesRequest(project_id=scope["project_id"], query_embedding=[1.0, 0.0])
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details.reason == "ERROR_REASON_SIMILARITY_SCOPE_TOO_LARGE"
    assert details.metadata["limit"] == "2"


async def test_delete_forgets_the_episode_everywhere(episodic, scope, server: Server):
    ids = await record_corpus(episodic, scope)
    project = scope["project_id"]
    await episodic.DeleteEpisode(ep.DeleteEpisodeRequest(project_id=project, episode_id=ids[4]))
    await expect_error(
        episodic.GetEpisode(ep.GetEpisodeRequest(project_id=project, episode_id=ids[4])),
        grpc.StatusCode.NOT_FOUND,
    )
    assert ids[4] not in [e.episode_id for e in await list_all(episodic, project)]
    assert await search_ids(episodic, project, "vault") == []
    url = server.config.database_url
    assert await sql_rows(url, "SELECT 1 FROM episodes WHERE episode_id = ?", ids[4]) == []
    if url.startswith("sqlite"):
        # The FTS5 index holds no trace of it.
        assert (
            await sql_rows(url, "SELECT rowid FROM episodes_fts WHERE episodes_fts MATCH 'vault'")
            == []
        )
    details = await expect_error(
        episodic.DeleteEpisode(ep.DeleteEpisodeRequest(project_id=project, episode_id=ids[4])),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details.reason == "ERROR_REASON_EPISODE_NOT_FOUND"
    await episodic.DeleteEpisode(
        ep.DeleteEpisodeRequest(project_id=project, episode_id=ids[4], allow_missing=True)
    )
    assert len(await list_all(episodic, project)) == 4


async def test_terminate_records_its_episode_in_episodic_memory(channel, episodic, scope):
    lifecycle = LifecycleServiceStub(channel)
    await lifecycle.Spawn(lc.SpawnRequest(**scope))
    ended = await lifecycle.Terminate(
        lc.TerminateRequest(**scope, task_description="Refactor the scheduler",
                            lessons_learned=["small steps"])
    )  # fmt: skip
    got = (
        await episodic.GetEpisode(
            ep.GetEpisodeRequest(project_id=scope["project_id"], episode_id=ended.episode_id)
        )
    ).episode
    assert got.task_type == "session_completion"
    assert got.importance == pytest.approx(0.6)
    assert list(got.lessons_learned) == ["small steps"]
    assert await search_ids(episodic, scope["project_id"], "scheduler") == [ended.episode_id]
    assert json_format.MessageToDict(got.actions[0])["type"] == "session_completion"


async def test_a_time_filter_before_year_1000_means_the_same_on_both_databases(episodic, scope):
    await record(episodic, episode(scope))
    early = timestamp_pb2.Timestamp()
    early.FromJsonString("0500-01-01T00:00:00Z")
    found = await episodic.ListEpisodes(
        ep.ListEpisodesRequest(
            project_id=scope["project_id"], filter=ep.EpisodeFilter(start_time=early)
        )
    )
    assert len(found.episodes) == 1


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"outcome": 5}, "outcome"),
        ({"outcome": 5, "skip_consolidation": True}, "outcome"),
        ({"task_description": "a\x00b"}, "task_description"),
        ({"lessons_learned": ["a\x00b"]}, "lessons_learned[0]"),
        ({"metadata": struct({"k": "a\x00b"})}, "metadata"),
    ],
)
async def test_terminate_refuses_what_record_episode_refuses(channel, scope, fields, field):
    lifecycle = LifecycleServiceStub(channel)
    await lifecycle.Spawn(lc.SpawnRequest(**scope))
    details = await expect_error(
        lifecycle.Terminate(lc.TerminateRequest(**scope, **fields)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert field in details.violations, details.violations
    status = await lifecycle.GetSession(lc.GetSessionRequest(**scope))
    assert status.session.state == lc.SESSION_STATE_ACTIVE


@pytest.mark.parametrize("keys", [3, 400])
async def test_terminate_summarises_the_state_as_sorted_json_cut_to_1000_chars(
    channel, episodic, scope, keys
):
    """The reference's context summary: the whole state rendered as JSON with sorted
    keys, cut to 1,000 characters, whatever the session's size (text outside ASCII
    as it is, where the reference escaped it: a search finds its words)."""
    # Numbers are doubles (google.protobuf.Value), so they render as floats.
    state: dict[str, Any] = {
        f"k{i:03d}": {"step": i + 0.5, "notes": ["ok", None, True]} for i in range(keys)
    }
    state["~last"] = 'é and "quotes"'
    lifecycle = LifecycleServiceStub(channel)
    await lifecycle.Spawn(
        lc.SpawnRequest(
            **scope,
            initial_entries=[wm.EntryInput(key=k, value=value(v)) for k, v in state.items()],
        )
    )
    ended = await lifecycle.Terminate(lc.TerminateRequest(**scope))
    got = (
        await episodic.GetEpisode(
            ep.GetEpisodeRequest(project_id=scope["project_id"], episode_id=ended.episode_id)
        )
    ).episode
    assert got.context_summary == json.dumps(state, sort_keys=True, ensure_ascii=False)[:1000]
    assert json_format.MessageToDict(got.actions[0])["state_keys"] == sorted(state)


async def test_a_terminated_sessions_words_outside_ascii_are_found(channel, episodic, scope):
    """Found by a review: the summary escaped them (\\u00fc), and a search for
    "Müller" or "東京" found nothing."""
    lifecycle = LifecycleServiceStub(channel)
    await lifecycle.Spawn(
        lc.SpawnRequest(
            **scope, initial_entries=[wm.EntryInput(key="notizen", value=value("Lösung Müller"))]
        )
    )
    ended = await lifecycle.Terminate(lc.TerminateRequest(**scope))
    found = await episodic.SearchEpisodes(
        ep.SearchEpisodesRequest(project_id=scope["project_id"], query="Müller")
    )
    assert [r.episode.episode_id for r in found.results] == [ended.episode_id]


async def test_query_syntax_of_either_database_is_plain_text(episodic, scope):
    """Operators of FTS5 or tsquery in a query are words, never syntax errors: every
    word must match ("OR", "x" and "NEAR" are in no episode; punctuation is not a word)."""
    ids = await record_corpus(episodic, scope)
    project = scope["project_id"]
    expected = {
        'vault* OR "x': [],
        "vault:* & !secrets": [ids[4]],
        "NEAR(vault secrets)": [],
        "vault -- ;": [ids[4]],
    }
    for query, wanted in expected.items():
        assert await search_ids(episodic, project, query) == wanted, query
