"""Episodic memory: record, read, list, search and delete episodes.

Episodes live in the durable store. Every call is scoped by project. Records
are validated whole before anything is written; a ``request_id`` makes a
retried RecordEpisode return the first answer. Listing pages by the keyset
(create time, episode id), newest first, so a token stays correct while new
episodes arrive. Search ranks by the store's full-text relevance, or by cosine
similarity to a query embedding computed here over the filtered scope (bounded
by ``max_similarity_candidates``; see docs/decisions/0006-episodic-memory.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import struct
import time
import unicodedata
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from memsvc.domain._errors import (
    EpisodeNotFound,
    FieldViolation,
    SimilarityScopeTooLarge,
)
from memsvc.domain._ids import (
    SessionRef,
    check_request_id,
    check_session_id,
    check_uuid,
    raise_if_any,
)
from memsvc.domain._lifecycle_records import EpisodeRecord, RequestLog
from memsvc.domain._lifecycle_results import arguments_hash, claim, uuid7
from memsvc.domain._pagination import (
    Page,
    check_page_size,
    decode_page_token,
    fingerprint,
    page_of,
    page_position,
    position_ms,
    position_score,
    position_uuid,
)
from memsvc.domain._storable import (
    MAX_TIME_MS,
    MIN_TIME_MS,
    json_problem,
    json_size,
    metadata_problem,
)

OUTCOMES = {1: "SUCCESS", 2: "FAILURE", 3: "PARTIAL"}
MAX_TASK_TYPE_CHARS = 128
MAX_TEXT_CHARS = 10_000  # task description, outcome details
MAX_CONTEXT_SUMMARY_CHARS = 100_000
MAX_LESSONS = 100
MAX_LESSON_CHARS = 2_000
MAX_ACTIONS = 1_000
MAX_ACTIONS_BYTES = 1 << 20
MAX_EMBEDDING_DIMENSIONS = 4_096
MAX_QUERY_CHARS = 1_000
# Distinct terms (words and quoted phrases) a query may hold.
MAX_QUERY_TERMS = 64
# protobuf's Duration range: what the API can send back.
MAX_DURATION_SECONDS = 315_576_000_000
# Candidates scored per slice in a similarity search (at most 2 MB of float64 each).
_SCORED_AT_ONCE = 64
# Embeddings a similarity search reads from the store at once (4 MB at 4,096 values).
_CANDIDATES_AT_ONCE = 256
# Similarity searches that read and score at once in a process; the others wait
# their turn holding nothing. Each holds a slice of embeddings and its ranking
# (about 5 MB at 4,096 values); unbounded, 200 concurrent searches took a
# gigabyte, twice a sidecar's memory limit. As many as the database's readers.
SIMILARITY_SEARCHES_AT_ONCE = 4
LIST_PAGE = (100, 1_000)  # (default, maximum) page size
SEARCH_PAGE = (20, 100)

_TERM = re.compile(r'"([^"]*)"|([^\s"]+)')


def _number_signs() -> str:
    """A regex class body of the number signs that are neither digits nor letter
    numbers (Unicode No: ½, ², ①): Python's \\w takes them for word characters,
    PostgreSQL's parser does not (planes 0 and 1 hold them all). Letter numbers
    (Nl: Ⅻ, U+3007) it keeps in words, as FTS5 does."""
    ranges: list[str] = []
    start: int | None = None
    for code in range(0x20001):
        if code < 0x20000 and unicodedata.category(chr(code)) == "No":
            start = code if start is None else start
        elif start is not None:
            ranges.append(f"{re.escape(chr(start))}-{re.escape(chr(code - 1))}")
            start = None
    return "".join(ranges)


# A word, for search: a run of letters and digits, split out of the text before
# either store's tokenizer sees it, so both index and match the same words.
_NUMBER_SIGNS = _number_signs()
_WORD = re.compile(rf"[^\W_{_NUMBER_SIGNS}]+")
_NOT_WORDS = re.compile(rf"[\W_{_NUMBER_SIGNS}]+")
# PostgreSQL ignores a word longer than this (in UTF-8 bytes), in text and in
# queries alike: such words are left out of what both stores index, and refused
# in a query (a term PostgreSQL dropped would match every episode).
MAX_WORD_BYTES = 2047
# The fewest characters a word over MAX_WORD_BYTES can have (4 bytes each).
_MAYBE_TOO_LONG = re.compile(f"[^ ]{{{MAX_WORD_BYTES // 4 + 1},}}")
# Searchable text per episode indexed on PostgreSQL (description and lessons
# first): a tsvector holds at most 1 MiB, about 6.5 bytes per character at worst.
SEARCH_TEXT_CHARS = 120_000


def search_words(text: str) -> str:
    """``text`` as the words search sees: every run of other characters one space,
    and no word over MAX_WORD_BYTES."""
    words = _NOT_WORDS.sub(" ", text).strip()
    if _MAYBE_TOO_LONG.search(words):
        words = " ".join(w for w in words.split(" ") if len(w.encode()) <= MAX_WORD_BYTES)
    return words


def search_texts(episode: EpisodeRecord) -> tuple[str, str]:
    """The words an episode is found by, weighted high (description and lessons)
    and low (context summary), together at most SEARCH_TEXT_CHARS."""
    high = search_words(" ".join((episode.task_description, *episode.lessons_learned)))
    high = high[:SEARCH_TEXT_CHARS]
    low = search_words(episode.context_summary)[: SEARCH_TEXT_CHARS - len(high)]
    return high, low


@dataclass(frozen=True, slots=True)
class EpisodeScope:
    """Which episodes of a project a List or Search covers; None matches all."""

    project_id: str
    agent_instance_id: str | None = None
    session_id: str | None = None
    outcome: int | None = None
    task_type: str | None = None
    start_ms: int | None = None  # inclusive
    end_ms: int | None = None  # exclusive
    min_importance: float | None = None

    def fingerprint(self, *extra: str) -> str:
        # JSON, not str(): an unset filter (null) is not the text "None".
        return fingerprint(*(json.dumps(v) for v in dataclasses.astuple(self)), *extra)


@dataclass(frozen=True, slots=True)
class ScoredEpisode:
    """A search result: higher scores rank first."""

    episode: EpisodeRecord
    score: float


class EpisodeTransaction(RequestLog, Protocol):
    """The writes of episodic memory, inside one durable-store transaction."""

    async def lock_project(self, project_id: str, exclusive: bool) -> None:
        """Hold the project's lock (shared: writes; exclusive: a purge) until the
        transaction ends."""

    async def insert_episode(self, record: EpisodeRecord) -> None: ...

    async def delete_episode(self, project_id: str, episode_id: str) -> bool:
        """Delete an episode and its search entries; False when it did not exist."""


class EpisodeDatabase(Protocol):
    """The durable store's episodic side."""

    def transaction(self) -> AbstractAsyncContextManager[EpisodeTransaction]: ...

    async def get_episodes(
        self, project_id: str, episode_ids: Sequence[str], with_embedding: bool
    ) -> list[EpisodeRecord]:
        """The episodes of ``project_id`` among ``episode_ids`` (any order)."""

    async def ranked_episodes(
        self, project_id: str, episode_ids: Sequence[str], with_embedding: bool, byte_budget: int
    ) -> tuple[list[EpisodeRecord], bool]:
        """The episodes of ``project_id`` among ``episode_ids``, in that order, and
        whether ``byte_budget`` ended the read before the last (see list_episodes)."""

    async def list_episodes(
        self,
        scope: EpisodeScope,
        before: tuple[int, str] | None,
        limit: int,
        with_embedding: bool,
        byte_budget: int,
    ) -> tuple[list[EpisodeRecord], bool]:
        """Newest first, strictly before (create_ms, episode_id) when given; and
        whether the read stopped early at about ``byte_budget`` bytes (estimated by
        the store: the episode that crosses it comes, the rest are not read)."""

    async def search_episodes(
        self,
        scope: EpisodeScope,
        terms: Sequence[str],
        after: tuple[float, str] | None,
        limit: int,
        with_embedding: bool,
        byte_budget: int,
    ) -> tuple[list[ScoredEpisode], bool]:
        """Episodes matching every term (a word or phrase), best first, ties by
        episode id descending, strictly after (score, episode_id) when given; and
        whether the read stopped early at ``byte_budget`` (as list_episodes)."""

    async def embedded_episodes(
        self, scope: EpisodeScope, terms: Sequence[str], dimensions: int, limit: int
    ) -> list[str]:
        """The ids of up to ``limit`` episodes in scope whose embedding has
        ``dimensions`` values (and that match ``terms``, if any)."""

    async def embeddings(
        self, project_id: str, episode_ids: Sequence[str]
    ) -> list[tuple[str, bytes]]:
        """(episode_id, embedding) of those of ``episode_ids`` that have one."""


class Episodes:
    """Episodic memory over a durable store."""

    def __init__(
        self,
        database: EpisodeDatabase,
        *,
        max_similarity_candidates: int = 10_000,
        page_bytes: int = 3 << 20,
        text_search_readers: int = 4,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._db = database
        self._max_candidates = max_similarity_candidates
        # Pages end before their episodes outgrow this (a response is one message).
        self._page_bytes = page_bytes
        self._clock_ms = clock_ms
        self._similarity_turns = asyncio.Semaphore(SIMILARITY_SEARCHES_AT_ONCE)
        # Full-text searches that run at once: half the store's readers (at least
        # one). A search ranks every match it finds, on SQLite rereading each one's
        # text (about 3 ms for a 90,000-character summary), holding a reader that
        # every other read shares (GetSession, ListCheckpoints, a watcher catching
        # up): the other half stays theirs.
        self.text_searches_at_once = max(1, text_search_readers // 2)
        self._text_search_turns = asyncio.Semaphore(self.text_searches_at_once)

    async def record(
        self,
        episode: EpisodeRecord,
        embedding: Sequence[float],
        request_id: str,
        found: Sequence[FieldViolation] = (),
    ) -> EpisodeRecord:
        """Validate and store ``episode`` with ``embedding`` (its id, time and
        embedding dimensions are assigned here); ``found``: violations found
        before (by the API), reported with these."""
        violations = [*found, *check_episode(episode, "episode")]
        packed = check_embedding(embedding, "episode.embedding", violations)
        request_id = check_request_id(request_id, violations)
        size = dataclasses.replace(episode, embedding=packed).size()
        if not violations and size > self._page_bytes:
            # Within every field's limit, but too large for a response as a whole.
            violations.append(
                FieldViolation(
                    "episode",
                    f"is {size} bytes with all its fields, over the {self._page_bytes} bytes "
                    "one response carries (3/4 of max_message_bytes): shorten its text, "
                    "actions or lessons",
                )
            )
        raise_if_any(violations)
        ref = SessionRef(
            episode.ref.project_id.lower(),
            episode.ref.agent_instance_id.lower(),
            episode.ref.session_id,
        )
        # Before the transaction: hashing a large episode takes a while (0.1 s for
        # 1 MiB of actions), which no pooled connection or project lock should wait on.
        arguments = (
            arguments_hash(
                "RecordEpisode",
                dataclasses.astuple(dataclasses.replace(episode, ref=ref)),
                packed.hex() if packed else None,
            )
            if request_id
            else ""
        )
        async with self._db.transaction() as tx:
            # Not inside a purge of the project (it travels with the next statement).
            await tx.lock_project(ref.project_id, exclusive=False)
            if request_id:
                previous = await claim(tx, ref, request_id, "RecordEpisode", arguments)
                if previous is not None:
                    return decode_episode(previous)
            # One clock reading for both: the id sorts as the time does.
            now = self._clock_ms()
            stored = dataclasses.replace(
                episode,
                ref=ref,
                episode_id=uuid7(now),
                create_ms=now,
                embedding=packed,
                embedding_dimensions=len(packed or b"") // 4,
            )
            await tx.insert_episode(stored)
            answer = dataclasses.replace(stored, embedding=None)
            if request_id:
                await tx.remember_response(ref.project_id, request_id, encode_episode(answer))
        return answer

    async def get(self, project_id: str, episode_id: str, with_embedding: bool) -> EpisodeRecord:
        violations: list[FieldViolation] = []
        project, episode = _check_episode_name(project_id, episode_id, violations)
        raise_if_any(violations)
        found = await self._db.get_episodes(project, [episode], with_embedding)
        if not found:
            raise EpisodeNotFound(episode_id)
        return found[0]

    async def delete(
        self, project_id: str, episode_id: str, allow_missing: bool, request_id: str = ""
    ) -> None:
        """Delete an episode; with ``request_id``, a retry of a call that deleted it
        answers OK again (the first answer), not NOT_FOUND."""
        violations: list[FieldViolation] = []
        project, episode = _check_episode_name(project_id, episode_id, violations)
        request_id = check_request_id(request_id, violations)
        raise_if_any(violations)
        async with self._db.transaction() as tx:
            if request_id:
                arguments = arguments_hash("DeleteEpisode", project, episode, allow_missing)
                scope = SessionRef(project, "", "")
                if await claim(tx, scope, request_id, "DeleteEpisode", arguments) is not None:
                    return  # answered before: the episode is gone
            deleted = await tx.delete_episode(project, episode)
            if not deleted and not allow_missing:
                # Raised inside the transaction: a refused call claims no request id.
                raise EpisodeNotFound(episode_id)
            if request_id:
                await tx.remember_response(project, request_id, b"deleted")

    async def list_episodes(
        self,
        scope: EpisodeScope,
        page_size: int,
        page_token: str,
        with_embedding: bool,
        found: Sequence[FieldViolation] = (),
    ) -> Page[EpisodeRecord]:
        violations = list(found)
        scope = check_scope(scope, violations)
        limit = check_page_size(
            page_size, default=LIST_PAGE[0], maximum=LIST_PAGE[1], violations=violations
        )
        raise_if_any(violations)
        token_scope = scope.fingerprint("list")
        after = decode_page_token(page_token, token_scope)
        before = page_position(after, position_ms, position_uuid)
        items, cut = await self._db.list_episodes(
            scope, before, limit + 1, with_embedding, self._page_bytes
        )
        return page_of(
            items,
            limit,
            token_scope,
            lambda e: [e.create_ms, e.episode_id],
            EpisodeRecord.size,
            self._page_bytes,
            cut,
        )

    async def search(
        self,
        scope: EpisodeScope,
        query: str,
        query_embedding: Sequence[float],
        page_size: int,
        page_token: str,
        with_embedding: bool,
        found: Sequence[FieldViolation] = (),
    ) -> Page[ScoredEpisode]:
        violations = list(found)
        scope = check_scope(scope, violations)
        limit = check_page_size(
            page_size, default=SEARCH_PAGE[0], maximum=SEARCH_PAGE[1], violations=violations
        )
        terms = check_query(query, bool(query_embedding), violations)
        vector = check_embedding(query_embedding, "query_embedding", violations)
        raise_if_any(violations)
        # "rank 2": PostgreSQL ranks by the OR of the terms since 2026-12-08; a page
        # position of the AND's score taken on a replica of before means nothing here.
        token_scope = scope.fingerprint(
            "search", "rank 2", json.dumps(terms), vector.hex() if vector else ""
        )
        after = page_position(
            decode_page_token(page_token, token_scope), position_score, position_uuid
        )
        if vector is None:
            async with self._text_search_turns:
                items, cut = await self._db.search_episodes(
                    scope, terms, after, limit + 1, with_embedding, self._page_bytes
                )
        else:
            async with self._similarity_turns:
                items, cut = await self._similar(
                    scope, terms, vector, after, limit + 1, with_embedding
                )
        return page_of(
            items,
            limit,
            token_scope,
            lambda s: [s.score, s.episode.episode_id],
            lambda s: s.episode.size(),
            self._page_bytes,
            cut,
        )

    async def _similar(
        self,
        scope: EpisodeScope,
        terms: list[str],
        vector: bytes,
        after: tuple[float, str] | None,
        limit: int,
        with_embedding: bool,
    ) -> tuple[list[ScoredEpisode], bool]:
        """Rank the scope's embeddings by cosine similarity to ``vector``; the
        best ``limit`` episodes, and whether the page's byte budget stopped the
        read before them (see list_episodes)."""
        dimensions = len(vector) // 4
        candidates = await self._db.embedded_episodes(
            scope, terms, dimensions, self._max_candidates + 1
        )
        if len(candidates) > self._max_candidates:
            raise SimilarityScopeTooLarge(self._max_candidates)
        # Their embeddings read and scored a slice at a time: the whole scope's at
        # once would be 164 MB at 10,000 x 4,096 (a sidecar's memory limit is
        # 512 MiB), and as much again for every search running beside it.
        ranked: list[tuple[float, str]] = []
        for start in range(0, len(candidates), _CANDIDATES_AT_ONCE):
            read = await self._db.embeddings(
                scope.project_id, candidates[start : start + _CANDIDATES_AT_ONCE]
            )
            if read:
                scores = cosine_scores([e for _, e in read], vector, dimensions)
                ranked += zip(map(float, scores), (i for i, _ in read), strict=True)
            # Let go of this slice before waiting for the next: held, it doubles
            # what every search waiting on the database keeps.
            del read
        if not ranked:
            return [], False
        ranked.sort(reverse=True)
        if after is not None:
            ranked = [item for item in ranked if item < after]
        # An episode deleted since the ranking read is left out, and the next ones
        # in the ranking take its place: a short page would say no more follow.
        results: list[ScoredEpisode] = []
        used = 0
        while len(results) < limit and ranked:
            chunk, ranked = ranked[: limit - len(results)], ranked[limit - len(results) :]
            found, cut = await self._db.ranked_episodes(
                scope.project_id,
                [episode_id for _, episode_id in chunk],
                with_embedding,
                max(0, self._page_bytes - used),
            )
            by_id = {episode.episode_id: episode for episode in found}
            kept = [ScoredEpisode(by_id[i], s) for s, i in chunk if i in by_id]
            results += kept
            used += sum(s.episode.size() for s in kept)
            if cut:
                return results, True
        return results, False


def _check_episode_name(
    project_id: str, episode_id: str, violations: list[FieldViolation]
) -> tuple[str, str]:
    """The canonical project and episode ids; bad ones go to ``violations``."""
    return (
        check_uuid(project_id, "project_id", violations),
        check_uuid(episode_id, "episode_id", violations),
    )


def check_scope(scope: EpisodeScope, violations: list[FieldViolation]) -> EpisodeScope:
    """Validate List and Search filters; return them canonical."""
    project = check_uuid(scope.project_id, "project_id", violations)
    agent = scope.agent_instance_id
    if agent is not None:
        agent = check_uuid(agent, "filter.agent_instance_id", violations)
    if scope.session_id is not None:
        check_session_id(scope.session_id, "filter.session_id", violations)
        if agent is None:
            violations.append(
                FieldViolation("filter.session_id", "requires filter.agent_instance_id")
            )
    if scope.outcome is not None and scope.outcome not in OUTCOMES:
        violations.append(FieldViolation("filter.outcome", f"unknown outcome {scope.outcome}"))
    if scope.task_type is not None and len(scope.task_type) > MAX_TASK_TYPE_CHARS:
        violations.append(
            FieldViolation("filter.task_type", f"is over {MAX_TASK_TYPE_CHARS} characters")
        )
    if scope.min_importance is not None and not 0 <= scope.min_importance <= 1:
        violations.append(
            FieldViolation(
                "filter.min_importance", f"must be from 0 to 1, got {scope.min_importance}"
            )
        )
    for name, moment in (("start_time", scope.start_ms), ("end_time", scope.end_ms)):
        if moment is not None and not MIN_TIME_MS <= moment <= MAX_TIME_MS:
            violations.append(
                FieldViolation(f"filter.{name}", "must be from year 1 to year 9999 (UTC)")
            )
    if scope.task_type is not None and (problem := json_problem(scope.task_type)):
        violations.append(FieldViolation("filter.task_type", problem))
    # Equal is an empty range, not a mistake: bounds within one millisecond round
    # to the same one (and no episode is stamped between them).
    if scope.start_ms is not None and scope.end_ms is not None and scope.start_ms > scope.end_ms:
        violations.append(FieldViolation("filter.end_time", "must not be before filter.start_time"))
    return dataclasses.replace(scope, project_id=project, agent_instance_id=agent)


def check_query(query: str, has_embedding: bool, violations: list[FieldViolation]) -> list[str]:
    """The search terms of ``query``: quoted phrases and single words, each
    reduced to its words (so no term carries query syntax into the store)."""
    if len(query) > MAX_QUERY_CHARS:
        violations.append(
            FieldViolation("query", f"is {len(query)} characters, over {MAX_QUERY_CHARS}")
        )
        return []
    terms: list[str] = []
    seen: set[str] = set()
    for phrase, word in _TERM.findall(query):
        words = _WORD.findall(phrase or word)
        if any(len(found.encode()) > MAX_WORD_BYTES for found in words):
            violations.append(
                FieldViolation(
                    "query",
                    f"has a word over {MAX_WORD_BYTES} bytes (UTF-8), which no episode"
                    " can be found by (PostgreSQL indexes no longer words)",
                )
            )
            return []
        term = " ".join(words)
        # Once each: every term must match anyway, and ranking works through each
        # term's matches (a query of one word 500 times took SQLite 50 s on 10
        # small episodes, and held a search slot of every project meanwhile). As
        # written: which case forms one word matches is the database's (PostgreSQL
        # under LC_CTYPE C folds ASCII only).
        if words and term not in seen:
            seen.add(term)
            terms.append(term)
    if len(terms) > MAX_QUERY_TERMS:
        # Ranking works through every term's matches: the cost grows faster than the
        # terms (case forms of one word count apart here, yet are one to SQLite).
        violations.append(
            FieldViolation("query", f"has {len(terms)} terms, over {MAX_QUERY_TERMS}")
        )
        return []
    if not terms and not has_embedding:
        violations.append(
            FieldViolation("query", "needs at least one word (or give a query_embedding)")
        )
    elif not terms and query.strip():
        # With an embedding, a query filters: one with no word would filter nothing.
        violations.append(
            FieldViolation(
                "query",
                "has no word (letter or digit) to filter by; leave it empty to "
                "rank by query_embedding alone",
            )
        )
    return terms


def cosine_scores(embeddings: Sequence[bytes], vector: bytes, dimensions: int) -> Any:
    """The cosine similarity of each packed embedding to ``vector`` (0 for a zero
    embedding), as a numpy array.

    Each score is the same whichever rows are scored with it: a page token holds
    a score, and the next page compares the scores computed then with it. A BLAS
    matrix product (``matrix @ query``) rounds a row differently with the number
    of rows in the product, which repeated or skipped an episode across pages.
    """
    import numpy as np  # a server dependency: the client side imports this module too

    query = np.frombuffer(vector, dtype="<f4").astype(np.float64)
    query_norm = np.sqrt(np.einsum("j,j->", query, query))
    scores = np.zeros(len(embeddings))
    # Scored a slice at a time: the whole scope as one float64 matrix would be
    # twice its embeddings again in memory (328 MB at 10,000 x 4,096). einsum
    # (not BLAS) sums each row alone, in the same order for any slice.
    for start in range(0, len(embeddings), _SCORED_AT_ONCE):
        rows = embeddings[start : start + _SCORED_AT_ONCE]
        matrix = np.frombuffer(b"".join(rows), dtype="<f4")
        matrix = matrix.reshape(len(rows), dimensions).astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix)) * query_norm
        dots = np.einsum("ij,j->i", matrix, query)
        np.divide(dots, norms, out=scores[start : start + len(rows)], where=norms > 0)
    # Rounding can take a vector's score against itself past 1: the proto says -1 to 1.
    return np.clip(scores, -1.0, 1.0)


def check_embedding(
    values: Sequence[float], field: str, violations: list[FieldViolation]
) -> bytes | None:
    """Pack an embedding as little-endian float32; None when empty."""
    if not values:
        return None
    if len(values) > MAX_EMBEDDING_DIMENSIONS:
        violations.append(
            FieldViolation(
                field, f"has {len(values)} values, over the maximum of {MAX_EMBEDDING_DIMENSIONS}"
            )
        )
        return None
    if not all(math.isfinite(v) for v in values):
        violations.append(FieldViolation(field, "must hold only finite numbers"))
        return None
    packed = struct.pack(f"<{len(values)}f", *values)
    # As stored (float32): a value too small for it is 0 there. A vector of zeros
    # has no direction, so no cosine: stored, it would score 0 against any query.
    if not any(struct.unpack(f"<{len(values)}f", packed)):
        violations.append(FieldViolation(field, "is all zeros: it has no direction to compare"))
        return None
    return packed


def unpack_embedding(raw: bytes | None) -> list[float]:
    """The values of a packed embedding."""
    if not raw:
        return []
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def check_episode(episode: EpisodeRecord, prefix: str) -> list[FieldViolation]:
    """Every violation of the episode rules (see proto/memsvc/v1/episodic.proto)."""
    violations: list[FieldViolation] = []

    def bad(name: str, problem: str) -> None:
        violations.append(FieldViolation(f"{prefix}.{name}", problem))

    ref = episode.ref
    check_uuid(ref.project_id, f"{prefix}.project_id", violations)
    check_uuid(ref.agent_instance_id, f"{prefix}.agent_instance_id", violations)
    check_session_id(ref.session_id, f"{prefix}.session_id", violations)
    if episode.episode_id:
        bad("episode_id", "is assigned by the server; leave it empty")
    if episode.create_ms:  # the API refuses a set create_time itself (its presence)
        bad("create_time", "is assigned by the server; leave it unset")
    if episode.embedding_dimensions:
        bad("embedding_dimensions", "is computed by the server; leave it 0")
    if not episode.task_type:
        bad("task_type", "is required (for example 'code_review')")
    _check_text(bad, "task_type", episode.task_type, MAX_TASK_TYPE_CHARS)
    _check_text(bad, "outcome_details", episode.outcome_details, MAX_TEXT_CHARS)
    _check_text(bad, "context_summary", episode.context_summary, MAX_CONTEXT_SUMMARY_CHARS)
    check_story(
        bad, episode.task_description, episode.outcome, episode.lessons_learned, episode.metadata
    )
    if len(episode.actions) > MAX_ACTIONS:
        bad("actions", f"has {len(episode.actions)} actions, over the maximum of {MAX_ACTIONS}")
    elif json_size(episode.actions) > MAX_ACTIONS_BYTES:
        bad("actions", f"is over {MAX_ACTIONS_BYTES} bytes of JSON")
    elif problem := json_problem(episode.actions):
        bad("actions", problem)
    if not math.isfinite(episode.duration_seconds) or episode.duration_seconds < 0:
        bad("duration", "must not be negative")
    elif episode.duration_seconds > MAX_DURATION_SECONDS:
        bad("duration", f"must be at most {MAX_DURATION_SECONDS} seconds (10,000 years)")
    if episode.tokens_used < 0:
        bad("tokens_used", f"must not be negative, got {episode.tokens_used}")
    if not (math.isfinite(episode.importance) and 0 <= episode.importance <= 1):
        bad("importance", f"must be from 0 to 1, got {episode.importance}")
    return violations


def check_story(
    bad: Callable[[str, str], None],
    task_description: str,
    outcome: int,
    lessons: Sequence[str],
    metadata: Any,
    *,
    limits: bool = True,
    lesson_limits: bool = True,
) -> None:
    """The rules of an episode's story, whoever writes it: RecordEpisode, or a
    Terminate that consolidates the session into one. Terminate's contract cuts
    its description instead of refusing it, and its metadata has the lifecycle's
    limits (``limits=False``); its lessons become the episode's as they are, so
    they have the episode's limits when it records one (``lesson_limits``)."""
    if outcome not in OUTCOMES:
        expected = "OUTCOME_SUCCESS, OUTCOME_FAILURE or OUTCOME_PARTIAL"
        bad("outcome", f"must be {expected}, got {outcome}")
    _check_text(bad, "task_description", task_description, MAX_TEXT_CHARS if limits else None)
    if lesson_limits and len(lessons) > MAX_LESSONS:
        bad("lessons_learned", f"has {len(lessons)} lessons, over {MAX_LESSONS}")
    for index, lesson in enumerate(lessons):
        _check_text(
            bad, f"lessons_learned[{index}]", lesson, MAX_LESSON_CHARS if lesson_limits else None
        )
    if limits and (problem := metadata_problem(metadata)):
        bad("metadata", problem)


def _check_text(bad: Callable[[str, str], None], name: str, value: str, limit: int | None) -> None:
    """One violation at most: longer than ``limit`` (when given), or not storable."""
    if limit is not None and len(value) > limit:
        bad(name, f"is {len(value)} characters, over the maximum of {limit}")
    elif problem := json_problem(value):
        bad(name, problem)


def encode_episode(episode: EpisodeRecord) -> bytes:
    """An episode (without its embedding) as a remembered answer."""
    data = dataclasses.asdict(dataclasses.replace(episode, embedding=None))
    return json.dumps(data, separators=(",", ":")).encode()


def decode_episode(raw: bytes) -> EpisodeRecord:
    data = json.loads(raw)
    return EpisodeRecord(**{**data, "ref": SessionRef(**data["ref"])})
