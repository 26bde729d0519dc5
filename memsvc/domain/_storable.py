"""What any text or JSON-like value must be to be stored, on both databases, and
the longest TTL any store keeps."""

from __future__ import annotations

import json
import math
from typing import Any

from memsvc.domain._errors import FieldViolation

MAX_JSON_DEPTH = 64
# protobuf's Timestamp range: the times the API can send back (and both databases hold).
MIN_TIME_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
NUL_FREE = "must not contain NUL characters (U+0000), which PostgreSQL cannot store in text"
# Metadata of a lifecycle call or an episode: each lifecycle event carries its
# call's metadata to every watcher, and a page of sessions, checkpoints or episodes
# carries many, so it stays a small fraction of one gRPC message.
MAX_METADATA_BYTES = 64 << 10


def json_problem(value: Any, depth: int = 0) -> str | None:
    """Why ``value`` (a text, or any JSON-like value) cannot be stored, or None:
    a NUL character in a string or key (PostgreSQL keeps none in text or jsonb),
    a lone surrogate (JSON text may escape one, "\\ud800"; UTF-8 has none), a
    number that is not finite (JSON has none), nesting past MAX_JSON_DEPTH."""
    if depth > MAX_JSON_DEPTH:
        return f"nests deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, str):
        if "\x00" in value:
            return NUL_FREE
        return None if value.isascii() or _encodes(value) else NOT_UTF8
    if isinstance(value, float) and not math.isfinite(value):
        return "must hold only finite numbers"
    if isinstance(value, dict):
        for key, item in value.items():
            problem = json_problem(key, depth) or json_problem(item, depth + 1)
            if problem:
                return problem
    if isinstance(value, list):
        for item in value:
            problem = json_problem(item, depth + 1)
            if problem:
                return problem
    return None


def unsigned_zero(number: float) -> float:
    """``number``, with -0.0 made 0.0: PostgreSQL's jsonb and double keep no sign of
    zero where SQLite keeps it, so the stores would read back different values (and
    a retry with what was read back would differ from its first call)."""
    return number + 0.0  # -0.0 + 0.0 is 0.0; any other number is itself


def without_negative_zero(value: Any) -> Any:
    """A JSON-like ``value`` with every float passed through :func:`unsigned_zero`."""
    if isinstance(value, float):
        return unsigned_zero(value)
    if isinstance(value, dict):
        return {key: without_negative_zero(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_negative_zero(item) for item in value]
    return value


def json_size(value: Any) -> int:
    """Bytes of compact UTF-8 JSON (not of ASCII escapes: an emoji is 4 bytes, not 12)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return len(text.encode("utf-8", "surrogatepass"))


def metadata_problem(metadata: dict[str, Any]) -> str | None:
    """Why metadata is too large to store, or None."""
    size = json_size(metadata)
    if size > MAX_METADATA_BYTES:
        return f"is {size} bytes of JSON, over the maximum of {MAX_METADATA_BYTES} bytes"
    return None


NOT_UTF8 = "must be valid Unicode: a lone surrogate (such as \\ud800) has no UTF-8 form"


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The longest TTL: 1,000 years. The expiry (now + TTL) must stay a Timestamp
# (up to year 9999) for the API to send it back, and an exact integer in Redis's
# scores (below 2**53 ms), which PEXPIREAT needs.
MAX_TTL_MS = 31_557_600_000 * 1000


def check_ttl(ttl_ms: int | None, field: str, violations: list[FieldViolation]) -> None:
    """A TTL (None: none) must be from 0 to MAX_TTL_MS."""
    if ttl_ms is not None and ttl_ms < 0:
        violations.append(
            FieldViolation(field, "must not be negative (leave it unset for no expiry)")
        )
    elif ttl_ms is not None and ttl_ms > MAX_TTL_MS:
        violations.append(
            FieldViolation(
                field,
                f"must be at most {MAX_TTL_MS // 1000} seconds (1,000 years; leave it "
                "unset for no expiry)",
            )
        )
