"""Bounded retries of transient backend errors, never past the caller's deadline.

The gRPC layer records each call's deadline in a context variable
(memsvc/domain/_call_deadline.py); :func:`with_retries` retries an idempotent backend
operation with jittered exponential backoff until it succeeds, the attempts
run out, the retry budget is spent or the deadline would pass, whichever comes
first. Then it raises ``BackendUnavailable`` (UNAVAILABLE for the caller).
The client libraries' own retries are switched off, so this is the one place
that decides how often memsvc retries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from memsvc.domain import BackendUnavailable
from memsvc.domain._call_deadline import current_deadline

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ATTEMPTS = 4
DEFAULT_BUDGET_SECONDS = 5.0


async def with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    backend: str,
    transient: tuple[type[BaseException], ...],
    attempts: int = DEFAULT_ATTEMPTS,
    budget_seconds: float = DEFAULT_BUDGET_SECONDS,
) -> T:
    """Run ``operation``, retrying transient errors within the deadline.

    ``operation`` must be safe to repeat: it may have taken effect before the
    error that triggers a retry (a reply lost with its connection).
    """
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + budget_seconds
    deadline = current_deadline()
    if deadline is not None:
        stop_at = min(stop_at, deadline)
    retryable: tuple[type[BaseException], ...] = (*transient, TimeoutError)
    # The first attempt runs without tenacity's machinery: it is the common case
    # and sits on every call's hot path.
    try:
        async with asyncio.timeout_at(stop_at):
            return await operation()
    except retryable as error:
        if attempts <= 1 or loop.time() >= stop_at:
            raise BackendUnavailable(backend, error) from error
        # One warning per call that retries; its later attempts at debug level, and
        # a call that fails after them is said once more, by the API layer: during
        # an outage every call fails, and four lines each drowned the log.
        log.warning("%s backend error, retrying: %r", backend, error)
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(attempts - 1)
            | stop_before_delay(max(0.0, stop_at - loop.time())),
            wait=wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.05),
            retry=retry_if_exception_type(retryable),
            reraise=True,
            before_sleep=lambda state: log.debug(
                "%s backend error, retrying (attempt %d): %r",
                backend,
                state.attempt_number + 1,
                state.outcome.exception() if state.outcome else None,
            ),
        ):
            with attempt:
                async with asyncio.timeout_at(stop_at):
                    return await operation()
    except retryable as error:
        raise BackendUnavailable(backend, error) from error
    raise AssertionError("unreachable: AsyncRetrying either returns or raises")
