"""Episode SQL shared by the SQLite and PostgreSQL stores.

Everything but full-text matching is written once. Full text differs: on
PostgreSQL a ``tsvector`` column that memsvc fills, with a GIN index, matched by
one ``phraseto_tsquery`` per term and ranked by ``ts_rank``; on SQLite an FTS5 table
kept in step by triggers, matched by an FTS5 query and ranked by ``text_rank``.
Both see text as memsvc's words of letters and digits: the text with every
other character made a space (``search_words``), which FTS5's triggers get
through the SQL function ``memsvc_search_words`` (SQLite migration 0009) and
PostgreSQL's document is written from (``search_texts``), parsed by
``memsvc_english`` (English stems, no stop words; PostgreSQL migration 0009).
Both receive the same terms (words and phrases, see
``memsvc.domain._episodes.check_query``), every one of which must match.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from memsvc.domain import SessionRef
from memsvc.domain._episodes import EpisodeScope, ScoredEpisode, search_texts
from memsvc.domain._lifecycle_records import (
    EMBEDDING_FRAMING_BYTES,
    EPISODE_RECORD_BYTES,
    EpisodeRecord,
)
from memsvc.store._budgeted_sql import next_page_condition, read_within_budget
from memsvc.store._lifecycle_sql import (
    Connection,
    Dialect,
    SqlQueries,
    SqlWrites,
    record_weight,
    text,
)

_COLUMNS = (
    "e.episode_id, e.project_id, e.agent_instance_id, e.session_id, e.task_type,"
    " e.task_description, e.outcome, e.outcome_details, e.actions, e.context_summary,"
    " e.lessons_learned, e.duration_seconds, e.tokens_used, e.importance, e.metadata,"
    " e.create_time, e.embedding_dimensions"
)


def _marked(column: int) -> str:
    """One column of the row with each match FTS5 finds in it marked by char(1)
    (NULL for an episode without lessons)."""
    return f"highlight(episodes_fts, {column}, char(1), '')"


# The SQL functions each SQLite connection gets (SqliteDurableStore): text_rank,
# and search_words, which the FTS5 triggers call (migration 0009).
SQLITE_TEXT_RANK = "memsvc_text_rank"
SQLITE_SEARCH_WORDS = "memsvc_search_words"
_MATCH = "\x01"


def text_rank(
    description: str | None,
    summary: str | None,
    lessons: str | None,
    raw_description: str | None,
    raw_summary: str | None,
    raw_lessons: str | None,
    length: int,
) -> float:
    """A search score from one episode alone: its matches (the columns as
    ``_marked`` gives them, each marked once; less the marks the stored text
    holds itself, which an episode could otherwise use to rank itself first),
    description and lessons weighing twice the summary, divided by
    1 + ln(1 + its length in characters) (as ts_rank's normalization 1 divides by
    1 + log(length)). Not FTS5's bm25, whose corpus statistics move with every
    episode recorded (in any project): a page position taken from one search
    would no longer compare with the next."""
    weighted = sum(
        weight * ((marked or "").count(_MATCH) - (raw or "").count(_MATCH))
        for weight, marked, raw in (
            (2.0, description, raw_description),
            (1.0, summary, raw_summary),
            (2.0, lessons, raw_lessons),
        )
    )
    return weighted / (1.0 + math.log1p(length))


def _columns(with_embedding: bool) -> str:
    return _COLUMNS + (", e.embedding" if with_embedding else ", NULL")


def episode_from_row(row: Sequence[Any], dialect: Dialect) -> EpisodeRecord:
    """An EpisodeRecord from the columns of :func:`_columns`."""
    return EpisodeRecord(
        episode_id=str(text(row[0])),
        ref=SessionRef(str(text(row[1])), str(text(row[2])), str(row[3])),
        task_type=row[4],
        task_description=row[5],
        outcome=int(row[6]),
        outcome_details=row[7],
        actions=dialect.json_value(row[8]),
        context_summary=row[9],
        lessons_learned=dialect.json_value(row[10]),
        duration_seconds=float(row[11]),
        tokens_used=int(row[12]),
        importance=float(row[13]),
        metadata=dialect.json_value(row[14]),
        create_ms=dialect.time_value(row[15]),
        embedding_dimensions=int(row[16]),
        embedding=None if row[17] is None else bytes(row[17]),
    )


def _scope(scope: EpisodeScope, dialect: Dialect) -> tuple[list[str], list[Any]]:
    """WHERE conditions (on alias ``e``) and parameters for a scope."""
    conditions = ["e.project_id = ?"]
    params: list[Any] = [scope.project_id]
    for column, value in (
        ("agent_instance_id", scope.agent_instance_id),
        ("session_id", scope.session_id),
        ("outcome", scope.outcome),
        ("task_type", scope.task_type),
    ):
        if value is not None:
            conditions.append(f"e.{column} = ?")
            params.append(value)
    if scope.start_ms is not None:
        conditions.append("e.create_time >= ?")
        params.append(dialect.time_param(scope.start_ms))
    if scope.end_ms is not None:
        conditions.append("e.create_time < ?")
        params.append(dialect.time_param(scope.end_ms))
    if scope.min_importance is not None:
        conditions.append("e.importance >= ?")
        params.append(scope.min_importance)
    return conditions, params


def _text_match(dialect: Dialect, terms: Sequence[str]) -> tuple[str, str, str, list[str]]:
    """(FROM clause, match condition, score expression, query parameters)."""
    if dialect.name == "postgres":
        phrases = ["phraseto_tsquery('memsvc_english', ?)" for _ in terms]
        return (
            # Every term must match (q), a phrase as a phrase (its words in a row);
            # ranked by any of them (r): ts_rank of an AND compares every pair of
            # terms at every pair of their positions, and 20 common words over 60
            # long episodes took over 5 s; of an OR it sums each term's weight.
            f"episodes e, (SELECT {' && '.join(phrases)}, {' || '.join(phrases)}) AS m(q, r)",
            "e.search_document @@ m.q",
            # Normalization 1: divide by 1 + log(length), so long summaries do not win.
            # float8: a real would reach Python rounded by its text form, and the
            # page position would then no longer compare equal to it.
            "ts_rank(e.search_document, m.r, 1)::float8",
            [*terms, *terms],
        )
    return (
        "episodes_fts JOIN episodes e ON e.search_rowid = episodes_fts.rowid",
        "episodes_fts MATCH ?",
        f"{SQLITE_TEXT_RANK}({_marked(0)}, {_marked(1)}, {_marked(2)},"
        " episodes_fts.task_description, episodes_fts.context_summary, episodes_fts.lessons,"
        " length(e.task_description) + length(e.context_summary) + length(e.lessons_learned))",
        [" ".join(f'"{term}"' for term in terms)],
    )


async def get_episodes(
    conn: Connection,
    dialect: Dialect,
    project_id: str,
    episode_ids: Sequence[str],
    with_embedding: bool,
) -> list[EpisodeRecord]:
    if not episode_ids:
        return []
    marks = ", ".join("?" for _ in episode_ids)
    cursor = await conn.execute(
        dialect.sql(
            f"SELECT {_columns(with_embedding)} FROM episodes e"
            f" WHERE e.project_id = ? AND e.episode_id IN ({marks})"
        ),
        (project_id, *episode_ids),
    )
    return [episode_from_row(row, dialect) for row in await cursor.fetchall()]


async def ranked_episodes(
    conn: Connection,
    dialect: Dialect,
    project_id: str,
    episode_ids: Sequence[str],
    with_embedding: bool,
    byte_budget: int,
) -> tuple[list[EpisodeRecord], bool]:
    """The episodes of ``project_id`` among ``episode_ids``, in that order, within
    ``byte_budget`` (see :func:`read_within_budget`)."""
    if not episode_ids:
        return [], False
    marks = ", ".join("?" for _ in episode_ids)
    place = "CASE e.episode_id " + " ".join(f"WHEN ? THEN {i}" for i in range(len(episode_ids)))
    rows, cut = await read_within_budget(
        conn,
        dialect,
        f"SELECT {_columns(with_embedding)}, {place} END AS place,"
        f" {_weight(dialect, with_embedding)} AS weight FROM episodes e"
        f" WHERE e.project_id = ? AND e.episode_id IN ({marks})",
        [*episode_ids, project_id, *episode_ids],
        "place",
        len(episode_ids),
        byte_budget,
    )
    return [episode_from_row(row, dialect) for row in rows], cut


def _weight(dialect: Dialect, with_embedding: bool) -> str:
    """An episode row's bytes in a response: what memsvc counted when it recorded
    it (``response_bytes``), plus its embedding when the page carries them. An
    episode recorded before that column is weighed as EpisodeRecord.size counts
    it, with a bound of its JSON's (Dialect.json_wire_bound): never light."""
    texts = ("task_type", "task_description", "outcome_details", "context_summary", "session_id")
    counted = record_weight(
        dialect,
        EPISODE_RECORD_BYTES,
        [f"e.{column}" for column in texts],
        [f"e.{column}" for column in ("actions", "lessons_learned", "metadata")],
    )
    weight = f"coalesce(e.response_bytes, {counted})"
    if with_embedding:
        embedding = dialect.stored_length("e.embedding")
        weight += f" + coalesce({embedding} + {EMBEDDING_FRAMING_BYTES}, 0)"
    return weight


async def list_episodes(
    conn: Connection,
    dialect: Dialect,
    scope: EpisodeScope,
    before: tuple[int, str] | None,
    limit: int,
    with_embedding: bool,
    byte_budget: int,
) -> tuple[list[EpisodeRecord], bool]:
    if before is not None and scope.end_ms is not None and before[0] < scope.end_ms:
        # The cursor's own bound implies the end's: alone, it is the one SQLite
        # starts the index scan from (it takes the first upper bound, the end's,
        # and filters every row from there to the cursor).
        scope = dataclasses.replace(scope, end_ms=None)
    conditions, params = _scope(scope, dialect)
    if before is not None:
        after, after_params = next_page_condition(
            ("e.create_time", "e.episode_id"), (dialect.time_param(before[0]), before[1])
        )
        conditions.append(after)
        params += after_params
    rows, cut = await read_within_budget(
        conn,
        dialect,
        f"SELECT {_columns(with_embedding)}, {_weight(dialect, with_embedding)} AS weight"
        f" FROM episodes e WHERE {' AND '.join(conditions)}",
        params,
        "create_time DESC, episode_id DESC",
        limit,
        byte_budget,
    )
    return [episode_from_row(row, dialect) for row in rows], cut


async def search_episodes(
    conn: Connection,
    dialect: Dialect,
    scope: EpisodeScope,
    terms: Sequence[str],
    after: tuple[float, str] | None,
    limit: int,
    with_embedding: bool,
    byte_budget: int,
) -> tuple[list[ScoredEpisode], bool]:
    source, match, score, query = _text_match(dialect, terms)
    conditions, params = _scope(scope, dialect)
    outer = ""
    outer_params: list[Any] = []
    if after is not None:
        outer = " WHERE score < ? OR (score = ? AND episode_id < ?)"
        outer_params = [after[0], after[0], after[1]]
    # The rank is computed in a subquery so the page position can compare it.
    rows, cut = await read_within_budget(
        conn,
        dialect,
        f"SELECT * FROM (SELECT {_columns(with_embedding)}, {score} AS score,"
        f" {_weight(dialect, with_embedding)} AS weight"
        f" FROM {source} WHERE {match} AND {' AND '.join(conditions)}) ranked{outer}",
        [*query, *params, *outer_params],
        "score DESC, episode_id DESC",
        limit,
        byte_budget,
    )
    return [ScoredEpisode(episode_from_row(row, dialect), float(row[18])) for row in rows], cut


async def embedded_episodes(
    conn: Connection,
    dialect: Dialect,
    scope: EpisodeScope,
    terms: Sequence[str],
    dimensions: int,
    limit: int,
) -> list[str]:
    conditions, params = _scope(scope, dialect)
    conditions.append("e.embedding_dimensions = ?")
    params.append(dimensions)
    source = "episodes e"
    if terms:
        source, match, _, query = _text_match(dialect, terms)
        conditions.insert(0, match)
        params = [*query, *params]
    cursor = await conn.execute(
        dialect.sql(
            f"SELECT e.episode_id FROM {source} WHERE {' AND '.join(conditions)} LIMIT {int(limit)}"
        ),
        params,
    )
    return [str(text(row[0])) for row in await cursor.fetchall()]


async def embeddings(
    conn: Connection, dialect: Dialect, project_id: str, episode_ids: Sequence[str]
) -> list[tuple[str, bytes]]:
    if not episode_ids:
        return []
    marks = ", ".join("?" for _ in episode_ids)
    cursor = await dialect.execute_bulk_read(
        conn,
        "SELECT e.episode_id, e.embedding FROM episodes e WHERE e.project_id = ?"
        f" AND e.episode_id IN ({marks}) AND e.embedding IS NOT NULL",
        [project_id, *episode_ids],
    )
    return [(str(text(row[0])), bytes(row[1])) for row in await cursor.fetchall()]


class SqlEpisodeWrites(SqlWrites):
    """The episode writes of a durable-store transaction."""

    async def insert_episode(self, record: EpisodeRecord) -> None:
        columns = (
            "episode_id, project_id, agent_instance_id, session_id, task_type,"
            " task_description, outcome, outcome_details, actions, context_summary,"
            " lessons_learned, duration_seconds, tokens_used, importance, metadata,"
            " create_time, embedding, embedding_dimensions, response_bytes"
        )
        values: list[Any] = [
            record.episode_id,
            record.ref.project_id,
            record.ref.agent_instance_id,
            record.ref.session_id,
            record.task_type,
            record.task_description,
            record.outcome,
            record.outcome_details,
            self._d.json_param(record.actions),
            record.context_summary,
            self._d.json_param(record.lessons_learned),
            record.duration_seconds,
            record.tokens_used,
            record.importance,
            self._d.json_param(record.metadata),
            self._d.time_param(record.create_ms),
            record.embedding,
            record.embedding_dimensions,
            record.size_without_embedding(),
        ]
        marks = ", ".join("?" for _ in values)
        if self._d.name == "postgres":
            # The search document, from memsvc's words (on SQLite, triggers fill FTS5).
            columns += ", search_document"
            marks += (
                ", setweight(to_tsvector('memsvc_english', ?), 'A')"
                " || setweight(to_tsvector('memsvc_english', ?), 'B')"
            )
            values += search_texts(record)
        await self._write(f"INSERT INTO episodes ({columns}) VALUES ({marks})", values)

    async def delete_episode(self, project_id: str, episode_id: str) -> bool:
        cursor = await self._conn.execute(
            self._d.sql(
                "DELETE FROM episodes WHERE project_id = ? AND episode_id = ? RETURNING episode_id"
            ),
            (project_id, episode_id),
        )
        return await cursor.fetchone() is not None


class SqlEpisodeReads(SqlQueries):
    """The reads of EpisodeDatabase, written once for both stores."""

    async def get_episodes(
        self, project_id: str, episode_ids: Sequence[str], with_embedding: bool
    ) -> list[EpisodeRecord]:
        return await self._query(get_episodes, project_id, episode_ids, with_embedding)

    async def ranked_episodes(
        self, project_id: str, episode_ids: Sequence[str], with_embedding: bool, byte_budget: int
    ) -> tuple[list[EpisodeRecord], bool]:
        return await self._query(
            ranked_episodes, project_id, episode_ids, with_embedding, byte_budget
        )

    async def list_episodes(
        self,
        scope: EpisodeScope,
        before: tuple[int, str] | None,
        limit: int,
        with_embedding: bool,
        byte_budget: int,
    ) -> tuple[list[EpisodeRecord], bool]:
        return await self._query(list_episodes, scope, before, limit, with_embedding, byte_budget)

    async def search_episodes(
        self,
        scope: EpisodeScope,
        terms: Sequence[str],
        after: tuple[float, str] | None,
        limit: int,
        with_embedding: bool,
        byte_budget: int,
    ) -> tuple[list[ScoredEpisode], bool]:
        return await self._query(
            search_episodes, scope, terms, after, limit, with_embedding, byte_budget
        )

    async def embedded_episodes(
        self, scope: EpisodeScope, terms: Sequence[str], dimensions: int, limit: int
    ) -> list[str]:
        return await self._query(embedded_episodes, scope, terms, dimensions, limit)

    async def embeddings(
        self, project_id: str, episode_ids: Sequence[str]
    ) -> list[tuple[str, bytes]]:
        return await self._query(embeddings, project_id, episode_ids)
