"""Bounded retries: transient errors retried, others not, and never past the deadline."""

from __future__ import annotations

import asyncio

import pytest

from memsvc.domain import BackendUnavailable
from memsvc.domain._call_deadline import call_deadline
from memsvc.store._retry import with_retries


class Flaky:
    """Fails with ``error`` a given number of times, then returns "ok"."""

    def __init__(self, failures: int, error: BaseException) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


async def test_transient_errors_are_retried_until_success():
    operation = Flaky(2, ConnectionError("reset"))
    assert await with_retries(operation, backend="b", transient=(ConnectionError,)) == "ok"
    assert operation.calls == 3


async def test_attempts_are_bounded_then_unavailable():
    operation = Flaky(10, ConnectionError("refused"))
    with pytest.raises(BackendUnavailable) as error:
        await with_retries(operation, backend="cache", transient=(ConnectionError,), attempts=3)
    assert operation.calls == 3
    assert error.value.metadata == {"backend": "cache"}


async def test_other_errors_are_not_retried():
    operation = Flaky(1, ValueError("bug"))
    with pytest.raises(ValueError, match="bug"):
        await with_retries(operation, backend="b", transient=(ConnectionError,))
    assert operation.calls == 1


async def test_retries_stop_at_the_call_deadline():
    """A hanging backend is abandoned at the call's deadline, though the retry budget
    is an hour (the outer wait_for only guards against a hang)."""

    async def hang() -> str:
        await asyncio.Event().wait()
        return "never"

    with call_deadline(0.2), pytest.raises(BackendUnavailable):
        await asyncio.wait_for(
            with_retries(hang, backend="b", transient=(ConnectionError,), budget_seconds=3600),
            timeout=30,
        )


async def test_a_call_that_retries_warns_once(caplog: pytest.LogCaptureFixture):
    """Found by a review: every attempt was a warning, so during an outage each
    failed call wrote four lines (three retries and its failure); the later
    attempts are at debug level now."""
    operation = Flaky(10, ConnectionError("reset"))
    with (
        caplog.at_level("DEBUG", logger="memsvc.store._retry"),
        pytest.raises(BackendUnavailable),
    ):
        await with_retries(
            operation, backend="test", transient=(ConnectionError,), budget_seconds=30
        )
    assert operation.calls == 4
    levels = [record.levelname for record in caplog.records]
    assert levels == ["WARNING", "DEBUG", "DEBUG"], levels
