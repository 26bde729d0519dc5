# ASYNC109: ``timeout`` is the gRPC deadline of a call, the name gRPC APIs use.
# ruff: noqa: ASYNC109
"""Retries within one deadline, and the request ids that make them safe.

A call's ``timeout`` is its whole budget: every attempt and every backoff sleep fit
in it, and each attempt's gRPC deadline is what is left of it (or
``RetryPolicy.attempt_timeout``, when that is shorter, for the calls retried after
a DEADLINE_EXCEEDED).

What is retried:

- UNAVAILABLE, always: the server was not reached, is shutting down, or a backend is
  down (memsvc then says how long to wait in RetryInfo, which is honoured).
- RESOURCE_EXHAUSTED from the server's call limit (TooManyCalls), always: the call
  was refused before anything was done.
- DEADLINE_EXCEEDED and ABORTED for calls that carry a request id. The first
  attempt may have taken effect; the request id makes the server answer the retry
  with the first attempt's answer instead of doing it twice. The SDK makes one id
  (a UUID4) per call and sends it with every attempt of that call.
- DEADLINE_EXCEEDED and ABORTED for reads (READ_ONLY_REQUESTS), which change
  nothing, unless memsvc's own deadline ended the read (it would run as long again).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from memsvc.client._auth import BearerToken
from memsvc.client._errors import (
    Cancelled,
    ErrorReason,
    MemsvcError,
    TooManyCalls,
    from_rpc_error,
)

log = logging.getLogger("memsvc.client")


def being_cancelled() -> bool:
    """Whether the running task itself is being cancelled, not only a call it
    awaited (grpc.aio raises CancelledError for a call cancelled locally too)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


Response = TypeVar("Response")

ALWAYS_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE})
RETRIED_WITH_REQUEST_ID = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)


@dataclass(frozen=True)
class RetryPolicy:
    """How failed attempts are retried (and how ``watch()`` reconnects).

    Attributes:
        max_attempts: attempts per call, the first included (1 disables retries).
            ``watch()`` reconnects without this limit (see ``reconnect_timeout``).
        initial_backoff: seconds before the first retry (more than 0: the later
            waits grow from it).
        max_backoff: the longest wait between two attempts.
        multiplier: growth of the wait after each failed attempt.
        jitter: fraction of each wait taken off at random (0 to 1), so that many
            clients failing together do not retry together.
        attempt_timeout: optional deadline of each attempt, in seconds, within the
            call's budget; lets a hung attempt be retried. Only calls that such a
            retry is safe for have it (calls with a request id, and reads); the
            others get the whole budget.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    attempt_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        # 0 would stay 0 at every growth: each retry, and each reconnection of a
        # watch, would follow its failure at once, in a hot loop. (``not > 0``
        # refuses NaN too.)
        if not self.initial_backoff > 0:
            raise ValueError(
                f"initial_backoff must be > 0 seconds (got {self.initial_backoff!r}); "
                "use a small value such as 0.01 for quick retries"
            )
        if self.max_backoff < self.initial_backoff:
            raise ValueError("need initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")
        if self.attempt_timeout is not None and self.attempt_timeout <= 0:
            raise ValueError("attempt_timeout must be positive")

    @classmethod
    def disabled(cls) -> RetryPolicy:
        """One attempt per call, never a retry."""
        return cls(max_attempts=1)

    def backoff(
        self,
        failures: int,
        server_delay: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure.

        Exponential from ``initial_backoff``, capped at ``max_backoff``, minus up to
        ``jitter`` of it; never shorter than a delay the server asked for.
        """
        # Capped before the power: 2.0**1024 overflows, and a watch that keeps
        # reconnecting for hours counts that many failures.
        exponent = min(max(failures - 1, 0), 64)
        base = min(self.max_backoff, self.initial_backoff * self.multiplier**exponent)
        delay = base * (1 - self.jitter * rand())
        if server_delay is not None:
            delay = max(delay, server_delay)
        return delay


# Requests that change nothing: an attempt that timed out or was aborted may run
# again, as a call with a request id may.
READ_ONLY_REQUESTS = frozenset(
    f"memsvc.v1.{name}Request"
    for name in (
        "Get", "BatchGet", "ListKeys", "ListEntries",
        "GetSession", "ListSessions", "ListCheckpoints", "GetCheckpoint",
        "GetEpisode", "ListEpisodes", "SearchEpisodes",
        "GetGraphCheckpoint", "ListGraphCheckpoints",
    )
)  # fmt: skip


def read_only(request: object) -> bool:
    """Whether ``request`` is one of READ_ONLY_REQUESTS."""
    return isinstance(request, Message) and request.DESCRIPTOR.full_name in READ_ONLY_REQUESTS


def retryable(failure: MemsvcError, has_request_id: bool, read_only: bool = False) -> bool:
    """Whether a failed attempt may be tried again: UNAVAILABLE always, and a
    refusal past the server's call limit (nothing was done); DEADLINE_EXCEEDED and
    ABORTED for a call with a request id (a retry has one effect) and for a read
    (it has none), except that a read the server itself cut at its own deadline
    would only run as long again."""
    if isinstance(failure, TooManyCalls):
        return True
    if failure.code in ALWAYS_RETRIED or (
        has_request_id and failure.code in RETRIED_WITH_REQUEST_ID
    ):
        return True
    return (
        read_only
        and failure.code in RETRIED_WITH_REQUEST_ID
        and failure.reason != ErrorReason.DEADLINE_EXCEEDED
    )


class Invoker:
    """Runs unary calls with deadlines, retries and the client's gRPC metadata (and
    bearer token: a call refused with UNAUTHENTICATED is tried again at once when the
    token file holds a new token)."""

    def __init__(
        self,
        policy: RetryPolicy,
        timeout: float | None,
        grpc_metadata: Sequence[tuple[str, str]],
        token: BearerToken | None = None,
    ) -> None:
        self.policy = policy
        self.timeout = timeout
        self.grpc_metadata = tuple(grpc_metadata)
        self.token = token
        # Set by close(): a call waiting to retry ends at once, and none starts again.
        self._closed = asyncio.Event()
        # The client's grpc.aio calls in flight (unary attempts, watch streams).
        # close() cancels them itself: closing the channel would, but a channel
        # given to ``from_channel`` stays open, and others may be using it. Weak:
        # the stream of a watch dropped unclosed is still cancelled when collected.
        self._in_flight: weakref.WeakSet[Any] = weakref.WeakSet()

    def close(self) -> None:
        """The client closed: its calls in flight, those waiting between attempts
        and its watches raise Cancelled."""
        self._closed.set()
        in_flight, self._in_flight = list(self._in_flight), weakref.WeakSet()
        for call in in_flight:
            call.cancel()

    def track(self, call: object) -> None:
        """Cancel this grpc.aio call when the client closes (at once if it is closed)."""
        if not isinstance(call, grpc.aio.Call):
            return  # not a gRPC call (a stand-in of a test): nothing to cancel
        if self.closed:
            call.cancel()
        else:
            self._in_flight.add(call)

    def untrack(self, call: object) -> None:
        """The call ended: close() has nothing more to cancel there."""
        if isinstance(call, grpc.aio.Call):
            self._in_flight.discard(call)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def closed_within(self, delay: float) -> bool:
        """Wait ``delay`` seconds before a retry; True as soon as the client closes."""
        try:
            await asyncio.wait_for(self._closed.wait(), delay)
        except TimeoutError:
            return False
        return True

    def deadline(self, timeout: float | None) -> float | None:
        """The event-loop time a call's budget ends at (None: never); ``timeout``
        None is the client's default budget, infinity none."""
        budget = self.timeout if timeout is None else timeout
        if budget is None or math.isinf(budget):
            return None
        return asyncio.get_running_loop().time() + budget

    @staticmethod
    def remaining(deadline: float | None) -> float:
        """What is left of a budget ending at ``deadline``, as a call's timeout
        (infinity for none), for a method that makes several calls."""
        if deadline is None:
            return math.inf
        return max(deadline - asyncio.get_running_loop().time(), 0.0)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of the next call: the client's own, then the token's."""
        if self.token is None:
            return self.grpc_metadata
        return self.grpc_metadata + self.token.metadata()

    def _token_rotated(self, code: grpc.StatusCode, sent: Sequence[tuple[str, str]]) -> bool:
        """After UNAUTHENTICATED: whether the token file now holds another token than
        the one ``sent`` (read at once, not at the next periodic check)."""
        if code != grpc.StatusCode.UNAUTHENTICATED or self.token is None:
            return False
        self.token.refresh()
        return self.metadata() != tuple(sent)

    def token_rotated(self, sent: Sequence[tuple[str, str]]) -> bool:
        """Whether a stream refused with UNAUTHENTICATED, opened with ``sent``, may be
        opened again with a new token."""
        return self._token_rotated(grpc.StatusCode.UNAUTHENTICATED, sent)

    async def __call__(
        self,
        rpc: Callable[..., Awaitable[Response]],
        request: Any,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Response:
        """Call ``rpc(request)``; ``request_id`` is what ``request`` carries, if any."""
        loop = asyncio.get_running_loop()
        deadline = self.deadline(timeout)
        policy = self.policy
        # Only an attempt whose DEADLINE_EXCEEDED is retried is cut short: a write
        # without a request id, cut short, would fail and might still take effect.
        cut_short = request_id is not None or read_only(request)
        attempt = 0
        while True:
            attempt += 1
            attempt_timeout = policy.attempt_timeout if cut_short else None
            if deadline is not None:
                remaining = max(deadline - loop.time(), 0.0)
                attempt_timeout = (
                    remaining if attempt_timeout is None else min(attempt_timeout, remaining)
                )
            sent = self.metadata()
            call: Awaitable[Response] | None = None
            try:
                call = rpc(request, timeout=attempt_timeout, metadata=sent)
                self.track(call)
                return await call
            except asyncio.CancelledError as error:
                if being_cancelled():
                    raise
                # The call alone was cancelled: the client was closed.
                raise Cancelled(
                    "the call was cancelled: the client was closed while it ran",
                    request_id=request_id,
                    attempts=attempt,
                ) from error
            except grpc.RpcError as error:
                failure = from_rpc_error(error, request_id=request_id, attempts=attempt)
                if self._token_rotated(failure.code, sent) and attempt < policy.max_attempts:
                    log.info("memsvc refused the token; retrying with the new one from its file")
                    continue
                if attempt >= policy.max_attempts or not retryable(
                    failure, request_id is not None, read_only(request)
                ):
                    raise failure from error
                delay = policy.backoff(attempt, failure.retry_delay)
                if deadline is not None and loop.time() + delay >= deadline:
                    raise failure from error
                log.info(
                    "memsvc call failed with %s (attempt %d, request_id %s); retrying in %.2fs",
                    failure.code.name,
                    attempt,
                    request_id,
                    delay,
                )
            finally:
                self.untrack(call)
            if await self.closed_within(delay):
                raise Cancelled(
                    "the call was cancelled: the client was closed while it waited to retry",
                    request_id=request_id,
                    attempts=attempt,
                )
