"""The embedded deployment's data directory: one serving process at a time, a
file that cannot be used stops start-up with a message (and an exit), another
process's write lock makes migrations wait, and the files are private."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from memsvc.config import Config, StartupError
from memsvc.server import Server
from memsvc.store.sqlite import SqliteDurableStore
from tests.conftest import REDIS_URL, need
from tests.helpers import migrated


@pytest.fixture
def embedded(tmp_path: Path) -> Config:
    return Config(
        listen="127.0.0.1:0", data_dir=str(tmp_path / "data"), health_listen="", metrics_listen=""
    )


async def test_a_second_server_on_a_served_data_dir_is_refused(embedded):
    """Two servers with their working memory in process on one database would each
    acknowledge writes into their own copy of a session: the second one refuses
    to start, naming the first; once the first stops, the directory is free."""
    async with Server(embedded):
        with pytest.raises(StartupError, match=f"another memsvc process \\(pid {os.getpid()}\\)"):
            await Server(embedded).start()
    async with Server(embedded):
        pass


async def test_servers_sharing_redis_working_memory_may_share_a_database(embedded):
    """With Redis, processes share the sessions' memory too: they may share the
    data directory, but not with a server whose memory is in process."""
    need(REDIS_URL)
    shared = replace(embedded, working_memory_url=REDIS_URL)
    async with Server(shared), Server(shared):
        with pytest.raises(StartupError, match="must be the only one"):
            await Server(embedded).start()
    async with Server(embedded):
        with pytest.raises(StartupError, match="must be the only one"):
            await Server(shared).start()


async def test_a_refusal_never_names_a_server_that_has_stopped(embedded):
    """Each server sharing the file writes its pid over the last one's: the last
    one clears it as it stops, so the refusal says it does not know the holder
    rather than name a process that has stopped."""
    need(REDIS_URL)
    shared = replace(embedded, working_memory_url=REDIS_URL)
    async with Server(shared):
        async with Server(shared):
            pass
        with pytest.raises(StartupError, match=r"another memsvc process \(pid unknown\)"):
            await Server(embedded).start()


def test_a_data_dir_memsvc_may_not_write_stops_start_up(tmp_path):
    """SQLite opens a file it may not write read-only, without a word: memsvc would
    serve, ready, and answer every write UNAVAILABLE. It refuses to start instead,
    naming the file, whether the database, a log file a crash left, or the
    directory is the one it may not write (root without CAP_DAC_OVERRIDE, so that
    file modes apply as to any other user)."""
    data = tmp_path / "data"
    started = subprocess.run(
        [sys.executable, "-m", "memsvc", "migrate", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    database = data / "memsvc.db"
    log = data / "memsvc.db-wal"
    log.touch(mode=0o600)
    for read_only, named in ((database, database), (log, log), (data, database)):
        read_only.chmod(0o500 if read_only.is_dir() else 0o400)
        ended = subprocess.run(
            [*_without_file_override(), sys.executable, "-m", "memsvc", "serve",
             "--listen", "127.0.0.1:0", "--data-dir", str(data),
             "--health-listen=", "--metrics-listen="],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        read_only.chmod(0o700 if read_only.is_dir() else 0o600)
        assert ended.returncode == 1, ended.stderr
        assert f"cannot open {named} for writing" in ended.stderr
        assert "Traceback" not in ended.stderr


def _without_file_override() -> list[str]:
    """A command prefix under which file modes bind this process (as root, one
    without the capabilities that override them)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, and setpriv (util-linux) is not installed")
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}"]


def test_a_file_that_is_not_a_database_stops_start_up_and_exits(tmp_path):
    """A corrupt database file is a start-up error that names it, and the process
    exits (a connection left open on aiosqlite's thread kept it alive for ever)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "memsvc.db").write_bytes(os.urandom(8192))
    ended = subprocess.run(
        [sys.executable, "-m", "memsvc", "serve", "--listen", "127.0.0.1:0",
         "--data-dir", str(data), "--health-listen=", "--metrics-listen="],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ended.returncode == 1, ended.stderr
    assert "is not a usable SQLite database" in ended.stderr
    assert str(data / "memsvc.db") in ended.stderr
    assert "Traceback" not in ended.stderr


async def test_migrations_wait_for_another_process_s_write_lock(tmp_path):
    """Another process holding SQLite's write lock past busy_timeout (5 s) makes
    migrations wait for it, not fail with 'database is locked'."""
    path = tmp_path / "memsvc.db"
    holder = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")  # as memsvc leaves every database
    holder.execute("BEGIN IMMEDIATE")
    released = threading.Timer(6.5, holder.rollback)
    released.start()
    try:
        async with migrated(SqliteDurableStore(f"sqlite:///{path}")) as store:
            assert await store.schema_version() == store.bundled_schema_version()
    finally:
        released.cancel()
        holder.close()


async def test_a_new_data_dir_and_its_files_are_private(embedded):
    """They hold every checkpoint and episode: readable by memsvc's user alone (the
    process umask left them readable by every local user)."""
    data = embedded.data_dir
    async with Server(embedded):
        assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
        files = ["memsvc.db", "memsvc.db-wal", "memsvc.db-shm"]
        assert {name: stat.S_IMODE(os.stat(f"{data}/{name}").st_mode) for name in files} == {
            name: 0o600 for name in files
        }


async def test_a_schema_ahead_of_this_memsvc_is_served_with_a_warning(embedded, caplog):
    """A rollback to an older memsvc: served (migrations keep compatibility with the
    release before them), and said in the log."""
    async with Server(embedded):
        pass
    with sqlite3.connect(Path(embedded.data_dir) / "memsvc.db") as db:
        db.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'later', 'x')"
        )
    async with Server(embedded):
        pass
    assert "the database's schema is at version 999, ahead of this memsvc's" in caplog.text
