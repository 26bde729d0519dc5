"""Bearer tokens: UNAUTHENTICATED without a valid one, PERMISSION_DENIED outside the
projects a token is bound to (Watch included), health and reflection open, the tokens
file reloaded without a restart, the Unix socket's mode and group, and the refusal to
serve an open API on a non-loopback address."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from memsvc.api._auth import PROJECT_OF
from memsvc.auth import (
    CredentialsError,
    Grant,
    TokenFile,
    TokenTable,
    digest,
    fingerprint,
    parse_tokens,
)
from memsvc.config import Config, ConfigError, load
from memsvc.server import Server
from memsvc.testing import free_port, wait_for_port
from memsvc.v1 import (
    data_removal_pb2,
    episodic_pb2,
    graph_checkpoint_pb2,
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    working_memory_pb2,
    working_memory_pb2_grpc,
)
from tests.client._credentials import new_token, write_token, write_tokens
from tests.conftest import DEPLOYMENTS, Deployment

# Every memsvc service's proto module.
_MODULES = (working_memory_pb2, lifecycle_pb2, episodic_pb2, data_removal_pb2, graph_checkpoint_pb2)

MEMSVC = str(Path(sys.executable).parent / "memsvc")
PROJECT = "0f8fad5b-d9cb-469f-a165-70867728950e"
OTHER_PROJECT = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
AGENT = "5a1f36a2-0c6f-4bb4-9d3e-2f1c3a9b8e70"


@pytest.fixture
def deployment() -> Deployment:
    """Tokens do not depend on the backends: the embedded ones are enough here."""
    return DEPLOYMENTS["embedded"]


class Tokens:
    """The test's tokens file: ``admin`` may act anywhere, ``bound`` only in PROJECT."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.admin = new_token()
        self.bound = new_token()
        self.write(self.admin, f"{self.bound} {PROJECT}")

    def write(self, *lines: str) -> None:
        write_tokens(self.path, "# memsvc tokens (test)", *lines)


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    return Tokens(tmp_path / "tokens")


@pytest.fixture
def config_overrides(tokens: Tokens) -> dict[str, object]:
    return {"auth_tokens_file": str(tokens.path), "auth_reload_interval_seconds": 0.1}


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def ids(project: str = PROJECT, session: str | None = None) -> dict[str, Any]:
    return {
        "project_id": project,
        "agent_instance_id": AGENT,
        "session_id": session or f"s-{uuid.uuid4().hex[:8]}",
    }


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {status}")


async def refused(call: Any, code: grpc.StatusCode, reason: str) -> error_details_pb2.ErrorInfo:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    info = error_info(raised.value)
    assert (info.reason, info.domain) == (reason, "memsvc.dev")
    return info


async def first_watch_message(
    stub: lifecycle_pb2_grpc.LifecycleServiceStub,
    metadata: tuple[tuple[str, str], ...],
    **filters: Any,
) -> lifecycle_pb2.WatchLifecycleResponse:
    call = stub.WatchLifecycle(lifecycle_pb2.WatchLifecycleRequest(**filters), metadata=metadata)
    try:
        message: lifecycle_pb2.WatchLifecycleResponse = await asyncio.wait_for(call.read(), 10)
        return message
    finally:
        call.cancel()


UNAUTHENTICATED = (grpc.StatusCode.UNAUTHENTICATED, "ERROR_REASON_UNAUTHENTICATED")
PERMISSION_DENIED = (grpc.StatusCode.PERMISSION_DENIED, "ERROR_REASON_PERMISSION_DENIED")


# ---- UNAUTHENTICATED ----------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", "Bearer"),),
        bearer("not-a-token-of-this-server"),
    ],
    ids=["none", "not-bearer", "empty", "unknown"],
)
async def test_a_call_without_a_valid_token_is_unauthenticated(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
):
    wm = working_memory_pb2_grpc.WorkingMemoryServiceStub(channel)
    lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
    info = await refused(
        wm.Get(working_memory_pb2.GetRequest(**ids(), key="k"), metadata=metadata),
        *UNAUTHENTICATED,
    )
    assert not info.metadata
    await refused(
        lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**ids()), metadata=metadata), *UNAUTHENTICATED
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await first_watch_message(lifecycle, metadata, project_id=PROJECT)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(raised.value).reason == "ERROR_REASON_UNAUTHENTICATED"


async def test_a_valid_token_is_admitted_and_the_scheme_is_case_insensitive(
    channel: grpc.aio.Channel, tokens: Tokens
):
    lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
    for metadata in (bearer(tokens.admin), (("authorization", f"bearer {tokens.admin}"),)):
        spawned = await lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**ids()), metadata=metadata)
        assert spawned.session.state == lifecycle_pb2.SESSION_STATE_ACTIVE


async def test_the_token_is_checked_before_the_request(channel: grpc.aio.Channel):
    """A bad request without a token learns nothing about the request's validity."""
    wm = working_memory_pb2_grpc.WorkingMemoryServiceStub(channel)
    await refused(wm.Get(working_memory_pb2.GetRequest(project_id="nope")), *UNAUTHENTICATED)


async def test_an_unparsable_request_is_checked_like_any_other(
    channel: grpc.aio.Channel, tokens: Tokens
):
    """Bytes protobuf cannot parse: no token, UNAUTHENTICATED; a bound token cannot be
    matched to a project, PERMISSION_DENIED; the admin token, INVALID_ARGUMENT."""
    send = channel.unary_unary(
        "/memsvc.v1.WorkingMemoryService/Get",
        request_serializer=None,
        response_deserializer=working_memory_pb2.GetResponse.FromString,
    )
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, a length far past the end
    await refused(send(garbage), *UNAUTHENTICATED)
    await refused(send(garbage, metadata=bearer(tokens.bound)), *PERMISSION_DENIED)
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await send(garbage, metadata=bearer(tokens.bound))
    assert "the request could not be parsed" in (denied.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await send(garbage, metadata=bearer(tokens.admin))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT, invalid.value.details()


# ---- PERMISSION_DENIED --------------------------------------------------------------


async def test_a_bound_token_acts_only_in_its_projects(channel: grpc.aio.Channel, tokens: Tokens):
    lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
    wm = working_memory_pb2_grpc.WorkingMemoryServiceStub(channel)
    mine = ids()
    await lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**mine), metadata=bearer(tokens.bound))
    # Project ids are compared as stored: lower-cased.
    shouting = dict(mine, project_id=PROJECT.upper())
    await wm.Set(
        working_memory_pb2.SetRequest(**shouting, key="k", value=_value("v")),
        metadata=bearer(tokens.bound),
    )
    theirs = ids(OTHER_PROJECT)
    info = await refused(
        lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**theirs), metadata=bearer(tokens.bound)),
        *PERMISSION_DENIED,
    )
    assert dict(info.metadata) == {"project_id": OTHER_PROJECT}
    # The unbound token may act there.
    await lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**theirs), metadata=bearer(tokens.admin))
    await refused(
        wm.Get(working_memory_pb2.GetRequest(**theirs, key="k"), metadata=bearer(tokens.bound)),
        *PERMISSION_DENIED,
    )


async def test_a_call_without_a_project_is_told_to_name_one(
    channel: grpc.aio.Channel, tokens: Tokens
):
    """Found by a review: the refusal spoke of a watch of every project, whatever the
    call; it says what this call lacks (the watch's case is said too)."""
    wm = working_memory_pb2_grpc.WorkingMemoryServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await wm.Get(working_memory_pb2.GetRequest(key="k"), metadata=bearer(tokens.bound))
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = raised.value.details() or ""
    assert "names none: set project_id" in details, details


async def test_a_huge_project_id_is_refused_with_a_readable_status(
    channel: grpc.aio.Channel, tokens: Tokens
):
    """The refusal quotes the first 64 characters: status details travel in trailers,
    which gRPC caps (16 KiB by default), so quoting all of it left no status."""
    lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
    huge = dict(ids(), project_id="p" * 100_000)
    info = await refused(
        lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**huge), metadata=bearer(tokens.bound)),
        *PERMISSION_DENIED,
    )
    assert dict(info.metadata) == {"project_id": "p" * 64}


async def test_record_episode_is_checked_on_the_episodes_project(
    channel: grpc.aio.Channel, tokens: Tokens
):
    stub = channel.unary_unary(
        "/memsvc.v1.EpisodicMemoryService/RecordEpisode",
        request_serializer=episodic_pb2.RecordEpisodeRequest.SerializeToString,
        response_deserializer=episodic_pb2.RecordEpisodeResponse.FromString,
    )

    def record(project: str) -> Any:
        episode = episodic_pb2.Episode(
            project_id=project,
            agent_instance_id=AGENT,
            session_id="s",
            task_type="review",
            outcome=lifecycle_pb2.OUTCOME_SUCCESS,
        )
        request = episodic_pb2.RecordEpisodeRequest(episode=episode)
        return stub(request, metadata=bearer(tokens.bound))

    recorded = await record(PROJECT)
    assert recorded.episode.episode_id
    await refused(record(OTHER_PROJECT), *PERMISSION_DENIED)


async def test_a_bound_token_watches_only_its_projects(channel: grpc.aio.Channel, tokens: Tokens):
    lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
    first = await first_watch_message(lifecycle, bearer(tokens.bound), project_id=PROJECT)
    assert first.HasField("progress")
    for filters in ({"project_id": OTHER_PROJECT}, {}, {"session_id": "s"}):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await first_watch_message(lifecycle, bearer(tokens.bound), **filters)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, filters
        info = error_info(raised.value)
        assert info.reason == "ERROR_REASON_PERMISSION_DENIED"
        assert info.metadata["project_id"] == filters.get("project_id", "")
    # An unbound token may watch every project at once.
    everything = await first_watch_message(lifecycle, bearer(tokens.admin))
    assert everything.HasField("progress")


def test_every_memsvc_method_names_the_project_it_acts_in():
    """A method whose request names no project could not be checked for a bound token."""
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in _MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert set(PROJECT_OF) == methods
    assert [m for m, getter in PROJECT_OF.items() if getter is None] == []


async def test_every_method_refuses_a_bound_token_in_another_project(
    channel: grpc.aio.Channel, tokens: Tokens
):
    for module in _MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                request: Any = message_factory.GetMessageClass(method.input_type)()
                if "project_id" in method.input_type.fields_by_name:
                    request.project_id = OTHER_PROJECT
                else:
                    request.episode.project_id = OTHER_PROJECT
                name = f"/{service.full_name}/{method.name}"
                if method.server_streaming:
                    call = channel.unary_stream(name)(
                        request.SerializeToString(), metadata=bearer(tokens.bound)
                    )
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        await call.read()
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        await channel.unary_unary(name)(
                            request.SerializeToString(), metadata=bearer(tokens.bound)
                        )
                assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, name


# ---- open to everyone ---------------------------------------------------------------


async def test_health_and_reflection_need_no_token(channel: grpc.aio.Channel):
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflection.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    names = {s.name for s in response.list_services_response.service}
    assert "memsvc.v1.WorkingMemoryService" in names


async def test_refused_calls_are_counted_by_their_code(channel: grpc.aio.Channel, server: Server):
    wm = working_memory_pb2_grpc.WorkingMemoryServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError):
        await wm.Get(working_memory_pb2.GetRequest(**ids(), key="k"))

    def handled() -> float | None:
        return server.metrics.registry.get_sample_value(
            "grpc_server_handled_total",
            {
                "grpc_type": "unary",
                "grpc_service": "memsvc.v1.WorkingMemoryService",
                "grpc_method": "Get",
                "grpc_code": "UNAUTHENTICATED",
            },
        )

    async def counted_once() -> None:
        assert handled() == 1

    # The server counts the call once its handler has unwound, which may be just
    # after the client has its answer.
    await eventually(counted_once)


# ---- reloading the tokens file ------------------------------------------------------


async def test_tokens_are_added_and_removed_without_a_restart(
    channel: grpc.aio.Channel, tokens: Tokens
):
    lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
    newcomer = new_token()

    async def spawn(token: str) -> Any:
        return await lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**ids()), metadata=bearer(token))

    await refused(spawn(newcomer), *UNAUTHENTICATED)
    tokens.write(tokens.admin, newcomer)  # the poll (every 0.1 s) picks it up
    await eventually(lambda: spawn(newcomer))
    tokens.write(newcomer)
    await eventually(lambda: refused(spawn(tokens.admin), *UNAUTHENTICATED))
    await spawn(newcomer)


async def test_removing_a_token_ends_its_open_watches(channel: grpc.aio.Channel, tokens: Tokens):
    lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
    admin_watch = lifecycle.WatchLifecycle(
        lifecycle_pb2.WatchLifecycleRequest(project_id=PROJECT), metadata=bearer(tokens.admin)
    )
    bound_watch = lifecycle.WatchLifecycle(
        lifecycle_pb2.WatchLifecycleRequest(project_id=PROJECT), metadata=bearer(tokens.bound)
    )
    for call in (admin_watch, bound_watch):
        assert (await call.read()).HasField("progress")
    # The bound token keeps its token but loses the project; the admin token goes.
    tokens.write(f"{tokens.bound} {OTHER_PROJECT}")
    with pytest.raises(grpc.aio.AioRpcError) as admin_end:
        while True:
            await asyncio.wait_for(admin_watch.read(), 10)
    assert admin_end.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as bound_end:
        while True:
            await asyncio.wait_for(bound_watch.read(), 10)
    assert bound_end.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(bound_end.value).metadata["project_id"] == PROJECT


async def test_a_broken_tokens_file_keeps_the_tokens_in_force(
    channel: grpc.aio.Channel, tokens: Tokens, server: Server, caplog: pytest.LogCaptureFixture
):
    lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)

    def refused() -> float | None:
        # Found by a review: a refused file was only in the log, so a revocation that
        # did not take effect could not be alerted on.
        return server.metrics.registry.get_sample_value(
            "memsvc_credentials_file_refused", {"file": "tokens"}
        )

    assert refused() == 0.0
    tokens.write(tokens.admin, "short")
    await server.reload_credentials()
    assert refused() == 1.0
    await lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**ids()), metadata=bearer(tokens.admin))
    assert "line 3: a token must be at least 16" in caplog.text
    tokens.path.unlink()
    await server.reload_credentials()
    assert refused() == 1.0
    await lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**ids()), metadata=bearer(tokens.admin))
    assert tokens.admin not in caplog.text and tokens.bound not in caplog.text
    tokens.write(tokens.admin)
    await server.reload_credentials()
    assert refused() == 0.0


async def test_a_kubernetes_secret_update_is_picked_up(base_config: Config, tmp_path: Path):
    """Secret volumes swap a `..data` symlink; the file name stays a symlink through it."""
    volume = tmp_path / "secret"
    first, second = new_token(), new_token()

    def publish(version: str, token: str) -> None:
        folder = volume / f"..{version}"
        folder.mkdir(parents=True)
        write_tokens(folder / "tokens", token)
        link = volume / "..data_tmp"
        link.symlink_to(folder.name)
        os.replace(link, volume / "..data")

    publish("2026_01_01_00_00_00.1", first)
    (volume / "tokens").symlink_to("..data/tokens")
    config = replace(base_config, auth_tokens_file=str(volume / "tokens"))
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan,
    ):
        lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(chan)
        await lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**ids()), metadata=bearer(first))
        publish("2026_01_01_00_05_00.2", second)
        await server.reload_credentials()
        await refused(
            lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**ids()), metadata=bearer(first)),
            *UNAUTHENTICATED,
        )
        await lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**ids()), metadata=bearer(second))


async def test_sighup_reloads_the_tokens_at_once(tmp_path: Path):
    tokens = tmp_path / "tokens"
    first, second = new_token(), new_token()
    write_tokens(tokens, first)
    port = free_port()
    env = _server_env(tmp_path, port)
    # A poll too slow to matter: only SIGHUP can make the new token valid in time.
    env |= {"MEMSVC_AUTH_TOKENS_FILE": str(tokens), "MEMSVC_AUTH_RELOAD_INTERVAL_SECONDS": "3600"}
    process = await asyncio.create_subprocess_exec(
        MEMSVC, "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        await asyncio.to_thread(wait_for_port, port, 20)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
            lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(chan)
            await lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**ids()), metadata=bearer(first))
            write_tokens(tokens, second)
            process.send_signal(signal.SIGHUP)
            await eventually(
                lambda: lifecycle.Spawn(
                    lifecycle_pb2.SpawnRequest(**ids()), metadata=bearer(second)
                ),
                timeout=10,
            )
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr.decode()
    assert first not in stderr.decode() and second not in stderr.decode()


# ---- the tokens file format ---------------------------------------------------------


def test_more_than_one_authorization_is_malformed_whatever_their_order():
    """Found by a review: the first one counted, so behind a proxy that adds its own
    header instead of replacing the client's, the order chose the credentials."""
    token, other = new_token(), new_token()
    table = parse_tokens(f"{token}\n{other} {PROJECT}\n")
    assert isinstance(table.authorize([("authorization", f"Bearer {token}")]), Grant)
    for pair in ([token, other], [other, token], [token, token]):
        headers = [("authorization", f"Bearer {each}") for each in pair]
        assert table.authorize(headers) == "malformed"
    assert table.authorize([("x-other", "1")]) == "missing"


def test_the_tokens_file_format():
    token, other = new_token(), new_token()
    table = parse_tokens(
        f"# comment\n\n  {token}   # anywhere\n{other} {PROJECT},{OTHER_PROJECT.upper()}\n"
    )
    admin, bound = table.lookup(token), table.lookup(other)
    assert admin is not None and admin.projects is None
    assert bound is not None and bound.projects == frozenset({PROJECT, OTHER_PROJECT})
    assert table.lookup("x" * 32) is None
    # Two tokens on one line: refused without writing the second one into the message.
    with pytest.raises(CredentialsError, match="item 1 of the list is not") as raised:
        parse_tokens(f"{token} {other}\n")
    assert other not in str(raised.value) and token not in str(raised.value)
    for text, complaint in [
        ("short\n", "line 1: a token must be at least 16"),
        (f"{token}\n{token}\n", "line 2: the token of an earlier line"),
        (f"{token} {PROJECT}, {OTHER_PROJECT}\n", "expected `TOKEN`"),
        (f"{token} not-a-uuid\n", "project ids must be UUIDs"),
        (f"{token} {PROJECT},\n", "project ids must be UUIDs"),
        # Found by a review: a project id wrapped onto a line of its own was a token
        # valid in every project (and the token above it lost its binding); so was one
        # after a lone CR or another separator that splitlines() or split() takes.
        (f"{token}\n    {PROJECT}\n", "line 2: project ids alone"),
        (f"{token}\n{PROJECT}\n", "line 2: project ids alone"),
        (f"{token}\n{PROJECT},{OTHER_PROJECT}\n", "line 2: project ids alone"),
        (f"{token}\r{PROJECT}\n", "line 1: character U\\+000D"),
        (f"{token}\x1e{PROJECT}\n", "line 1: character U\\+001E"),
        (f"{token} {PROJECT}\u2028\n", "line 1: character U\\+2028"),
        (f"{token}\u00a0{PROJECT}\n", "line 1: character U\\+00A0"),
        # In a comment too (a review of the fix): the comment would end there, and
        # the rest, a line of its own, vanish with it.
        (f"{token} {PROJECT} # note\r{other}\n", "line 1: character U\\+000D"),
        (f"# memsvc tokens\r{token} {PROJECT}\r{other}\r", "line 1: character U\\+000D"),
    ]:
        with pytest.raises(CredentialsError, match=complaint):
            parse_tokens(text)
    # CR LF line ends, tabs, and any text in comments are fine.
    crlf = parse_tokens(f"# révoqué le 8/12 ✓\r\n{token}\t{PROJECT}\r\n{other}  # 🔑\r\n")
    bound, unbound = crlf.lookup(token), crlf.lookup(other)
    # A UUID bound to projects is a token (uuidgen's), with a warning.
    uuid_token = str(uuid.uuid4())
    assert parse_tokens(f"{token}\n{uuid_token} {PROJECT}\n").uuid_lines == (2,)
    assert bound is not None and bound.projects == frozenset({PROJECT})
    assert unbound is not None and unbound.projects is None


def test_a_tokens_file_is_utf8_with_its_comments_in_any_language(tmp_path: Path, caplog):
    """Found by a review: a file was read as ASCII, so a comment with an accent (or a
    BOM an editor put first) made a reload fail, and a token it removed stayed valid."""
    token = new_token()
    path = tmp_path / "tokens"
    path.write_bytes(f"\ufeff# jeton révoqué (fuite)\n{token} {PROJECT}\n".encode())
    source = TokenFile(path)
    assert source.table.lookup(token) is not None
    path.write_bytes(b"# ok\n" + token.encode() + b"\n\xff\xfe\n")
    with pytest.raises(CredentialsError, match="line 3: not UTF-8 text"):
        TokenFile(path)


def test_the_refused_gauge_falls_when_the_files_in_force_are_back(tmp_path: Path):
    """Found by a review: a tokens file unreadable for a while (its link pointed
    elsewhere), then back as it was, kept memsvc_credentials_file_refused at 1."""
    token = new_token()
    write_tokens(tmp_path / "real", token)
    (tmp_path / "tokens").symlink_to(tmp_path / "real")
    source = TokenFile(tmp_path / "tokens")
    (tmp_path / "tokens").unlink()
    (tmp_path / "tokens").symlink_to(tmp_path / "missing")
    assert source.reload() is None and source.refused
    (tmp_path / "tokens").unlink()
    (tmp_path / "tokens").symlink_to(tmp_path / "real")
    assert source.reload() is None and not source.refused


def test_the_example_placeholder_token_is_warned_of(tmp_path: Path, caplog):
    path = write_tokens(tmp_path / "tokens", f"example-only-change-me-agent-token {PROJECT}")
    with caplog.at_level(logging.WARNING, logger="memsvc.auth"):
        TokenFile(path)
    assert any("placeholder token" in r.getMessage() for r in caplog.records)


async def test_a_server_refuses_to_start_with_an_unusable_tokens_file(
    base_config: Config, tmp_path: Path
):
    with pytest.raises(ConfigError, match="cannot read"):
        await Server(replace(base_config, auth_tokens_file=str(tmp_path / "missing"))).start()
    write_tokens(tmp_path / "bad", "x")
    with pytest.raises(ConfigError, match="line 1"):
        await Server(replace(base_config, auth_tokens_file=str(tmp_path / "bad"))).start()


# ---- secure by default --------------------------------------------------------------


def test_a_non_loopback_api_needs_tokens_tls_or_an_explicit_override(tmp_path: Path):
    for listen in ("0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051", "memsvc.internal:50051"):
        with pytest.raises(ConfigError, match="--allow-insecure-remote") as raised:
            load({}, {"MEMSVC_LISTEN": listen})
        assert "MEMSVC_AUTH_TOKENS_FILE" in str(raised.value)
        assert load({}, {"MEMSVC_LISTEN": listen, "MEMSVC_ALLOW_INSECURE_REMOTE": "true"})
        assert load({}, {"MEMSVC_LISTEN": listen, "MEMSVC_AUTH_TOKENS_FILE": "/tokens"})
        assert load(
            {},
            {"MEMSVC_LISTEN": listen, "MEMSVC_TLS_CERT_FILE": "/c", "MEMSVC_TLS_KEY_FILE": "/k"},
        )
    for listen in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "127.0.0.2:1"):
        assert load({}, {"MEMSVC_LISTEN": listen}).listen == listen


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"MEMSVC_TLS_CERT_FILE": "/c"}, "set both or neither"),
        ({"MEMSVC_TLS_KEY_FILE": "/k"}, "set both or neither"),
        ({"MEMSVC_TLS_CLIENT_CA_FILE": "/ca"}, "needs tls_cert_file"),
        ({"MEMSVC_UNIX_SOCKET_GROUP": "agents"}, "unix_socket is not"),
        ({"MEMSVC_AUTH_RELOAD_INTERVAL_SECONDS": "0"}, "positive finite"),
    ],
)
def test_inconsistent_security_settings_are_refused(env: dict[str, str], complaint: str):
    with pytest.raises(ConfigError, match=complaint):
        load({}, env)


def _server_env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
    return env | {
        "MEMSVC_LISTEN": f"127.0.0.1:{port}",
        "MEMSVC_HEALTH_LISTEN": "",
        "MEMSVC_METRICS_LISTEN": "",
        "MEMSVC_DATA_DIR": str(tmp_path / "data"),
        "MEMSVC_SHUTDOWN_GRACE_SECONDS": "2",
        "MEMSVC_LOG_FORMAT": "text",
    }


async def test_serve_refuses_an_open_remote_api_and_starts_with_the_override(tmp_path: Path):
    env = _server_env(tmp_path, 0)
    env["MEMSVC_LISTEN"] = f"0.0.0.0:{free_port()}"
    refused_start = await asyncio.to_thread(
        subprocess.run, [MEMSVC, "serve"], env=env, capture_output=True, text=True, timeout=30
    )
    assert refused_start.returncode == 2
    assert "configuration error" in refused_start.stderr
    assert "--allow-insecure-remote" in refused_start.stderr
    port = int(env["MEMSVC_LISTEN"].rsplit(":", 1)[1])
    process = await asyncio.create_subprocess_exec(
        MEMSVC, "serve", "--allow-insecure-remote", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        await asyncio.to_thread(wait_for_port, port, 20)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr.decode()
    assert "neither tokens nor TLS" in stderr.decode()


async def test_serve_exits_2_when_the_tokens_file_is_unusable(tmp_path: Path):
    env = _server_env(tmp_path, free_port()) | {"MEMSVC_AUTH_TOKENS_FILE": str(tmp_path / "no")}
    done = await asyncio.to_thread(
        subprocess.run, [MEMSVC, "serve"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert "configuration error: cannot read" in done.stderr


# ---- the Unix socket ----------------------------------------------------------------


def _some_other_group() -> int:
    """A group this process may give a file to: another than its own when it can (root
    may give it to any; a user to its supplementary groups), else its own."""
    if os.geteuid() == 0:
        return 4321
    others = [g for g in os.getgroups() if g != os.getegid()]
    return others[0] if others else os.getegid()


async def test_the_unix_socket_has_mode_0660_its_group_and_needs_a_token(
    base_config: Config, tmp_path: Path, tokens: Tokens
):
    path = tmp_path / "memsvc.sock"
    group = _some_other_group()
    config = replace(
        base_config,
        unix_socket=str(path),
        unix_socket_group=str(group),
        auth_tokens_file=str(tokens.path),
    )
    async with Server(config), grpc.aio.insecure_channel(f"unix:{path}") as chan:
        status = path.stat()
        assert stat.S_ISSOCK(status.st_mode)
        assert stat.S_IMODE(status.st_mode) == 0o660
        assert status.st_gid == group
        lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(chan)
        await refused(lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**ids())), *UNAUTHENTICATED)
        await lifecycle.Spawn(lifecycle_pb2.SpawnRequest(**ids()), metadata=bearer(tokens.admin))
    assert not path.exists()


async def test_an_unknown_socket_group_is_refused(base_config: Config, tmp_path: Path):
    config = replace(
        base_config,
        unix_socket=str(tmp_path / "memsvc.sock"),
        unix_socket_group="no-such-group-here",
    )
    with pytest.raises(ConfigError, match="no group named 'no-such-group-here'"):
        await Server(config).start()


# ---- the CLI ------------------------------------------------------------------------


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        MEMSVC, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_cli_sends_its_token(server: Server, tokens: Tokens, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
    env["MEMSVC_ADDRESS"] = f"127.0.0.1:{server.port}"
    session = ["-p", PROJECT, "-a", AGENT, "-s", f"cli-{uuid.uuid4().hex[:8]}"]

    code, _, err = await _cli(env, "spawn", *session)
    assert code == 7, err
    assert "UNAUTHENTICATED (ERROR_REASON_UNAUTHENTICATED)" in err
    assert "--token-file or $MEMSVC_TOKEN_FILE" in err

    token_file = write_token(tmp_path / "token", tokens.bound)
    code, _, err = await _cli(env, "spawn", *session, "--token-file", str(token_file))
    assert code == 0, err
    env["MEMSVC_TOKEN_FILE"] = str(token_file)
    code, _, err = await _cli(env, "get", *session, "missing")
    assert code == 3, err
    code, _, err = await _cli(env, "sessions", "list", "-p", OTHER_PROJECT)
    assert code == 7 and "PERMISSION_DENIED (ERROR_REASON_PERMISSION_DENIED)" in err
    code, _, err = await _cli(env, "sessions", "list", "-p", PROJECT, "--token-file", "/nope")
    assert code == 2 and "/nope" in err


def _value(text: str) -> Any:
    from google.protobuf import struct_pb2

    return struct_pb2.Value(string_value=text)


async def eventually(attempt: Any, timeout: float = 5.0) -> Any:
    """Await ``attempt()`` until it stops raising (a reload is polled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await attempt()
        except (grpc.aio.AioRpcError, AssertionError, pytest.fail.Exception):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_a_reload_logs_tokens_rebound_to_other_projects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A token whose projects changed is named in the log (by fingerprint), as added and
    removed ones are: a line cut before its project ids would widen its token."""
    token, other = new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_text(f"{token} {PROJECT}\n{other}\n")
    tokens = TokenFile(path)
    path.write_text(f"{token}\n{other}\n")
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))  # a new mtime
    with caplog.at_level(logging.INFO, logger="memsvc.auth"):
        table = tokens.reload()
    assert table is not None and table.lookup(token).projects is None  # type: ignore[union-attr]
    rebound = f"rebound {fingerprint(digest(token))} to every project"
    assert rebound in caplog.text and token not in caplog.text


class HeldTokens:
    """A tokens file holding ``text``, on a clock the test moves (``now``), whose
    suspicious changes are held back for 5 s."""

    def __init__(self, path: Path, text: str) -> None:
        path.write_text(text)
        self.now = 0.0
        self.file = TokenFile(path, hold_seconds=5, clock=lambda: self.now)

    def rewrite(self, text: str) -> TokenTable | None:
        """Write ``text`` over the file, with a new mtime, and reload it."""
        self.file.path.write_text(text)
        os.utime(self.file.path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
        return self.file.reload()


def test_a_line_cut_before_its_project_ids_does_not_widen_its_token_at_once(tmp_path: Path):
    """A tokens file caught half written (rewritten in place, the writer paused
    mid-line) ends with a token alone: taken at once, it would let the token act in
    every project until the rest arrived. Held back one check: a finished line then
    binds it as before; a file that stays so (a last line without its end of line,
    on purpose) is taken then."""
    token, other = new_token(), new_token()
    held = HeldTokens(tmp_path / "tokens", f"{other}\n{token} {PROJECT}\n")
    assert held.rewrite(f"{other}\n{token}") is None  # cut: held back
    finished = held.rewrite(f"{other}\n{token} {PROJECT}\n")
    assert finished is not None
    assert finished.lookup(token).projects == frozenset({PROJECT})  # type: ignore[union-attr]
    held.file.table = finished
    assert held.rewrite(f"{other}\n{token}") is None
    held.now = 1.0
    assert held.file.reload() is None  # a check soon after (a SIGHUP per write): still held
    held.now = 5.0
    kept = held.file.reload()  # unchanged for the hold: meant so
    assert kept is not None and kept.lookup(token).projects is None  # type: ignore[union-attr]


def test_a_tokens_file_truncated_to_be_written_again_is_not_taken_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Found by a review: a writer's first step, truncating the file, was taken at the
    next check, refusing every call and ending every watch until the tokens were back.
    Held back as a cut line is; a file left empty on purpose is taken after the hold,
    with a warning."""
    token = new_token()
    held = HeldTokens(tmp_path / "tokens", f"{token}\n")
    with caplog.at_level(logging.WARNING, logger="memsvc.auth"):
        assert held.rewrite("") is None  # truncated: held back
        assert "holds no token any more" in caplog.text
    written = held.rewrite(f"{token}\n")
    assert written is not None and written.lookup(token) is not None
    held.file.table = written
    assert held.rewrite("") is None
    held.now = 5.0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="memsvc.auth"):
        emptied = held.file.reload()  # unchanged for the hold: meant so
    assert emptied is not None and len(emptied) == 0
    assert "every API call is refused" in caplog.text


async def test_tokens_without_tls_on_a_network_address_are_warned_of(
    base_config: Config, tokens: Tokens, caplog: pytest.LogCaptureFixture
):
    config = replace(
        base_config, listen=f"0.0.0.0:{free_port()}", auth_tokens_file=str(tokens.path)
    )
    with caplog.at_level(logging.WARNING, logger="memsvc.server"):
        async with Server(config):
            pass
    assert "takes bearer tokens without TLS" in caplog.text


def test_a_tokens_file_changing_while_read_is_taken_at_the_next_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    token, other = new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_text(f"{token}\n")
    tokens = TokenFile(path)
    path.write_text(f"{token}\n{other}\n")
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    real = tokens._files.signature
    calls = iter(range(10**6))
    # Every look at the file sees another signature: a writer still at work.
    monkeypatch.setattr(tokens._files, "signature", lambda: (real(), next(calls)))
    assert tokens.reload() is None
    monkeypatch.setattr(tokens._files, "signature", real)
    table = tokens.reload()
    assert table is not None and table.lookup(other) is not None
