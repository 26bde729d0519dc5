"""What any text or JSON-like value must be to be stored, on both databases."""

from __future__ import annotations

import math
from typing import Any

MAX_JSON_DEPTH = 64
# protobuf's Timestamp range: the times the API can send back (and both databases hold).
MIN_TIME_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
NUL_FREE = "must not contain NUL characters (U+0000), which PostgreSQL cannot store in text"


def json_problem(value: Any, depth: int = 0) -> str | None:
    """Why ``value`` (a text, or any JSON-like value) cannot be stored, or None:
    a NUL character in a string or key (PostgreSQL keeps none in text or jsonb),
    a number that is not finite (JSON has none), nesting past MAX_JSON_DEPTH."""
    if depth > MAX_JSON_DEPTH:
        return f"nests deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, str):
        return NUL_FREE if "\x00" in value else None
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
