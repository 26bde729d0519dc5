"""The SDK's credentials: bearer tokens (fixed or from a file that rotates) and TLS."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from memsvc.client import (
    TLS,
    AsyncClient,
    Client,
    ErrorReason,
    EventType,
    PermissionDenied,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from memsvc.client._auth import BearerToken
from memsvc.config import Config
from memsvc.server import Server
from tests.client._credentials import make_pki, new_token, write_token, write_tokens
from tests.client.conftest import FAST_RETRY
from tests.conftest import DEPLOYMENTS, Deployment

OTHER_PROJECT = "7c9e6679-7425-40de-944b-e07fc1f90ae7"


@pytest.fixture
def deployment() -> Deployment:
    """Credentials do not depend on the backends: the embedded ones are enough here."""
    return DEPLOYMENTS["embedded"]


@pytest.fixture
def config_overrides(config_overrides: dict[str, object]) -> dict[str, object]:
    return {**config_overrides, "auth_reload_interval_seconds": 0.1}


async def test_a_client_without_a_valid_token_is_unauthenticated(
    server: Server, scope: dict[str, str]
):
    target = f"127.0.0.1:{server.port}"
    for token in (None, new_token()):
        async with AsyncClient(target, token=token, retry=FAST_RETRY) as client:
            session = client.session(*scope.values())
            with pytest.raises(Unauthenticated) as raised:
                await session.spawn()
            assert raised.value.reason == ErrorReason.UNAUTHENTICATED
            assert raised.value.attempts == 1, "UNAUTHENTICATED is not retried"
            with pytest.raises(Unauthenticated):
                async with client.watch(scope["project_id"]):
                    pass


async def test_a_bound_token_is_refused_other_projects(
    server: Server, server_tokens_file: Path, auth_token: str, scope: dict[str, str]
):
    bound = new_token()
    write_tokens(server_tokens_file, auth_token, f"{bound} {scope['project_id']}")
    await server.reload_credentials()
    async with AsyncClient(f"127.0.0.1:{server.port}", token=bound) as client:
        await client.session(*scope.values()).spawn()
        with pytest.raises(PermissionDenied) as raised:
            await client.list_sessions(OTHER_PROJECT).collect()
        assert raised.value.reason == ErrorReason.PERMISSION_DENIED
        assert raised.value.project_id == OTHER_PROJECT
        with pytest.raises(PermissionDenied) as watch_refused:
            async with client.watch():  # every project: not for a bound token
                pass
        assert watch_refused.value.project_id == ""


async def test_a_rotated_token_file_is_followed_by_calls_and_watches(
    server: Server,
    server_tokens_file: Path,
    auth_token: str,
    token_file: Path,
    scope: dict[str, str],
):
    """The server accepts old and new, the file changes, the server drops the old one:
    calls go on, and a watch whose stream the server ended reconnects with the new token
    and misses nothing."""
    project, agent = scope["project_id"], scope["agent_instance_id"]
    fresh = new_token()
    async with (
        AsyncClient(f"127.0.0.1:{server.port}", token_file=token_file, retry=FAST_RETRY) as sdk,
        sdk.watch(project, progress_interval=0.2) as events,
    ):
        await sdk.session(project, agent, "before").spawn()
        write_tokens(server_tokens_file, auth_token, fresh)
        await server.reload_credentials()
        write_token(token_file, fresh)
        write_tokens(server_tokens_file, fresh)
        await server.reload_credentials()  # the watch's stream ends: its token is gone
        # The next call may still carry the old token (the file is checked once a
        # second): refused, it reads the file at once and is retried with the new one.
        await sdk.session(project, agent, "after").spawn()
        received = [await asyncio.wait_for(anext(events), 10) for _ in range(2)]
    assert [(e.session_id, e.event_type) for e in received] == [
        ("before", EventType.SESSION_SPAWNED),
        ("after", EventType.SESSION_SPAWNED),
    ]
    assert events.connections == 2


async def test_the_sync_client_sends_its_token(server: Server, auth_token: str, scope):
    def flow() -> str:
        with Client(f"127.0.0.1:{server.port}", token=auth_token) as client:
            return client.session(*scope.values()).spawn().session_id

    assert await asyncio.to_thread(flow) == scope["session_id"]


def test_bearer_token_reads_its_file_again_when_it_changes(tmp_path: Path):
    path = write_token(tmp_path / "token", "first-token-0123456789")
    token = BearerToken(file=path, check_interval=3600)
    assert token.metadata() == (("authorization", "Bearer first-token-0123456789"),)
    write_token(path, "second-token-0123456789")
    # Within the check interval the file is not looked at...
    assert token.metadata() == (("authorization", "Bearer first-token-0123456789"),)
    # ...unless a refusal asks for it.
    assert token.refresh() is True
    assert token.metadata() == (("authorization", "Bearer second-token-0123456789"),)
    assert token.refresh() is False
    # A file briefly missing (a Secret being swapped) keeps the last token.
    path.unlink()
    assert token.refresh() is False
    assert token.metadata()[0][1].endswith("second-token-0123456789")
    often = BearerToken(file=write_token(path, "third-token-0123456789"), check_interval=0)
    write_token(path, "fourth-token-0123456789")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert often.metadata()[0][1] == "Bearer fourth-token-0123456789"
    assert "fourth" not in repr(often) and "third" not in repr(BearerToken("third-token-0123"))


def test_credentials_arguments_are_checked(tmp_path: Path):
    with pytest.raises(ValueError, match="not both"):
        AsyncClient(token="a" * 20, token_file=tmp_path / "t")
    with pytest.raises(FileNotFoundError):
        AsyncClient(token_file=tmp_path / "missing")
    with pytest.raises(ValueError, match="one token"):
        AsyncClient(token="two words")
    with pytest.raises(ValueError, match="one token"):
        AsyncClient(token_file=write_token(tmp_path / "empty", ""))
    with pytest.raises(ValueError, match="cert_file and key_file"):
        TLS(cert_file="client.crt")
    with pytest.raises(ValueError, match="tls or credentials"):
        AsyncClient(tls=True, credentials=grpc.ssl_channel_credentials())
    threads = threading.active_count()
    with pytest.raises(ValueError, match="not both"):
        Client(token="a" * 20, token_file=tmp_path / "t")
    assert threading.active_count() == threads, "a refused Client starts no thread"


def test_tls_files_without_their_pem_blocks_are_refused_at_once(tmp_path: Path):
    """Found by a review: a token file given as the CA was taken, and every call then
    waited out its deadline for a handshake that could never succeed, as if memsvc were
    down. A CA or certificate file needs a PEM certificate, a key file a PEM key."""
    pki = make_pki(tmp_path / "pki")
    token = write_token(tmp_path / "token", new_token())
    refused = [
        (TLS(ca_file=token), f"the TLS CA file {token} holds no PEM certificate"),
        (
            TLS(ca_file=pki.ca, cert_file=pki.client_key, key_file=pki.client_cert),
            f"the TLS certificate file {pki.client_key} holds no PEM certificate",
        ),
        (
            TLS(cert_file=pki.client_cert, key_file=pki.client_cert),
            f"the TLS key file {pki.client_cert} holds no PEM private key",
        ),
    ]
    for tls, message in refused:
        with pytest.raises(ValueError, match=re.escape(message)):
            AsyncClient(tls=tls)
        threads = threading.active_count()
        with pytest.raises(ValueError, match=re.escape(message)):
            Client(tls=tls)
        assert threading.active_count() == threads, "a refused Client starts no thread"
    # The real files pass (a key file holding the certificate too, as some tools write).
    both = tmp_path / "client.pem"
    both.write_bytes(pki.client_cert.read_bytes() + pki.client_key.read_bytes())
    TLS(ca_file=pki.ca, cert_file=pki.client_cert, key_file=both).channel_credentials()


@pytest.fixture
async def mtls_server(
    base_config: Config, tmp_path: Path
) -> AsyncIterator[tuple[Server, Path, Path, Path]]:
    pki = make_pki(tmp_path / "pki")
    config = replace(
        base_config,
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca),
    )
    async with Server(config) as server:
        yield server, pki.ca, pki.client_cert, pki.client_key


async def test_the_sdks_speak_mutual_tls_with_a_token(
    mtls_server: tuple[Server, Path, Path, Path], token_file: Path, scope: dict[str, str]
):
    server, ca, cert, key = mtls_server
    tls = TLS(ca_file=ca, cert_file=cert, key_file=key)
    target = f"localhost:{server.port}"
    async with AsyncClient(target, tls=tls, token_file=token_file) as client:
        await client.session(*scope.values()).spawn()

    def sync_flow() -> int:
        with Client(target, tls=tls, token_file=token_file) as client:
            return client.session(*scope.values()).describe().version

    assert await asyncio.to_thread(sync_flow) == 1
    async with AsyncClient(
        target, tls=TLS(ca_file=ca), token_file=token_file, retry=RetryPolicy.disabled(), timeout=5
    ) as client:
        with pytest.raises(Unavailable):  # no client certificate: no handshake
            await client.session(*scope.values()).describe()


def test_a_token_and_an_authorization_in_grpc_metadata_are_refused_together():
    """memsvc refuses a call with two authorization entries (their order must not
    choose the credentials): the client says so when it is made, not on each call."""
    with pytest.raises(ValueError, match="not both"):
        AsyncClient("127.0.0.1:1", token=new_token(), grpc_metadata=[("Authorization", "Bearer x")])
    AsyncClient("127.0.0.1:1", grpc_metadata=[("authorization", f"Bearer {new_token()}")])
