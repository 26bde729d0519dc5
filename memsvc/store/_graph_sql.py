"""Graph-checkpoint SQL shared by the SQLite and PostgreSQL stores.

Lists of ids and (channel, version) pairs travel as one parameter: an array
(``= ANY``) on PostgreSQL, JSON read by ``json_each`` on SQLite. Values no
checkpoint refers to any more are found in Python (the deleted checkpoints'
versions less those the remaining ones hold), which both databases share and
which costs one read of the namespace's version maps.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from itertools import accumulate
from typing import Any

from memsvc.domain import SessionRef
from memsvc.domain._errors import BackendUnavailable
from memsvc.domain._graph_checkpoints import (
    GraphCheckpointRecord,
    GraphCheckpointTooLarge,
    GraphListScope,
    GraphThreadOptions,
    GraphValue,
    GraphWrite,
    PendingThreadWork,
)
from memsvc.store._budgeted_sql import next_page_condition, read_within_budget
from memsvc.store._lifecycle_sql import (
    PROJECT_LOCK_SHARED,
    Connection,
    Dialect,
    SqlQueries,
    SqlWrites,
    project_lock,
    text,
)

_COLUMNS = (
    "c.project_id, c.thread_id, c.checkpoint_ns, c.checkpoint_id, c.parent_checkpoint_id,"
    " c.checkpoint_type, c.checkpoint, c.metadata, c.channel_versions, c.create_time"
)
_THREAD = "project_id = ? AND thread_id = ?"
_NAMESPACE = "project_id = ? AND thread_id = ? AND checkpoint_ns = ?"
# Rows per multi-row INSERT (SQLite allows 32,766 parameters a statement).
_CHUNK = 500
# (channel, version) pairs one statement names (in one JSON parameter).
_PAIRS_PER_STATEMENT = 5_000


def _in(dialect: Dialect, column: str, values: Sequence[str]) -> tuple[str, Any]:
    """``column`` is one of ``values``: the condition and its one parameter."""
    if dialect.name == "postgres":
        return f"{column} = ANY(?)", list(values)
    return f"{column} IN (SELECT value FROM json_each(?))", json.dumps(list(values))


def _pairs(dialect: Dialect) -> str:
    """A subquery of (channel, version) pairs from one JSON parameter."""
    if dialect.name == "postgres":
        return "SELECT e->>0, e->>1 FROM jsonb_array_elements(?::jsonb) e"
    return "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?)"


def _named_values(
    dialect: Dialect, pairs: tuple[str, str, str], namespace: tuple[str, str, str], columns: str
) -> str:
    """``columns`` of the values (``v``) that (channel, version) pairs name in one
    namespace, looked up one pair at a time by primary key, so a read costs the
    same however many versions are stored. ``pairs``: a relation ``e`` with its
    channel and version expressions; ``namespace``: SQL for the project, thread
    and namespace. On PostgreSQL the LIMIT keeps the planner from turning the
    lookups into a hash join over every stored version of the namespace."""
    relation, channel, version = pairs
    project, thread, ns = namespace
    if dialect.name == "postgres":
        return (
            f"SELECT {columns} FROM {relation} CROSS JOIN LATERAL"
            f" (SELECT * FROM graph_values WHERE project_id = {project} AND thread_id = {thread}"
            f"  AND checkpoint_ns = {ns} AND channel = {channel} AND version = {version}"
            "  LIMIT 1) v"
        )
    # CROSS JOIN: SQLite keeps the pairs as the outer loop.
    return (
        f"SELECT {columns} FROM {relation} CROSS JOIN graph_values v"
        f" WHERE v.project_id = {project} AND v.thread_id = {thread}"
        f" AND v.checkpoint_ns = {ns} AND v.channel = {channel} AND v.version = {version}"
    )


def _values_by_pairs(dialect: Dialect, columns: str) -> str:
    """``columns`` of the values a JSON array of (channel, version) pairs names (the
    parameters: the array, then the namespace)."""
    if dialect.name == "postgres":
        pairs = ("jsonb_array_elements(?::jsonb) e", "e->>0", "e->>1")
    else:
        pairs = ("json_each(?) e", "json_extract(e.value, '$[0]')", "json_extract(e.value, '$[1]')")
    return _named_values(dialect, pairs, ("?", "?", "?"), columns)


# A value row of _attach's statement (see there).
_VALUE_ROW = "'v', v.channel, v.version, NULL, NULL, 0, v.value_type, v.value"

# Bytes a value or pending write takes in a response besides its data, at the
# least: its message's tag and length, and those of its channel, version (or
# task id) and type, each at least one byte long (puts refuse them empty).
_LEAST_FRAMING = 13


def _least_payload(dialect: Dialect) -> str:
    """SQL for the bytes checkpoint ``c``'s values and pending writes take in a
    response at the least, as stored now: weighed without reading a value. A
    value's length comes from its header (octet_length of a PostgreSQL bytea is
    its raw length, compressed or not, without decompressing it or reading its
    TOAST chunks; SQLite's length of a blob reads no overflow page). For one
    checkpoint at a time: over many, PostgreSQL's estimate of these lookups (a
    hundred channels each) soon passes its JIT threshold, and compiling would cost
    more than the read (_least_sizes weighs many)."""
    each = "jsonb_each_text" if dialect.name == "postgres" else "json_each"
    values = _named_values(
        dialect,
        (f"{each}(c.channel_versions) e", "e.key", "e.value"),
        ("c.project_id", "c.thread_id", "c.checkpoint_ns"),
        f"coalesce(sum({dialect.stored_length('v.value')} + {_LEAST_FRAMING}), 0)",
    )
    writes = (
        f"SELECT coalesce(sum({dialect.stored_length('w.value')} + {_LEAST_FRAMING}), 0)"
        " FROM graph_writes w WHERE w.project_id = c.project_id AND w.thread_id = c.thread_id"
        " AND w.checkpoint_ns = c.checkpoint_ns AND w.checkpoint_id = c.checkpoint_id"
    )
    return f"({values}) + ({writes})"


def _refuse_if_over(record: GraphCheckpointRecord, least_bytes: int, max_bytes: int) -> None:
    """Refuse a checkpoint that cannot fit in one response, before reading its values:
    ``least_bytes`` is at most what the response would take, so none that fits is refused."""
    if least_bytes > max_bytes:
        raise GraphCheckpointTooLarge(
            record.thread_id, record.checkpoint_ns, record.checkpoint_id, least_bytes, max_bytes
        )


def _record(row: Sequence[Any], dialect: Dialect) -> GraphCheckpointRecord:
    return GraphCheckpointRecord(
        project_id=str(text(row[0])),
        thread_id=row[1],
        checkpoint_ns=row[2],
        checkpoint_id=row[3],
        parent_checkpoint_id=row[4],
        doc_type=row[5],
        doc=bytes(row[6]),
        metadata=dialect.json_value(row[7]),
        channel_versions=dialect.json_value(row[8]),
        create_ms=dialect.time_value(row[9]),
    )


def _as_text(dialect: Dialect, column: str) -> str:
    """A JSON column as its text (PostgreSQL keeps it as jsonb)."""
    return f"{column}::text" if dialect.name == "postgres" else column


# Times a read starts again when a checkpoint it read changed under it.
_REREADS = 5


async def _attach(
    conn: Connection,
    dialect: Dialect,
    records: list[GraphCheckpointRecord],
    channels: frozenset[str] | None,
) -> tuple[list[GraphCheckpointRecord], list[GraphCheckpointRecord]]:
    """The records with the values their versions name and their pending writes
    (only those of ``channels``, unless None), and the records that changed since
    they were read.

    The checkpoint rows were read by an earlier statement, so each one is read again
    with its values and writes, in one statement and so one snapshot: a record
    deleted meanwhile (a pruned checkpoint, a deleted thread or run) or put again
    with other versions comes back among the changed, never without its values.
    """
    values: dict[int, list[GraphValue]] = {i: [] for i in range(len(records))}
    writes: dict[int, list[GraphWrite]] = {i: [] for i in range(len(records))}
    current: set[int] = set()
    only, selected = _channel_condition(dialect, channels)
    for key, indexes in _by_namespace(records).items():
        pairs = _named_pairs(records, indexes, channels)
        by_id = {records[i].checkpoint_id: i for i in indexes}
        condition, ids = _in(dialect, "checkpoint_id", list(by_id))
        # Values, writes and the checkpoints themselves in one round trip:
        # ("v", channel, version, ...), ("w", channel, checkpoint id, task id,
        # task path, idx, ...) and ("c", checkpoint id, channel versions) rows.
        cursor = await dialect.execute_bulk_read(
            conn,
            f"{_values_by_pairs(dialect, _VALUE_ROW)} UNION ALL"
            " SELECT 'w', channel, checkpoint_id, task_id, task_path, idx, value_type, value"
            f" FROM graph_writes WHERE {_NAMESPACE} AND {condition}{only} UNION ALL"
            f" SELECT 'c', checkpoint_id, {_as_text(dialect, 'channel_versions')},"
            " NULL, NULL, 0, NULL, NULL"
            f" FROM graph_checkpoints WHERE {_NAMESPACE} AND {condition}",
            [json.dumps(pairs), *key, *key, ids, *selected, *key, ids],
        )
        found: dict[tuple[str, str], GraphValue] = {}
        for row in await cursor.fetchall():
            if row[0] == "v":
                found[(row[1], row[2])] = GraphValue(row[1], row[2], row[6], bytes(row[7]))
            elif row[0] == "w":
                writes[by_id[row[2]]].append(
                    GraphWrite(row[3], row[4], int(row[5]), row[1], row[6], bytes(row[7]))
                )
            elif json.loads(row[2]) == records[by_id[row[1]]].channel_versions:
                current.add(by_id[row[1]])
        for i in indexes:
            versions = records[i].channel_versions
            values[i] = [found[(c, v)] for c, v in sorted(versions.items()) if (c, v) in found]
            writes[i].sort(key=lambda w: (w.task_path, w.task_id, w.idx))
    attached = [
        dataclasses.replace(r, values=tuple(values[i]), writes=tuple(writes[i]))
        for i, r in enumerate(records)
        if i in current
    ]
    return attached, [r for i, r in enumerate(records) if i not in current]


async def get_graph_checkpoint(
    conn: Connection,
    dialect: Dialect,
    project_id: str,
    thread_id: str,
    ns: str,
    checkpoint_id: str | None,
    max_bytes: int,
    channels: frozenset[str] | None,
) -> GraphCheckpointRecord | None:
    condition, params = "", [project_id, thread_id, ns]
    if checkpoint_id is not None:
        condition = " AND c.checkpoint_id = ?"
        params.append(checkpoint_id)
    # The row weighed with all its values in the same statement (one snapshot);
    # with some channels only, by theirs in a statement of its own (_least_sizes).
    weight = f", {_least_payload(dialect)}" if channels is None else ""
    for _ in range(_REREADS):
        cursor = await dialect.execute_bulk_read(
            conn,
            f"SELECT {_COLUMNS}{weight} FROM graph_checkpoints c"
            " WHERE c.project_id = ? AND c.thread_id = ? AND c.checkpoint_ns = ?"
            f"{condition} ORDER BY c.checkpoint_id DESC LIMIT 1",
            params,
        )
        row = await cursor.fetchone()
        if row is None:
            return None
        record = _record(row, dialect)
        if channels is None:
            least = len(record.doc) + int(row[-1])
        else:
            least = (await _least_sizes(conn, dialect, [record], channels))[0]
        _refuse_if_over(record, least, max_bytes)
        attached, _ = await _attach(conn, dialect, [record], channels)
        if attached:
            return attached[0]
        # Deleted or put again between the two statements: what is there now?
    raise _kept_changing(dialect)


def _metadata_conditions(dialect: Dialect, wanted: dict[str, Any]) -> tuple[list[str], list[Any]]:
    """The metadata holds each key of ``wanted`` with a JSON value equal to its own."""
    if not wanted:
        return [], []
    if dialect.name == "postgres":
        conditions, params = [], []
        for key, value in sorted(wanted.items()):
            conditions.append("c.metadata -> ? = ?::jsonb")
            params += [key, _json_text(value)]
        return conditions, params
    # One call whatever the number of keys (a condition per key made an
    # expression past SQLite's depth limit at about 1,000 keys).
    return [f"{SQLITE_JSON_HOLDS}(c.metadata, ?)"], [_json_text(wanted)]


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# The SQL functions each SQLite connection gets (SqliteDurableStore): json_holds
# and json_equal (memsvc/_json_match.py).
SQLITE_JSON_HOLDS = "memsvc_json_holds"
SQLITE_JSON_EQUAL = "memsvc_json_equal"


async def list_graph_checkpoints(
    conn: Connection,
    dialect: Dialect,
    scope: GraphListScope,
    after: tuple[str, str, str] | None,
    limit: int,
    byte_budget: int,
    max_bytes: int,
) -> tuple[list[GraphCheckpointRecord], bool]:
    conditions = ["c.project_id = ?"]
    params: list[Any] = [scope.project_id]
    if scope.thread_id is not None:
        conditions.append("c.thread_id = ?")
        params.append(scope.thread_id)
    if scope.checkpoint_ns is not None:
        conditions.append("c.checkpoint_ns = ?")
        params.append(scope.checkpoint_ns)
    if scope.before_checkpoint_id is not None:
        conditions.append("c.checkpoint_id < ?")
        params.append(scope.before_checkpoint_id)
    if scope.checkpoint_id is not None:
        conditions.append("c.checkpoint_id = ?")
        params.append(scope.checkpoint_id)
    filtered, extra = _metadata_conditions(dialect, scope.metadata_filter)
    conditions += filtered
    params += extra
    if after is not None:
        # As every listing's next page: its leading `checkpoint_id <= ?` bounds the
        # scan of a thread's index (graph_checkpoints_thread_newest).
        after_condition, after_params = next_page_condition(
            ("c.checkpoint_id", "c.thread_id", "c.checkpoint_ns"), after
        )
        conditions.append(after_condition)
        params += after_params
    # Rows past the budget, by their own bytes (their values come later), are not read.
    weight = " + ".join([
        dialect.stored_length("c.checkpoint"),
        dialect.json_stored_length("c.metadata"),
        dialect.json_stored_length("c.channel_versions"),
    ])  # fmt: skip

    async def read() -> tuple[list[Any], bool]:
        return await read_within_budget(
            conn,
            dialect,
            f"SELECT {_COLUMNS}, {weight} AS weight FROM graph_checkpoints c"
            f" WHERE {' AND '.join(conditions)}",
            params,
            "checkpoint_id DESC, thread_id DESC, checkpoint_ns DESC",
            limit,
            byte_budget,
        )

    channels = frozenset(scope.channels) or None
    for _ in range(_REREADS):
        page = await _list_page(conn, dialect, read, byte_budget, max_bytes, channels)
        if page is not None:
            return page
        # The page's first checkpoint was deleted or put again between its row
        # and its values: the page is read again.
    raise _kept_changing(dialect)


async def _list_page(
    conn: Connection,
    dialect: Dialect,
    read: Callable[[], Awaitable[tuple[list[Any], bool]]],
    byte_budget: int,
    max_bytes: int,
    channels: frozenset[str] | None,
) -> tuple[list[GraphCheckpointRecord], bool] | None:
    """The page and whether it ended early (the byte budget, or a checkpoint that
    changed between its row and its values: the page ends before it, and the next
    one reads it as it is then, through its filters), or None when its first
    checkpoint changed. ``read`` gives the checkpoint rows, and whether the budget
    left some out. A first checkpoint larger than ``max_bytes`` is refused."""
    rows, cut = await read()
    records = [_record(row, dialect) for row in rows]
    # Weighed with their values before any value is read: the checkpoints that
    # cannot fit are left out (or refused, the first) unread.
    if records:
        least = await _least_sizes(conn, dialect, records, channels)
        _refuse_if_over(records[0], least[0], max_bytes)
        fitting = max(1, sum(1 for total in accumulate(least) if total <= byte_budget))
        if fitting < len(records):
            records, cut = records[:fitting], True
    # Values are read in slices, so a page of large checkpoints stops at the budget:
    # a checkpoint that would take the page past it waits for the next page (unless
    # it is the first, which is always returned).
    result: list[GraphCheckpointRecord] = []
    size = 0
    for start in range(0, len(records), 10):
        attached, changed = await _attach(conn, dialect, records[start : start + 10], channels)
        for record in attached:
            if changed and _position(record) < max(map(_position, changed)):
                break  # past a changed one: the page ends before it
            record_size = record.size()
            if result and size + record_size > byte_budget:
                return result, True
            result.append(record)
            size += record_size
        if changed:
            return (result, True) if result else None
    return result, cut


async def _least_sizes(
    conn: Connection,
    dialect: Dialect,
    records: list[GraphCheckpointRecord],
    channels: frozenset[str] | None,
) -> list[int]:
    """Bytes each checkpoint takes in a response at the least, as _least_payload
    weighs them: its document, the values its versions name and its pending
    writes (of ``channels`` only, unless None), from their stored lengths, in one
    statement per namespace (a value
    several checkpoints share is weighed once). A checkpoint that changed since
    it was read is weighed by what it names as read: reading its values finds the
    change."""
    least = [len(record.doc) for record in records]
    only, selected = _channel_condition(dialect, channels)
    for key, indexes in _by_namespace(records).items():
        pairs = _named_pairs(records, indexes, channels)
        by_id = {records[i].checkpoint_id: i for i in indexes}
        condition, ids = _in(dialect, "checkpoint_id", list(by_id))
        length = dialect.stored_length
        cursor = await conn.execute(
            dialect.sql(
                _values_by_pairs(dialect, f"'v', v.channel, v.version, {length('v.value')}")
                + f" UNION ALL SELECT 'w', checkpoint_id, NULL, {length('value')}"
                f" FROM graph_writes WHERE {_NAMESPACE} AND {condition}{only}"
            ),
            (json.dumps(pairs), *key, *key, ids, *selected),
        )
        found: dict[tuple[str, str], int] = {}
        for kind, name, version, size in await cursor.fetchall():
            if kind == "v":
                found[(name, version)] = int(size)
            else:
                least[by_id[name]] += int(size) + _LEAST_FRAMING
        for i in indexes:
            least[i] += sum(
                found[pair] + _LEAST_FRAMING
                for pair in records[i].channel_versions.items()
                if pair in found
            )
    return least


def _named_pairs(
    records: list[GraphCheckpointRecord], indexes: list[int], channels: frozenset[str] | None
) -> list[tuple[str, str]]:
    """The (channel, version) pairs these records name (of ``channels`` only,
    unless None), each once, sorted."""
    return sorted({
        pair
        for i in indexes
        for pair in records[i].channel_versions.items()
        if channels is None or pair[0] in channels
    })  # fmt: skip


def _channel_condition(dialect: Dialect, channels: frozenset[str] | None) -> tuple[str, list[Any]]:
    """SQL that keeps pending writes of ``channels`` only (nothing for None), to
    append to a WHERE clause, and its parameters."""
    if channels is None:
        return "", []
    condition, names = _in(dialect, "channel", sorted(channels))
    return f" AND {condition}", [names]


def _by_namespace(records: list[GraphCheckpointRecord]) -> dict[tuple[str, str, str], list[int]]:
    """The records' indexes, by (project, thread, namespace)."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for index, record in enumerate(records):
        key = (record.project_id, record.thread_id, record.checkpoint_ns)
        groups.setdefault(key, []).append(index)
    return groups


def _position(record: GraphCheckpointRecord) -> tuple[str, str, str]:
    """Where a checkpoint sorts in a list (newest first: larger comes first)."""
    return (record.checkpoint_id, record.thread_id, record.checkpoint_ns)


def _kept_changing(dialect: Dialect) -> BackendUnavailable:
    """A read that met a change on every try (writers putting one id again and
    again): UNAVAILABLE, which tells the caller to retry."""
    return BackendUnavailable(dialect.name, RuntimeError("checkpoints kept changing while read"))


def _touch_thread(
    project_id: str, thread_id: str, now_ms: int, options: GraphThreadOptions | None
) -> tuple[str, list[Any]]:
    """The upsert of a thread's row that every write makes first (it locks the row)."""
    if options is None:
        return (
            "INSERT INTO graph_threads (project_id, thread_id, update_ms)"
            " VALUES (?, ?, ?) ON CONFLICT (project_id, thread_id) DO UPDATE SET"
            " update_ms = excluded.update_ms,"
            " expire_ms = excluded.update_ms + graph_threads.ttl_ms,"
            " prune_pending = graph_threads.keep_last > 0",
            [project_id, thread_id, now_ms],
        )
    session = options.session
    ttl = options.ttl_ms or None
    return (
        "INSERT INTO graph_threads (project_id, thread_id, update_ms, ttl_ms, expire_ms,"
        " keep_last, prune_pending, agent_instance_id, session_id, on_session_end)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (project_id, thread_id) DO UPDATE SET"
        " update_ms = excluded.update_ms, ttl_ms = excluded.ttl_ms,"
        " expire_ms = excluded.expire_ms, keep_last = excluded.keep_last,"
        " prune_pending = excluded.prune_pending,"
        " agent_instance_id = excluded.agent_instance_id,"
        " session_id = excluded.session_id,"
        # An end action already applied (stored negated) stays applied when the same
        # link and action come again (the saver sends its options with every put):
        # a run still writing after its session ended is not pruned again and again.
        " on_session_end = CASE WHEN graph_threads.on_session_end = -excluded.on_session_end"
        " AND graph_threads.agent_instance_id = excluded.agent_instance_id"
        " AND graph_threads.session_id = excluded.session_id"
        " THEN graph_threads.on_session_end ELSE excluded.on_session_end END",
        [
            project_id,
            thread_id,
            now_ms,
            ttl,
            None if ttl is None else now_ms + ttl,
            options.keep_last,
            options.keep_last > 0,
            session.agent_instance_id if session else None,
            session.session_id if session else None,
            int(options.on_session_end),
        ],
    )


def _insert_values_from_arrays(
    project_id: str, thread_id: str, ns: str, values: Sequence[GraphValue], condition: str = ""
) -> tuple[str, list[Any]]:
    """PostgreSQL: values from arrays, not a VALUES list, so the statement stays short
    however many there are; sent in binary (%b), which psycopg encodes much faster.
    ``condition``: a WHERE clause the rows wait for."""
    return (
        "INSERT INTO graph_values (project_id, thread_id, checkpoint_ns, channel,"
        " version, value_type, value) SELECT ?, ?, ?, * FROM"
        f" unnest(%b::text[], %b::text[], %b::text[], %b::bytea[]){condition}"
        " ON CONFLICT DO NOTHING",
        [
            project_id,
            thread_id,
            ns,
            [v.channel for v in values],
            [v.version for v in values],
            [v.type for v in values],
            [v.data for v in values],
        ],
    )


def _upsert_checkpoint(
    dialect: Dialect, record: GraphCheckpointRecord, condition: str = ""
) -> tuple[str, list[Any]]:
    """``condition`` (PostgreSQL): a WHERE clause the row waits for; with one, a
    stored checkpoint of the id is replaced only if it has the same versions (else
    the statement leaves it and returns no row: see put_graph_checkpoint_at_once)."""
    row = (
        f"SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?{condition}"
        if condition
        else ("VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
    )
    same_versions = (
        " WHERE graph_checkpoints.channel_versions = excluded.channel_versions" if condition else ""
    )
    return (
        "INSERT INTO graph_checkpoints (project_id, thread_id, checkpoint_ns,"
        " checkpoint_id, parent_checkpoint_id, checkpoint_type, checkpoint, metadata,"
        f" channel_versions, run_id, create_time) {row}"
        " ON CONFLICT (project_id, thread_id, checkpoint_ns, checkpoint_id) DO UPDATE SET"
        " parent_checkpoint_id = excluded.parent_checkpoint_id,"
        " checkpoint_type = excluded.checkpoint_type, checkpoint = excluded.checkpoint,"
        " metadata = excluded.metadata, channel_versions = excluded.channel_versions,"
        f" run_id = excluded.run_id{same_versions}",
        [*_stored_as(dialect, record), record.run_id, dialect.time_param(record.create_ms)],
    )


def _stored_as(dialect: Dialect, record: GraphCheckpointRecord) -> list[Any]:
    """A checkpoint's key, parent, state, metadata and versions, as parameters in the
    form the database stores them."""
    return [
        record.project_id,
        record.thread_id,
        record.checkpoint_ns,
        record.checkpoint_id,
        record.parent_checkpoint_id,
        record.doc_type,
        record.doc,
        dialect.json_param(record.metadata),
        dialect.json_param(record.channel_versions),
    ]


async def put_graph_checkpoint_at_once(
    conn: Connection,
    dialect: Dialect,
    record: GraphCheckpointRecord,
    values: Sequence[GraphValue],
    options: GraphThreadOptions | None,
) -> int | None:
    """PostgreSQL: an unfenced put as ONE statement (its data-modifying CTEs commit
    together), after the project's lock, one round trip instead of five. None on
    SQLite, whose writes go through the store's transaction, and when the put
    would replace a stored checkpoint's versions: the statement then stores
    nothing but the thread's row, and the transaction that puts it collects the
    values the old versions alone named (this statement's snapshot, taken before
    it waits for the thread's lock, cannot tell them)."""
    if dialect.name != "postgres":
        return None
    thread, thread_params = _touch_thread(
        record.project_id, record.thread_id, record.create_ms, options
    )
    # The thread's row first: every write of a thread takes its lock first, so a
    # delete or prune holding it cannot remove a value this put found stored
    # (and skipped) before it waited. Data-modifying CTEs run in no set order;
    # reading ``thread`` makes the others wait for it.
    after_thread = " WHERE EXISTS (SELECT 1 FROM thread)"
    checkpoint, checkpoint_params = _upsert_checkpoint(dialect, record, after_thread)
    values_sql, values_params = "SELECT 1 WHERE false", list[Any]()
    if values:
        # After the checkpoint (so after the thread's lock too): none when the
        # checkpoint is left for the transaction.
        values_sql, values_params = _insert_values_from_arrays(
            record.project_id,
            record.thread_id,
            record.checkpoint_ns,
            values,
            " WHERE EXISTS (SELECT 1 FROM checkpoint)",
        )
        values_sql += " RETURNING 1"
    execute: Any = conn.execute
    # The project's lock (shared), then the put, in one pipeline: one transaction
    # (ADR 0009) and one round trip. A purge of the project, which holds the lock
    # exclusively, never sees this put commit between two of its statements.
    async with conn.pipeline():  # type: ignore[attr-defined]
        await execute(dialect.sql(PROJECT_LOCK_SHARED), (project_lock(record.project_id),))
        cursor = await execute(
            dialect.sql(
                f"WITH thread AS ({thread} RETURNING 1),"
                f" checkpoint AS ({checkpoint} RETURNING 1), stored AS ({values_sql})"
                " SELECT (SELECT count(*) FROM stored), (SELECT count(*) FROM thread),"
                " (SELECT count(*) FROM checkpoint)"
            ),
            [*thread_params, *checkpoint_params, *values_params],
        )
    row = await cursor.fetchone()
    return int(row[0]) if row[2] else None


class SqlGraphWrites(SqlWrites):
    """The graph-checkpoint writes of a durable-store transaction."""

    async def _rows(self, statement: str, params: Sequence[Any]) -> list[Any]:
        cursor = await self._conn.execute(self._d.sql(statement), params)
        return list(await cursor.fetchall())

    async def lock_graph_thread(
        self, project_id: str, thread_id: str, now_ms: int, options: GraphThreadOptions | None
    ) -> None:
        statement, params = _touch_thread(project_id, thread_id, now_ms, options)
        await self._conn.execute(self._d.sql(statement), params)

    async def lock_graph_thread_row(self, project_id: str, thread_id: str) -> int | None:
        rows = await self._rows(
            "SELECT coalesce(expire_ms, -1) FROM graph_threads"
            f" WHERE {_THREAD}{self._d.for_update}",
            (project_id, thread_id),
        )
        return None if not rows else int(rows[0][0])

    async def lock_graph_thread_work(
        self, project_id: str, thread_id: str
    ) -> PendingThreadWork | None:
        rows = await self._rows(
            "SELECT keep_last, prune_pending, CASE WHEN EXISTS (SELECT 1 FROM sessions s"
            " WHERE s.project_id = t.project_id AND s.agent_instance_id = t.agent_instance_id"
            " AND s.session_id = t.session_id AND s.state = 3) AND on_session_end > 0"
            " THEN on_session_end ELSE 0 END"
            f" FROM graph_threads t WHERE {_THREAD}{self._d.for_update}",
            (project_id, thread_id),
        )
        if not rows:
            return None
        keep_last, prune_pending, end_action = rows[0]
        return PendingThreadWork(int(keep_last), bool(prune_pending), int(end_action))

    async def latest_graph_checkpoint_id(
        self, project_id: str, thread_id: str, ns: str
    ) -> str | None:
        rows = await self._rows(
            f"SELECT max(checkpoint_id) FROM graph_checkpoints WHERE {_NAMESPACE}",
            (project_id, thread_id, ns),
        )
        return None if not rows or rows[0][0] is None else str(rows[0][0])

    async def holds_graph_checkpoint(self, record: GraphCheckpointRecord) -> bool:
        # Compared in SQL, each side as stored: read back from jsonb, a number such
        # as 1e23 comes as another Python number than the one put (an int). On
        # SQLite as JSON values, not texts: a row stored with \u escapes (before
        # the twenty-third session) is the same put as its UTF-8 form now.
        def same(column: str) -> str:
            if self._d.name == "postgres":
                return f"{column} = ?"
            return f"{SQLITE_JSON_EQUAL}({column}, ?)"

        rows = await self._rows(
            f"SELECT 1 FROM graph_checkpoints WHERE {_NAMESPACE} AND checkpoint_id = ?"
            # A parent stored NULL was none, or one a prune deleted (which clears
            # the parents it leaves dangling): any parent may have made it.
            " AND (parent_checkpoint_id IS NULL OR parent_checkpoint_id = ?)"
            f" AND checkpoint_type = ? AND checkpoint = ? AND {same('metadata')}"
            f" AND {same('channel_versions')}",
            _stored_as(self._d, record),
        )
        return bool(rows)

    async def graph_checkpoint_versions(
        self, project_id: str, thread_id: str, ns: str, checkpoint_id: str
    ) -> dict[str, str] | None:
        rows = await self._rows(
            f"SELECT channel_versions FROM graph_checkpoints WHERE {_NAMESPACE}"
            " AND checkpoint_id = ?",
            (project_id, thread_id, ns, checkpoint_id),
        )
        return None if not rows else dict(self._d.json_value(rows[0][0]))

    async def collect_graph_values(
        self, project_id: str, thread_id: str, ns: str, freed: dict[str, str]
    ) -> None:
        await self._collect_values((project_id, thread_id, ns), [freed])

    async def insert_graph_values(
        self, project_id: str, thread_id: str, ns: str, values: Sequence[GraphValue]
    ) -> int:
        if not values:
            return 0
        if self._d.name == "postgres":
            statement, arrays = _insert_values_from_arrays(project_id, thread_id, ns, values)
            return len(await self._rows(f"{statement} RETURNING 1", arrays))
        stored = 0
        for start in range(0, len(values), _CHUNK):
            chunk = values[start : start + _CHUNK]
            marks = ", ".join("(?, ?, ?, ?, ?, ?, ?)" for _ in chunk)
            params: list[Any] = []
            for value in chunk:
                params += [project_id, thread_id, ns, value.channel, value.version]
                params += [value.type, value.data]
            rows = await self._rows(
                "INSERT INTO graph_values (project_id, thread_id, checkpoint_ns, channel,"
                f" version, value_type, value) VALUES {marks} ON CONFLICT DO NOTHING RETURNING 1",
                params,
            )
            stored += len(rows)
        return stored

    async def upsert_graph_checkpoint(self, record: GraphCheckpointRecord) -> None:
        statement, params = _upsert_checkpoint(self._d, record)
        await self._conn.execute(self._d.sql(statement), params)

    async def insert_graph_writes(
        self,
        project_id: str,
        thread_id: str,
        ns: str,
        checkpoint_id: str,
        writes: Sequence[GraphWrite],
        replace: bool,
    ) -> None:
        conflict = (
            "DO UPDATE SET task_path = excluded.task_path, channel = excluded.channel,"
            " value_type = excluded.value_type, value = excluded.value"
            if replace
            else "DO NOTHING"
        )
        columns = (
            "INSERT INTO graph_writes (project_id, thread_id, checkpoint_ns, checkpoint_id,"
            " task_id, idx, task_path, channel, value_type, value)"
        )
        key = "(project_id, thread_id, checkpoint_ns, checkpoint_id, task_id, idx)"
        if self._d.name == "postgres":
            await self._conn.execute(
                self._d.sql(
                    f"{columns} SELECT ?, ?, ?, ?, * FROM unnest(%b::text[], %b::int[], %b::text[],"
                    f" %b::text[], %b::text[], %b::bytea[]) ON CONFLICT {key} {conflict}"
                ),
                (
                    project_id,
                    thread_id,
                    ns,
                    checkpoint_id,
                    [w.task_id for w in writes],
                    [w.idx for w in writes],
                    [w.task_path for w in writes],
                    [w.channel for w in writes],
                    [w.type for w in writes],
                    [w.data for w in writes],
                ),
            )
            return
        for start in range(0, len(writes), _CHUNK):
            chunk = writes[start : start + _CHUNK]
            marks = ", ".join("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" for _ in chunk)
            params: list[Any] = []
            for write in chunk:
                params += [project_id, thread_id, ns, checkpoint_id, write.task_id, write.idx]
                params += [write.task_path, write.channel, write.type, write.data]
            await self._conn.execute(
                self._d.sql(f"{columns} VALUES {marks} ON CONFLICT {key} {conflict}"), params
            )

    async def delete_graph_thread(self, project_id: str, thread_id: str) -> int:
        key = (project_id, thread_id)
        # The caller holds the thread's row lock, which every write takes first:
        # no put commits a checkpoint whose values the next statements would then
        # delete (each statement sees the latest commits).
        await self._conn.execute(self._d.sql(f"DELETE FROM graph_threads WHERE {_THREAD}"), key)
        deleted = await self._rows(
            f"DELETE FROM graph_checkpoints WHERE {_THREAD} RETURNING 1", key
        )
        for table in ("graph_values", "graph_writes"):
            await self._conn.execute(self._d.sql(f"DELETE FROM {table} WHERE {_THREAD}"), key)
        return len(deleted)

    async def graph_run_threads(
        self, project_id: str, run_ids: Sequence[str]
    ) -> list[tuple[str, str, str]]:
        condition, ids = _in(self._d, "run_id", run_ids)
        rows = await self._rows(
            "SELECT thread_id, checkpoint_ns, checkpoint_id FROM graph_checkpoints"
            f" WHERE project_id = ? AND {condition}",
            (project_id, ids),
        )
        return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    async def delete_graph_checkpoints(
        self, project_id: str, thread_id: str, ns: str, checkpoint_ids: Sequence[str]
    ) -> int:
        if not checkpoint_ids:
            return 0
        key = (project_id, thread_id, ns)
        condition, ids = _in(self._d, "checkpoint_id", checkpoint_ids)
        await self._conn.execute(
            self._d.sql(f"DELETE FROM graph_writes WHERE {_NAMESPACE} AND {condition}"),
            (*key, ids),
        )
        freed = await self._rows(
            f"DELETE FROM graph_checkpoints WHERE {_NAMESPACE} AND {condition}"
            " RETURNING channel_versions",
            (*key, ids),
        )
        # As LangGraph's PostgreSQL saver prunes: a kept checkpoint names no parent
        # that is gone (reads give it none, rather than one that cannot be read).
        parent_condition, _ = _in(self._d, "parent_checkpoint_id", checkpoint_ids)
        await self._conn.execute(
            self._d.sql(
                f"UPDATE graph_checkpoints SET parent_checkpoint_id = NULL"
                f" WHERE {_NAMESPACE} AND {parent_condition}"
            ),
            (*key, ids),
        )
        await self._collect_values(key, (self._d.json_value(row[0]) for row in freed))
        return len(freed)

    async def _collect_values(
        self, key: tuple[str, str, str], freed: Iterable[dict[str, str]]
    ) -> None:
        """Delete the values the freed version maps name that no checkpoint of the
        namespace still holds."""
        candidates = {(c, v) for versions in freed for c, v in versions.items()}
        if not candidates:
            return
        for row in await self._rows(
            f"SELECT channel_versions FROM graph_checkpoints WHERE {_NAMESPACE}", key
        ):
            candidates -= set(self._d.json_value(row[0]).items())
            if not candidates:
                return
        garbage = sorted(candidates)
        for start in range(0, len(garbage), _PAIRS_PER_STATEMENT):
            await self._conn.execute(
                self._d.sql(
                    f"DELETE FROM graph_values WHERE {_NAMESPACE}"
                    f" AND (channel, version) IN ({_pairs(self._d)})"
                ),
                (*key, json.dumps(garbage[start : start + _PAIRS_PER_STATEMENT])),
            )

    async def keep_latest_graph_checkpoints(
        self, project_id: str, thread_id: str, keep: int
    ) -> int:
        if keep < 1:
            raise ValueError("keep at least 1 checkpoint (delete_graph_thread deletes all)")
        rows = await self._rows(
            "SELECT checkpoint_ns, checkpoint_id FROM graph_checkpoints"
            f" WHERE {_THREAD} ORDER BY checkpoint_ns, checkpoint_id DESC",
            (project_id, thread_id),
        )
        by_ns: dict[str, list[str]] = {}
        for ns, checkpoint_id in rows:
            by_ns.setdefault(str(ns), []).append(str(checkpoint_id))
        finished = await self._finished_subgraph_calls(project_id, thread_id, by_ns, keep)
        deleted_count = 0
        for ns, ids in by_ns.items():
            if ns in finished:
                deleted_count += await self.delete_graph_checkpoints(project_id, thread_id, ns, ids)
                await self._conn.execute(
                    self._d.sql(f"DELETE FROM graph_writes WHERE {_NAMESPACE}"),
                    (project_id, thread_id, ns),
                )
                continue
            deleted_count += await self.delete_graph_checkpoints(
                project_id, thread_id, ns, ids[keep:]
            )
            if len(ids) >= keep:
                # Pending writes of a checkpoint never stored (its run failed between
                # saving them and saving it) go as that checkpoint would have: once
                # ``keep`` newer ones are stored. Nothing stored sorts below the
                # oldest kept one now, so the writes below it are theirs. A checkpoint
                # still being saved keeps its writes: a run saves its checkpoints in
                # order, so it is newer than every stored one of its namespace.
                await self._conn.execute(
                    self._d.sql(
                        f"DELETE FROM graph_writes WHERE {_NAMESPACE} AND checkpoint_id < ?"
                    ),
                    (project_id, thread_id, ns, ids[keep - 1]),
                )
        return deleted_count

    async def _finished_subgraph_calls(
        self, project_id: str, thread_id: str, by_ns: dict[str, list[str]], keep: int
    ) -> set[str]:
        """The namespaces of subgraph calls that a prune keeping ``keep`` checkpoints
        deletes whole, as LangGraph's PostgreSQL saver does: a call's namespace has
        its task id after a ':' (new for each call, unlike a ``checkpointer=True``
        subgraph's, whose state outlives its calls) and goes with the root
        checkpoint it started from (its latest checkpoint's ``metadata.parents[""]``)
        once that one is stored and not kept. Stored: a run saves its checkpoints in
        the background, so a call's may be stored before its root's. ``by_ns``: the
        thread's checkpoint ids by namespace, newest first."""
        heads = {ns: ids[0] for ns, ids in by_ns.items() if ":" in ns}
        if not heads:
            return set()
        roots = by_ns.get("", [])
        stored, kept = set(roots), set(roots[:keep])
        condition, ids = _in(self._d, "checkpoint_id", sorted(set(heads.values())))
        rows = await self._rows(
            "SELECT checkpoint_ns, checkpoint_id, metadata FROM graph_checkpoints"
            f" WHERE {_THREAD} AND {condition}",
            (project_id, thread_id, ids),
        )
        finished = set()
        for ns, checkpoint_id, metadata in rows:
            if heads.get(str(ns)) != str(checkpoint_id):
                continue  # the same id in another namespace
            parents = self._d.json_value(metadata).get("parents")
            root = parents.get("") if isinstance(parents, dict) else None
            if root in stored and root not in kept:
                finished.add(str(ns))
        return finished

    async def graph_threads_with_metadata_keys(
        self, project_id: str, thread_ids: Sequence[str], keys: Sequence[str]
    ) -> list[str]:
        threads, thread_param = _in(self._d, "c.thread_id", thread_ids)
        has_key, key_param = _in(self._d, "k.key", keys)
        # The metadata's top-level keys, as a relation with a column "key".
        keys_of = (
            "jsonb_object_keys(c.metadata) AS k(key)"
            if self._d.name == "postgres"
            else "json_each(c.metadata) AS k"
        )
        rows = await self._rows(
            f"SELECT DISTINCT c.thread_id FROM graph_checkpoints c"
            f" WHERE c.project_id = ? AND {threads}"
            f" AND EXISTS (SELECT 1 FROM {keys_of} WHERE {has_key}) ORDER BY c.thread_id",
            (project_id, thread_param, key_param),
        )
        return [str(r[0]) for r in rows]

    async def copy_graph_thread(
        self, project_id: str, source: str, target: str, now_ms: int
    ) -> int:
        copied = await self._rows(
            "INSERT INTO graph_checkpoints (project_id, thread_id, checkpoint_ns, checkpoint_id,"
            " parent_checkpoint_id, checkpoint_type, checkpoint, metadata, channel_versions,"
            " run_id, create_time) SELECT project_id, ?, checkpoint_ns, checkpoint_id,"
            " parent_checkpoint_id, checkpoint_type, checkpoint, metadata, channel_versions,"
            f" run_id, ? FROM graph_checkpoints WHERE {_THREAD} ON CONFLICT DO NOTHING"
            " RETURNING checkpoint_ns, checkpoint_id, channel_versions",
            (target, self._d.time_param(now_ms), project_id, source),
        )
        # Only what the copied checkpoints need: a checkpoint the target holds
        # already keeps its own writes, and no value it does not name joins it.
        by_ns: dict[str, tuple[list[str], set[tuple[str, str]]]] = {}
        for ns, checkpoint_id, versions in copied:
            ids, pairs = by_ns.setdefault(str(ns), ([], set()))
            ids.append(str(checkpoint_id))
            pairs.update(self._d.json_value(versions).items())
        for ns, (ids, pairs) in sorted(by_ns.items()):
            await self._copy_rows(project_id, source, target, ns, ids, sorted(pairs))
        # A copy belongs where its source does: a target without settings of its own
        # takes the source's session link (so a purge or the session's end reaches
        # it), TTL and keep_last.
        await self._conn.execute(
            self._d.sql(
                "UPDATE graph_threads SET ttl_ms = s.ttl_ms,"
                " expire_ms = CASE WHEN s.ttl_ms IS NULL THEN NULL ELSE ? + s.ttl_ms END,"
                " keep_last = s.keep_last, prune_pending = s.keep_last > 0,"
                " agent_instance_id = s.agent_instance_id, session_id = s.session_id,"
                " on_session_end = s.on_session_end"
                " FROM graph_threads s WHERE s.project_id = ? AND s.thread_id = ?"
                " AND graph_threads.project_id = ? AND graph_threads.thread_id = ?"
                " AND graph_threads.agent_instance_id IS NULL AND graph_threads.ttl_ms IS NULL"
                " AND graph_threads.keep_last = 0"
            ),
            (now_ms, project_id, source, project_id, target),
        )
        return len(copied)

    async def _copy_rows(
        self,
        project_id: str,
        source: str,
        target: str,
        ns: str,
        checkpoint_ids: list[str],
        pairs: list[tuple[str, str]],
    ) -> None:
        """Copy into ``target`` the writes of these checkpoints of ``source`` and the
        values these (channel, version) pairs name, in one namespace."""
        key = (project_id, source, ns)
        for start in range(0, len(pairs), _PAIRS_PER_STATEMENT):
            await self._conn.execute(
                self._d.sql(
                    "INSERT INTO graph_values (project_id, thread_id, checkpoint_ns, channel,"
                    " version, value_type, value) SELECT project_id, ?, checkpoint_ns, channel,"
                    f" version, value_type, value FROM graph_values WHERE {_NAMESPACE}"
                    f" AND (channel, version) IN ({_pairs(self._d)}) ON CONFLICT DO NOTHING"
                ),
                (target, *key, json.dumps(pairs[start : start + _PAIRS_PER_STATEMENT])),
            )
        condition, ids = _in(self._d, "checkpoint_id", checkpoint_ids)
        await self._conn.execute(
            self._d.sql(
                "INSERT INTO graph_writes (project_id, thread_id, checkpoint_ns, checkpoint_id,"
                " task_id, idx, task_path, channel, value_type, value) SELECT project_id, ?,"
                " checkpoint_ns, checkpoint_id, task_id, idx, task_path, channel, value_type,"
                f" value FROM graph_writes WHERE {_NAMESPACE} AND {condition}"
                " ON CONFLICT DO NOTHING"
            ),
            (target, *key, ids),
        )

    async def expired_graph_threads(self, now_ms: int, limit: int) -> list[tuple[str, str]]:
        rows = await self._rows(
            "SELECT project_id, thread_id FROM graph_threads WHERE expire_ms <= ?"
            f" ORDER BY expire_ms LIMIT {int(limit)}",
            (now_ms,),
        )
        return [(str(text(r[0])), str(r[1])) for r in rows]

    async def graph_threads_to_prune(
        self, limit: int, after: tuple[str, str] | None = None
    ) -> list[tuple[str, str]]:
        # In the order of the index on flagged threads, from a position: a walk
        # that reaches every one of them, however many are flagged again meanwhile.
        position = "" if after is None else " AND (project_id, thread_id) > (?, ?)"
        rows = await self._rows(
            "SELECT project_id, thread_id FROM graph_threads"
            f" WHERE prune_pending AND keep_last > 0{position}"
            f" ORDER BY project_id, thread_id LIMIT {int(limit)}",
            after or (),
        )
        return [(str(text(r[0])), str(r[1])) for r in rows]

    async def graph_threads_prune_done(self, project_id: str, thread_id: str) -> None:
        await self._conn.execute(
            self._d.sql(f"UPDATE graph_threads SET prune_pending = ? WHERE {_THREAD}"),
            (False, project_id, thread_id),
        )

    async def graph_threads_of_ended_sessions(
        self, limit: int, session: SessionRef | None = None
    ) -> list[tuple[str, str]]:
        only, params = "", tuple[str, ...]()
        if session is not None:
            only = " AND s.project_id = ? AND s.agent_instance_id = ? AND s.session_id = ?"
            params = (session.project_id, session.agent_instance_id, session.session_id)
        rows = await self._rows(
            "SELECT t.project_id, t.thread_id FROM graph_threads t"
            " JOIN sessions s ON s.project_id = t.project_id"
            " AND s.agent_instance_id = t.agent_instance_id AND s.session_id = t.session_id"
            # In key order, as every caller then locks them: copy, delete_runs and
            # purge lock threads in that order too, so none can deadlock with another.
            f" WHERE t.on_session_end > 0 AND s.state = 3{only}"
            f" ORDER BY t.project_id, t.thread_id LIMIT {int(limit)}",
            params,
        )
        return [(str(text(r[0])), str(r[1])) for r in rows]

    async def graph_thread_session_done(self, project_id: str, thread_id: str) -> None:
        await self._conn.execute(
            # Negated, not zeroed: applied, as _touch_thread's upsert reads it.
            self._d.sql(
                "UPDATE graph_threads SET on_session_end = -on_session_end"
                f" WHERE {_THREAD} AND on_session_end > 0"
            ),
            (project_id, thread_id),
        )

    async def purge_graph(self, scope: SessionRef) -> int:
        if not scope.agent_instance_id:
            project = (scope.project_id,)
            # Thread rows first, as in delete_graph_thread.
            await self._conn.execute(
                self._d.sql("DELETE FROM graph_threads WHERE project_id = ?"), project
            )
            deleted = await self._rows(
                "DELETE FROM graph_checkpoints WHERE project_id = ? RETURNING 1", project
            )
            for table in ("graph_values", "graph_writes"):
                await self._conn.execute(
                    self._d.sql(f"DELETE FROM {table} WHERE project_id = ?"), project
                )
            return len(deleted)
        conditions = "project_id = ? AND agent_instance_id = ?"
        params: list[Any] = [scope.project_id, scope.agent_instance_id]
        if scope.session_id:
            conditions += " AND session_id = ?"
            params.append(scope.session_id)
        threads = await self._rows(
            f"SELECT thread_id FROM graph_threads WHERE {conditions}"
            f" ORDER BY thread_id{self._d.for_update}",
            params,
        )
        deleted_count = 0
        for (thread_id,) in threads:
            deleted_count += await self.delete_graph_thread(scope.project_id, str(thread_id))
        return deleted_count


class SqlGraphReads(SqlQueries):
    """The reads of GraphDatabase, written once for both stores."""

    async def get_graph_checkpoint(
        self,
        project_id: str,
        thread_id: str,
        ns: str,
        checkpoint_id: str | None,
        max_bytes: int,
        channels: frozenset[str] | None = None,
    ) -> GraphCheckpointRecord | None:
        return await self._query(
            get_graph_checkpoint, project_id, thread_id, ns, checkpoint_id, max_bytes, channels
        )

    async def list_graph_checkpoints(
        self,
        scope: GraphListScope,
        after: tuple[str, str, str] | None,
        limit: int,
        byte_budget: int,
        max_bytes: int,
    ) -> tuple[list[GraphCheckpointRecord], bool]:
        return await self._query(
            list_graph_checkpoints, scope, after, limit, byte_budget, max_bytes
        )

    async def put_graph_checkpoint_at_once(
        self,
        record: GraphCheckpointRecord,
        values: Sequence[GraphValue],
        options: GraphThreadOptions | None,
    ) -> int | None:
        # Safe to retry: every part is an upsert, so a repeat leaves the same rows.
        return await self._query(put_graph_checkpoint_at_once, record, values, options)
