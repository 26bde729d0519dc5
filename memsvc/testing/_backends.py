"""Finding the test backends, and private databases for tests that need one."""

from __future__ import annotations

import os
import socket
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg


class BackendUnreachable(RuntimeError):
    """A backend the tests need does not answer."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def require_backend(url: str) -> None:
    """Raise BackendUnreachable unless a TCP connection to the URL's host succeeds."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or {"redis": 6379, "postgresql": 5432, "postgres": 5432}[parts.scheme]
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as error:
        raise BackendUnreachable(
            f"{parts.scheme} at {host}:{port} is unreachable: {error}"
        ) from error


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def create_postgres_database(
    admin_url: str, prefix: str = "memsvc_test", locale: str | None = None
) -> str:
    """Create an empty database with a unique name (and ``locale``, else the
    server's default); return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    options = "" if locale is None else f" TEMPLATE template0 ENCODING 'UTF8' LOCALE '{locale}'"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{options}')
    return _with_database(admin_url, name)


def drop_postgres_database(admin_url: str, database_url: str) -> None:
    """Drop a database made by create_postgres_database, closing its sessions."""
    name = urlsplit(database_url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def env_url(name: str, default: str) -> str:
    """A backend URL from the environment, with the local default."""
    return os.environ.get(name, default)
