"""Working memory: the rules of a session's key/value store and its storage port.

``WorkingMemory`` validates every request completely before touching storage, so
an invalid call changes nothing; the store (``WorkingMemoryStore``) performs
each operation as one atomic step and enforces the per-session limits inside
that step, where no concurrent writer can slip past them.

Values are opaque bytes here: the gRPC layer stores the protobuf binary encoding
of a ``google.protobuf.Value``. The domain never imports protobuf.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from memsvc.domain._errors import (
    FieldViolation,
    MemsvcError,
    SessionLimitExceeded,
    SessionNotFound,
    SessionNotWritable,
)
from memsvc.domain._ids import (
    MAX_KEY_BYTES,
    SessionRef,
    check_key,
    check_session_ref,
    raise_if_any,
)
from memsvc.domain._markers import MISSING, NoSession
from memsvc.domain._pagination import (
    Page,
    check_page_size,
    decode_page_token,
    encode_page_token,
    fingerprint,
)
from memsvc.domain._storable import check_ttl

# An entry's bytes in a response besides its key and value (field tags and
# lengths, its expiry): the stores count it with each entry's key (list_entries.lua).
ENTRY_FRAMING_BYTES = 40


@dataclass(frozen=True, slots=True)
class WorkingMemoryLimits:
    """Per-value, per-session and per-response limits (see docs/configuration.md)."""

    max_value_bytes: int = 1 << 20
    max_session_keys: int = 10_000
    max_session_bytes: int = 16 << 20
    max_batch_keys: int = 1_000
    default_page_size: int = 100
    max_page_size: int = 1_000
    # What one response carries stops before this many bytes, so a reply always
    # fits under the 4 MiB gRPC message limit with room for framing: its values,
    # and its keys with ENTRY_FRAMING_BYTES each.
    response_budget_bytes: int = 3 << 20

    # The gRPC message limit the budget is 3/4 of (the rest is slack for framing).
    message_bytes: int = 4 << 20

    @staticmethod
    def key_room(keys: Sequence[str]) -> int:
        """Bytes ``keys`` take in a BatchGet response: every key comes back, found,
        missing or unprocessed."""
        return sum(len(key.encode()) + ENTRY_FRAMING_BYTES for key in keys)

    def values_budget(self, keys: Sequence[str]) -> int:
        """Bytes of values a BatchGet of ``keys`` may carry: what its keys leave."""
        return max(0, self.response_budget_bytes - self.key_room(keys))

    def page_size(self, requested: int, violations: list[FieldViolation]) -> int:
        """The page size to use for a request's ``page_size`` (AIP-158 rules)."""
        return check_page_size(
            requested,
            default=self.default_page_size,
            maximum=self.max_page_size,
            violations=violations,
        )

    def __post_init__(self) -> None:
        if self.max_value_bytes >= self.response_budget_bytes:
            raise ValueError(
                f"max_value_bytes ({self.max_value_bytes}) must be below the response budget "
                f"({self.response_budget_bytes} bytes, 3/4 of max_message_bytes) so that any "
                "one value can be read back"
            )
        if self.max_value_bytes > self.max_session_bytes:
            raise ValueError("max_value_bytes must not exceed max_session_bytes")
        if min(self.max_session_keys, self.max_batch_keys, self.max_page_size) < 1:
            raise ValueError("key, batch and page limits must be at least 1")


@dataclass(frozen=True, slots=True)
class EntryWrite:
    """One validated write: ``ttl_ms`` None means the key never expires."""

    key: str
    value: bytes
    ttl_ms: int | None


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """A live key with its value; ``expire_at_ms`` is Unix time in milliseconds."""

    key: str
    value: bytes
    expire_at_ms: int | None


@dataclass(frozen=True, slots=True)
class KeyMeta:
    """A live key without its value."""

    key: str
    value_size: int
    expire_at_ms: int | None


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The outcome of writing one key."""

    key: str
    expire_at_ms: int | None
    created: bool


@dataclass(frozen=True, slots=True)
class BatchRead:
    """The outcome of reading several keys under a response byte budget."""

    found: list[StoredEntry]
    missing: list[str]
    unprocessed: list[str]


T = TypeVar("T")


class WorkingMemoryStore(Protocol):
    """Storage port for working memory; every method is one atomic step.

    Keys listed are live (not expired) and ordered by their UTF-8 bytes. Writes
    enforce the session limits given at construction and raise
    ``SessionLimitExceeded`` without writing anything when they would be
    exceeded, or ``SessionNotWritable`` when the session's state marker forbids
    writes. Backend failures surface as ``BackendUnavailable`` after bounded
    retries.
    """

    backend_name: str

    async def open(self) -> None:
        """Connect (or start background work); nothing connects in ``__init__``."""

    async def aclose(self) -> None:
        """Release connections and background tasks."""

    async def ping(self) -> None:
        """Raise ``BackendUnavailable`` unless the backend answers now."""

    async def set_entries(
        self, session: SessionRef, writes: Sequence[EntryWrite]
    ) -> list[WriteResult]:
        """Write all entries or none; keys are distinct."""

    async def get_entries(
        self, session: SessionRef, keys: Sequence[str], budget_bytes: int
    ) -> BatchRead:
        """Read keys in order until their values would pass ``budget_bytes``.

        The first found value is always returned, whatever its size.
        """

    async def delete_entries(self, session: SessionRef, keys: Sequence[str]) -> list[bool]:
        """Delete all keys at once; say for each whether it existed."""

    async def list_keys(
        self, session: SessionRef, after: str | None, limit: int
    ) -> tuple[list[KeyMeta], bool]:
        """Return up to ``limit`` keys after ``after``, and whether more follow."""

    async def list_entries(
        self, session: SessionRef, after: str | None, limit: int, budget_bytes: int
    ) -> tuple[list[StoredEntry], bool]:
        """As list_keys with values, stopping early before the entries (each its
        value, key and ENTRY_FRAMING_BYTES) pass ``budget_bytes``; one at least."""


class SessionGuard(Protocol):
    """Explains (or heals) a session's refusal of a working-memory call."""

    async def refusal(self, session: SessionRef, state: str, write: bool) -> MemsvcError | None:
        """The error to report, or None after healing a transitional marker."""


class WorkingMemory:
    """Validates working-memory requests and runs them against a store.

    The store refuses calls on sessions without a marker, or writes in any
    state but active, inside its own atomic step; only then does ``guard``
    (the lifecycle) read the database to say why, or heal a marker left by an
    operation that died, after which the call is tried once more.
    """

    def __init__(
        self,
        store: WorkingMemoryStore,
        limits: WorkingMemoryLimits,
        guard: SessionGuard | None = None,
    ) -> None:
        self._store = store
        self.limits = limits
        self.guard = guard

    async def _guarded(
        self, session: SessionRef, write: bool, call: Callable[[], Awaitable[T]]
    ) -> T:
        for attempt in (1, 2):
            try:
                return await call()
            except SessionNotWritable as refused:
                if self.guard is None:
                    raise
                # Asked again after a heal too: a Terminate that settled meanwhile
                # leaves no marker, which only the database can call "terminated".
                explained = await self.guard.refusal(session, refused.metadata["state"], write=True)
                if explained is None and attempt == 2:
                    raise  # healed, and another operation began at once
            except NoSession as unread:
                if self.guard is None:
                    if unread.state == MISSING:
                        raise SessionNotFound(session.session_id) from None
                    raise SessionNotWritable(session.session_id, unread.state) from None
                explained = await self.guard.refusal(session, unread.state, write=write)
                if explained is None and attempt == 2:
                    if unread.state == MISSING:
                        raise SessionNotFound(session.session_id) from None
                    # Healed, and another operation began at once: say so; a retry waits it out.
                    raise SessionNotWritable(session.session_id, unread.state) from None
            if explained is not None:
                try:
                    raise explained
                finally:
                    # Else this frame, in the error's traceback, holds the error: a
                    # reference cycle, and the request with it, until a collection.
                    explained = None
        raise AssertionError("unreachable")

    async def set(
        self,
        session: SessionRef,
        key: str,
        value: bytes | None,
        ttl_ms: int | None,
        found: Sequence[FieldViolation] = (),
    ) -> WriteResult:
        """Store one value (see ``set_many``)."""
        violations = list(found)
        ref = check_session_ref(*_fields(session), violations)
        self._check_write(key, value, ttl_ms, "", violations)
        raise_if_any(violations)
        assert value is not None
        write = EntryWrite(key, value, ttl_ms)
        (result,) = await self._guarded(ref, True, lambda: self._store.set_entries(ref, [write]))
        return result

    async def set_many(
        self,
        session: SessionRef,
        entries: Sequence[tuple[str, bytes | None, int | None]],
        found: Sequence[FieldViolation] = (),
    ) -> list[WriteResult]:
        """Store up to ``max_batch_keys`` entries atomically; keys must be distinct.
        ``found``: violations found before (by the API), reported with these."""
        violations = list(found)
        ref = check_session_ref(*_fields(session), violations)
        writes = self.check_entries(entries, "entries", violations)
        raise_if_any(violations)
        return await self._guarded(ref, True, lambda: self._store.set_entries(ref, writes))

    def check_entries(
        self,
        entries: Sequence[tuple[str, bytes | None, int | None]],
        field: str,
        violations: list[FieldViolation],
        allow_empty: bool = False,
    ) -> list[EntryWrite]:
        """Validate a batch of writes (``field[i].key`` ...); return the valid ones."""
        if entries or not allow_empty:
            self._check_batch_size(len(entries), field, violations)
        seen: dict[str, int] = {}
        for index, (key, value, ttl_ms) in enumerate(entries):
            self._check_write(key, value, ttl_ms, f"{field}[{index}].", violations)
            _check_duplicate(key, index, seen, f"{field}[{index}].key", violations)
        return [EntryWrite(key, value, ttl) for key, value, ttl in entries if value is not None]

    def check_fits_session(self, writes: Sequence[EntryWrite]) -> None:
        """Raise SessionLimitExceeded when ``writes`` alone pass the session limits."""
        size = sum(len(w.key.encode()) + len(w.value) for w in writes)
        if len(writes) > self.limits.max_session_keys:
            raise SessionLimitExceeded(
                what="keys", limit=self.limits.max_session_keys, current=0, requested=len(writes)
            )
        if size > self.limits.max_session_bytes:
            raise SessionLimitExceeded(
                what="bytes", limit=self.limits.max_session_bytes, current=0, requested=size
            )

    async def get(self, session: SessionRef, key: str) -> StoredEntry | None:
        """Return the live entry under ``key``, or None."""
        violations: list[FieldViolation] = []
        ref = check_session_ref(*_fields(session), violations)
        check_key(key, "key", violations)
        raise_if_any(violations)
        budget = self.limits.values_budget([key])
        read = await self._guarded(ref, False, lambda: self._store.get_entries(ref, [key], budget))
        return read.found[0] if read.found else None

    async def get_many(self, session: SessionRef, keys: Sequence[str]) -> BatchRead:
        """Read up to ``max_batch_keys`` distinct keys under the response budget."""
        violations: list[FieldViolation] = []
        ref = self._check_keys(session, keys, violations)
        room = self.limits.key_room(keys)
        too_big = room + self.limits.max_value_bytes > self.limits.message_bytes
        if not violations and len(keys) > 1 and too_big:
            # The first value found always comes back: with these keys beside it,
            # one of max_value_bytes could pass the message limit. Only with a
            # small max_message_bytes, and many long keys; one key always goes.
            violations.append(
                FieldViolation(
                    "keys",
                    f"take {room} bytes of a response, which leaves less than max_value_bytes "
                    f"({self.limits.max_value_bytes}) of the message limit for their values: "
                    "ask for fewer keys at once",
                )
            )
        raise_if_any(violations)
        budget = self.limits.values_budget(keys)
        return await self._guarded(ref, False, lambda: self._store.get_entries(ref, keys, budget))

    async def delete(self, session: SessionRef, key: str) -> bool:
        """Delete one key; return whether it existed."""
        violations: list[FieldViolation] = []
        ref = check_session_ref(*_fields(session), violations)
        check_key(key, "key", violations)
        raise_if_any(violations)
        (existed,) = await self._guarded(ref, True, lambda: self._store.delete_entries(ref, [key]))
        return existed

    async def delete_many(self, session: SessionRef, keys: Sequence[str]) -> list[bool]:
        """Delete up to ``max_batch_keys`` distinct keys atomically."""
        violations: list[FieldViolation] = []
        ref = self._check_keys(session, keys, violations)
        raise_if_any(violations)
        return await self._guarded(ref, True, lambda: self._store.delete_entries(ref, keys))

    async def list_keys(
        self, session: SessionRef, page_size: int, page_token: str
    ) -> Page[KeyMeta]:
        """One page of live keys, in byte order."""
        ref, scope, after, limit = self._check_list(session, page_size, page_token)
        # As many keys as a response carries, each at its longest (a small
        # max_message_bytes holds fewer than a page of 512-byte keys).
        fits = self.limits.response_budget_bytes // (MAX_KEY_BYTES + ENTRY_FRAMING_BYTES)
        limit = max(1, min(limit, fits))
        items, more = await self._guarded(
            ref, False, lambda: self._store.list_keys(ref, after, limit)
        )
        return Page(items, encode_page_token(items[-1].key, scope) if more and items else "")

    async def list_entries(
        self, session: SessionRef, page_size: int, page_token: str
    ) -> Page[StoredEntry]:
        """One page of live entries with values, in byte order of keys."""
        ref, scope, after, limit = self._check_list(session, page_size, page_token)
        budget = self.limits.response_budget_bytes
        items, more = await self._guarded(
            ref, False, lambda: self._store.list_entries(ref, after, limit, budget)
        )
        return Page(items, encode_page_token(items[-1].key, scope) if more and items else "")

    def _check_write(
        self,
        key: str,
        value: bytes | None,
        ttl_ms: int | None,
        prefix: str,
        violations: list[FieldViolation],
    ) -> None:
        check_key(key, f"{prefix}key", violations)
        if value is None:
            violations.append(
                FieldViolation(f"{prefix}value", "is required (any JSON-like value, null included)")
            )
        elif len(value) > self.limits.max_value_bytes:
            violations.append(
                FieldViolation(
                    f"{prefix}value",
                    f"is {len(value)} bytes encoded, over the limit of "
                    f"{self.limits.max_value_bytes} bytes; store smaller values or split them",
                )
            )
        check_ttl(ttl_ms, f"{prefix}ttl", violations)

    def _check_batch_size(self, count: int, field: str, violations: list[FieldViolation]) -> None:
        if count == 0:
            violations.append(FieldViolation(field, "must not be empty"))
        elif count > self.limits.max_batch_keys:
            violations.append(
                FieldViolation(
                    field,
                    f"has {count} items, over the maximum of {self.limits.max_batch_keys} per "
                    "call; split the batch",
                )
            )

    def _check_keys(
        self, session: SessionRef, keys: Sequence[str], violations: list[FieldViolation]
    ) -> SessionRef:
        ref = check_session_ref(*_fields(session), violations)
        self._check_batch_size(len(keys), "keys", violations)
        seen: dict[str, int] = {}
        for index, key in enumerate(keys):
            check_key(key, f"keys[{index}]", violations)
            _check_duplicate(key, index, seen, f"keys[{index}]", violations)
        return ref

    def _check_list(
        self, session: SessionRef, page_size: int, page_token: str
    ) -> tuple[SessionRef, str, str | None, int]:
        violations: list[FieldViolation] = []
        ref = check_session_ref(*_fields(session), violations)
        limit = self.limits.page_size(page_size, violations)
        raise_if_any(violations)
        scope = fingerprint("working-memory", *_fields(ref))
        after = decode_page_token(page_token, scope)
        return ref, scope, after, limit


def _fields(session: SessionRef) -> tuple[str, str, str]:
    return session.project_id, session.agent_instance_id, session.session_id


def _check_duplicate(
    key: str, index: int, seen: dict[str, int], field: str, violations: list[FieldViolation]
) -> None:
    first = seen.setdefault(key, index)
    if first != index:
        violations.append(
            FieldViolation(field, f"repeats the key at index {first}; keys must be distinct")
        )
