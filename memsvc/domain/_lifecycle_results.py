"""Results of lifecycle operations, and how a request id remembers them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
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


def uuid7() -> str:
    """A time-ordered UUID (version 7): 48 bits of Unix ms, then 74 random bits."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
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
