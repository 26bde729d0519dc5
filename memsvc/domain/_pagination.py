"""Opaque page tokens shared by every List call.

A token records where the previous page ended (the last item's sort key) and a
fingerprint of the request it belongs to, so a token replayed against another
session or filter is refused instead of silently listing the wrong thing.
Tokens are URL-safe base64 of a small JSON document; clients must treat them as
opaque.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from memsvc.domain._errors import FieldViolation, InvalidArgument
from memsvc.domain._ids import check_uuid
from memsvc.domain._storable import MAX_TIME_MS, MIN_TIME_MS

T = TypeVar("T")
P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; ``next_page_token`` is empty on the last page."""

    items: list[T]
    next_page_token: str


_TOKEN_VERSION = 1


def fingerprint(*parts: str) -> str:
    """A short digest of the request fields that a token is bound to."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
    return digest[:16]


def encode_page_token(after: str, scope: str) -> str:
    """Make the token for the page that starts after ``after``."""
    document = json.dumps({"v": _TOKEN_VERSION, "a": after, "s": scope}, separators=(",", ":"))
    return base64.urlsafe_b64encode(document.encode()).decode().rstrip("=")


def decode_page_token(token: str, scope: str, field: str = "page_token") -> str | None:
    """Return the position a token resumes after; None for an empty token.

    Raises InvalidArgument when the token is malformed or was issued for
    another scope.
    """
    if not token:
        return None
    after, token_scope = _token_parts(token, field)
    if token_scope != scope:
        raise InvalidArgument(
            [
                FieldViolation(
                    field,
                    "belongs to a different request (another session or filter, or a "
                    "checkpoint taken again under its id); start again with an empty "
                    "page_token",
                )
            ]
        )
    return after


def check_page_token(token: str, field: str = "page_token") -> None:
    """Raise InvalidArgument for a malformed token (before reading anything, when
    the scope it must match is known only from what a read returns)."""
    if token:
        _token_parts(token, field)


def _token_parts(token: str, field: str) -> tuple[str, str]:
    """A token's position and scope; InvalidArgument when it is malformed."""
    try:
        padded = token + "=" * (-len(token) % 4)
        document = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        after, token_scope = document["a"], document["s"]
        valid = document.get("v") == _TOKEN_VERSION and isinstance(after, str)
        if valid:
            after.encode("utf-8")  # a lone surrogate: no key or id holds one
    except (ValueError, KeyError, TypeError, RecursionError, binascii.Error, UnicodeError):
        valid = False
    if not valid:
        raise InvalidArgument(
            [
                FieldViolation(
                    field,
                    "is not a token returned by this call; start again with an empty page_token",
                )
            ]
        )
    return str(after), str(token_scope)


def page_position(after: str | None, *kinds: Callable[[Any], Any]) -> tuple[Any, ...] | None:
    """The keyset position ``after`` (from decode_page_token; None for the first
    page): its JSON list, one item per ``kinds`` reader (:func:`position_ms`,
    :func:`position_text`, :func:`position_score`). The fingerprint only binds a
    token to its request, and a client can forge one: a position that does not
    read is INVALID_ARGUMENT, never a failure further down."""
    if after is None:
        return None
    try:
        values = json.loads(after)
        if not isinstance(values, list):
            raise TypeError("a position is a list")
        return tuple(kind(value) for kind, value in zip(kinds, values, strict=True))
    # RecursionError: nested past json's depth; OverflowError: an integer past a float.
    except (ValueError, TypeError, RecursionError, OverflowError):
        raise InvalidArgument.single(
            "page_token", "is not a token returned by this call; start again with an empty one"
        ) from None


def position_ms(value: Any) -> int:
    """A time (Unix ms) in a position: an integer within protobuf's Timestamp range."""
    if type(value) is not int or not MIN_TIME_MS <= value <= MAX_TIME_MS:
        raise ValueError(f"not a time in milliseconds: {value!r}")
    return value


def position_text(value: Any) -> str:
    """An id or key in a position: text without NUL, which no id or key holds
    (and PostgreSQL cannot compare)."""
    if not isinstance(value, str) or "\x00" in value:
        raise ValueError(f"not an id: {value!r}")
    value.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate
    return value


def position_uuid(value: Any) -> str:
    """A UUID in a position (an episode id), in the canonical form ids are stored in."""
    problems: list[FieldViolation] = []
    canonical = check_uuid(position_text(value), "position", problems)
    if problems or canonical != value:
        raise ValueError(f"not a UUID: {value!r}")
    return canonical


def position_score(value: Any) -> float:
    """A search score in a position: a finite number."""
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError(f"not a score: {value!r}")
    return float(value)


def check_page_size(
    page_size: int, *, default: int, maximum: int, violations: list[FieldViolation]
) -> int:
    """Apply the AIP-158 rules: 0 means the default, above the maximum is clamped."""
    if page_size < 0:
        violations.append(FieldViolation("page_size", f"must not be negative, got {page_size}"))
        return default
    if page_size == 0:
        return default
    return min(page_size, maximum)


def page_of(
    items: list[T],
    limit: int,
    scope: str,
    position: Callable[[T], list[Any]],
    size: Callable[[T], int] | None = None,
    budget: int = 0,
    cut: bool = False,
) -> Page[T]:
    """The page for ``items`` read with ``limit + 1``: the extra one says more follow.

    With ``size``, the page also ends before its items outgrow ``budget`` bytes
    (one item at least): a response must fit in a gRPC message. ``cut``: the read
    itself stopped early (at a byte budget of its own), so more may follow
    whatever was read. The token records ``position(last item)`` (JSON), where the
    next page starts after.
    """
    kept = items[:limit]
    if size is not None:
        total = 0
        for count, item in enumerate(kept):
            total += size(item)
            if count and total > budget:
                kept = kept[:count]
                break
    if not kept or (len(kept) == len(items) and not cut):
        return Page(items, "")
    return Page(kept, encode_page_token(json.dumps(position(kept[-1])), scope))


def wire_size(value: Any) -> int:
    """An upper bound of the bytes of a JSON-like value as a google.protobuf.Value
    (a number takes 9 bytes, whatever its JSON; lengths count 5)."""
    if isinstance(value, str):
        return 6 + len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list):
        return 6 + sum(6 + wire_size(item) for item in value)
    if isinstance(value, dict):
        return 6 + sum(12 + len(key.encode("utf-8", "surrogatepass")) + 6 + wire_size(item)
                       for key, item in value.items())  # fmt: skip
    return 9
