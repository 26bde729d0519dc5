"""Lifecycle SQL shared by the SQLite and PostgreSQL stores.

The statements are written once with ``?`` placeholders; a :class:`Dialect`
says how each database spells placeholders, row locks, JSON, UUIDs and times.
Both drivers (aiosqlite, psycopg) offer ``await conn.execute(sql, params)``
returning a cursor with ``fetchone``/``fetchall``, which is all this uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from psycopg.types.json import Jsonb

from memsvc.domain import BackendUnavailable, SessionRef
from memsvc.domain._lifecycle_records import (
    PURGED_ANSWER,
    RECORD_BYTES,
    TEXT_FRAMING_BYTES,
    AnswerPurged,
    CheckpointLock,
    CheckpointRecord,
    EndLock,
    EventRecord,
    EventType,
    LockedWithCheckpoint,
    RequestIdReused,
    SessionRecord,
    SessionState,
)
from memsvc.domain._pagination import wire_size
from memsvc.domain._watch import EventFilter, StoredEvent, Wakeup
from memsvc.store._budgeted_sql import next_page_condition, read_within_budget


class _Cursor(Protocol):
    async def fetchone(self) -> Any: ...
    async def fetchall(self) -> Any: ...


class Connection(Protocol):
    """What both drivers' connections offer."""

    async def execute(self, sql: Any, params: Sequence[Any] = ...) -> Any: ...


@dataclass(frozen=True)
class Dialect:
    """How one database spells what the shared statements need."""

    name: str
    placeholder: str
    for_update: str
    # PostgreSQL takes the sequence, inserts and notifies in one statement.
    single_statement_append: bool = False
    # Read large bytea values as binary results: as they are, instead of as hex
    # text twice as long to send and decode (psycopg's ``binary=True``).
    binary_reads: bool = False
    # Transactions run in psycopg's pipeline mode: a statement whose result is
    # not read yet costs no round trip of its own; it travels with the next one
    # read, or with COMMIT.
    pipelined: bool = False
    # Named locks held to the end of the transaction (PostgreSQL's advisory
    # locks), for what row locks cannot order: rows not committed yet (a Spawn's
    # session), or not there at all (a purge's project). SQLite's write lock
    # already serializes every writing transaction.
    named_locks: bool = False
    # Writes whose outcome nobody reads wait for the next event append, which
    # carries them as data-modifying CTEs (WriteBatch): psycopg's CPU cost is per
    # statement, and most of a transaction's statements are such writes.
    batched_writes: bool = False

    async def execute_bulk_read(
        self, conn: Connection, statement: str, params: Sequence[Any]
    ) -> Any:
        """Run a read whose results hold large binary values."""
        if self.binary_reads:
            execute: Any = conn.execute  # psycopg's execute takes binary=
            return await execute(self.sql(statement), params, binary=True)
        return await conn.execute(self.sql(statement), params)

    def sql(self, statement: str) -> str:
        return statement.replace("?", self.placeholder)

    def stored_length(self, column: str) -> str:
        """SQL for a binary column's length in bytes, as a row's weight (pages that
        stop at a byte budget), read without the value: from its header on
        PostgreSQL, and on SQLite length() of a blob column reads no overflow page."""
        return f"octet_length({column})" if self.name == "postgres" else f"length({column})"

    def text_length(self, column: str) -> str:
        """As :meth:`stored_length`, for a text column: its bytes. (SQLite's length()
        of a text counts characters: 3 bytes of CJK weighed 1. Its bytes need the
        value read, as its characters did.)"""
        if self.name == "postgres":
            return f"octet_length({column})"
        return f"length(CAST({column} AS BLOB))"

    def json_stored_length(self, column: str) -> str:
        """As :meth:`text_length`, for a JSON column: on PostgreSQL the jsonb's size
        as stored, compressed or not (a compressed one sends far more)."""
        if self.name == "postgres":
            return f"pg_column_size({column})"
        return self.text_length(column)

    def json_wire_bound(self, column: str) -> str:
        """SQL for a bound of what a JSON column's value takes in a response as
        memsvc's wire_size counts it (domain/_pagination.py), never below it, for
        rows written without that count: 8 bytes for each byte of its JSON text,
        and 1. (Each element costs at most 7.5 times its compact text: ``0,`` is
        15 bytes. An exact count in SQL grows faster than the value: 10 s for an
        array of 300,000 numbers.) Such a row ends its page early, never late."""
        if self.name == "postgres":
            return f"(8 * octet_length({column}::text) + 1)"
        return f"(8 * length(CAST({column} AS BLOB)) + 1)"

    def json_param(self, value: Any) -> Any:
        if self.name == "postgres":
            return Jsonb(value)
        # Characters as they are (UTF-8), not \u escapes: a row weighs what its
        # metadata takes in a response (escaped, "ж" weighed 6 bytes, not 2, and
        # pages of non-Latin metadata ended at a third of their budget).
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    def json_value(self, raw: Any) -> Any:
        return json.loads(raw) if isinstance(raw, str) else raw

    def time_param(self, ms: int) -> Any:
        moment = datetime.fromtimestamp(ms / 1000, UTC)
        if self.name == "postgres":
            return moment
        # The year zero-padded (strftime's %Y is not, before 1000): these strings
        # are compared as text.
        return f"{moment.year:04d}" + moment.strftime("-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"

    def time_value(self, raw: Any) -> int:
        if isinstance(raw, datetime):
            return int(raw.timestamp() * 1000)
        moment = datetime.strptime(str(raw), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        return int(moment.timestamp() * 1000)


T = TypeVar("T")

SQLITE = Dialect("sqlite", "?", "")
# SQLite has no row locks: its write lock (BEGIN IMMEDIATE) serializes instead.
POSTGRES = Dialect(
    "postgres",
    "%s",
    " FOR UPDATE",
    single_statement_append=True,
    binary_reads=True,
    pipelined=True,
    named_locks=True,
    batched_writes=True,
)
EVENT_CHANNEL = "memsvc_events"
# A notification on EVENT_CHANNEL is the last sequence an append committed, or
# this prefix and the JSON of a purge's scope: the replicas' watch hubs make
# tombstones of the events they hold of that scope (see EventHub.purged).
_PURGE_NOTICE = "purge:"


def purge_notice(scope: SessionRef) -> str:
    """The payload announcing a purge of ``scope`` on EVENT_CHANNEL."""
    return _PURGE_NOTICE + json.dumps([scope.project_id, scope.agent_instance_id, scope.session_id])


def read_notice(payload: str) -> Wakeup:
    """A payload on EVENT_CHANNEL: a committed sequence (0: unknown), or a purge's scope."""
    if payload.isdigit():
        return int(payload)
    if payload.startswith(_PURGE_NOTICE):
        with contextlib.suppress(ValueError, TypeError):
            project, agent, session = json.loads(payload[len(_PURGE_NOTICE) :])
            return SessionRef(str(project), str(agent), str(session))
    return 0


def text(raw: Any) -> str | None:
    """A column that may hold a UUID object (PostgreSQL) or text (SQLite)."""
    return None if raw is None else str(raw)


_SESSION_COLUMNS = (
    "project_id, agent_instance_id, session_id, agent_type_id, state, metadata, version, "
    "memory_epoch, resume_checkpoint_id, create_time, update_time"
)
_SESSION_KEY = "project_id = ? AND agent_instance_id = ? AND session_id = ?"
_CHECKPOINT_COLUMNS = (
    "project_id, agent_instance_id, session_id, checkpoint_id, create_time, key_count, "
    "size_bytes, metadata"
)


def record_weight(
    dialect: Dialect, fixed: int, texts: Sequence[str], json_columns: Sequence[str] = ()
) -> str:
    """SQL for what a row takes in a response as its record's size() counts it:
    ``fixed`` bytes, each text column's bytes and framing (NULL as empty), and a
    bound of each JSON column's (Dialect.json_wire_bound): never light."""
    parts = [str(fixed + TEXT_FRAMING_BYTES * len(texts))]
    parts += [f"coalesce({dialect.text_length(text)}, 0)" for text in texts]
    parts += [dialect.json_wire_bound(column) for column in json_columns]
    return " + ".join(parts)


def _listing_weight(dialect: Dialect, texts: tuple[str, ...]) -> str:
    """SQL for what a listed session or checkpoint row takes in a response: a List
    page then stops at its byte budget in the database, and never reads a page size
    of rows of large metadata to send the few that fit. ``metadata_bytes`` is the
    metadata's size as memsvc counted it on writing (jsonb's stored size is
    compressed, a fraction of what it sends). The rows written without it (before
    migrations 0012 and SQLite 0010, or by an older replica meanwhile) are weighed
    by a bound from their JSON's length."""
    return (
        f"{record_weight(dialect, RECORD_BYTES, texts)}"
        f" + coalesce(metadata_bytes, {dialect.json_wire_bound('metadata')})"
    )


def _reading_checkpoint(contents: str) -> str:
    """A checkpoint and ``contents`` (an expression), by id (the placeholder or
    expression that follows)."""
    return (
        f"SELECT {_CHECKPOINT_COLUMNS}, {contents} FROM checkpoints"
        f" WHERE {_SESSION_KEY} AND checkpoint_id = "
    )


# The checkpoint a session in the state of the placeholder (PAUSED) resumes from.
_RESUME_POINT = f"(SELECT resume_checkpoint_id FROM sessions WHERE {_SESSION_KEY} AND state = ?)"
_READ_CHECKPOINT = _reading_checkpoint("contents")
# Its record only: the contents may be megabytes.
_READ_CHECKPOINT_RECORD = _reading_checkpoint("NULL")
# Without the contents (NULL) of the checkpoint a PAUSED session's Pause took
# when none of its keys has a TTL: the working memory most likely still holds
# exactly that (SessionMemoryStore.begin_restore).
_READ_CHECKPOINT_UNLESS_HELD = _reading_checkpoint(
    f"CASE WHEN timed_keys = 0 AND checkpoint_id = {_RESUME_POINT} THEN NULL ELSE contents END"
)
# A session's checkpoints, oldest first, with the contents of a PAUSED session's
# resume checkpoint when the first placeholder is 1 (NULL for every other one).
_READ_CHECKPOINTS_TO_END = (
    f"SELECT checkpoint_id, CASE WHEN ? = 1 AND checkpoint_id = {_RESUME_POINT}"
    f" THEN contents END FROM checkpoints WHERE {_SESSION_KEY}"
    " ORDER BY create_time, checkpoint_id"
)
# A PAUSED session's resume checkpoint alone, with its contents.
_READ_RESUME_POINT = (
    f"SELECT checkpoint_id, contents FROM checkpoints WHERE {_SESSION_KEY}"
    f" AND checkpoint_id = {_RESUME_POINT}"
)


def _key(ref: SessionRef) -> tuple[str, str, str]:
    return ref.project_id, ref.agent_instance_id, ref.session_id


def project_lock(project_id: str) -> str:
    """The name of a project's lock (Dialect.named_locks)."""
    return f"memsvc project {project_id}"


def _lock_call(shared: bool) -> str:
    """Take one named lock (its name the placeholder) to the end of the transaction."""
    return f"pg_advisory_xact_lock{'_shared' if shared else ''}(hashtextextended(?, 0))"


# A project's lock, shared: for a statement of its own.
PROJECT_LOCK_SHARED = f"SELECT {_lock_call(shared=True)}"


def _session_lock(ref: SessionRef) -> str:
    return f"memsvc session {ref.project_id}/{ref.agent_instance_id}/{ref.session_id}"


def _lock_statement(dialect: Dialect, *extra: str) -> str:
    """Read and lock a session's row, with ``extra`` columns after its own."""
    columns = ", ".join((_SESSION_COLUMNS, *extra))
    return f"SELECT {columns} FROM sessions WHERE {_SESSION_KEY}{dialect.for_update}"


def _written_table(statement: str) -> str:
    """The table an INSERT, UPDATE or DELETE statement writes."""
    found = re.match(r"(?:INSERT INTO|UPDATE|DELETE FROM) (\w+)", statement)
    if found is None:
        raise ValueError(f"not a write of one table: {statement[:40]!r}")
    return found.group(1)


class WriteBatch:
    """A PostgreSQL transaction's connection (Dialect.batched_writes): writes
    whose outcome nobody reads wait (:meth:`defer`) for the next event append,
    which takes them (:meth:`take`) into its own statement; every other
    statement sends them first, one by one and in order, so that every read
    sees the transaction's writes and no write changes place with another."""

    def __init__(self, conn: Connection, dialect: Dialect) -> None:
        self._conn = conn
        self._d = dialect
        # Each waiting write: the table it writes, its statement, its parameters.
        self._waiting: list[tuple[str, str, Sequence[Any]]] = []

    def holds(self, statement: str) -> bool:
        """Whether a write to the table ``statement`` writes is waiting already.
        Two writes of one table must not share a statement: its parts see one
        snapshot, not each other's effects (the second UPDATE of a row is skipped)."""
        table = _written_table(statement)
        return any(waiting == table for waiting, _, _ in self._waiting)

    def defer(self, statement: str, params: Sequence[Any]) -> None:
        self._waiting.append((_written_table(statement), statement, params))

    def take(self) -> list[tuple[str, Sequence[Any]]]:
        """The waiting writes (``?`` placeholders), which the caller now sends."""
        waiting, self._waiting = self._waiting, []
        return [(statement, params) for _, statement, params in waiting]

    async def flush(self) -> None:
        for statement, params in self.take():
            await self._conn.execute(self._d.sql(statement), params)

    async def execute(self, sql: Any, params: Sequence[Any] = (), **options: Any) -> Any:
        await self.flush()
        return await self._conn.execute(sql, params, **options)


class _Pending:
    """A statement's first row, read when needed: on a pipelined connection,
    reading it sends everything queued so far in one round trip."""

    def __init__(self, cursor: Any, row: Any = None, read: bool = False) -> None:
        self._cursor, self._row, self._read = cursor, row, read

    async def row(self) -> Any:
        if not self._read:
            self._row, self._read = await self._cursor.fetchone(), True
        return self._row


class _SqlPendingClaim:
    def __init__(
        self,
        tx: SqlLifecycleTransaction,
        scope: SessionRef,
        request_id: str,
        call: tuple[str, str],
        inserted: _Pending,
    ) -> None:
        self._tx, self._scope, self._request_id = tx, scope, request_id
        self._call = call  # method, arguments hash
        self._inserted = inserted

    async def answer(self) -> bytes | None:
        for _ in range(3):
            if await self._inserted.row() is not None:
                return None
            row = await self._tx._one(
                "SELECT method, arguments_hash, response FROM request_log"
                " WHERE project_id = ? AND request_id = ?",
                (self._scope.project_id, self._request_id),
            )
            if row is None:
                # The sweep forgot the expired answer the INSERT met (PostgreSQL,
                # READ COMMITTED: this read sees its commit): claim the id again,
                # which inserts now, or meets a duplicate that claimed it meanwhile.
                self._inserted = await self._tx.insert_claim(
                    self._scope, self._request_id, self._call
                )
                continue
            if (row[0], row[1]) != self._call:
                raise RequestIdReused(self._request_id)
            if row[2] is not None and bytes(row[2]) == PURGED_ANSWER:
                raise AnswerPurged(self._request_id)
            return bytes(row[2]) if row[2] is not None else None
        # Not reached in practice: a row met after one vanished is a fresh claim,
        # which the sweep does not take. (A duplicate that claimed the id meanwhile
        # and waits for this call's session lock makes the second INSERT wait for
        # it: PostgreSQL breaks that deadlock after deadlock_timeout, and one of the
        # two gets UNAVAILABLE, retried with its request_id.) Never a reuse without
        # the call that took the id to compare with.
        raise BackendUnavailable(
            "database", RuntimeError(f"request id {self._request_id!r} kept vanishing")
        )


class SqlWrites:
    """The base of a durable-store transaction's writes, on one connection
    inside an open transaction."""

    def __init__(self, conn: Connection, dialect: Dialect) -> None:
        self._batch = WriteBatch(conn, dialect) if dialect.batched_writes else None
        self._conn: Connection = self._batch or conn
        self._d = dialect

    async def send_waiting_writes(self) -> None:
        """Send the writes still waiting for an event append (before the Sync commits)."""
        if self._batch is not None:
            await self._batch.flush()

    async def _write(self, statement: str, params: Sequence[Any]) -> None:
        """A write whose outcome nobody reads: batched where the dialect allows."""
        if self._batch is not None:
            if self._batch.holds(statement):
                await self._batch.flush()
            self._batch.defer(statement, params)
        else:
            await self._conn.execute(self._d.sql(statement), params)


class SqlLifecycleTransaction(SqlWrites):
    """LifecycleTransaction over one connection inside an open transaction."""

    def __init__(self, conn: Connection, dialect: Dialect) -> None:
        super().__init__(conn, dialect)
        # Events this transaction appended, each chunk with the statement that
        # numbered it (its row: the chunk's last sequence). On PostgreSQL the
        # sequences are read after COMMIT (committed()).
        self._appending: list[tuple[_Pending, Sequence[EventRecord]]] = []
        self.appended: list[StoredEvent] = []

    async def committed(self) -> list[StoredEvent]:
        """The events this transaction appended, with their sequences (after COMMIT)."""
        self.appended = []
        for pending, events in self._appending:
            last = int((await pending.row())[0])
            first = last - len(events) + 1
            self.appended += [StoredEvent(first + i, event) for i, event in enumerate(events)]
        return self.appended

    async def _one(self, statement: str, params: Sequence[Any]) -> Any:
        cursor = await self._conn.execute(self._d.sql(statement), params)
        return await cursor.fetchone()

    async def _send(self, statement: str, params: Sequence[Any]) -> _Pending:
        cursor = await self._conn.execute(self._d.sql(statement), params)
        if self._d.pipelined:
            return _Pending(cursor)
        # SQLite: read now, so that no statement stays open.
        return _Pending(cursor, await cursor.fetchone(), read=True)

    async def send_claim(
        self, scope: SessionRef, request_id: str, method: str, arguments_hash: str
    ) -> _SqlPendingClaim:
        call = (method, arguments_hash)
        inserted = await self.insert_claim(scope, request_id, call)
        return _SqlPendingClaim(self, scope, request_id, call, inserted)

    async def insert_claim(
        self, scope: SessionRef, request_id: str, call: tuple[str, str]
    ) -> _Pending:
        """Claim a request id for a call (method, arguments hash): an INSERT that
        returns a row, or none when the id is taken."""
        return await self._send(
            "INSERT INTO request_log (project_id, agent_instance_id, session_id, request_id,"
            " method, arguments_hash, create_time) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING RETURNING request_id",
            (
                scope.project_id,
                scope.agent_instance_id or None,
                scope.session_id or None,
                request_id,
                *call,
                self._d.time_param(_now_ms()),
            ),
        )

    async def remember_response(self, project_id: str, request_id: str, response: bytes) -> None:
        await self._conn.execute(
            self._d.sql(
                "UPDATE request_log SET response = ? WHERE project_id = ? AND request_id = ?"
            ),
            (response, project_id, request_id),
        )

    async def lock_session(self, ref: SessionRef) -> SessionRecord | None:
        row = await self._one(_lock_statement(self._d), _key(ref))
        return None if row is None else session_from_row(row, self._d)

    async def lock_session_to_end(
        self, ref: SessionRef, *, checkpoints: bool, resume_contents: bool
    ) -> EndLock | None:
        linked = f"EXISTS (SELECT 1 FROM graph_threads WHERE {_SESSION_KEY} AND on_session_end > 0)"
        locked = await self._send(_lock_statement(self._d, linked), (*_key(ref), *_key(ref)))
        ids: list[str] = []
        contents = None
        paused = int(SessionState.PAUSED)
        reading: tuple[str, tuple[Any, ...]] | None = None
        if checkpoints:
            # Locked too: the retention sweep (which takes no session lock) must not
            # delete one in between, which this Terminate would then announce again.
            reading = (
                _READ_CHECKPOINTS_TO_END + self._d.for_update,
                (int(resume_contents), *_key(ref), paused, *_key(ref)),
            )
        elif resume_contents:
            reading = (_READ_RESUME_POINT, (*_key(ref), *_key(ref), paused))
        if reading is not None:
            # Sent together: the read runs after the lock, so it sees the locked row
            # (and a checkpoint committed while this waited for it).
            cursor = await self._d.execute_bulk_read(self._conn, *reading)
            for checkpoint_id, held in await cursor.fetchall():
                ids.append(str(checkpoint_id))
                if held is not None:
                    contents = bytes(held)
        row = await locked.row()
        if row is None:
            return None
        record = session_from_row(row[:-1], self._d)
        return EndLock(record, bool(row[-1]), tuple(ids) if checkpoints else (), contents)

    async def lock_session_for_checkpoint(
        self, ref: SessionRef, checkpoint_id: str | None, count: bool
    ) -> CheckpointLock | None:
        if not checkpoint_id and not count:
            record = await self.lock_session(ref)
            return None if record is None else CheckpointLock(record, 0, False)
        # The count and the requested id are read in a statement of their own, sent
        # with the lock and run after it: the lock's own subqueries would read the
        # snapshot from before it waited (PostgreSQL, READ COMMITTED), and miss the
        # checkpoints a concurrent call committed meanwhile: concurrent Pauses would
        # go past the checkpoint limit, and a duplicate id fail the commit, not the call.
        # Each subquery only when asked for: a server-made id is never taken.
        counted, taken, params = "0", "0", list[Any]()
        if count:
            counted = f"(SELECT count(*) FROM checkpoints WHERE {_SESSION_KEY})"
            params += _key(ref)
        if checkpoint_id:
            taken = f"EXISTS (SELECT 1 FROM checkpoints WHERE {_SESSION_KEY} AND checkpoint_id = ?)"
            params += (*_key(ref), checkpoint_id)
        locked = await self._send(_lock_statement(self._d), _key(ref))
        found = await self._one(f"SELECT {counted}, {taken}", params)
        row = await locked.row()
        if row is None:
            return None
        return CheckpointLock(session_from_row(row, self._d), int(found[0]), bool(found[1]))

    async def lock_session_reading_checkpoint(
        self, ref: SessionRef, checkpoint_id: str | None
    ) -> LockedWithCheckpoint:
        # Sent together: the read runs after the lock, so it sees the locked row.
        locked = await self._send(_lock_statement(self._d), _key(ref))
        cursor = await self._d.execute_bulk_read(
            self._conn,
            _READ_CHECKPOINT_UNLESS_HELD + "coalesce(?, (SELECT resume_checkpoint_id FROM sessions"
            f" WHERE {_SESSION_KEY}))",
            (*_key(ref), int(SessionState.PAUSED), *_key(ref), checkpoint_id, *_key(ref)),
        )
        found = await cursor.fetchone()
        row = await locked.row()
        record = None if row is None else session_from_row(row, self._d)
        if found is None:
            return record, None
        contents = None if found[8] is None else bytes(found[8])
        return record, (checkpoint_from_row(found, self._d), contents)

    async def read_contents(self, ref: SessionRef, checkpoint_id: str) -> bytes | None:
        found = await read_checkpoint(self._conn, self._d, ref, checkpoint_id)
        return None if found is None else found[1]

    async def _named_locks(self, *locks: tuple[str, bool]) -> None:
        """Hold each (name, shared) lock, in order, to the end of the transaction
        (Dialect.named_locks), in one statement. Sent, not read: it travels with
        the next statement read."""
        if self._d.named_locks:
            calls = ", ".join(_lock_call(shared) for _, shared in locks)
            await self._conn.execute(
                self._d.sql(f"SELECT {calls}"), tuple(name for name, _ in locks)
            )

    async def lock_project(self, project_id: str, exclusive: bool) -> None:
        """Shared by the writes that add a project's rows (Spawn, RecordEpisode),
        exclusive for a purge: a purge runs statement after statement, each seeing
        what committed before it, so nothing may commit in the project meanwhile."""
        await self._named_locks((project_lock(project_id), not exclusive))

    async def lock_session_after_spawn(self, ref: SessionRef) -> SessionRecord | None:
        # A Spawn's INSERT stays invisible until it commits: its session key's lock
        # makes this wait for it (and travels with the row lock: no round trip).
        await self._named_locks((_session_lock(ref), False))
        return await self.lock_session(ref)

    async def insert_session(self, record: SessionRecord) -> bool:
        # The project's lock, then the session key's: always in this order.
        await self._named_locks(
            (project_lock(record.ref.project_id), True), (_session_lock(record.ref), False)
        )
        row = await self._one(
            f"INSERT INTO sessions ({_SESSION_COLUMNS}, metadata_bytes)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING version",
            (*_key(record.ref), *self._session_values(record), wire_size(record.metadata)),
        )
        return row is not None

    async def update_session(self, record: SessionRecord) -> None:
        await self._write(
            "UPDATE sessions SET agent_type_id = ?, state = ?, metadata = ?, version = ?,"
            " memory_epoch = ?, resume_checkpoint_id = ?, create_time = ?, update_time = ?"
            f" WHERE {_SESSION_KEY}",
            (*self._session_values(record), *_key(record.ref)),
        )

    def _session_values(self, record: SessionRecord) -> tuple[Any, ...]:
        return (
            record.agent_type_id,
            int(record.state),
            self._d.json_param(record.metadata),
            record.version,
            record.memory_epoch,
            record.resume_checkpoint_id,
            self._d.time_param(record.create_ms),
            self._d.time_param(record.update_ms),
        )

    async def insert_checkpoint(
        self, record: CheckpointRecord, contents: bytes, timed_keys: int
    ) -> None:
        await self._write(
            f"INSERT INTO checkpoints ({_CHECKPOINT_COLUMNS}, contents, timed_keys,"
            " metadata_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                *_key(record.ref),
                record.checkpoint_id,
                self._d.time_param(record.create_ms),
                record.key_count,
                record.size_bytes,
                self._d.json_param(record.metadata),
                contents,
                timed_keys,
                wire_size(record.metadata),
            ),
        )

    async def delete_checkpoint(self, ref: SessionRef, checkpoint_id: str) -> bool:
        row = await self._one(
            f"DELETE FROM checkpoints WHERE {_SESSION_KEY} AND checkpoint_id = ?"
            " RETURNING checkpoint_id",
            (*_key(ref), checkpoint_id),
        )
        return row is not None

    async def prune_checkpoints(
        self, ref: SessionRef, keep_last: int, protected: str | None
    ) -> list[str]:
        # The protected one (just made) first among those kept, however it is
        # stamped (a clock behind): kept besides the newest, it would leave one
        # more than keep_last.
        rows = await (
            await self._conn.execute(
                self._d.sql(
                    f"DELETE FROM checkpoints WHERE {_SESSION_KEY} AND checkpoint_id <> ?"
                    " AND checkpoint_id NOT IN (SELECT checkpoint_id FROM checkpoints"
                    f" WHERE {_SESSION_KEY} ORDER BY checkpoint_id = ? DESC, create_time DESC,"
                    f" checkpoint_id DESC LIMIT {int(keep_last)})"
                    " AND checkpoint_id NOT IN (SELECT resume_checkpoint_id FROM sessions"
                    f" WHERE {_SESSION_KEY} AND state = 2 AND resume_checkpoint_id IS NOT NULL)"
                    " RETURNING checkpoint_id"
                ),
                (*_key(ref), protected or "", *_key(ref), protected or "", *_key(ref)),
            )
        ).fetchall()
        return [str(row[0]) for row in rows]

    async def delete_expired_checkpoints(
        self, cutoff_ms: int, limit: int
    ) -> list[tuple[SessionRef, str, str | None]]:
        # Checkpoints a call has locked are left to it (a Terminate deleting them,
        # which announces each): waiting for them could deadlock with its locks.
        skip_locked = " FOR UPDATE OF c SKIP LOCKED" if self._d.for_update else ""
        rows = await (
            await self._conn.execute(
                self._d.sql(
                    "DELETE FROM checkpoints WHERE (project_id, agent_instance_id, session_id,"
                    " checkpoint_id) IN (SELECT c.project_id, c.agent_instance_id, c.session_id,"
                    " c.checkpoint_id FROM checkpoints c WHERE c.create_time < ? AND NOT EXISTS"
                    " (SELECT 1 FROM sessions s WHERE s.project_id = c.project_id"
                    " AND s.agent_instance_id = c.agent_instance_id"
                    " AND s.session_id = c.session_id AND s.state = 2"
                    " AND s.resume_checkpoint_id = c.checkpoint_id)"
                    f" LIMIT {int(limit)}{skip_locked})"
                    " RETURNING project_id, agent_instance_id, session_id, checkpoint_id,"
                    " (SELECT s.agent_type_id FROM sessions s"
                    " WHERE s.project_id = checkpoints.project_id"
                    " AND s.agent_instance_id = checkpoints.agent_instance_id"
                    " AND s.session_id = checkpoints.session_id)"
                ),
                (self._d.time_param(cutoff_ms),),
            )
        ).fetchall()
        return [
            (SessionRef(str(text(r[0])), str(text(r[1])), str(r[2])), str(r[3]), text(r[4]))
            for r in rows
        ]

    async def forget_requests(self, cutoff_ms: int, limit: int) -> int:
        # Answers a transaction has locked are left to the next sweep: a purge locks
        # its project's in another order (the table's), and waiting for them could
        # deadlock with it, which PostgreSQL would end by aborting one of the two.
        skip_locked = " FOR UPDATE SKIP LOCKED" if self._d.for_update else ""
        rows = await (
            await self._conn.execute(
                self._d.sql(
                    "DELETE FROM request_log WHERE (project_id, request_id) IN"
                    " (SELECT project_id, request_id FROM request_log WHERE create_time < ?"
                    f" LIMIT {int(limit)}{skip_locked}) RETURNING request_id"
                ),
                (self._d.time_param(cutoff_ms),),
            )
        ).fetchall()
        return len(rows)

    async def delete_checkpoints(self, ref: SessionRef) -> None:
        await self._write(f"DELETE FROM checkpoints WHERE {_SESSION_KEY}", _key(ref))

    async def append_event(self, event: EventRecord) -> None:
        await self.append_events([event])

    async def append_events(self, events: Sequence[EventRecord]) -> None:
        # The counter row serializes writers from here to commit: keep this last.
        # One statement per _APPEND_CHUNK events, however many: a Terminate or a
        # retention sweep that announces a thousand deleted checkpoints holds the
        # counter for one statement, not a thousand.
        for start in range(0, len(events), _APPEND_CHUNK):
            await self._append_chunk(events[start : start + _APPEND_CHUNK])

    async def _append_chunk(self, events: Sequence[EventRecord]) -> None:
        rows = [self._event_values(event) for event in events]
        if self._d.single_statement_append:
            # One statement: the writes waiting in the batch, then bump the counter,
            # insert, and NOTIFY the last sequence (sent at commit).
            waiting = self._batch.take() if self._batch is not None else []
            writes = "".join(f"w{i} AS ({sql} RETURNING 1), " for i, (sql, _) in enumerate(waiting))
            # Unreferenced, a data-modifying CTE runs at the statement's end, after
            # the counter row is locked (held to COMMIT, it serializes every writer):
            # read by the counter's UPDATE, each runs to completion before it.
            first = " AND ".join(f"(SELECT count(*) FROM w{i}) >= 0" for i in range(len(waiting)))
            # The events take the counter's last len(rows) values, in order.
            values = ", ".join(
                f"((SELECT last_sequence FROM s) - {len(rows) - 1 - i}, {_EVENT_PLACEHOLDERS})"
                for i in range(len(rows))
            )
            pending = await self._send(
                f"WITH {writes}s AS (UPDATE event_sequence SET last_sequence = last_sequence"
                f" + {len(rows)}{f' WHERE {first}' if waiting else ''} RETURNING last_sequence),"
                f" ins AS (INSERT INTO lifecycle_events ({_EVENT_COLUMNS}) VALUES {values}"
                " RETURNING sequence)"
                " SELECT max(sequence),"
                f" pg_notify('{EVENT_CHANNEL}', max(sequence)::text) FROM ins",
                (*(param for _, params in waiting for param in params), *itertools.chain(*rows)),
            )
            self._appending.append((pending, events))
            return
        row = await self._one(
            "UPDATE event_sequence SET last_sequence = last_sequence + ? RETURNING last_sequence",
            (len(rows),),
        )
        first_sequence = int(row[0]) - len(rows) + 1
        insert = self._d.sql(
            f"INSERT INTO lifecycle_events ({_EVENT_COLUMNS}) VALUES (?, {_EVENT_PLACEHOLDERS})"
        )
        for i, row_values in enumerate(rows):
            await self._conn.execute(insert, (first_sequence + i, *row_values))
        self._appending.append((_Pending(None, row, read=True), events))

    def _event_values(self, event: EventRecord) -> tuple[Any, ...]:
        """An event's columns after its sequence, as parameters."""
        return (
            event.event_id,
            int(event.event_type),
            *_key(event.ref),
            event.agent_type_id,
            event.checkpoint_id,
            event.episode_id,
            event.request_id,
            self._d.json_param(event.metadata),
            self._d.time_param(event.time_ms),
        )

    async def acquire_lease(self, job: str, holder: str, now_ms: int, lease_ms: int) -> bool:
        """Take or renew ``job``'s lease for ``holder`` unless another holds it unexpired."""
        row = await self._one(
            "INSERT INTO job_leases (job, holder, expire_time) VALUES (?, ?, ?)"
            " ON CONFLICT (job) DO UPDATE SET holder = excluded.holder,"
            " expire_time = excluded.expire_time"
            " WHERE job_leases.holder = excluded.holder OR job_leases.expire_time < ?"
            " RETURNING holder",
            (job, holder, self._d.time_param(now_ms + lease_ms), self._d.time_param(now_ms)),
        )
        return row is not None

    async def release_lease(self, job: str, holder: str) -> None:
        """Give up ``job``'s lease if ``holder`` has it (a replica shutting down)."""
        await self._conn.execute(
            self._d.sql("DELETE FROM job_leases WHERE job = ? AND holder = ?"), (job, holder)
        )

    async def try_lead(self, job: str) -> bool:
        """Whether this transaction may run ``job`` now: one process at a time
        (a transaction-scoped advisory lock on PostgreSQL; SQLite's write lock
        already makes this transaction the only writer)."""
        if self._d.name != "postgres":
            return True
        row = await self._one("SELECT pg_try_advisory_xact_lock(hashtext(?))", (f"memsvc:{job}",))
        return bool(row[0])

    async def compact_events(self, before_ms: int, keep_last: int, limit: int) -> int:
        """Of the ``limit`` oldest events, delete those older than ``before_ms``
        or beyond the newest ``keep_last`` (0: no count limit), up to the first
        one that is neither: only ever a prefix of the log.

        A watch resumes anywhere after the oldest retained sequence, so a hole
        further on would be skipped without a word. Event times are not in
        sequence order (stamped before the sequence is taken, by clocks that may
        differ): an event stamped late keeps the ones after it until it expires.
        Only the oldest are examined (a range of the primary key, whatever the
        table's size).
        """
        conditions = ["event_time < ?"]
        params: list[Any] = [self._d.time_param(before_ms)]
        if keep_last:
            conditions.append(
                f"sequence <= (SELECT last_sequence FROM event_sequence) - {int(keep_last)}"
            )
        oldest = (
            "SELECT sequence, event_time FROM lifecycle_events"
            f" ORDER BY sequence LIMIT {int(limit)}"
        )
        # The events to delete are locked first, in sequence order, as a purge locks
        # the events it makes tombstones of (in the delete's own order, on a large log
        # the primary key's, the two deadlocked); none when none is due.
        first_kept = (
            f"COALESCE((SELECT min(sequence) FROM ({oldest}) kept"
            f" WHERE NOT ({' OR '.join(conditions)})), {_NO_SEQUENCE})"
        )
        rows = await (
            await self._conn.execute(
                self._d.sql(
                    "DELETE FROM lifecycle_events WHERE sequence IN (SELECT sequence FROM"
                    f" lifecycle_events WHERE sequence < {first_kept} ORDER BY sequence"
                    f" LIMIT {int(limit)}{self._d.for_update}) RETURNING sequence"
                ),
                params,
            )
        ).fetchall()
        return len(rows)


# Greater than any sequence (PostgreSQL's bigint maximum).
_NO_SEQUENCE = 2**63 - 1


_EVENT_COLUMNS = (
    "sequence, event_id, event_type, project_id, agent_instance_id, session_id,"
    " agent_type_id, checkpoint_id, episode_id, request_id, metadata, event_time"
)
# The placeholders of an event's columns after its sequence (_event_values).
_EVENT_PLACEHOLDERS = ", ".join("?" * 11)
# The most events one append statement carries: 11 parameters each, and
# PostgreSQL takes at most 65,535 in a statement.
_APPEND_CHUNK = 1000


def event_from_row(row: Sequence[Any], dialect: Dialect) -> StoredEvent:
    """A StoredEvent from the columns of _EVENT_COLUMNS, then ``purged``."""
    return StoredEvent(
        sequence=int(row[0]),
        event=EventRecord(
            event_id=str(text(row[1])),
            event_type=EventType(int(row[2])),
            ref=SessionRef(str(text(row[3])), str(text(row[4])), str(row[5])),
            agent_type_id=text(row[6]),
            checkpoint_id=row[7],
            episode_id=text(row[8]),
            request_id=row[9],
            metadata=dialect.json_value(row[10]),
            time_ms=dialect.time_value(row[11]),
            purged=bool(row[12]),
        ),
    )


def _events_query(
    dialect: Dialect, after: int, limit: int, event_filter: EventFilter, until: int | None
) -> tuple[str, list[Any]]:
    """The SELECT of up to ``limit`` matching events after ``after``, and its
    parameters."""
    conditions = ["sequence > ?"]
    params: list[Any] = [after]
    if until is not None:
        # The read scans the log by sequence (no index serves a scope or a type):
        # ``until`` bounds how much of it one read may scan.
        conditions.append("sequence <= ?")
        params.append(until)
    for column, wanted in (
        ("project_id", event_filter.project_id),
        ("agent_instance_id", event_filter.agent_instance_id),
        ("session_id", event_filter.session_id),
    ):
        if wanted:
            conditions.append(f"{column} = ?")
            params.append(wanted)
    if event_filter.scoped:
        # A tombstone's ids are the nil UUID, not its subject's: no scope's events.
        conditions.append("NOT purged")
    if event_filter.event_types:
        marks = ", ".join("?" for _ in event_filter.event_types)
        conditions.append(f"event_type IN ({marks})")
        params += [int(t) for t in event_filter.event_types]
    query = (
        f"SELECT {_EVENT_COLUMNS}, purged FROM lifecycle_events"
        f" WHERE {' AND '.join(conditions)}"
        f" ORDER BY sequence LIMIT {int(limit)}"
    )
    return query, params


async def read_events(
    conn: Connection,
    dialect: Dialect,
    after: int,
    limit: int,
    event_filter: EventFilter,
    until: int | None = None,
) -> list[StoredEvent]:
    """Up to ``limit`` events with sequence > ``after`` (and <= ``until``) that
    match, in order."""
    query, params = _events_query(dialect, after, limit, event_filter, until)
    cursor = await conn.execute(dialect.sql(query), params)
    return [event_from_row(row, dialect) for row in await cursor.fetchall()]


# The log's ends: its first sequence (NULL when empty) and its last ever.
_BOUNDS_QUERY = (
    "SELECT (SELECT min(sequence) FROM lifecycle_events) AS first_sequence,"
    " (SELECT last_sequence FROM event_sequence) AS latest"
)


def _bounds(first: Any, latest: Any) -> tuple[int, int]:
    """(the oldest position a watch may start after, the latest sequence)."""
    last = int(latest)
    return (int(first) - 1 if first is not None else last), last


async def event_bounds(conn: Connection, dialect: Dialect) -> tuple[int, int]:
    """(the oldest position a watch may start after, the latest sequence)."""
    cursor = await conn.execute(_BOUNDS_QUERY)
    row = await cursor.fetchone()
    return _bounds(row[0], row[1])


async def read_events_in_bounds(
    conn: Connection,
    dialect: Dialect,
    after: int,
    limit: int,
    event_filter: EventFilter,
    until: int | None = None,
) -> tuple[list[StoredEvent], int, int]:
    """read_events and event_bounds as one statement, so of one snapshot: a
    compaction committing between two statements would make the bounds say that
    events the read did get were gone (a catch-up's false OUT_OF_RANGE)."""
    query, params = _events_query(dialect, after, limit, event_filter, until)
    # One row with no event when none matches: the bounds come all the same.
    cursor = await conn.execute(
        dialect.sql(
            f"SELECT events.*, ends.first_sequence, ends.latest FROM ({_BOUNDS_QUERY}) AS ends"
            f" LEFT JOIN ({query}) AS events ON TRUE ORDER BY events.sequence"
        ),
        params,
    )
    rows = await cursor.fetchall()
    oldest, latest = _bounds(rows[0][-2], rows[0][-1])
    events = [event_from_row(row, dialect) for row in rows if row[0] is not None]
    return events, oldest, latest


def session_from_row(row: Sequence[Any], dialect: Dialect) -> SessionRecord:
    """A SessionRecord from the columns of _SESSION_COLUMNS."""
    return SessionRecord(
        ref=SessionRef(str(text(row[0])), str(text(row[1])), str(row[2])),
        agent_type_id=text(row[3]),
        state=SessionState(int(row[4])),
        metadata=dialect.json_value(row[5]),
        version=int(row[6]),
        memory_epoch=str(row[7]),
        resume_checkpoint_id=row[8],
        create_ms=dialect.time_value(row[9]),
        update_ms=dialect.time_value(row[10]),
    )


def checkpoint_from_row(row: Sequence[Any], dialect: Dialect) -> CheckpointRecord:
    """A CheckpointRecord from the columns of _CHECKPOINT_COLUMNS."""
    return CheckpointRecord(
        ref=SessionRef(str(text(row[0])), str(text(row[1])), str(row[2])),
        checkpoint_id=str(row[3]),
        create_ms=dialect.time_value(row[4]),
        key_count=int(row[5]),
        size_bytes=int(row[6]),
        metadata=dialect.json_value(row[7]),
    )


async def get_session(conn: Connection, dialect: Dialect, ref: SessionRef) -> SessionRecord | None:
    """Read a session without locking it."""
    cursor = await conn.execute(
        dialect.sql(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE {_SESSION_KEY}"), _key(ref)
    )
    row = await cursor.fetchone()
    return None if row is None else session_from_row(row, dialect)


async def read_checkpoint(
    conn: Connection,
    dialect: Dialect,
    ref: SessionRef,
    checkpoint_id: str,
    with_contents: bool = True,
) -> tuple[CheckpointRecord, bytes | None] | None:
    """A checkpoint and, ``with_contents``, its contents (else None), or None."""
    statement = _READ_CHECKPOINT if with_contents else _READ_CHECKPOINT_RECORD
    cursor = await dialect.execute_bulk_read(conn, statement + "?", (*_key(ref), checkpoint_id))
    row = await cursor.fetchone()
    if row is None:
        return None
    return checkpoint_from_row(row, dialect), None if row[8] is None else bytes(row[8])


async def list_checkpoints(
    conn: Connection,
    dialect: Dialect,
    ref: SessionRef,
    before: tuple[int, str] | None,
    limit: int,
    byte_budget: int,
) -> tuple[list[CheckpointRecord], bool]:
    """Checkpoints newest first, strictly before (create_ms, checkpoint_id), within
    ``byte_budget`` (see :func:`read_within_budget`)."""
    params: list[Any] = list(_key(ref))
    condition = ""
    if before is not None:
        after, after_params = next_page_condition(
            ("create_time", "checkpoint_id"), (dialect.time_param(before[0]), before[1])
        )
        condition = f" AND {after}"
        params += after_params
    weight = _listing_weight(dialect, ("session_id", "checkpoint_id"))
    rows, cut = await read_within_budget(
        conn,
        dialect,
        f"SELECT {_CHECKPOINT_COLUMNS}, {weight} AS weight FROM checkpoints"
        f" WHERE {_SESSION_KEY}{condition}",
        params,
        "create_time DESC, checkpoint_id DESC",
        limit,
        byte_budget,
    )
    return [checkpoint_from_row(row, dialect) for row in rows], cut


async def list_sessions(
    conn: Connection,
    dialect: Dialect,
    project_id: str,
    agent_instance_id: str | None,
    state: SessionState | None,
    before: tuple[int, str, str] | None,
    limit: int,
    byte_budget: int,
) -> tuple[list[SessionRecord], bool]:
    """A project's sessions newest first, strictly before (create_ms, agent,
    session), within ``byte_budget`` (see :func:`read_within_budget`)."""
    conditions = ["project_id = ?"]
    params: list[Any] = [project_id]
    if agent_instance_id is not None:
        conditions.append("agent_instance_id = ?")
        params.append(agent_instance_id)
    if state is not None:
        conditions.append("state = ?")
        params.append(int(state))
    if before is not None:
        after, after_params = next_page_condition(
            ("create_time", "agent_instance_id", "session_id"),
            (dialect.time_param(before[0]), before[1], before[2]),
        )
        conditions.append(after)
        params += after_params
    weight = _listing_weight(dialect, ("session_id", "resume_checkpoint_id"))
    rows, cut = await read_within_budget(
        conn,
        dialect,
        f"SELECT {_SESSION_COLUMNS}, {weight} AS weight FROM sessions"
        f" WHERE {' AND '.join(conditions)}",
        params,
        "create_time DESC, agent_instance_id DESC, session_id DESC",
        limit,
        byte_budget,
    )
    return [session_from_row(row, dialect) for row in rows], cut


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


class SqlQueries:
    """Base of the read mixins: a store provides :meth:`_query`, which runs a
    read function with a connection and its dialect."""

    async def _query(self, read: Callable[..., Awaitable[T]], *args: Any) -> T:
        raise NotImplementedError


class SqlReads(SqlQueries):
    """The reads of LifecycleDatabase and EventSource, written once for both stores."""

    async def get_session(self, ref: SessionRef) -> SessionRecord | None:
        return await self._query(get_session, ref)

    async def read_checkpoint(
        self, ref: SessionRef, checkpoint_id: str, with_contents: bool = True
    ) -> tuple[CheckpointRecord, bytes | None] | None:
        return await self._query(read_checkpoint, ref, checkpoint_id, with_contents)

    async def list_checkpoints(
        self, ref: SessionRef, before: tuple[int, str] | None, limit: int, byte_budget: int
    ) -> tuple[list[CheckpointRecord], bool]:
        return await self._query(list_checkpoints, ref, before, limit, byte_budget)

    async def list_sessions(
        self,
        project_id: str,
        agent_instance_id: str | None,
        state: SessionState | None,
        before: tuple[int, str, str] | None,
        limit: int,
        byte_budget: int,
    ) -> tuple[list[SessionRecord], bool]:
        return await self._query(
            list_sessions, project_id, agent_instance_id, state, before, limit, byte_budget
        )

    async def read_events(
        self, after: int, limit: int, event_filter: EventFilter, until: int | None = None
    ) -> list[StoredEvent]:
        return await self._query(read_events, after, limit, event_filter, until)

    async def event_bounds(self) -> tuple[int, int]:
        return await self._query(event_bounds)

    async def read_events_in_bounds(
        self, after: int, limit: int, event_filter: EventFilter, until: int | None = None
    ) -> tuple[list[StoredEvent], int, int]:
        return await self._query(read_events_in_bounds, after, limit, event_filter, until)


async def never_wakes() -> AsyncIterator[Wakeup]:
    """Wake-ups for a store without a notification channel: none (the tail polls)."""
    await asyncio.Event().wait()
    yield 0
