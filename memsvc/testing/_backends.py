"""Finding the test backends, and private databases for tests that need one."""

from __future__ import annotations

import os
import random
import socket
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg


class BackendUnreachable(RuntimeError):
    """A backend the tests need does not answer."""


_EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
_CHOOSER = random.SystemRandom()  # not the seeded global one: processes must differ


def _outside_ephemeral_range() -> range:
    """Ports below the kernel's ephemeral range, or none if it cannot be read.

    The kernel gives outgoing connections their local port from that range, as
    it does ``bind(("127.0.0.1", 0))``. A port found free there can be taken by
    any connection the tests open before the server meant to listen on it
    binds it; a port below the range is only ever taken by an explicit bind.
    """
    try:
        low = int(_EPHEMERAL_PORTS.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(max(1024, low - 16384), low)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, outside the ephemeral
    range where the machine allows it."""
    candidates = _outside_ephemeral_range()
    for _ in range(100 if candidates else 0):
        port = _CHOOSER.choice(candidates)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken, or in TIME_WAIT: try another
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


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
    admin_url: str,
    prefix: str = "memsvc_test",
    locale: str | None = None,
    icu_locale: str | None = None,
) -> str:
    """Create an empty database with a unique name (and ``locale``, else the
    server's default; or ICU's ``icu_locale`` collation); return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    options = "" if locale is None else f" TEMPLATE template0 ENCODING 'UTF8' LOCALE '{locale}'"
    if icu_locale is not None:
        options = (
            " TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C.UTF-8' LOCALE_PROVIDER icu"
            f" ICU_LOCALE '{icu_locale}'"
        )
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
