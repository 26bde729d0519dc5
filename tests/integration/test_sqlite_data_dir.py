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
from typing import Any

import pytest

from memsvc.config import Config, StartupError
from memsvc.server import Server
from memsvc.store.sqlite import SqliteDurableStore
from tests.conftest import REDIS_URL, need
from tests.helpers import local_server_config, migrated


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
        with pytest.raises(StartupError, match="this one keeps its working memory in process"):
            await Server(embedded).start()
    async with Server(embedded):
        # Found by a review: the refusal described the refused process, wrongly.
        with pytest.raises(StartupError, match="that one keeps its working memory in process"):
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


async def test_a_data_dir_deleted_while_serving_stops_writes_and_readiness(tmp_path):
    """Found by a review: after `rm -rf` of the data directory memsvc went on
    acknowledging Spawns into a file that no path named any more (all lost when it
    stopped), SERVING, and a second server could start on the path. Now the store
    finds its file gone: readiness NOT_SERVING, writes UNAVAILABLE."""
    import uuid

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from memsvc.v1 import lifecycle_pb2 as lc
    from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
    from tests.helpers import eventually, expect_error

    data = tmp_path / "data"
    config = local_server_config(data, health_interval_seconds=0.1)
    ids: dict[str, Any] = {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
    }
    async with (
        Server(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        life = LifecycleServiceStub(channel)
        await life.Spawn(lc.SpawnRequest(**ids, session_id="before"))
        shutil.rmtree(data)

        async def not_serving() -> bool:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="")
            )
            return bool(reply.status == health_pb2.HealthCheckResponse.NOT_SERVING)

        # Found by the health probe (a stat off the event loop), within its interval.
        await eventually(not_serving)
        error = await expect_error(
            life.Spawn(lc.SpawnRequest(**ids, session_id="after"), timeout=10),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert "was deleted or moved away" in error.message
        # The directory replaced by a file is the same finding, not an INTERNAL error
        # (a review of the fix).
        data.write_text("")
        await expect_error(
            life.Spawn(lc.SpawnRequest(**ids, session_id="later"), timeout=10),
            grpc.StatusCode.UNAVAILABLE,
        )
        data.unlink()


async def test_a_link_to_a_served_database_is_the_same_database(tmp_path):
    """Found by a review: the lock file was named after the path given, so a server
    given a symbolic link to another's database started beside it."""
    served = SqliteDurableStore(f"sqlite://{tmp_path / 'a' / 'memsvc.db'}")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    await served.open()
    try:
        served.claim(alone=True)
        (tmp_path / "b" / "memsvc.db").symlink_to(tmp_path / "a" / "memsvc.db")
        linked = SqliteDurableStore(f"sqlite://{tmp_path / 'b' / 'memsvc.db'}")
        await linked.open()
        try:
            with pytest.raises(StartupError, match="another memsvc process"):
                linked.claim(alone=True)
        finally:
            await linked.aclose()
    finally:
        await served.aclose()


def test_a_full_disk_at_start_says_so(tmp_path, monkeypatch):
    """Found by a review: a restart on a full volume said "disk I/O error; retry
    later" (SQLite cannot size its shared-memory file, SQLITE_IOERR_SHMSIZE)."""
    from memsvc.store.sqlite import _store

    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorname = "SQLITE_IOERR_SHMSIZE"
    monkeypatch.setattr(_store, "_no_room", lambda directory: directory == tmp_path)
    said = _store._open_error(tmp_path / "memsvc.db", error)
    assert isinstance(said, StartupError)
    assert f"no space left on the device of {tmp_path}" in str(said)
    monkeypatch.setattr(_store, "_no_room", lambda directory: False)
    assert not isinstance(_store._open_error(tmp_path / "memsvc.db", error), StartupError)


async def test_a_database_corrupt_past_its_first_pages_turns_unavailable(tmp_path):
    """Found by a review: a file corrupt in its middle opened and served, and every
    call that read a bad page failed INTERNAL with a traceback, SERVING. It is now
    UNAVAILABLE, saying to restore the file, and readiness turns off."""
    import uuid

    from memsvc.domain import BackendUnavailable, SessionRef
    from memsvc.domain._lifecycle_records import SessionRecord, SessionState

    path = tmp_path / "memsvc.db"
    project = str(uuid.uuid4())
    async with (
        migrated(SqliteDurableStore(f"sqlite://{path}")) as store,
        store.transaction() as tx,
    ):
        for i in range(3000):
            ref = SessionRef(project, str(uuid.uuid4()), f"s{i}")
            record = SessionRecord(
                ref, None, SessionState.ACTIVE, {"pad": "x" * 200}, 1, "e", None, i, i
            )
            await tx.insert_session(record)
    # Pages in the middle, the header intact.
    descriptor = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(descriptor, os.urandom(20 * 4096), path.stat().st_size // 2)
    finally:
        os.close(descriptor)
    broken = SqliteDurableStore(f"sqlite://{path}")
    await broken.open()
    try:
        with pytest.raises(BackendUnavailable, match="is corrupt") as refused:
            before = None
            for _ in range(100):
                page, _ = await broken.list_sessions(project, None, None, before, 100, 1 << 22)
                last = page[-1]
                before = (last.create_ms, last.ref.agent_instance_id, last.ref.session_id)
        assert "restore it from a backup" in str(refused.value)
        with pytest.raises(BackendUnavailable, match="is corrupt"):
            await broken.ping()
    finally:
        await broken.aclose()


async def test_an_empty_database_file_starts_with_a_warning(tmp_path, caplog):
    """Found by a review: a zero-byte file (a restore that failed) started silently
    as a new, empty store."""
    path = tmp_path / "memsvc.db"
    path.write_bytes(b"")
    store = SqliteDurableStore(f"sqlite://{path}")
    with caplog.at_level("WARNING", logger="memsvc.store.sqlite._store"):
        await store.open()
    await store.aclose()
    assert "is an empty file: memsvc starts a new, empty store" in caplog.text
    caplog.clear()
    async with migrated(SqliteDurableStore(f"sqlite://{path}")):
        pass
    with caplog.at_level("WARNING", logger="memsvc.store.sqlite._store"):
        async with migrated(SqliteDurableStore(f"sqlite://{path}")):
            pass
    assert "empty file" not in caplog.text


async def test_a_lock_file_memsvc_cannot_open_says_what_to_fix(tmp_path):
    """Found by a review: a bare "[Errno 13] Permission denied: '...memsvc.db.lock'".
    (A directory in its place stands for any file memsvc may not open, as root.)"""
    path = tmp_path / "memsvc.db"
    (tmp_path / "memsvc.db.lock").mkdir()
    async with migrated(SqliteDurableStore(f"sqlite://{path}")) as store:
        with pytest.raises(StartupError, match="memsvc needs to read and write its data dir"):
            store.claim(alone=True)
