"""Results of lifecycle operations, and how a request id remembers them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

from memsvc.domain._errors import RequestIdConflict, RequestPurged
from memsvc.domain._ids import SessionRef
from memsvc.domain._lifecycle_records import (
    AnswerPurged,
    CheckpointRecord,
    PendingClaim,
    RequestIdReused,
    RequestLog,
    SessionRecord,
    SessionState,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SpawnResult:
    session: SessionRecord
    initial_entries_written: int


@dataclass(frozen=True, slots=True)
class PauseResult:
    session: SessionRecord
    checkpoint: CheckpointRecord


@dataclass(frozen=True, slots=True)
class ResumeResult:
    session: SessionRecord
    checkpoint: CheckpointRecord
    entries_restored: int


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    session: SessionRecord
    checkpoint: CheckpointRecord


@dataclass(frozen=True, slots=True)
class DeleteResult:
    session: SessionRecord


@dataclass(frozen=True, slots=True)
class TerminateResult:
    session: SessionRecord
    episode_id: str | None
    entries_consolidated: int
    entries_cleared: int
    outcome: int


def encode_result(result: Any) -> bytes:
    return json.dumps(dataclasses.asdict(result), default=int, separators=(",", ":")).encode()


def _session_from(data: dict[str, Any]) -> SessionRecord:
    return SessionRecord(
        **{**data, "ref": SessionRef(**data["ref"]), "state": SessionState(data["state"])}
    )


def _checkpoint_from(data: dict[str, Any]) -> CheckpointRecord:
    return CheckpointRecord(**{**data, "ref": SessionRef(**data["ref"])})


def decode_result(kind: type[T], raw: bytes) -> T:
    data = json.loads(raw)
    data["session"] = _session_from(data["session"])
    if "checkpoint" in data:
        data["checkpoint"] = _checkpoint_from(data["checkpoint"])
    return kind(**data)


# The last id made in this process (its millisecond, its 74 other bits): ids of one
# millisecond count up from it (RFC 9562's "monotonic random"), so they sort in the
# order they were made, as List and Search break ties newest first by id.
_last_uuid7 = (0, 0)
_uuid7_lock = threading.Lock()
_RANDOM_BITS = 74


def uuid7(ms: int | None = None) -> str:
    """A time-ordered UUID (version 7): 48 bits of Unix ms (``ms``, or now), then 74
    bits, random, or the last id's plus one within the same millisecond."""
    global _last_uuid7
    if ms is None:
        ms = time.time_ns() // 1_000_000
    with _uuid7_lock:
        last_ms, last_bits = _last_uuid7
        if ms == last_ms and last_bits + 1 < 1 << _RANDOM_BITS:
            bits = last_bits + 1
        else:
            bits = int.from_bytes(os.urandom(10), "big") >> (80 - _RANDOM_BITS)
            # Room to count up within the millisecond: the top bit starts at 0.
            bits &= (1 << (_RANDOM_BITS - 1)) - 1
        _last_uuid7 = (ms, bits)
    # 48 bits of time, the version (4), 12 bits, the variant (2), 62 bits.
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (bits >> 62) << 64 | 0x2 << 62
    value |= bits & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


async def claim(
    tx: RequestLog, scope: SessionRef, request_id: str, method: str, arguments: str
) -> bytes | None:
    """Claim ``request_id`` for this call; the first answer when it was already
    served. The same id with other arguments is RequestIdConflict."""
    return await answer_of(await tx.send_claim(scope, request_id, method, arguments), request_id)


async def answer_of(pending: PendingClaim, request_id: str) -> bytes | None:
    """The answer of a claim sent earlier (see claim)."""
    try:
        return await pending.answer()
    except RequestIdReused:
        raise RequestIdConflict(request_id) from None
    except AnswerPurged:
        raise RequestPurged(request_id) from None


def arguments_hash(method: str, *parts: Any) -> str:
    document = json.dumps([method, *parts], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(document.encode()).hexdigest()
