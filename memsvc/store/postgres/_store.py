"""The durable store in PostgreSQL, through a small psycopg 3 connection pool.

Connections run in autocommit. Statements run often are prepared (named, after
their 5th run on a connection), which spares PostgreSQL parsing and planning them
each time; ``prepared_statements=False`` keeps every statement unnamed, so no state
lives on a pooled connection, for a transaction pooler that does not track
prepared statements (PgBouncer before 1.22).
Migrations take a transaction-scoped advisory lock, so a thousand sidecars
starting at once apply each migration exactly once, and the lock cannot leak
when a process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import pq

from memsvc.domain import BackendUnavailable, InvalidArgument
from memsvc.domain._durable import DurableTransaction
from memsvc.domain._watch import StoredEvent, Wakeup
from memsvc.store._lifecycle_sql import (
    EVENT_CHANNEL,
    POSTGRES,
    never_wakes,
    read_notice,
)
from memsvc.store._migrations import Migration, check_applied, load_migrations
from memsvc.store._observe import BackendObserver, ignore, observed
from memsvc.store._retry import with_retries
from memsvc.store._sql import SqlDurableReads, SqlTransaction
from memsvc.store.postgres._pipeline_exit import end_pipelines_with_their_sync

log = logging.getLogger(__name__)

end_pipelines_with_their_sync()  # behind a transaction pooler too (_pipeline_exit)

T = TypeVar("T")

# Reconnecting a lost LISTEN connection: the first wait and the longest.
_LISTEN_BACKOFF_SECONDS = (0.5, 30.0)
# Every this many seconds the LISTEN connection is asked a question, which it must
# answer within the second figure: one that went half-open (a failover behind the
# same address, a NAT or firewall forgetting it) never raises, and would otherwise
# leave the tail polling until the process restarts. (Notifications that arrive
# meanwhile wait in psycopg's backlog.)
_LISTEN_QUIET_SECONDS = (30.0, 10.0)

# How long closing the store waits for the pool's workers (one may be connecting).
POOL_CLOSE_SECONDS = 1.0

# pg_advisory_xact_lock key for migrations: "memsvc" in ASCII.
MIGRATION_LOCK_KEY = 0x6D656D737663
# How long a migration waits for a lock on the tables it changes before it rolls
# back and tries again, and the waits between its tries (growing). While a DDL
# statement waits for its lock (behind a backup, a long report, a replica cut off
# mid-call), PostgreSQL queues every later query on the table behind it: every
# replica's calls on it would stall for as long as the blocker lasts.
MIGRATION_LOCK_WAIT_SECONDS = 2.0
MIGRATION_RETRY_SECONDS = (1.0, 15.0)


# Conditions of the database, after which the same call may succeed: UNAVAILABLE
# once any retries run out, never INTERNAL. ReadOnlySqlTransaction (25006): the
# address leads to a database that cannot take writes now (a standby, or the old
# primary after a failover; or default_transaction_read_only). Nothing of the
# refused transaction was written, so a retry cannot apply it twice.
class StalePlans(Exception):
    """PostgreSQL refused a statement this process prepared: a migration of a
    newer memsvc changed the type of a column it returns (``cached plan must not
    change result type``, as when 0011 gave the ids COLLATE "C"). The statement
    failed, so nothing of its transaction was written; the pool's connections are
    replaced (each keeps its prepared statements for its life, an hour), and the
    same statement on a new connection succeeds. A rolling update stays possible."""


# "prepared statement ... does not exist" or "... already exists": a connection's
# record of what it prepared is out of step with the server (a pipeline cut short
# by a cancellation; or a transaction pooler that hands the server connection to
# other clients). The statement failed; the connection is closed, not reused.
_STATEMENTS_OUT_OF_STEP: tuple[type[psycopg.Error], ...] = (
    psycopg.errors.InvalidSqlStatementName,
    psycopg.errors.DuplicatePreparedStatement,
)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
    psycopg.errors.ReadOnlySqlTransaction,
    StalePlans,
    *_STATEMENTS_OUT_OF_STEP,
)


def _stale_plans(error: BaseException) -> bool:
    """Whether ``error`` is PostgreSQL refusing a prepared statement whose result
    changed type (told by the function that raised it: its message is localized)."""
    return (
        isinstance(error, psycopg.errors.FeatureNotSupported)
        and error.diag.source_function == "RevalidateCachedQuery"
    )


def _raise_if_past_a_limit(error: BaseException) -> None:
    """Raise what a statement past one of PostgreSQL's limits tells the caller:
    SQLSTATE class 54 (an index row or a tsvector too large, a statement too
    complex, too many columns or arguments; only 54000 is ProgramLimitExceeded).

    psycopg files class 54 under OperationalError, which memsvc retries and
    reports as UNAVAILABLE; but the same request fails the same way every time,
    so it is the request to change: INVALID_ARGUMENT, never "retry later".
    """
    if not isinstance(error, psycopg.OperationalError):
        return
    if not (error.sqlstate or "").startswith("54"):
        return
    detail = error.diag.message_primary or str(error)
    raise InvalidArgument.single(
        "request", f"is beyond a limit of the database ({detail}); make its longest values shorter"
    ) from error


_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@contextlib.asynccontextmanager
async def _pipelined_transaction(
    conn: psycopg.AsyncConnection[Any],
) -> AsyncIterator[SqlTransaction]:
    """A transaction in psycopg's pipeline mode (POSTGRES.pipelined): every
    statement whose result is not read at once travels with the next one read,
    the last ones with the pipeline's final Sync.

    Neither BEGIN nor COMMIT: in the extended query protocol the statements up to
    a Sync run as one transaction (an implicit block), which the Sync commits,
    and psycopg sends a Sync only when the pipeline ends (a read sends a Flush).
    That is two statements fewer per transaction, and psycopg's cost is per
    statement. (psycopg's ``conn.transaction()`` would add three round trips.)

    The price is on the way out of a failed block: the Sync would commit what ran
    so far. :func:`_abandon` rolls it back first.
    """
    async with conn.pipeline():
        tx = SqlTransaction(conn, POSTGRES)
        try:
            yield tx
            await tx.send_waiting_writes()
        except BaseException as error:
            await _abandon(conn, error)
            raise


async def _abandon(conn: psycopg.AsyncConnection[Any], error: BaseException) -> None:
    """Make sure the pipeline's coming Sync commits nothing of a failed block."""
    if isinstance(error, asyncio.CancelledError):
        # Cut short mid-pipeline: what psycopg sent and read may be out of step,
        # its record of prepared statements among it (the next call on it failed
        # with "prepared statement does not exist"). Closed, PostgreSQL rolls back
        # and the pool replaces it.
        await conn.close()
        return
    failed = isinstance(error, psycopg.Error) and error.sqlstate
    if failed or conn.closed or conn.pgconn.pipeline_status == pq.PipelineStatus.ABORTED:
        # PostgreSQL failed a statement (psycopg may have read the failure itself,
        # cancelling a statement for a cancelled task): it skips to the Sync,
        # which rolls back. Or the connection is gone, and PostgreSQL rolls back.
        return
    try:
        # BEGIN turns the implicit block into an explicit one, with what ran so
        # far, and ROLLBACK ends it (a bare ROLLBACK would too, but PostgreSQL
        # logs a warning for it).
        await conn.execute("BEGIN")
        await conn.execute("ROLLBACK")
    except Exception:
        # Unknown state (a lost connection): close it before any Sync is sent,
        # and PostgreSQL rolls back. The pool replaces it. The caller raises
        # ``error``, which says what happened (a refusal, a replayed answer).
        await conn.close()
    except BaseException:
        await conn.close()  # cancelled again meanwhile: the same, and cancelled
        raise


async def _answers_within(conn: psycopg.AsyncConnection[Any], seconds: float) -> None:
    """Ask ``conn`` a question; TimeoutError, with the connection closed, when no
    answer comes within ``seconds`` (see _cut_off_if_cancelled)."""
    try:
        async with asyncio.timeout(seconds):
            await _cut_off_if_cancelled(conn, conn.execute("SELECT 1"))
    except TimeoutError:
        raise TimeoutError(f"no answer within {seconds:g} s") from None


async def _read_only_state(conn: psycopg.AsyncConnection[Any]) -> tuple[bool, bool]:
    """Whether the database is a standby (in recovery), and whether this session's
    transactions are read-only (a standby's are, and so are those of a session that
    started under default_transaction_read_only)."""
    cursor = await conn.execute(
        "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'"
    )
    row = await cursor.fetchone()
    return (bool(row[0]), bool(row[1])) if row else (False, False)


async def _cut_off_if_cancelled(conn: psycopg.AsyncConnection[Any], question: Awaitable[T]) -> T:
    """Await ``question`` on ``conn``; cancelled (the probe's timeout, a shutdown),
    close the connection first. A cancelled query otherwise makes psycopg ask the
    server to cancel it and wait for the answer, which a database that stopped
    answering never gives: the probe's timeout, and a shutdown, would wait seconds."""
    asking = asyncio.ensure_future(question)
    try:
        await asyncio.wait({asking})
    finally:
        if not asking.done():
            conn.pgconn.finish()  # closed here: the cancelled query waits for nothing
            asking.cancel()
            await asyncio.wait({asking})
            if not asking.cancelled():
                asking.exception()
    return asking.result()


def _lost_connection(error: BaseException) -> bool:
    """Whether ``error`` says the connection itself failed (closed by the server,
    a restart, a failover, the network), not a statement or the pool's wait."""
    if isinstance(error, psycopg_pool.PoolTimeout) or not isinstance(
        error, psycopg.OperationalError
    ):
        return False
    state = error.sqlstate
    # None: failed in the client (the server closed it); 08: connection exception;
    # 57P01-57P03: the server shutting down or not accepting connections yet.
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


class PostgresDurableStore(SqlDurableReads):
    """Durable data in PostgreSQL."""

    backend_name = "durable store (PostgreSQL)"

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 4,
        connect_timeout_seconds: float = 5.0,
        listen_url: str | None = None,
        prepared_statements: bool = True,
    ) -> None:
        self._url = url
        # psycopg prepares a statement after its 5th run (None: never).
        self._prepare_threshold = 5 if prepared_statements else None
        # Told the events of each committed transaction (the event hub listens).
        self.events_committed: Callable[[list[StoredEvent]], None] = lambda events: None
        # LISTEN needs a direct connection, not one through a transaction pooler:
        # a URL of its own then, or "off" to poll only.
        self._listen_url = listen_url
        self._max_connections = max_connections
        self._timeout = connect_timeout_seconds
        self._pool: psycopg_pool.AsyncConnectionPool | None = None
        # The readiness probe's own connection: a pool that busy calls hold whole
        # says nothing about the database, and would turn a busy replica unready.
        self._probe: psycopg.AsyncConnection[Any] | None = None
        self._probe_lock = asyncio.Lock()
        # Connections being given back to the pool (_pooled).
        self._returning: set[asyncio.Task[None]] = set()
        # The probe found the database read-only; once it takes writes again, the
        # pool's connections are replaced (_retire_read_only_connections).
        self._found_read_only = False
        # Told each operation's time and outcome (the server's metrics).
        self.observe: BackendObserver = ignore
        # When a connection was last found lost, and when each pooled one was last
        # known to answer: the pool tests one before handing it out when that was
        # before the loss (_test_if_suspect).
        self._lost_at = 0.0
        # When the pool's connections were last replaced after a loss (by a probe
        # that found the database answering again: _replace_lost_connections).
        self._replaced_at = 0.0
        self._said_out_of_step = False
        self._answered: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )

    async def open(self) -> None:
        self._pool = psycopg_pool.AsyncConnectionPool(
            self._url,
            min_size=1,
            max_size=self._max_connections,
            timeout=self._timeout,
            # A connection slot whose attempts keep failing is given up this soon,
            # and the next call that waits starts a new one at once. psycopg_pool's
            # own backoff doubles to 64 s (for 5 minutes): after an outage of a
            # minute the pool stayed empty for up to as long again, the database
            # answering and readiness saying so.
            reconnect_timeout=2 * self._timeout,
            open=False,
            kwargs={"autocommit": True, "prepare_threshold": self._prepare_threshold},
            check=self._test_if_suspect,
            configure=self._new_connection,
            name="memsvc",
        )
        # Do not wait for the database: readiness reports it until it answers.
        await self._pool.open(wait=False)

    async def aclose(self) -> None:
        async with self._probe_lock:
            if self._probe is not None:
                await self._probe.close()
                self._probe = None
        if self._pool is not None:
            # Connections on their way back, whose calls were cancelled meanwhile.
            await asyncio.gather(*self._returning, return_exceptions=True)
            # A worker may be connecting to a database that does not answer: it is
            # not waited for to the end of its connect timeout.
            await self._pool.close(timeout=POOL_CLOSE_SECONDS)
            self._pool = None

    @property
    def readers(self) -> int:
        """Reads that can run at once: the pool's connections."""
        return self._max_connections

    @property
    def connect_timeout_seconds(self) -> float:
        """How long the probe's connection attempt may take (libpq counts whole seconds)."""
        return float(max(1, round(self._timeout)))

    async def erase_deleted(self) -> None:
        """Nothing to do at once: PostgreSQL's (auto)vacuum reclaims deleted rows and
        their index entries (docs/security.md)."""

    async def ping(self) -> None:
        """The database answers and takes writes, on the probe's own connection
        (made again when lost). A read-only database (a standby, the old primary
        after a failover, default_transaction_read_only) is not ready: every
        write would fail."""
        with observed(self.observe, "ping", self.backend_name):
            await with_retries(
                self._probe_select,
                backend=self.backend_name,
                transient=TRANSIENT_ERRORS,
                attempts=1,
            )

    async def _probe_select(self) -> None:
        async with self._probe_lock:
            had_connection = self._probe is not None and not self._probe.closed
            try:
                await self._ask_probe()
            except BaseException as error:
                if not _lost_connection(error):
                    raise
                # The pool's idle connections most likely went with it: each is
                # tested before its next call (not failing that call).
                self._suspect_connections(error)
                if not had_connection:
                    raise
                # The probe's own connection was lost (a restart that is over by
                # now, a reaper), which says nothing yet of the database: a new
                # connection asks again before the probe reports it unready.
                await self._ask_probe()
        if self._found_read_only:
            await self._retire_read_only_connections()
        elif self._lost_at > self._replaced_at:
            await self._replace_lost_connections()

    async def _replace_lost_connections(self) -> None:
        """The database answers after a connection was lost: the pool's connections
        from before most likely died with it (a restart closes them all). New ones
        replace them now; tested one by one as calls take them, each dead one cost
        a call a second or more of the pool's backoff, and several could run a call
        out of time."""
        self._replaced_at = time.monotonic()
        if self._pool is not None:
            log.info("a database connection was lost: replacing the pool's connections")
            await self._pool.drain()

    async def _ask_probe(self) -> None:
        """The read-only check on the probe's connection (made first if there is
        none); a connection that fails or is cut off is closed."""
        try:
            if self._probe is None or self._probe.closed:
                self._probe = await psycopg.AsyncConnection.connect(
                    self._url,
                    autocommit=True,
                    prepare_threshold=self._prepare_threshold,
                    connect_timeout=round(self.connect_timeout_seconds),
                )
            in_recovery, read_only = await _cut_off_if_cancelled(
                self._probe, _read_only_state(self._probe)
            )
            if in_recovery or read_only:
                self._found_read_only = True
                raise psycopg.errors.ReadOnlySqlTransaction(
                    "the database is read-only"
                    + (" (a standby in recovery)" if in_recovery else "")
                    + ": it cannot take writes"
                )
        except BaseException:
            # Cut off or failed, the connection may be mid-statement: a new one next time.
            if self._probe is not None:
                with contextlib.suppress(Exception):
                    await self._probe.close()
                self._probe = None
            raise

    async def _retire_read_only_connections(self) -> None:
        """The database takes writes again, but the pool's connections made while it
        did not may still start their transactions read-only (a session takes its
        default when it connects), or lead to the old server: each would fail a
        write of its own. New ones replace them."""
        self._found_read_only = False
        if self._pool is not None:
            log.info("the database takes writes again: replacing the pool's connections")
            await self._pool.drain()

    @contextlib.asynccontextmanager
    async def _pooled(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection of the pool (psycopg_pool's ``connection()``), given back
        to it whatever ends the block, by a task of its own that nothing waits for.

        psycopg_pool awaits the return in the caller: a call cancelled while it
        waited there (its client's deadline, the pool's lock taken) dropped the
        connection that the pool still counted as out, and that slot was gone until
        a restart, one in about a thousand such calls, until no call could get a
        connection. A task is not cancelled with the call; and not waited for, it
        costs the call no turn of a busy event loop (awaited, two turns behind a
        hundred watch deliveries added tens of milliseconds to a commit's p99).
        """
        pool = self._connections
        conn = await pool.getconn()
        try:
            async with conn:  # COMMIT or ROLLBACK of what the block left open
                yield conn
        finally:
            returning = asyncio.get_running_loop().create_task(pool.putconn(conn))
            self._returning.add(returning)
            returning.add_done_callback(self._returned)

    def _returned(self, returning: asyncio.Task[None]) -> None:
        self._returning.discard(returning)
        if not returning.cancelled() and (error := returning.exception()) is not None:
            log.warning("giving a connection back to the pool failed: %r", error)

    @contextlib.asynccontextmanager
    async def _writable_connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection, closed (not returned) when a write on it is refused
        as read-only: it was made to a database that cannot take writes, or took
        the read-only default of then, and the pool replaces it with one to
        wherever the address leads now."""
        async with self._pooled() as conn:
            try:
                yield conn
            except _STATEMENTS_OUT_OF_STEP as error:
                # Out of step with its prepared statements: so would be every later
                # statement prepared on it.
                self._say_statements_out_of_step(error)
                await conn.close()
                raise
            except psycopg.errors.ReadOnlySqlTransaction:
                await conn.close()
                raise

    def _say_statements_out_of_step(self, error: psycopg.Error) -> None:
        """Log, once, what prepared statements out of step most likely mean: a
        transaction pooler between memsvc and PostgreSQL that cannot keep them,
        where one client's statement may even run another's (a review saw an
        UPDATE run in place of a SELECT)."""
        if self._said_out_of_step or self._prepare_threshold is None:
            return
        self._said_out_of_step = True
        log.error(
            "PostgreSQL and this process disagree on its prepared statements (%s). If"
            " database_url goes through a transaction pooler (PgBouncer before 1.22, or"
            " without max_prepared_statements), set --no-database-prepared-statements"
            " (MEMSVC_DATABASE_PREPARED_STATEMENTS=false): statements may run on another"
            " client's server connection",
            error,
        )

    async def _select_one(self) -> None:
        async with self._pooled() as conn:
            await conn.execute("SELECT 1")

    async def migrate(self) -> list[int]:
        """Apply the migrations not applied yet, one replica at a time.

        Reaching the database is retried within three connect timeouts; the
        migrations themselves, and the wait for another replica's, take what
        they take (an index built over a large table): cut off and rolled back,
        they could never be applied. A lock on a table that a long transaction
        holds is waited for in tries of MIGRATION_LOCK_WAIT_SECONDS (_apply).
        """
        try:
            await with_retries(
                self._select_one,
                backend=self.backend_name,
                transient=TRANSIENT_ERRORS,
                budget_seconds=self._timeout * 3,
            )
        except BackendUnavailable as unavailable:
            # The pool says only that it timed out: why it could not connect (a
            # database or role that does not exist, a refused password, nothing
            # listening) is in one connection attempt of its own.
            why = await self._connect_error()
            if why is None:  # it answers now: the pool's own failure stands
                raise
            raise BackendUnavailable(self.backend_name, why) from unavailable
        try:
            return await self._migrate_once()
        except TRANSIENT_ERRORS as error:
            raise BackendUnavailable(self.backend_name, error) from error

    @staticmethod
    async def _warn_if_search_folds_ascii_only(conn: psycopg.AsyncConnection[Any]) -> None:
        """Say so when the database's LC_CTYPE lowercases ASCII only (C, POSIX): its
        text search parser then keeps the case of every other letter, so
        SearchEpisodes finds "Über" by "Über" alone, not by "über" (docs/api.md)."""
        cursor = await conn.execute(
            "SELECT to_tsvector('simple', chr(201)) = to_tsvector('simple', chr(233)),"
            " current_setting('lc_ctype')",
            prepare=False,
        )
        row = await cursor.fetchone()
        if row is not None and not row[0]:
            log.warning(
                "this database's LC_CTYPE (%s) lowercases ASCII only: SearchEpisodes matches"
                ' other letters by their exact case ("Über" is not found by "über"); a'
                " database made with a UTF-8 LC_CTYPE (C.UTF-8, en_US.UTF-8) matches any case",
                row[1],
            )

    async def _connect_error(self) -> BaseException | None:
        """What one connection to the database fails with now (None: it connects)."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._url, connect_timeout=max(1, round(self._timeout))
            )
        except Exception as error:
            return error
        await conn.close()
        return None

    async def _migrate_once(self) -> list[int]:
        applied_now = []
        async with self._pooled() as conn:
            for migration in load_migrations("memsvc.store.postgres"):
                if await self._apply(conn, migration):
                    log.info("applied migration %04d_%s", migration.version, migration.name)
                    applied_now.append(migration.version)
            await self._warn_if_search_folds_ascii_only(conn)
        return applied_now

    async def _apply(self, conn: psycopg.AsyncConnection[Any], migration: Migration) -> bool:
        """Apply ``migration`` unless it was; whether this did. A try that waits
        MIGRATION_LOCK_WAIT_SECONDS for a lock rolls back (the queries queued behind
        it then run) and is made again after a pause, for as long as it takes."""
        pause = MIGRATION_RETRY_SECONDS[0]
        while True:
            try:
                return await self._apply_once(conn, migration)
            except psycopg.errors.LockNotAvailable:
                why = f"a lock not granted within {MIGRATION_LOCK_WAIT_SECONDS:g} s"
            except psycopg.errors.DeadlockDetected:
                # A transaction that holds one of its tables and waits for another
                # it took first (found before the lock wait ends).
                why = "PostgreSQL found it in a deadlock"
            log.warning(
                "migration %04d_%s let go of its tables' locks (%s), so as not to hold up"
                " every replica's queries on them; trying again in %g s."
                " Transactions open for longer than %g s: %s",
                migration.version,
                migration.name,
                why,
                pause,
                MIGRATION_LOCK_WAIT_SECONDS,
                await _long_transactions(conn) or "none now",
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, MIGRATION_RETRY_SECONDS[1])

    async def _apply_once(self, conn: psycopg.AsyncConnection[Any], migration: Migration) -> bool:
        """One try of :meth:`_apply`, in one transaction."""
        async with conn.transaction():
            # Never prepared: the schema changes under these statements.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,), prepare=False
            )
            await conn.execute(_SCHEMA_TABLE, prepare=False)
            cursor = await conn.execute(
                "SELECT checksum FROM schema_migrations WHERE version = %s",
                (migration.version,),
                prepare=False,
            )
            row = await cursor.fetchone()
            if row is not None:
                check_applied(migration, row[0])
                return False
            # After the advisory lock, which replicas wait for as long as
            # another's migrations take.
            await conn.execute(
                f"SET LOCAL lock_timeout = '{int(MIGRATION_LOCK_WAIT_SECONDS * 1000)}ms'",
                prepare=False,
            )
            # No parameters: psycopg sends the whole file as one simple query.
            await conn.execute(migration.sql.encode(), prepare=False)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
                prepare=False,
            )
            return True

    def bundled_schema_version(self) -> int:
        return load_migrations("memsvc.store.postgres")[-1].version

    async def schema_version(self) -> int:
        async def read() -> int:
            async with self._pooled() as conn:
                cursor = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
                exists = await cursor.fetchone()
                if not exists or not exists[0]:
                    return 0
                cursor = await conn.execute(
                    "SELECT coalesce(max(version), 0) FROM schema_migrations"
                )
                row = await cursor.fetchone()
            return int(row[0]) if row else 0

        return await with_retries(
            read, backend=self.backend_name, transient=TRANSIENT_ERRORS, attempts=1
        )

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[DurableTransaction]:
        """One transaction; a lost connection surfaces as BackendUnavailable.

        Not retried here: a commit whose answer was lost may have happened, so
        only the caller (with a request_id) can safely try again.
        """
        try:
            with observed(self.observe, "transaction", self.backend_name):
                async with self._writable_connection() as conn:
                    async with _pipelined_transaction(conn) as tx:
                        yield tx
                    appended = await tx.committed()
        except psycopg.errors.FeatureNotSupported as error:
            await self._replace_if_stale(error)
            raise BackendUnavailable(self.backend_name, error) from error
        except TRANSIENT_ERRORS as error:
            self._suspect_connections(error)
            _raise_if_past_a_limit(error)
            raise BackendUnavailable(self.backend_name, error) from error
        if appended:
            self.events_committed(appended)

    @contextlib.asynccontextmanager
    async def event_wakeups(self) -> AsyncIterator[AsyncIterator[Wakeup]]:
        """Commit notifications, held while the event tail runs (the tail polls
        as well, so they only make it prompt)."""
        if self._listen_url == "off":
            yield never_wakes()
            return
        notifications = self._notifications()
        try:
            yield notifications
        finally:
            await notifications.aclose()

    async def _notifications(self) -> AsyncGenerator[Wakeup, None]:
        """The sequences of committed events (and purges' scopes), from LISTEN on a
        connection of its own (outside the pool, since it holds session state).

        Whenever that connection cannot be made or is lost (a PostgreSQL restart,
        a failover, an idle-connection reaper), it is made again with backoff; a
        0 after each connection has the tail read what it may have missed.
        """
        backoff = _LISTEN_BACKOFF_SECONDS[0]
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._listen_url or self._url, autocommit=True
                )
            except Exception as error:  # a refused connection, a malformed URL
                log.warning("cannot LISTEN for events, polling meanwhile: %s", error)
            else:
                quiet, answer_within = _LISTEN_QUIET_SECONDS
                try:
                    await conn.execute(f"LISTEN {EVENT_CHANNEL}")
                    backoff = _LISTEN_BACKOFF_SECONDS[0]
                    yield 0
                    while True:
                        async for notify in conn.notifies(timeout=quiet):
                            # The last sequence an append committed (append_events),
                            # or a purge's scope (tombstone_events).
                            yield read_notice(notify.payload)
                        await _answers_within(conn, answer_within)
                except psycopg.Error as error:
                    log.warning("event LISTEN connection lost, polling meanwhile: %s", error)
                except TimeoutError:
                    log.warning(
                        "event LISTEN connection did not answer within %g s, connecting again",
                        answer_within,
                    )
                finally:
                    await conn.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _LISTEN_BACKOFF_SECONDS[1])

    async def _query(self, read: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Reads are idempotent: retried within the call's deadline."""

        connected = False  # in the last attempt: the pool handed it a connection

        async def attempt() -> T:
            nonlocal connected
            connected = False
            # A write among the reads (a graph checkpoint's put, an upsert) may be
            # refused as read-only: nothing was written, and the retry gets a new
            # connection.
            try:
                async with self._writable_connection() as conn:
                    connected = True
                    try:
                        return await read(conn, POSTGRES, *args)
                    except psycopg.OperationalError as error:
                        self._suspect_connections(error)
                        _raise_if_past_a_limit(error)
                        raise
            except psycopg.errors.FeatureNotSupported as error:
                await self._replace_if_stale(error)
                raise StalePlans(str(error)) from error  # transient: retried

        with observed(self.observe, read.__name__, self.backend_name):
            try:
                return await with_retries(
                    attempt, backend=self.backend_name, transient=TRANSIENT_ERRORS
                )
            except BackendUnavailable as error:
                if isinstance(error.__cause__, (TimeoutError, psycopg_pool.PoolTimeout)):
                    # Out of time: say on what, so that an operator can tell a pool
                    # too small for the load (or not connected) from a slow database.
                    log.warning(
                        "%s ran out of time %s; pool: %s",
                        read.__name__,
                        "waiting for the answer" if connected else "waiting for a connection",
                        self._connections.get_stats(),
                    )
                raise

    async def _replace_if_stale(self, error: psycopg.errors.FeatureNotSupported) -> None:
        """After a connection's use ended with ``error`` (the connection back in the
        pool): re-raise it unless it is a statement refused for a stale plan; then
        replace every connection, and the caller says the failure is transient.
        Caught in an ``except``, free when nothing fails, on every transaction."""
        if not _stale_plans(error):
            raise error
        log.warning(
            "the database's schema changed under this process's prepared statements"
            " (a newer memsvc migrated it); replacing its connections"
        )
        await self._connections.drain()

    def _suspect_connections(self, error: BaseException) -> None:
        """A connection was lost (PostgreSQL restarted or failed over, a reaper
        closed it): the pool's idle ones most likely died with it, and the pool
        hands connections out untested, so each would fail a call of its own (a
        transaction is never retried) once the database is back. From now on each
        is tested once before it is handed out (_test_if_suspect)."""
        if _lost_connection(error):
            self._lost_at = time.monotonic()

    async def _new_connection(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._answered[conn] = time.monotonic()

    async def _test_if_suspect(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The pool's check: a bounded round trip for a connection not known to
        answer since the last loss (none at all until one); one that fails it is
        replaced, and the caller gets another."""
        if self._answered.get(conn, 0.0) >= self._lost_at:
            return
        await _answers_within(conn, self._timeout)
        self._answered[conn] = time.monotonic()

    @property
    def _connections(self) -> psycopg_pool.AsyncConnectionPool:
        if self._pool is None:
            raise RuntimeError("PostgresDurableStore used before open()")
        return self._pool


async def _long_transactions(conn: psycopg.AsyncConnection[Any]) -> str:
    """The transactions of this database open for longer than a migration waits
    for its locks (those that may hold it up), described in a line."""
    cursor = await conn.execute(
        "SELECT pid, coalesce(usename, ''), coalesce(application_name, ''), state,"
        " extract(epoch FROM now() - xact_start)::int, left(query, 60) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND xact_start < now() - make_interval(secs => %s) ORDER BY xact_start LIMIT 5",
        (MIGRATION_LOCK_WAIT_SECONDS,),
        prepare=False,
    )
    return "; ".join(
        f"pid {pid} ({user} {application or '-'}, {state}, {seconds} s: {query!r})"
        for pid, user, application, state, seconds, query in await cursor.fetchall()
    )
