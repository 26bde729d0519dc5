"""Private backend processes for tests that stop, kill or restart a backend.

Such tests must never touch the shared Redis or PostgreSQL; they start their own
on a free port with these helpers.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from memsvc.testing._backends import free_port

# How many ports a first start tries. A port free_port() found can be taken
# before the server binds it (another test's outgoing connection gets the same
# ephemeral port); the server then exits at once, and another port is tried.
START_ATTEMPTS = 3


class ExitedBeforeListening(RuntimeError):
    """The process ended before it accepted connections (often: its port was taken)."""


def log_tail(path: Path | None, lines: int = 20) -> str:
    """The last lines of a process's log, for an error message ('' if none)."""
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n" + "\n".join(text)


def wait_for_port(
    port: int,
    timeout: float = 10.0,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port.

    With ``process``, stop waiting as soon as it exits (ExitedBeforeListening,
    with the tail of ``log``): a server that could not bind will never listen.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise ExitedBeforeListening(
                    f"process {process.pid} exited with {process.returncode} before listening"
                    f" on 127.0.0.1:{port}{log_tail(log)}"
                ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listens on 127.0.0.1:{port} after {timeout}s{log_tail(log)}"
                ) from None
            time.sleep(0.05)


def check_redis_is(process: subprocess.Popen[bytes], port: int) -> None:
    """ExitedBeforeListening unless the Redis answering on ``port`` is ``process``:
    when two servers were handed one port, the second cannot bind it, and waiting
    for the port finds the first one listening."""
    try:
        with redis.Redis(port=port, socket_timeout=5) as client:
            answering = int(client.info("server")["process_id"])
    except redis.RedisError:  # not a Redis at all (another test's server)
        answering = -1
    if answering != process.pid:
        process.kill()
        process.wait(timeout=10)
        raise ExitedBeforeListening(
            f"127.0.0.1:{port} is served by process {answering}, not {process.pid}"
        )


def launch_redis(
    arguments: Callable[[int], list[str]],
    port: int,
    log: Path,
    *,
    attempts: int = START_ATTEMPTS,
    timeout: float = 10.0,
    next_port: Callable[[], int] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server on 127.0.0.1:``port`` with ``arguments(port)``, answering there
    (its log in ``log``); and the port. When the port was taken (the server exits,
    or another answers there), another from ``next_port`` (free_port), up to
    ``attempts``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed")
    for attempt in range(1, attempts + 1):
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--logfile", str(log),
             *arguments(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for_port(port, timeout, process=process, log=log)
            check_redis_is(process, port)
        except ExitedBeforeListening:
            if attempt == attempts:
                raise
            port = (next_port or free_port)()
        except BaseException:
            process.kill()
            process.wait(timeout=10)
            raise
        else:
            return process, port
    raise AssertionError("unreachable")


class PrivateRedis:
    """A redis-server of the test's own, on a port of its own, keeping nothing on disk.

    The port given is a first choice: if the server cannot bind it at its first
    start, another free port is tried, so read ``port`` and ``url`` after
    ``start``. Restarts keep the port (clients reconnect to it).
    """

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def persistence_arguments(self) -> list[str]:
        """How the server keeps its data: here, not at all."""
        return ["--save", "", "--appendonly", "no"]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._process, self.port = launch_redis(
            lambda port: [*self.persistence_arguments(), "--dir", str(self.workdir)],
            self.port,
            self.log_path,
            attempts=1 if self._started else START_ATTEMPTS,
        )
        self._started = True

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None
