"""The durable store in a SQLite file: the embedded default.

One writing connection and READERS reading ones, in WAL mode with
``synchronous=FULL`` so that a committed transaction survives a crash or power
loss. Migrations run under
``BEGIN IMMEDIATE``, which takes SQLite's write lock, so two processes sharing
the file never apply the same migration twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import shutil
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import aiosqlite

from memsvc._json_match import json_equal, json_holds
from memsvc.config import StartupError
from memsvc.domain import BackendUnavailable
from memsvc.domain._durable import DurableTransaction
from memsvc.domain._episodes import search_words
from memsvc.domain._watch import StoredEvent, Wakeup
from memsvc.store._episodes_sql import SQLITE_SEARCH_WORDS, SQLITE_TEXT_RANK, text_rank
from memsvc.store._graph_sql import SQLITE_JSON_EQUAL, SQLITE_JSON_HOLDS
from memsvc.store._lifecycle_sql import (
    SQLITE,
    never_wakes,
)
from memsvc.store._migrations import check_applied, load_migrations, split_sql
from memsvc.store._observe import BackendObserver, ignore, observed
from memsvc.store._sql import SqlDurableReads, SqlTransaction

log = logging.getLogger(__name__)

T = TypeVar("T")

# Connections for reads outside transactions (each about 2 MB of page cache at most).
READERS = 4
_BUSY_TIMEOUT_MS = 5000
# How long the checkpoint after a purge waits for reads in progress.
_CHECKPOINT_WAIT_MS = 200

_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)
"""


def sqlite_path(url: str) -> Path:
    """The file named by ``sqlite:///absolute/path.db`` or ``sqlite://relative.db``."""
    if not url.startswith("sqlite://") or len(url) == len("sqlite://"):
        raise ValueError(f"not a SQLite URL (expected sqlite:///path/to/file.db): {url!r}")
    return Path(url.removeprefix("sqlite://"))


class SqliteDurableStore(SqlDurableReads):
    """Durable data in one SQLite file."""

    backend_name = "durable store (SQLite)"

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url)
        self._db: aiosqlite.Connection | None = None
        # Connections for reads outside transactions (on the writer's they would see
        # a transaction's uncommitted rows), READERS of them: each runs its reads on
        # a thread of its own, so a long one (a full-text search ranking thousands of
        # episodes) does not hold up GetSession or a watcher's catch-up behind it.
        self._readers: list[aiosqlite.Connection] = []
        self._idle_readers = _Lender[aiosqlite.Connection]()
        # Readers of cancelled reads, on their way back (see _query).
        self._returning: set[asyncio.Future[None]] = set()
        self._write_lock = asyncio.Lock()
        # Told the events of each committed transaction (the event hub listens).
        self.events_committed: Callable[[list[StoredEvent]], None] = lambda events: None
        # Told each operation's time and outcome (the server's metrics).
        self.observe: BackendObserver = ignore
        # The lock file's descriptor while this process serves the file (claim).
        self._claim: int | None = None
        # The database file opened (device, inode): see _check_file.
        self._opened: tuple[int, int] | None = None
        # Set once a statement found the file corrupt.
        self._corrupt: UnusableDatabaseFile | None = None
        # What the last probe found at the path (None: the file opened).
        self._moved: UnusableDatabaseFile | None = None

    async def open(self) -> None:
        _make_private(self.path)
        _check_writable(self.path)
        if _empty_file(self.path):
            # SQLite takes an empty file for a new database: say so, in case it held
            # data once (a restore that failed, a truncated copy) (a review).
            log.warning(
                "%s is an empty file: memsvc starts a new, empty store in it; if it"
                " held data, stop memsvc and restore the file from a backup",
                self.path,
            )
        try:
            self._db = await self._connect()
            self._opened = _identity(self.path)
            for _ in range(READERS):
                reader = await self._connect()
                self._readers.append(reader)
                self._idle_readers.give_back(reader)
        except BaseException as error:
            # The ones already open, closed: each holds a thread that is not a daemon.
            await self.aclose()
            if isinstance(error, aiosqlite.Error):
                raise _open_error(self.path, error) from error
            raise

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        # Closed on any failure: aiosqlite runs each connection on a thread that is
        # not a daemon, so one left open keeps the process from ever exiting.
        try:
            await self._set_up(db)
        except BaseException:
            await db.close()
            raise
        return db

    async def _set_up(self, db: aiosqlite.Connection) -> None:
        # WAL lets reads run beside the writer; in the rollback journal a reader
        # makes COMMIT fail, and SQLite falls back to it where WAL cannot work (a
        # network filesystem) without an error: said here, not met later.
        (mode,) = next(iter(await db.execute_fetchall("PRAGMA journal_mode=WAL")))
        if str(mode).lower() != "wal":
            raise StartupError(
                f"SQLite cannot use WAL mode for {self.path} (it uses {mode!r}); put the "
                "data directory on a local filesystem"
            )
        for pragma in (
            "PRAGMA synchronous=FULL",
            f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}",
            # The log file is cut back to nothing each time it restarts, not left at
            # its largest with old pages past the new end (a purge's deleted text).
            "PRAGMA journal_size_limit=0",
            "PRAGMA foreign_keys=ON",
            # Deleted content is overwritten, not left in free pages: what a purge
            # forgets must not stay readable in the file (some builds default to it).
            "PRAGMA secure_delete=ON",
        ):
            await db.execute(pragma)
        await db.create_function(SQLITE_JSON_HOLDS, 2, json_holds, deterministic=True)
        await db.create_function(SQLITE_JSON_EQUAL, 2, json_equal, deterministic=True)
        await db.create_function(SQLITE_TEXT_RANK, 7, text_rank, deterministic=True)
        await db.create_function(SQLITE_SEARCH_WORDS, 1, _search_words, deterministic=True)

    def claim(self, alone: bool) -> None:
        """Hold this database for serving until :meth:`aclose`: ``alone`` for this
        process only, else with other processes that do not claim it alone
        (StartupError when the claim cannot be had).

        A server whose working memory lives in its own process must be alone: two
        servers on one file share every session's truth (its state, its epoch), and
        one with its own copy of the memory would acknowledge writes into a copy the
        other never sees. Servers that share a Redis share the memory too.
        """
        # Beside the file itself: a symbolic link to the database is the same
        # database, and must not be a second lock (a review).
        real = Path(os.path.realpath(self.path))
        lock_path = real.with_name(real.name + ".lock")
        try:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise _not_writable(lock_path, error) from error
        try:
            try:
                fcntl.flock(descriptor, (fcntl.LOCK_EX if alone else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
                # Either side may be the one with its memory in process (a review:
                # the message described only the other process).
                why = (
                    "this one keeps its working memory in process"
                    if alone
                    else "that one keeps its working memory in process"
                )
                raise StartupError(
                    f"another memsvc process (pid {holder or 'unknown'}) serves {self.path},"
                    f" and {why}: a server with its working memory in process must be the"
                    " only one on its data directory: run one process per data directory, or"
                    " give them all a shared working memory (--working-memory-url redis://...)"
                ) from None
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(descriptor)
            raise
        self._claim = descriptor

    async def aclose(self) -> None:
        self._idle_readers.close()  # reads waiting for a reader end now
        for returning in list(self._returning):
            returning.cancel()
        for db in (self._db, *self._readers):
            if db is not None:
                await db.close()
        self._db, self._readers = None, []
        self._idle_readers = _Lender()
        if self._claim is not None:
            # The lock file names the last process to claim it: that process clears it
            # as it lets go, so that no refusal names a process that has stopped
            # (servers sharing the file each wrote their pid over the last one's).
            with contextlib.suppress(OSError):
                if os.pread(self._claim, 32, 0).decode(errors="replace").strip() == str(
                    os.getpid()
                ):
                    os.ftruncate(self._claim, 0)
            os.close(self._claim)  # and with it the lock
            self._claim = None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[DurableTransaction]:
        """One write transaction at a time per process (SQLite has one writer)."""
        with observed(self.observe, "transaction", self.backend_name):
            async with self._transaction() as tx:
                yield tx
        appended = await tx.committed()
        if appended:
            self.events_committed(appended)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[SqlTransaction]:
        self._refuse_if_not_ours()
        async with self._write_lock:
            db = self._conn
            begin = asyncio.ensure_future(db.execute("BEGIN IMMEDIATE"))
            try:
                await asyncio.shield(begin)
            except asyncio.CancelledError:
                # aiosqlite runs the statement whether or not anyone still awaits it
                # (it may wait up to busy_timeout for another process's lock): end
                # the transaction it opens, or every later BEGIN finds one open.
                # Another cancellation meanwhile must not cut that short either.
                ending = asyncio.ensure_future(_rollback_once_begun(db, begin))
                while not ending.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(ending)
                raise
            except aiosqlite.OperationalError as error:  # locked by another process too long
                raise BackendUnavailable(self.backend_name, error) from error
            tx = SqlTransaction(db, SQLITE)
            with self._conditions_unavailable():
                try:
                    yield tx
                    await db.execute("COMMIT")
                except BaseException:
                    # A failed block, or a COMMIT that failed: that may leave the
                    # transaction open (SQLITE_BUSY), and the next caller's BEGIN would
                    # fail, or a later COMMIT make these writes durable with its own.
                    await _rollback(db)
                    raise

    async def _query(self, read: Callable[..., Awaitable[T]], *args: Any) -> T:
        if not self._readers:
            raise RuntimeError("SqliteDurableStore used before open()")
        observing = observed(self.observe, read.__name__, self.backend_name)
        with observing, self._conditions_unavailable():
            reader = await self._idle_readers.borrow()
            abandoned = False
            try:
                return await read(_WholeReads(reader), SQLITE, *args)
            except asyncio.CancelledError:
                # aiosqlite runs a statement to its end whoever still awaits it: stop
                # it, and lend the reader again once its thread is free, or the next
                # read would queue behind the abandoned one on a reader lent as idle.
                abandoned = True
                await reader.interrupt()
                returning = asyncio.ensure_future(self._give_back_when_free(reader))
                self._returning.add(returning)
                returning.add_done_callback(self._returning.discard)
                raise
            finally:
                if not abandoned:
                    self._idle_readers.give_back(reader)

    async def _give_back_when_free(self, reader: aiosqlite.Connection) -> None:
        """Lend ``reader`` again once the statements queued on it have run."""
        try:
            with contextlib.suppress(aiosqlite.Error, ValueError):  # interrupted; closed
                await reader.execute_fetchall("SELECT 1")  # runs after them
        finally:
            self._idle_readers.give_back(reader)

    @contextlib.asynccontextmanager
    async def event_wakeups(self) -> AsyncIterator[AsyncIterator[Wakeup]]:
        """SQLite has no cross-process channel: the hub polls, and this process's
        own commits wake it directly."""
        yield never_wakes()

    @property
    def readers(self) -> int:
        """Reads that can run at once (outside the write transaction)."""
        return READERS

    async def erase_deleted(self) -> None:
        """After a purge: copy the write-ahead log into the database and empty it (it
        holds the pages the purge changed as they were before). Best effort: the
        checkpoint waits at most ``_CHECKPOINT_WAIT_MS`` for the reads in progress;
        when one is still going, the log is emptied at its next restart
        (journal_size_limit 0)."""
        try:
            async with self._write_lock:
                busy = await self._checkpoint()
        except aiosqlite.Error as error:
            log.warning("after a purge, emptying the write-ahead log failed: %s", error)
            return
        if busy:
            log.info(
                "after a purge, a read in progress kept the write-ahead log: emptied at "
                "its next restart"
            )

    async def _checkpoint(self) -> bool:
        """``wal_checkpoint(TRUNCATE)``, waiting briefly for readers; True if one
        kept it from completing (the caller holds the write lock)."""
        db = self._conn
        await db.execute(f"PRAGMA busy_timeout={_CHECKPOINT_WAIT_MS}")
        try:
            rows = await db.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            await db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        return bool(next(iter(rows))[0])

    async def ping(self) -> None:
        with observed(self.observe, "ping", self.backend_name):
            await self._check_file()
            try:
                await self._conn.execute("SELECT 1")
            except aiosqlite.Error as error:
                raise BackendUnavailable(self.backend_name, error) from error

    @contextlib.contextmanager
    def _conditions_unavailable(self) -> Iterator[None]:
        """Raise BackendUnavailable for an error that is a condition of the database
        (UNAVAILABLE), and any other error as it is. A corrupt file is one too, for
        good: readiness turns NOT_SERVING until it is restored (a review: calls
        failed INTERNAL with a traceback, SERVING)."""
        try:
            yield
        except sqlite3.DatabaseError as error:
            code = getattr(error, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in _CORRUPT_CODES:
                if self._corrupt is None:
                    self._corrupt = UnusableDatabaseFile(
                        f"{self.path} is corrupt ({error}): stop memsvc and restore it from"
                        " a backup, or move it away to start with an empty one"
                    )
                    log.error("%s", self._corrupt)
                raise BackendUnavailable(self.backend_name, self._corrupt) from error
            if (
                isinstance(error, sqlite3.OperationalError)
                and code is not None
                and code & 0xFF in _UNAVAILABLE_CODES
            ):
                raise BackendUnavailable(self.backend_name, error) from error
            raise

    async def _check_file(self) -> None:
        """The probe's look at the path (a stat, on a thread: a slow file system
        must not stall the event loop): is the database file there still the one
        open? Deleted (with its data directory) or moved away while memsvc runs,
        SQLite would write on into the open file, which no path names any more, and
        lose every write acknowledged from then on when the process stops; and with
        the lock file gone, a second server would start on the path (a review).
        Until the file is back, readiness is NOT_SERVING and writes UNAVAILABLE.
        (A file copied over in place keeps its inode: not seen.)"""
        if self._opened is None:
            return
        try:
            found = await asyncio.to_thread(_identity, self.path)
        except OSError as error:  # not an answer about the file: say it, keep none
            raise BackendUnavailable(self.backend_name, error) from error
        if found == self._opened:
            self._moved = None
        elif self._moved is None:
            self._moved = UnusableDatabaseFile(
                f"{self.path} was deleted or moved away while memsvc ran: restart memsvc,"
                " which opens the file found at that path (or put the data directory back)"
            )
            log.error("%s", self._moved)
        self._refuse_if_not_ours()

    def _refuse_if_not_ours(self) -> None:
        """BackendUnavailable while the file is known corrupt, or the probe found
        another file (or none) at the path."""
        problem = self._corrupt or self._moved
        if problem is not None:
            raise BackendUnavailable(self.backend_name, problem)

    async def migrate(self) -> list[int]:
        async with self._write_lock:
            return await self._migrate()

    async def _migrate(self) -> list[int]:
        applied_now = []
        db = self._conn
        for migration in load_migrations("memsvc.store.sqlite"):
            await _begin_waiting(db, self.path)
            try:
                await db.execute(_SCHEMA_TABLE)
                async with db.execute(
                    "SELECT checksum FROM schema_migrations WHERE version = ?", (migration.version,)
                ) as cursor:
                    row = await cursor.fetchone()
                if row is not None:
                    check_applied(migration, row[0])
                    await db.execute("ROLLBACK")
                    continue
                for statement in split_sql(migration.sql):
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (?, ?, ?)",
                    (migration.version, migration.name, migration.checksum),
                )
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            log.info("applied migration %04d_%s", migration.version, migration.name)
            applied_now.append(migration.version)
        return applied_now

    def bundled_schema_version(self) -> int:
        return load_migrations("memsvc.store.sqlite")[-1].version

    async def schema_version(self) -> int:
        await self._conn.execute(_SCHEMA_TABLE)
        async with self._conn.execute(
            "SELECT coalesce(max(version), 0) FROM schema_migrations"
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("SqliteDurableStore used before open()")
        return self._db


def _search_words(text: str | None) -> str | None:
    """The SQL function memsvc_search_words: what the FTS5 triggers index."""
    return None if text is None else search_words(text)


def _make_private(path: Path) -> None:
    """Make the data directory (0700) and the database file (0600) when absent: they
    hold every checkpoint and episode, and SQLite gives its WAL and shared-memory
    files the database file's mode. Existing ones keep the mode they have."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        raise _not_writable(path, error) from error


def _check_writable(path: Path) -> None:
    """StartupError unless this process may write the database and the log files a
    crash left beside it. SQLite opens a file it may not write read-only, without a
    word: memsvc would start, report itself ready, and answer every write with
    UNAVAILABLE, which no retry clears. Opened for writing as SQLite would, so the
    kernel decides (file modes, capabilities, a read-only mount)."""
    for file in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm"))):
        try:
            os.close(os.open(file, os.O_RDWR))
        except FileNotFoundError:
            continue  # no log files: SQLite makes them, as the directory allows
        except OSError as error:
            raise _not_writable(file, error) from error


def _empty_file(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def _not_writable(path: Path, cause: BaseException) -> StartupError:
    return StartupError(
        f"cannot open {path} for writing ({cause}): memsvc needs to read and write its "
        "data directory and the files in it"
    )


class UnusableDatabaseFile(Exception):
    """The database file memsvc opened is no longer at its path, or is corrupt:
    until it is back (or restored), durable calls are UNAVAILABLE."""


def _identity(path: Path) -> tuple[int, int] | None:
    """The (device, inode) of the file at ``path``; None when there is none (its
    directory gone, or become a file). Other errors (EIO, ESTALE...) raise."""
    try:
        found = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return found.st_dev, found.st_ino


def _open_error(path: Path, error: aiosqlite.Error) -> Exception:
    """What opening ``path`` failed with: a StartupError that says what to fix when
    waiting will not fix it; else BackendUnavailable."""
    name = getattr(error, "sqlite_errorname", "")
    if name.startswith(("SQLITE_FULL", "SQLITE_IOERR")) and _no_room(path.parent):
        # SQLite names a full disk at open an I/O error (it cannot size the shared
        # memory file, SQLITE_IOERR_SHMSIZE): say what it is (a review).
        return StartupError(
            f"no space left on the device of {path.parent} ({error}): free some, or give"
            " memsvc a larger volume; it needs room for its database and write-ahead log"
        )
    if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
        return StartupError(
            f"{path} is not a usable SQLite database ({error}): restore it from a backup, "
            "or move it away to start with an empty one"
        )
    if name.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM")):
        return _not_writable(path, error)
    return BackendUnavailable(SqliteDurableStore.backend_name, error)


def _no_room(directory: Path) -> bool:
    """Whether the file system of ``directory`` has less than a page or two free."""
    try:
        return shutil.disk_usage(directory).free < 64 * 1024
    except OSError:
        return False


async def _begin_waiting(db: aiosqlite.Connection, path: Path) -> None:
    """BEGIN IMMEDIATE, for as long as another process holds the write lock (its
    migrations take as long as they take; each try waits busy_timeout)."""
    while True:
        try:
            await db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as error:
            if getattr(error, "sqlite_errorname", "") not in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                raise
            log.warning("waiting for another process's write lock on %s to migrate", path)


class _Lender(Generic[T]):
    """Lends idle items first come, first served. (asyncio.Queue is not fair: a
    task that puts an item back and asks again at once takes it before the waiter
    it woke, and a few busy readers starved every other read.)"""

    def __init__(self) -> None:
        self._idle: list[T] = []
        self._waiting: collections.deque[asyncio.Future[T]] = collections.deque()
        self._closed = False

    async def borrow(self) -> T:
        if self._closed:
            raise RuntimeError("the store was closed")
        if self._idle and not self._waiting:
            return self._idle.pop()
        lent: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.append(lent)
        try:
            return await lent
        except asyncio.CancelledError:
            if lent.done() and not lent.cancelled():
                self.give_back(lent.result())  # lent just as the borrower was cancelled
            raise

    def close(self) -> None:
        """Lend nothing more: waiting borrowers fail, items given back are dropped."""
        self._closed = True
        self._idle.clear()
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(RuntimeError("the store was closed"))

    def give_back(self, item: T) -> None:
        """Return ``item``: to the longest waiting borrower, if any."""
        if self._closed:
            return
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(item)
                return
        self._idle.append(item)


class _WholeReads:
    """A reader connection as the shared reads use it (execute, then fetch),
    each statement run to its end in one aiosqlite job.

    A statement left unfinished pins its connection's read snapshot, and every
    statement started on that connection meanwhile reads that snapshot too. Reads
    interleaved on one reader (an execute, another read's execute, then the first
    one's fetch) would see the database as it was before commits that were
    already answered: a watcher's catch-up would skip an event, the tail would
    take the log for rewound, GetSession would show the state before a Pause.
    """

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> _Rows:
        return _Rows(await self._conn.execute_fetchall(sql, params))


class _Rows:
    """A finished statement's rows, fetched as from a cursor."""

    def __init__(self, rows: Iterable[Any]) -> None:
        self._rows = iter(rows)

    async def fetchone(self) -> Any:
        return next(self._rows, None)

    async def fetchall(self) -> list[Any]:
        return list(self._rows)


# SQLite's primary result codes of a condition to wait out or fix: locked by
# another process (past busy_timeout), a read-only or full disk, an I/O error, a
# file that cannot be opened (out of memory is Python's MemoryError). Others
# (SQLITE_ERROR: a statement SQLite cannot run, such as one with too many
# variables) are not the backend's state: retrying them would fail the same way.
_UNAVAILABLE_CODES = frozenset({
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL,
})  # fmt: skip
# A file whose pages SQLite cannot read: waiting fixes nothing, a backup does.
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


async def _rollback(db: aiosqlite.Connection) -> None:
    """End the open transaction, if one is still open: SQLite rolls back by
    itself a transaction that met a full disk or an I/O error, and a ROLLBACK
    then fails, which must not hide that error."""
    if db.in_transaction:
        try:
            await db.execute("ROLLBACK")
        except sqlite3.OperationalError:
            if db.in_transaction:
                raise


async def _rollback_once_begun(db: aiosqlite.Connection, begin: asyncio.Future[Any]) -> None:
    """End the transaction ``begin`` opens, if it opens one."""
    with contextlib.suppress(aiosqlite.Error):
        await begin
        await db.execute("ROLLBACK")
