"""Fixtures of the SDK tests: an AsyncClient on the `server` fixture (both deployments).

Every server of these tests takes bearer tokens (``auth_tokens_file``), and every client
sends one: the SDK is tested as agents use it in production. The contract suites
(tests/contract) keep calling raw stubs on servers without tokens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from memsvc.client import AsyncClient, AsyncSessionClient, RetryPolicy
from memsvc.config import Config
from memsvc.server import Server
from tests.client._credentials import new_token, write_token, write_tokens

# Quick retries keep fault tests short; the budget (timeout) still bounds them.
FAST_RETRY = RetryPolicy(max_attempts=5, initial_backoff=0.05, max_backoff=0.5)


@pytest.fixture
def auth_token() -> str:
    """The bearer token of this test's clients (valid for every project)."""
    return new_token()


@pytest.fixture
def server_tokens_file(tmp_path: Path, auth_token: str) -> Path:
    return write_tokens(tmp_path / "server-tokens", auth_token)


@pytest.fixture
def token_file(tmp_path: Path, auth_token: str) -> Path:
    """The client's token file: the token alone, as a mounted Secret holds it."""
    return write_token(tmp_path / "token", auth_token)


@pytest.fixture
def base_config(base_config: Config, server_tokens_file: Path) -> Config:
    """tests/conftest.py's base configuration, with bearer tokens on."""
    return replace(base_config, auth_tokens_file=str(server_tokens_file))


@pytest.fixture
async def client(server: Server, token_file: Path) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(
        f"127.0.0.1:{server.port}", retry=FAST_RETRY, token_file=token_file
    ) as sdk:
        yield sdk


@pytest.fixture
def session(client: AsyncClient, scope: dict[str, str]) -> AsyncSessionClient:
    return client.session(scope["project_id"], scope["agent_instance_id"], scope["session_id"])
