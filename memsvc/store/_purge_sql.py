"""Purge SQL shared by the SQLite and PostgreSQL stores (see memsvc.domain._purge)."""

from __future__ import annotations

from typing import Any

from memsvc.domain import SessionRef
from memsvc.domain._lifecycle_records import NIL_UUID, PURGED_ANSWER
from memsvc.store._lifecycle_sql import EVENT_CHANNEL, SqlWrites, purge_notice, text


def _scope(scope: SessionRef) -> tuple[str, list[Any]]:
    """WHERE condition and parameters: empty agent or session ids match all."""
    conditions = ["project_id = ?"]
    params: list[Any] = [scope.project_id]
    if scope.agent_instance_id:
        conditions.append("agent_instance_id = ?")
        params.append(scope.agent_instance_id)
    if scope.session_id:
        conditions.append("session_id = ?")
        params.append(scope.session_id)
    return " AND ".join(conditions), params


class SqlPurgeWrites(SqlWrites):
    """The purge writes of a durable-store transaction."""

    async def _count(self, statement: str, params: list[Any]) -> int:
        """Run a DELETE or UPDATE; return how many rows it changed (from its
        RETURNING rows: rowcount is unknown until a sync in psycopg's pipeline mode)."""
        cursor = await self._conn.execute(self._d.sql(f"{statement} RETURNING 1"), params)
        return len(await cursor.fetchall())

    async def purge_sessions(self, scope: SessionRef) -> tuple[list[SessionRef], int]:
        where, params = _scope(scope)
        # Session rows first, as every lifecycle operation locks them (then
        # checkpoints): the same order, so the two never deadlock.
        await self._conn.execute(
            self._d.sql(f"SELECT 1 FROM sessions WHERE {where}{self._d.for_update}"), params
        )
        checkpoints = await self._count(f"DELETE FROM checkpoints WHERE {where}", params)
        cursor = await self._conn.execute(
            self._d.sql(
                f"DELETE FROM sessions WHERE {where}"
                " RETURNING project_id, agent_instance_id, session_id"
            ),
            params,
        )
        sessions = [
            SessionRef(str(text(row[0])), str(text(row[1])), str(row[2]))
            for row in await cursor.fetchall()
        ]
        return sessions, checkpoints

    async def purge_episodes(self, scope: SessionRef) -> int:
        where, params = _scope(scope)
        deleted = await self._count(f"DELETE FROM episodes WHERE {where}", params)
        if self._d.name == "sqlite":
            # FTS5 deletes by adding markers: the words of the purged episodes, and
            # of the scope's episodes DeleteEpisode deleted before (even when this
            # purge deletes none), stay in the index's older segments until a merge.
            # Merged here, with the delete, so no crash or failure after the commit
            # can leave them (the merge rewrites the whole index: 0.9 s for 40,000
            # episodes; purges are rare).
            await self._conn.execute("INSERT INTO episodes_fts (episodes_fts) VALUES ('optimize')")
        return deleted

    async def purge_requests(self, scope: SessionRef, keep_request_id: str) -> int:
        """Forget the answers of the scope's requests and their agent and session
        ids, but not the request ids: a retry of one finds it claimed (AnswerPurged)
        instead of running again and bringing the purged data back. Answers that hold
        no data stay (a purge's counts, a deleted episode's), so their retries still
        get them."""
        where, params = _scope(scope)
        return await self._count(
            "UPDATE request_log SET response = ?, agent_instance_id = NULL, session_id = NULL"
            f" WHERE {where} AND request_id <> ? AND method NOT IN ('PurgeData', 'DeleteEpisode')"
            " AND (response IS NULL OR response <> ?)",
            [PURGED_ANSWER, *params, keep_request_id, PURGED_ANSWER],
        )

    async def tombstone_events(self, scope: SessionRef) -> tuple[int, int]:
        where, params = _scope(scope)
        # Locked in sequence order, as compaction locks them: in the order of a
        # scan of the table (no index serves a scope), the two deadlocked on old
        # events of the scope.
        # The form domain._lifecycle_records.tombstone gives.
        cursor = await self._conn.execute(
            self._d.sql(
                "UPDATE lifecycle_events SET purged = ?, project_id = ?, agent_instance_id = ?,"
                " session_id = '', agent_type_id = NULL, checkpoint_id = NULL,"
                " episode_id = NULL, request_id = NULL, metadata = ? WHERE sequence IN"
                f" (SELECT sequence FROM lifecycle_events WHERE {where} AND purged = ?"
                f" ORDER BY sequence{self._d.for_update}) RETURNING sequence"
            ),
            [True, NIL_UUID, NIL_UUID, self._d.json_param({}), *params, False],
        )
        # The last one too: the hubs leave a later event of the scope (the session id
        # spawned again) as it is, though they may be told of the purge after it.
        sequences = [int(row[0]) for row in await cursor.fetchall()]
        if sequences and self._d.name == "postgres":
            # Delivered at commit: the other replicas' hubs drop the old form of
            # these events from what they hold for their streams.
            await self._conn.execute(
                self._d.sql("SELECT pg_notify(?, ?)"), (EVENT_CHANNEL, purge_notice(scope))
            )
        return len(sequences), max(sequences, default=0)
