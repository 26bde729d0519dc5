"""Error mapping: status code and ErrorInfo reason to exception classes, on both deployments."""

from __future__ import annotations

import uuid

import grpc
import pytest

from memsvc.client import (
    AlreadyExists,
    AsyncClient,
    AsyncSessionClient,
    CheckpointNotFound,
    CheckpointProtected,
    EpisodeNotFound,
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    InvalidTransition,
    KeyNotFound,
    MemsvcError,
    NotFound,
    RequestIdReused,
    SessionAlreadyExists,
    SessionLimitExceeded,
    SessionNotFound,
    SessionNotWritable,
    SessionState,
    Unavailable,
)
from memsvc.server import Server


async def test_missing_key_is_key_not_found_with_metadata(session: AsyncSessionClient):
    await session.spawn()
    with pytest.raises(KeyNotFound) as raised:
        await session.get("absent")
    error = raised.value
    assert isinstance(error, NotFound) and isinstance(error, MemsvcError)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == ErrorReason.KEY_NOT_FOUND
    assert error.reason == "ERROR_REASON_KEY_NOT_FOUND"
    assert error.metadata == {
        "project_id": session.project_id,
        "agent_instance_id": session.agent_instance_id,
        "session_id": session.session_id,
        "key": "absent",
    }
    assert error.attempts == 1 and error.request_id is None
    assert "ERROR_REASON_KEY_NOT_FOUND" in str(error)


async def test_bad_ids_are_invalid_argument_with_violations(client: AsyncClient):
    bad = client.session("not-a-uuid", str(uuid.uuid4()), "has space")
    with pytest.raises(InvalidArgument) as raised:
        await bad.set("", 1)
    error = raised.value
    assert error.reason == ErrorReason.INVALID_ARGUMENT
    assert {"project_id", "session_id", "key"} <= set(error.violations)
    assert all(error.violations.values())
    with pytest.raises(InvalidArgument) as negative:
        await client.list_sessions(str(uuid.uuid4()), page_size=-1).collect()
    assert "page_size" in negative.value.violations


async def test_lifecycle_errors_name_the_state(session: AsyncSessionClient):
    """A session's state comes as the SDK's SessionState (memsvc's details write it
    in capitals); a refused write says why in its working memory's own words."""
    with pytest.raises(SessionNotFound):
        await session.describe()
    with pytest.raises(SessionNotWritable) as not_spawned:
        await session.set("k", 1)
    assert isinstance(not_spawned.value, FailedPrecondition)
    assert not_spawned.value.state == "not spawned"
    await session.spawn()
    with pytest.raises(SessionAlreadyExists) as twice:
        await session.spawn()
    assert isinstance(twice.value, AlreadyExists)
    assert twice.value.state is SessionState.ACTIVE
    paused = await session.pause()
    with pytest.raises(InvalidTransition) as again:
        await session.pause()
    assert again.value.state is SessionState.PAUSED
    with pytest.raises(SessionNotWritable) as read_only:
        await session.set("k", 1)
    assert read_only.value.state == "paused"
    with pytest.raises(CheckpointProtected):
        await session.delete_checkpoint(paused.checkpoint.checkpoint_id)
    with pytest.raises(CheckpointNotFound) as missing:
        await session.get_checkpoint("nope")
    assert missing.value.checkpoint_id == "nope"


async def test_reused_request_id_with_other_arguments(session: AsyncSessionClient):
    request_id = str(uuid.uuid4())
    await session.spawn(request_id=request_id)
    await session.create_checkpoint(checkpoint_id="a", request_id=str(uuid.uuid4()))
    with pytest.raises(RequestIdReused) as raised:
        await session.create_checkpoint(checkpoint_id="b", request_id=request_id)
    assert isinstance(raised.value, InvalidArgument)
    assert raised.value.request_id == request_id


async def test_missing_episode(client: AsyncClient, scope: dict[str, str]):
    with pytest.raises(EpisodeNotFound) as raised:
        await client.episodes(scope["project_id"]).get(str(uuid.uuid4()))
    assert raised.value.episode_id


@pytest.fixture
def config_overrides(config_overrides: dict[str, object]) -> dict[str, object]:
    return {**config_overrides, "max_session_keys": 2}


async def test_session_limits_are_resource_exhausted(session: AsyncSessionClient):
    await session.spawn(initial={"a": 1, "b": 2})
    with pytest.raises(SessionLimitExceeded) as raised:
        await session.set("c", 3)
    assert raised.value.limit == 2
    assert raised.value.reason == ErrorReason.SESSION_KEY_LIMIT


async def test_values_that_are_not_json_are_refused_before_any_call(
    session: AsyncSessionClient,
):
    with pytest.raises(TypeError, match="not JSON-like"):
        await session.set("k", {1, 2})
    with pytest.raises(TypeError, match="keys must be str"):
        await session.set("k", {1: "a"})
    with pytest.raises(ValueError, match="2\\*\\*53"):
        await session.set("k", 2**60)
    with pytest.raises(ValueError, match="not a JSON number"):
        await session.set("k", float("nan"))
    with pytest.raises(ValueError, match="naive datetime"):
        from datetime import datetime

        await (
            session.client.episodes(session.project_id)
            .list(start_time=datetime(2026, 1, 1))
            .collect()
        )


async def test_unreachable_server_is_unavailable_after_its_timeout(server: Server):
    """The call waits for a connection for its whole budget (memsvc may be coming
    back), then says memsvc was not reached: Unavailable, not DeadlineExceeded."""
    port = server.port
    await server.stop()
    async with AsyncClient(f"127.0.0.1:{port}", timeout=1) as client:
        client_session = client.session(str(uuid.uuid4()), str(uuid.uuid4()), "s")
        with pytest.raises(Unavailable, match="could not be reached") as raised:
            await client_session.get("k")
    # Its whole budget: the attempt ended on the call's deadline, not on a refusal.
    assert isinstance(raised.value.__cause__, grpc.RpcError)
    assert raised.value.__cause__.code() == grpc.StatusCode.DEADLINE_EXCEEDED
