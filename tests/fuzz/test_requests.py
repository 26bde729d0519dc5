"""Fuzzing every RPC with Hypothesis-generated requests, valid and invalid.

Each example gets a project of its own, seeded with a spawned session (ACTIVE or
PAUSED, three entries, one checkpoint), a never-spawned session id and one
episode. A request is then drawn for one RPC, mixing the seeded ids, keys and
values with malformed ones (bad UUIDs, oversized strings, control characters,
negative or huge page sizes, garbage page tokens, NaN and infinite numbers,
deeply nested values, empty fields, unknown enum numbers), and the answer must be
OK or one of the documented error codes: never INTERNAL or UNKNOWN, never a hang,
never a lost backend, always with an ErrorInfo. A mutating call that fails must
leave the project exactly as it was (sessions, working memory, checkpoints,
episodes), and the server must stay SERVING.

The ``server`` fixture is function-scoped, so each test runs all its examples
against one server (HealthCheck.function_scoped_fixture is suppressed on purpose:
the per-example isolation comes from the fresh project ids, not from the fixture).
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from memsvc.v1 import data_removal_pb2 as dr
from memsvc.v1 import episodic_pb2 as ep
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.data_removal_pb2_grpc import DataRemovalServiceStub
from memsvc.v1.episodic_pb2_grpc import EpisodicMemoryServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import details_of

FUZZ = settings(
    max_examples=30,
    deadline=None,
    # The explain phase re-runs failures to comment on them: slow, and noisy with
    # the large values drawn here.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CALL_TIMEOUT = 15.0
# What a request may legitimately end with; anything else (INTERNAL, UNKNOWN,
# UNAVAILABLE, DEADLINE_EXCEEDED...) is a failure of the server.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
MIB = 1 << 20


# Strategies ---------------------------------------------------------------------

CONTROL = st.text(st.characters(min_codepoint=0, max_codepoint=0x1F), min_size=1, max_size=4)
PRINTABLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=140)
BAD_TEXT = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "a b",
            "x" * 600,
            "é" * 300,
            "\x7f",
            "0f8fad5b-d9cb-469f-a165-70867728950",
            "0f8fad5b-d9cb-469f-a165-70867728950g",
            "{0f8fad5b-d9cb-469f-a165-70867728950e}",
            "0f8fad5bd9cb469fa16570867728950e",
            "00000000-0000-0000-0000-000000000000",
            "../../etc/passwd",
            "*",
            "%",
            "'; DROP TABLE sessions; --",
        ]
    ),
    CONTROL,
    CONTROL.map(lambda c: f"k{c}k"),
    st.text(max_size=40),
)
PAGE_SIZES = st.one_of(
    st.sampled_from([-(2**31), -1, 0, 1, 2, 1000, 1001, 2**31 - 1]),
    st.integers(-(2**31), 2**31 - 1),
)
PAGE_TOKENS = st.one_of(
    st.just(""),
    st.text(max_size=60),
    st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    st.sampled_from(["A" * 5000, "eyJ9", "null", "[]", "e30=", "%%%"]),
)
INT64 = st.one_of(
    st.sampled_from([-(2**63), -1, 0, 1, 2**63 - 1]), st.integers(-(2**63), 2**63 - 1)
)
ENUMS = st.one_of(st.integers(-3, 8), st.sampled_from([2**31 - 1, -(2**31)]))
DURATIONS = st.one_of(
    st.none(),
    st.builds(
        duration_pb2.Duration,
        seconds=st.one_of(
            st.sampled_from([-1, 0, 1, 3600, 315_576_000_000, 2**63 - 1, -(2**63)]),
            st.integers(-(10**6), 10**12),
        ),
        nanos=st.one_of(st.sampled_from([0, 1, -1, 999_999_999]), st.integers(-(2**31), 2**31 - 1)),
    ),
)
TIMESTAMPS = st.one_of(
    st.none(),
    st.builds(
        timestamp_pb2.Timestamp,
        seconds=st.one_of(
            st.sampled_from([0, -62_135_596_801, 253_402_300_800, 2**63 - 1, -(2**63)]),
            st.integers(-(2**40), 2**40),
        ),
        nanos=st.one_of(st.just(0), st.integers(-(2**31), 2**31 - 1)),
    ),
)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)

_EMPTY = object()


def fill(message: struct_pb2.Value, item: Any) -> struct_pb2.Value:
    """Write a JSON-like item (NaN and infinities allowed) into ``message``, in place.

    In place, never with CopyFrom: copying a deeply nested Value parses it again,
    and the client's own parser refuses more than 100 levels.
    """
    if item is _EMPTY:
        return message
    if item is None:
        message.null_value = struct_pb2.NULL_VALUE
    elif isinstance(item, bool):
        message.bool_value = item
    elif isinstance(item, int | float):
        message.number_value = float(item)
    elif isinstance(item, str):
        message.string_value = item
    elif isinstance(item, list):
        message.list_value.SetInParent()
        for element in item:
            fill(message.list_value.values.add(), element)
    else:
        message.struct_value.SetInParent()
        for key, element in item.items():
            fill(message.struct_value.fields[key], element)
    return message


def to_value(item: Any) -> struct_pb2.Value:
    return fill(struct_pb2.Value(), item)


def to_struct(fields: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    for key, element in fields.items():
        fill(message.fields[key], element)
    return message


# Each level of a list is two protobuf messages (Value, ListValue) and each level of
# a struct three (Struct, map entry, Value): a request nested past the server's
# parser limit of 100 messages cannot be built as a message (the Python runtime
# refuses it); test_too_deep_a_value_is_invalid_argument sends its raw bytes instead.
MAX_LIST_DEPTH = 45
MAX_STRUCT_DEPTH = 30


def nested(depth: int, as_struct: bool) -> Any:
    item: Any = 1
    for _ in range(depth):
        item = {"n": item} if as_struct else [item]
    return item


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), FLOATS, st.text(max_size=30)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
VALUES = st.one_of(
    JSON.map(to_value),
    JSON.map(to_value),
    st.just(_EMPTY).map(to_value),
    st.builds(nested, st.integers(1, MAX_LIST_DEPTH), st.just(False)).map(to_value),
    st.builds(nested, st.integers(1, MAX_STRUCT_DEPTH), st.just(True)).map(to_value),
    st.sampled_from(["x" * (MIB + 16), "y" * (MIB - 64)]).map(to_value),
)
# Finite numbers only in metadata: NaN or infinity in an episode's metadata is a
# known bug (test_non_finite_metadata_is_not_internal).
FINITE_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=8,
)
STRUCTS = st.one_of(
    st.none(),
    st.dictionaries(st.text(max_size=10), FINITE_JSON, max_size=4).map(to_struct),
    st.builds(nested, st.integers(1, MAX_STRUCT_DEPTH - 1), st.just(True)).map(to_struct),
    st.just(to_struct({"big": "z" * (70 * 1024)})),
)


@dataclass(frozen=True)
class Ids:
    """The seeded ids of one example."""

    project: str
    other_project: str
    agent: str
    session: str  # spawned, with entries and checkpoint "cp1"
    idle: str  # never spawned
    episode: str

    @property
    def scope(self) -> dict[str, Any]:
        return {
            "project_id": self.project,
            "agent_instance_id": self.agent,
            "session_id": self.session,
        }


def mostly(valid: st.SearchStrategy[str], *invalid: st.SearchStrategy[str]) -> Any:
    return st.one_of(valid, valid, valid, *invalid)


def strategies_for(ids: Ids) -> dict[str, Any]:
    projects = mostly(
        st.just(ids.project), st.just(ids.project.upper()), st.just(ids.other_project), BAD_TEXT
    )
    agents = mostly(st.just(ids.agent), st.just(ids.agent.upper()), st.just(""), BAD_TEXT)
    sessions = mostly(st.sampled_from([ids.session, ids.idle]), PRINTABLE, BAD_TEXT)
    keys = mostly(
        st.sampled_from(["a", "b", "c", "new", "é", "{x}:y"]), BAD_TEXT, st.just("k" * 513)
    )
    checkpoints = mostly(st.sampled_from(["cp1", "cp2", ""]), PRINTABLE, BAD_TEXT)
    request_ids = st.one_of(
        st.just(""), st.just(""), st.builds(lambda: str(uuid.uuid4())), BAD_TEXT
    )
    return {
        "project_id": projects,
        "agent_instance_id": agents,
        "session_id": sessions,
        "key": keys,
        "checkpoint_id": checkpoints,
        "request_id": request_ids,
        "episode_id": mostly(st.just(ids.episode), st.builds(lambda: str(uuid.uuid4())), BAD_TEXT),
    }


def message(cls: type[Message], **fields: Any) -> st.SearchStrategy[Message]:
    """A strategy of ``cls`` messages; fields drawn as None stay unset."""
    return st.fixed_dictionaries(fields).map(
        lambda drawn: cls(**{k: v for k, v in drawn.items() if v is not None})
    )


def scoped(s: dict[str, Any]) -> dict[str, Any]:
    return {k: s[k] for k in ("project_id", "agent_instance_id", "session_id")}


def entry_inputs(s: dict[str, Any]) -> st.SearchStrategy[list[Message]]:
    entry = message(pb.EntryInput, key=s["key"], value=st.one_of(st.none(), VALUES), ttl=DURATIONS)
    many = [pb.EntryInput(key=f"k{i}", value=to_value(i)) for i in range(1001)]
    return st.one_of(st.lists(entry, max_size=3), st.just(many))


def key_lists(s: dict[str, Any]) -> st.SearchStrategy[list[str]]:
    return st.one_of(
        st.lists(s["key"], max_size=5),
        # Few duplicates: 1,000 of them make an error too large for the client
        # (test_many_bad_keys_fit_in_one_error, a known bug).
        st.just(["a"] * 20),
        st.just([f"k{i}" for i in range(1001)]),
    )


def working_memory_requests(ids: Ids) -> st.SearchStrategy[tuple[str, Message]]:
    s = strategies_for(ids)
    scope = scoped(s)
    return st.one_of(
        st.tuples(
            st.just("Set"),
            message(
                pb.SetRequest,
                **scope,
                key=s["key"],
                value=st.one_of(st.none(), VALUES),
                ttl=DURATIONS,
            ),
        ),
        st.tuples(st.just("Get"), message(pb.GetRequest, **scope, key=s["key"])),
        st.tuples(st.just("Delete"), message(pb.DeleteRequest, **scope, key=s["key"])),
        st.tuples(
            st.just("ListKeys"),
            message(pb.ListKeysRequest, **scope, page_size=PAGE_SIZES, page_token=PAGE_TOKENS),
        ),
        st.tuples(
            st.just("ListEntries"),
            message(pb.ListEntriesRequest, **scope, page_size=PAGE_SIZES, page_token=PAGE_TOKENS),
        ),
        st.tuples(st.just("BatchGet"), message(pb.BatchGetRequest, **scope, keys=key_lists(s))),
        st.tuples(
            st.just("BatchSet"), message(pb.BatchSetRequest, **scope, entries=entry_inputs(s))
        ),
        st.tuples(
            st.just("BatchDelete"), message(pb.BatchDeleteRequest, **scope, keys=key_lists(s))
        ),
    )


def lifecycle_requests(ids: Ids) -> st.SearchStrategy[tuple[str, Message]]:
    s = strategies_for(ids)
    scope = scoped(s)
    lessons = st.lists(st.one_of(st.text(max_size=20), st.just("l" * 3000)), max_size=3)
    return st.one_of(
        st.tuples(
            st.just("Spawn"),
            message(
                lc.SpawnRequest,
                **scope,
                agent_type_id=st.one_of(st.just(""), s["agent_instance_id"]),
                initial_entries=entry_inputs(s),
                metadata=STRUCTS,
                request_id=s["request_id"],
            ),
        ),
        st.tuples(
            st.just("Pause"),
            message(
                lc.PauseRequest,
                **scope,
                checkpoint_id=s["checkpoint_id"],
                metadata=STRUCTS,
                request_id=s["request_id"],
            ),
        ),
        st.tuples(
            st.just("Resume"),
            message(
                lc.ResumeRequest,
                **scope,
                checkpoint_id=s["checkpoint_id"],
                merge_with_current=st.booleans(),
                metadata=STRUCTS,
                request_id=s["request_id"],
            ),
        ),
        st.tuples(
            st.just("Terminate"),
            message(
                lc.TerminateRequest,
                **scope,
                task_description=st.one_of(st.text(max_size=30), st.just("d" * 20_000)),
                outcome=ENUMS,
                lessons_learned=lessons,
                skip_consolidation=st.booleans(),
                keep_working_memory=st.booleans(),
                metadata=STRUCTS,
                request_id=s["request_id"],
            ),
        ),
        st.tuples(st.just("GetSession"), message(lc.GetSessionRequest, **scope)),
        st.tuples(
            st.just("ListSessions"),
            message(
                lc.ListSessionsRequest,
                project_id=s["project_id"],
                agent_instance_id=s["agent_instance_id"],
                state=ENUMS,
                page_size=PAGE_SIZES,
                page_token=PAGE_TOKENS,
            ),
        ),
        st.tuples(
            st.just("CreateCheckpoint"),
            message(
                lc.CreateCheckpointRequest,
                **scope,
                checkpoint_id=s["checkpoint_id"],
                metadata=STRUCTS,
                request_id=s["request_id"],
            ),
        ),
        st.tuples(
            st.just("ListCheckpoints"),
            message(
                lc.ListCheckpointsRequest, **scope, page_size=PAGE_SIZES, page_token=PAGE_TOKENS
            ),
        ),
        st.tuples(
            st.just("GetCheckpoint"),
            message(
                lc.GetCheckpointRequest,
                **scope,
                checkpoint_id=s["checkpoint_id"],
                include_entries=st.booleans(),
                page_size=PAGE_SIZES,
                page_token=PAGE_TOKENS,
            ),
        ),
        st.tuples(
            st.just("DeleteCheckpoint"),
            message(
                lc.DeleteCheckpointRequest,
                **scope,
                checkpoint_id=s["checkpoint_id"],
                request_id=s["request_id"],
            ),
        ),
    )


def watch_requests(ids: Ids) -> st.SearchStrategy[Message]:
    s = strategies_for(ids)
    return message(
        lc.WatchLifecycleRequest,
        project_id=st.one_of(st.just(""), s["project_id"]),
        agent_instance_id=st.one_of(st.just(""), s["agent_instance_id"]),
        session_id=st.one_of(st.just(""), s["session_id"]),
        event_types=st.lists(ENUMS, max_size=4),
        after_sequence=st.one_of(st.none(), INT64),
        start=ENUMS,
        # Past timedelta's range (about 8.6e13 s) is a known bug:
        # test_an_out_of_range_progress_interval_is_invalid_argument.
        progress_interval=st.one_of(
            st.none(),
            st.builds(
                duration_pb2.Duration,
                seconds=st.integers(-(10**6), 315_576_000_000),
                nanos=st.integers(-(10**9), 10**9),
            ),
        ),
    )


def filters(s: dict[str, Any]) -> st.SearchStrategy[Message | None]:
    return st.one_of(
        st.none(),
        message(
            ep.EpisodeFilter,
            agent_instance_id=st.one_of(st.just(""), s["agent_instance_id"]),
            session_id=st.one_of(st.just(""), s["session_id"]),
            outcome=ENUMS,
            task_type=st.one_of(st.just(""), st.text(max_size=20), st.just("t" * 200)),
            start_time=TIMESTAMPS,
            end_time=TIMESTAMPS,
            min_importance=FLOATS,
        ),
    )


EMBEDDINGS = st.one_of(
    st.lists(FLOAT32, max_size=6),
    st.just([0.0] * 3),
    st.just([1.0] * 4097),
    st.just([math.nan, 1.0]),
)


def episodic_requests(ids: Ids) -> st.SearchStrategy[tuple[str, Message]]:
    s = strategies_for(ids)
    episode = message(
        ep.Episode,
        episode_id=st.one_of(st.none(), s["episode_id"]),
        project_id=s["project_id"],
        agent_instance_id=s["agent_instance_id"],
        session_id=s["session_id"],
        task_type=st.one_of(
            st.just("code_review"), st.just(""), st.text(max_size=10), st.just("t" * 129)
        ),
        task_description=st.one_of(st.text(max_size=40), st.just("d" * 10_001)),
        outcome=ENUMS,
        outcome_details=st.one_of(st.text(max_size=20), st.just("o" * 10_001)),
        actions=st.one_of(st.lists(STRUCTS.filter(lambda x: x is not None), max_size=3)),
        context_summary=st.one_of(st.text(max_size=40), st.just("c" * 100_001)),
        lessons_learned=st.one_of(
            st.lists(st.text(max_size=20), max_size=3), st.just(["l"] * 101), st.just(["l" * 2001])
        ),
        duration=DURATIONS,
        tokens_used=INT64,
        importance=FLOATS,
        metadata=STRUCTS,
        create_time=TIMESTAMPS,
        embedding=EMBEDDINGS,
        embedding_dimensions=st.one_of(st.just(0), ENUMS),
    )
    return st.one_of(
        st.tuples(
            st.just("RecordEpisode"),
            message(
                ep.RecordEpisodeRequest,
                episode=st.one_of(st.none(), episode),
                request_id=s["request_id"],
            ),
        ),
        st.tuples(
            st.just("GetEpisode"),
            message(
                ep.GetEpisodeRequest,
                project_id=s["project_id"],
                episode_id=s["episode_id"],
                include_embedding=st.booleans(),
            ),
        ),
        st.tuples(
            st.just("ListEpisodes"),
            message(
                ep.ListEpisodesRequest,
                project_id=s["project_id"],
                filter=filters(s),
                page_size=PAGE_SIZES,
                page_token=PAGE_TOKENS,
                include_embedding=st.booleans(),
            ),
        ),
        st.tuples(
            st.just("SearchEpisodes"),
            message(
                ep.SearchEpisodesRequest,
                project_id=s["project_id"],
                query=st.one_of(
                    st.sampled_from(
                        ["retry", '"retry policy"', "a OR b", "NEAR(", "*", '"', "-x", ""]
                    ),
                    st.text(max_size=40),
                    st.just("q " * 600),
                ),
                query_embedding=st.one_of(st.just([]), EMBEDDINGS),
                filter=filters(s),
                page_size=PAGE_SIZES,
                page_token=PAGE_TOKENS,
                include_embedding=st.booleans(),
            ),
        ),
        st.tuples(
            st.just("DeleteEpisode"),
            message(
                ep.DeleteEpisodeRequest,
                project_id=s["project_id"],
                episode_id=s["episode_id"],
                allow_missing=st.booleans(),
            ),
        ),
    )


def purge_requests(ids: Ids) -> st.SearchStrategy[tuple[str, Message]]:
    s = strategies_for(ids)
    return st.tuples(
        st.just("PurgeData"),
        message(
            dr.PurgeDataRequest,
            project_id=s["project_id"],
            agent_instance_id=st.one_of(st.just(""), s["agent_instance_id"]),
            session_id=st.one_of(st.just(""), s["session_id"]),
            request_id=s["request_id"],
        ),
    )


MUTATING = {
    "Set",
    "Delete",
    "BatchSet",
    "BatchDelete",
    "Spawn",
    "Pause",
    "Resume",
    "Terminate",
    "CreateCheckpoint",
    "DeleteCheckpoint",
    "RecordEpisode",
    "DeleteEpisode",
    "PurgeData",
}


# Running one example -----------------------------------------------------------


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.wm = WorkingMemoryServiceStub(channel)
        self.life = LifecycleServiceStub(channel)
        self.episodic = EpisodicMemoryServiceStub(channel)
        self.removal = DataRemovalServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    def method(self, name: str) -> Callable[..., Awaitable[Any]]:
        for stub in (self.wm, self.life, self.episodic, self.removal):
            if hasattr(stub, name):
                return getattr(stub, name)  # type: ignore[no-any-return]
        raise AssertionError(name)


async def seed(stubs: Stubs, projects: list[str], paused: bool) -> Ids:
    """A fresh project: a spawned session (entries a, b, c and checkpoint cp1), an episode."""
    ids = Ids(
        project=str(uuid.uuid4()),
        other_project=str(uuid.uuid4()),
        agent=str(uuid.uuid4()),
        session=f"s-{uuid.uuid4().hex[:8]}",
        idle="idle",
        episode="",
    )
    projects += [ids.project, ids.other_project]
    initial = [
        pb.EntryInput(key=k, value=to_value(v))
        for k, v in {"a": 1, "b": "two", "c": [3, {"x": None}]}.items()
    ]
    await stubs.life.Spawn(lc.SpawnRequest(**ids.scope, initial_entries=initial))
    await stubs.life.CreateCheckpoint(lc.CreateCheckpointRequest(**ids.scope, checkpoint_id="cp1"))
    if paused:
        await stubs.life.Pause(lc.PauseRequest(**ids.scope, checkpoint_id="cp-pause"))
    recorded = await stubs.episodic.RecordEpisode(
        ep.RecordEpisodeRequest(
            episode=ep.Episode(
                project_id=ids.project,
                agent_instance_id=ids.agent,
                session_id=ids.session,
                task_type="code_review",
                task_description="review the retry policy",
                outcome=lc.OUTCOME_SUCCESS,
                embedding=[0.5, 0.25, 1.0],
            )
        )
    )
    return Ids(**{**ids.__dict__, "episode": recorded.episode.episode_id})


async def outcome_of(call: Awaitable[Any]) -> Any:
    """The response, or (code, reason) of a failed call."""
    try:
        return json_format.MessageToDict(await call)
    except grpc.aio.AioRpcError as error:
        return (error.code(), details_of(error).reason)


def without_expiring(listing: Any) -> Any:
    """A listing without the entries that could expire while the example runs."""
    if not isinstance(listing, dict):
        return listing
    soon = timestamp_pb2.Timestamp()
    soon.GetCurrentTime()
    horizon = soon.ToMilliseconds() + 3_600_000
    kept = []
    for entry in listing.get("entries", []):
        if "expireTime" in entry:
            expiry = timestamp_pb2.Timestamp()
            expiry.FromJsonString(entry["expireTime"])
            if expiry.ToMilliseconds() < horizon:
                continue
        kept.append(entry)
    return {**listing, "entries": kept}


async def snapshot(stubs: Stubs, ids: Ids) -> list[Any]:
    """Everything a failed mutating call must leave as it was."""
    state: list[Any] = []
    for project in (ids.project, ids.other_project):
        for session in (ids.session, ids.idle):
            scope = {"project_id": project, "agent_instance_id": ids.agent, "session_id": session}
            state.append(await outcome_of(stubs.life.GetSession(lc.GetSessionRequest(**scope))))
            entries = await outcome_of(
                stubs.wm.ListEntries(pb.ListEntriesRequest(**scope, page_size=1000))
            )
            state.append(without_expiring(entries))
            state.append(
                await outcome_of(
                    stubs.life.ListCheckpoints(lc.ListCheckpointsRequest(**scope, page_size=1000))
                )
            )
        state.append(
            await outcome_of(
                stubs.episodic.ListEpisodes(
                    ep.ListEpisodesRequest(
                        project_id=project, page_size=1000, include_embedding=True
                    )
                )
            )
        )
        state.append(
            await outcome_of(
                stubs.life.ListSessions(lc.ListSessionsRequest(project_id=project, page_size=1000))
            )
        )
    return state


async def check_call(stubs: Stubs, ids: Ids, name: str, request: Message) -> None:
    """One fuzzed call: an allowed status, an ErrorInfo, and no change when it fails."""
    before = await snapshot(stubs, ids) if name in MUTATING else None
    try:
        await stubs.method(name)(request, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        details = details_of(error)
        assert details.code in ALLOWED, f"{name} -> {details.code}: {details.message}"
        assert details.reason, f"{name} -> {details.code} without ErrorInfo: {details.message}"
        if before is not None:
            after = await snapshot(stubs, ids)
            assert after == before, f"failed {name} ({details.code}) changed state\n{request}"
    await check_healthy(stubs.health)


async def check_healthy(health: health_pb2_grpc.HealthStub) -> None:
    """The call left memsvc serving. Health follows probes bounded at the tests'
    0.2 s: on a loaded machine one may miss its bound, and health says NOT_SERVING
    until the next probe answers (seen in CI beside other load); a call that broke a
    backend keeps it there. A bound for a broken test, not a measure."""
    deadline = time.monotonic() + 10
    while True:
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        if answer.status == health_pb2.HealthCheckResponse.SERVING:
            return
        assert time.monotonic() < deadline, "memsvc NOT_SERVING for 10 s after the call"
        await asyncio.sleep(0.1)


# Tests -------------------------------------------------------------------------

pytestmark = pytest.mark.timeout(120)


@FUZZ
@given(data=st.data(), paused=st.booleans())
async def test_working_memory_requests(
    channel: grpc.aio.Channel, projects: list[str], data: st.DataObject, paused: bool
) -> None:
    stubs = Stubs(channel)
    ids = await seed(stubs, projects, paused)
    name, request = data.draw(working_memory_requests(ids), label="request")
    await check_call(stubs, ids, name, request)


@FUZZ
@given(data=st.data(), paused=st.booleans())
async def test_lifecycle_requests(
    channel: grpc.aio.Channel, projects: list[str], data: st.DataObject, paused: bool
) -> None:
    stubs = Stubs(channel)
    ids = await seed(stubs, projects, paused)
    name, request = data.draw(lifecycle_requests(ids), label="request")
    await check_call(stubs, ids, name, request)


@settings(FUZZ, max_examples=20)
@given(data=st.data())
async def test_watch_requests(
    channel: grpc.aio.Channel, projects: list[str], data: st.DataObject
) -> None:
    """Open the stream, read the first message (a progress) or the error, cancel."""
    stubs = Stubs(channel)
    ids = await seed(stubs, projects, paused=False)
    request = data.draw(watch_requests(ids), label="request")
    call = stubs.life.WatchLifecycle(request, timeout=CALL_TIMEOUT)
    try:
        first = await asyncio.wait_for(call.read(), CALL_TIMEOUT)
        assert first is not grpc.aio.EOF, "the stream ended without a message"
        assert first.WhichOneof("kind") == "progress", first
    except grpc.aio.AioRpcError as error:
        details = details_of(error)
        assert details.code in ALLOWED, f"Watch -> {details.code}: {details.message}\n{request}"
        assert details.reason, f"Watch -> {details.code} without ErrorInfo: {details.message}"
    finally:
        call.cancel()
    await check_healthy(stubs.health)


@settings(FUZZ, max_examples=20)
@given(data=st.data())
async def test_episodic_requests(
    channel: grpc.aio.Channel, projects: list[str], data: st.DataObject
) -> None:
    stubs = Stubs(channel)
    ids = await seed(stubs, projects, paused=False)
    name, request = data.draw(episodic_requests(ids), label="request")
    await check_call(stubs, ids, name, request)


@settings(FUZZ, max_examples=20)
@given(data=st.data(), paused=st.booleans())
async def test_data_removal_requests(
    channel: grpc.aio.Channel, projects: list[str], data: st.DataObject, paused: bool
) -> None:
    stubs = Stubs(channel)
    ids = await seed(stubs, projects, paused)
    name, request = data.draw(purge_requests(ids), label="request")
    await check_call(stubs, ids, name, request)


async def test_too_deep_a_value_is_invalid_argument(
    channel: grpc.aio.Channel, projects: list[str]
) -> None:
    """A value nested past protobuf's parser limit (100 messages) cannot even be built
    as a message by a protobuf runtime, but any client can send its bytes: memsvc
    answers INVALID_ARGUMENT naming the limit (grpc alone would answer UNKNOWN)."""
    stubs = Stubs(channel)
    ids = await seed(stubs, projects, paused=False)
    deep = to_value(nested(60, as_struct=False)).SerializeToString()
    # SetRequest.value is field 5, length-delimited: the request's bytes with it appended.
    body = pb.SetRequest(**ids.scope, key="deep").SerializeToString()
    body += b"\x2a" + _varint(len(deep)) + deep
    send = channel.unary_unary(
        "/memsvc.v1.WorkingMemoryService/Set",
        request_serializer=None,
        response_deserializer=pb.SetResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(body)
    details = details_of(refused.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.reason == "ERROR_REASON_INVALID_ARGUMENT"
    assert "100 levels" in details.message
    page = await stubs.wm.ListKeys(pb.ListKeysRequest(**ids.scope))
    assert "deep" not in [info.key for info in page.keys], "nothing was written"


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


async def test_an_out_of_range_progress_interval_is_invalid_argument(
    channel: grpc.aio.Channel, projects: list[str]
) -> None:
    stubs = Stubs(channel)
    ids = await seed(stubs, projects, paused=False)
    request = lc.WatchLifecycleRequest(
        project_id=ids.project, progress_interval=duration_pb2.Duration(seconds=2**63 - 1)
    )
    call = stubs.life.WatchLifecycle(request, timeout=CALL_TIMEOUT)
    try:
        await call.read()
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    else:
        raise AssertionError("the watch started")
    finally:
        call.cancel()


async def test_non_finite_metadata_is_not_internal(
    channel: grpc.aio.Channel, projects: list[str]
) -> None:
    """Found by the fuzzer: RecordEpisode with metadata {'': inf} was INTERNAL. Metadata
    and actions are stored as JSON, which has no NaN or Infinity: INVALID_ARGUMENT
    naming the field, on every RPC that takes them."""
    stubs = Stubs(channel)
    ids = await seed(stubs, projects, paused=False)
    episode = ep.Episode(
        project_id=ids.project,
        agent_instance_id=ids.agent,
        session_id=ids.session,
        task_type="code_review",
        outcome=lc.OUTCOME_SUCCESS,
        metadata=to_struct({"": math.inf}),
    )
    with_action = ep.Episode(
        project_id=ids.project,
        agent_instance_id=ids.agent,
        session_id=ids.session,
        task_type="code_review",
        outcome=lc.OUTCOME_SUCCESS,
        actions=[to_struct({"score": math.nan})],
    )
    calls = {
        "episode.metadata": stubs.episodic.RecordEpisode(ep.RecordEpisodeRequest(episode=episode)),
        "episode.actions[0]": stubs.episodic.RecordEpisode(
            ep.RecordEpisodeRequest(episode=with_action)
        ),
        "metadata": stubs.life.CreateCheckpoint(
            lc.CreateCheckpointRequest(**ids.scope, metadata=to_struct({"x": -math.inf}))
        ),
    }
    episodes_before = await stubs.episodic.ListEpisodes(
        ep.ListEpisodesRequest(project_id=ids.project)
    )
    checkpoints_before = await stubs.life.ListCheckpoints(lc.ListCheckpointsRequest(**ids.scope))
    for field, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        details = details_of(refused.value)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert list(details.violations) == [field], details
    episodes = await stubs.episodic.ListEpisodes(ep.ListEpisodesRequest(project_id=ids.project))
    assert episodes == episodes_before, "nothing was recorded"
    checkpoints = await stubs.life.ListCheckpoints(lc.ListCheckpointsRequest(**ids.scope))
    assert checkpoints == checkpoints_before, "no checkpoint was created"
