"""How a metadata filter matches, as memsvc's PostgreSQL listing compares it
(``metadata -> key = value::jsonb`` for each key of the filter), and when two
JSON values are equal (``jsonb = jsonb``), for SQLite (SQL functions the store
registers), so both databases compare alike."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any


def json_holds(document: str, wanted: str) -> bool:
    """Whether the JSON object ``document`` holds every top-level key of the JSON
    object ``wanted`` with an equal value (a nested object equal as a whole, not
    contained), as PostgreSQL's jsonb compares values: numbers exactly and by value
    (1 = 1.0, 0.3 <> 0.30000000000000004, 2**64 exact), objects whatever their key
    order, true never 1."""
    held = _comparable(json.loads(document, parse_float=Decimal))
    if held[0] != "object":
        return False
    items = dict(held[1])
    return all(
        key in items and items[key] == value
        for key, value in _comparable(json.loads(wanted, parse_float=Decimal))[1]
    )


def json_equal(stored: str | None, given: str | None) -> bool:
    """Whether two JSON texts hold equal values, as jsonb compares them: so a row
    that SQLite holds with \\u escapes (as memsvc wrote JSON until the
    twenty-third session) equals the same value written as UTF-8 now."""
    if stored is None or given is None:
        return stored is given
    return bool(
        _comparable(json.loads(stored, parse_float=Decimal))
        == _comparable(json.loads(given, parse_float=Decimal))
    )


def _comparable(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, int | Decimal):
        return ("number", value)  # int == Decimal compares exactly
    if isinstance(value, float):
        # Only NaN or an infinity here (Python's json reads them so), which no JSON
        # value equals: a marker of its own, equal to nothing (not even itself).
        return ("non-finite", object())
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list):
        return ("array", tuple(_comparable(item) for item in value))
    if isinstance(value, dict):
        return ("object", frozenset((key, _comparable(item)) for key, item in value.items()))
    raise TypeError(f"not a JSON value: {value!r}")
