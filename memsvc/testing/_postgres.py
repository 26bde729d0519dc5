"""A private PostgreSQL cluster for tests that stop, kill or restart the database.

Such tests must never touch the shared PostgreSQL. :class:`PrivatePostgres`
makes a cluster of its own with ``initdb`` in a temporary directory, on a port of
its own, listening on 127.0.0.1 only with ``trust`` authentication, and starts,
stops, restarts and kills it with ``pg_ctl``. PostgreSQL refuses to run as root,
so when the tests run as root every command runs as the ``postgres`` OS user
(``runuser``), and the directory belongs to that user.

The first cluster of a process is a template (``initdb`` takes most of a second);
each later one is a copy of it. Every wait is bounded, and whatever is left
running is killed (SIGKILL) and its directory removed when the object is closed,
collected, or the process exits.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType

from memsvc.testing._backends import free_port

# fsync=off: the tests kill processes, never the machine, and a killed
# PostgreSQL loses nothing that reached the kernel (synchronous_commit stays on,
# so every acknowledged commit did). Small buffers: many clusters may run at once.
_SETTINGS = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
fsync = off
full_page_writes = off
shared_buffers = 16MB
max_connections = 60
max_wal_size = 64MB
log_min_messages = warning
log_line_prefix = '%m [%p] '
"""


def postgres_bindir() -> Path:
    """The directory of initdb, pg_ctl and postgres.

    ``MEMSVC_TEST_POSTGRES_BIN`` if set, else the newest ``/usr/lib/postgresql/*/bin``
    (Debian's layout), else wherever ``pg_ctl`` is on the PATH.
    """
    configured = os.environ.get("MEMSVC_TEST_POSTGRES_BIN")
    candidates = [Path(configured)] if configured else []
    candidates += sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise FileNotFoundError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql "
        "or set MEMSVC_TEST_POSTGRES_BIN"
    )


class _Owner:
    """Who runs the server: the postgres OS user when we are root, else ourselves."""

    def __init__(self) -> None:
        self.as_root = os.geteuid() == 0
        if self.as_root:
            entry = pwd.getpwnam("postgres")
            self.uid, self.gid = entry.pw_uid, entry.pw_gid
            runuser = shutil.which("runuser")
            self.prefix = [runuser, "-u", "postgres", "--"] if runuser else None
        else:
            self.uid, self.gid = os.geteuid(), os.getegid()
            self.prefix = []

    def command(self, args: list[str]) -> list[str]:
        if self.prefix is None:  # no runuser: su takes one shell command line
            import shlex

            return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(args)]
        return [*self.prefix, *args]

    def give(self, path: Path) -> None:
        if self.as_root:
            os.chown(path, self.uid, self.gid)


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, cwd="/"
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited with {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result


_template_lock = threading.Lock()
_template: Path | None = None


def _template_cluster(owner: _Owner, bindir: Path) -> Path:
    """A freshly initdb'd data directory, made once per process and copied after."""
    global _template
    with _template_lock:
        if _template is None or not (_template / "data" / "PG_VERSION").exists():
            root = Path(tempfile.mkdtemp(prefix="memsvc-pg-template-"))
            owner.give(root)
            _run(
                owner.command(
                    [str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres",
                     "-A", "trust", "-E", "UTF8", "--locale=C", "-N", "--no-instructions"]
                ),
                timeout=120,
            )  # fmt: skip
            _template = root
            weakref.finalize(_template_lock, shutil.rmtree, root, True)
        return _template / "data"


def _pid_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (killed orphans are never
    reaped where PID 1 does not reap; they must count as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_cluster(data_dir: Path, known_pid: int | None) -> None:
    """SIGKILL the postmaster and all its processes; remove its stale lock file."""
    pids: set[int] = set()
    if known_pid:
        pids.add(known_pid)
    with contextlib.suppress(OSError, ValueError, IndexError):
        pids.add(int((data_dir / "postmaster.pid").read_text().splitlines()[0]))
    for pid in list(pids):
        if not _pid_alive(pid):
            continue
        # Stopped, the postmaster forks no new backend while its children are listed.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        pids.update(_descendants(pid))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_pid_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"PostgreSQL processes {sorted(pids)} survived SIGKILL")
        time.sleep(0.02)
    # A killed postmaster leaves its lock files; its pid may live on as a zombie,
    # which PostgreSQL would take for a running postmaster.
    for stale in [data_dir / "postmaster.pid", *data_dir.parent.glob(".s.PGSQL.*")]:
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def _cleanup(root: Path, data_dir: Path, pid_holder: list[int | None]) -> None:
    with contextlib.suppress(Exception):
        _kill_cluster(data_dir, pid_holder[0])
    shutil.rmtree(root, ignore_errors=True)


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own on 127.0.0.1:``port``.

    ``with PrivatePostgres() as pg:`` creates and starts it; ``pg.url`` is the
    ``postgres`` database as the ``postgres`` superuser (trust authentication).
    """

    def __init__(self, port: int | None = None, *, bindir: Path | None = None) -> None:
        self.port = port or free_port()
        self.bindir = bindir or postgres_bindir()
        self._owner = _Owner()
        self.root = Path(tempfile.mkdtemp(prefix="memsvc-pg-"))
        self.data_dir = self.root / "data"
        self.log_file = self.root / "postgres.log"
        # The postmaster's pid, shared with the finalizer (which must not hold self).
        self._pid: list[int | None] = [None]
        self._finalizer = weakref.finalize(self, _cleanup, self.root, self.data_dir, self._pid)
        self._owner.give(self.root)
        template = _template_cluster(self._owner, self.bindir)
        _run(["cp", "-a", str(template), str(self.data_dir)], timeout=60)
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(_SETTINGS.format(port=self.port, socket_dir=self.root))

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str, port: int | None = None) -> str:
        """The URL of ``database`` on this cluster, or through ``port`` (a proxy)."""
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._pid[0]

    @property
    def running(self) -> bool:
        return self._pid[0] is not None and _pid_alive(self._pid[0])

    def _pg_ctl(self, *args: str, timeout: float) -> None:
        _run(
            self._owner.command([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), *args]),
            timeout=timeout + 10,
        )

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait (at most ``timeout`` s) until it accepts connections."""
        self._pg_ctl("-l", str(self.log_file), "-w", "-t", str(int(timeout)), "start",
                     timeout=timeout)  # fmt: skip
        self._pid[0] = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """``pg_ctl stop`` in ``mode``: smart, fast (sessions are ended) or immediate
        (a crash: no shutdown checkpoint, WAL replayed at the next start)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        self._pg_ctl("-m", mode, "-w", "-t", str(int(timeout)), "stop", timeout=timeout)
        self._pid[0] = None

    def restart(self, mode: str = "fast", timeout: float = 30) -> None:
        self.stop(mode, timeout)
        self.start(timeout)

    def kill(self) -> None:
        """SIGKILL the postmaster and every process of the cluster, as a machine
        losing the process (not the disk) would; ``start()`` recovers from the WAL."""
        _kill_cluster(self.data_dir, self._pid[0])
        self._pid[0] = None

    def log(self) -> str:
        """The server log so far (for failure messages)."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        """Kill whatever runs and remove the directory."""
        self._finalizer()

    def __enter__(self) -> PrivatePostgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
