# ASYNC109: ``timeout`` is the gRPC deadline of a call, the name gRPC APIs use.
# ruff: noqa: ASYNC109
"""Retries within one deadline, and the request ids that make them safe.

A call's ``timeout`` is its whole budget: every attempt and every backoff sleep fit
in it, and each attempt's gRPC deadline is what is left of it (or
``RetryPolicy.attempt_timeout``, when that is shorter, for the calls retried after
a DEADLINE_EXCEEDED).

What is retried depends on whether a failed attempt may have taken effect:

- Reads (READ_ONLY_REQUESTS) change nothing: retried on UNAVAILABLE, and on
  DEADLINE_EXCEEDED and ABORTED unless memsvc's own deadline ended the read (it
  would run as long again).
- Calls that carry a request id: retried on UNAVAILABLE, DEADLINE_EXCEEDED and
  ABORTED. The first attempt may have taken effect; the request id makes the server
  answer the retry with the first attempt's answer instead of doing it twice. The
  SDK makes one id (a UUID4) per call and sends it with every attempt of that call.
  So are the graph puts (REPEATABLE_REQUESTS): putting a checkpoint id again stores
  the same step again, never over a newer one.
- Other writes without a request id (Set, BatchSet, Delete, BatchDelete, the graph
  deletes and copies): retried only when the failure proves that nothing ran. A
  retry of an attempt that did run could undo another client's later write.
- Every call: RESOURCE_EXHAUSTED from the server's call limit (TooManyCalls), which
  refuses a call before doing anything, and UNAUTHENTICATED when the token file
  holds a new token (the server refused the call before running it).

An attempt does not fail for want of a connection where it can wait for one: after
an UNAVAILABLE, and always for a call with a deadline (however the channel's state
reads: READY lags a connection just lost), it is made with gRPC's wait_for_ready,
so it starts as soon as the server
is back (instead of failing at once while gRPC waits out its reconnection backoff).
It sends nothing until then, so a write that meets a restart is sent once, when it
can be, instead of failing in a way no retry could tell apart from a lost answer.
When the deadline passes while it waits, a call that may run twice (a read, a
request id, a graph put) raises Unavailable naming the last failure: the server was
not reached, and a bare DEADLINE_EXCEEDED would suggest a slow one. Another write
keeps its DEADLINE_EXCEEDED: the channel may have been up in between, the write sent.
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
    Unavailable,
    from_rpc_error,
)

log = logging.getLogger("memsvc.client")


def being_cancelled() -> bool:
    """Whether the running task itself is being cancelled, not only a call it
    awaited (grpc.aio raises CancelledError for a call cancelled locally too)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


Response = TypeVar("Response")

# The failures retried for calls that may run twice: reads, and calls with a request id.
# CANCELLED as a status is the server's (a call of the client's own that it cancels
# ends in asyncio.CancelledError): gRPC cancels the calls that reached a server as it
# stopped, before they reached memsvc, during every graceful restart.
RETRIED_WITH_REQUEST_ID = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
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

    Every number must be finite (ValueError otherwise).
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    attempt_timeout: float | None = None

    def __post_init__(self) -> None:
        # NaN passes every comparison below (each is False) and infinities make
        # backoff() return nan or inf: refused first, by name.
        for name in ("max_attempts", "initial_backoff", "max_backoff", "multiplier", "jitter"):
            _require_finite(name, getattr(self, name))
        if self.attempt_timeout is not None:
            _require_finite("attempt_timeout", self.attempt_timeout)
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


def _require_finite(name: str, value: float) -> None:
    """Refuse NaN and infinities (an int is always finite; math.isfinite would
    overflow on a huge one)."""
    if not isinstance(value, int) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number (got {value!r})")


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


# Writes whose second run stores what the first did and nothing else: a graph
# checkpoint's id names one step of one thread, never a newer state, so putting it
# (or its pending writes) again cannot undo a later write, as a retried Set of a
# key can. Retried as a call with a request id is (a fenced put's retry is accepted
# as one when it matches what is stored).
REPEATABLE_REQUESTS = frozenset(
    f"memsvc.v1.{name}Request" for name in ("PutGraphCheckpoint", "PutGraphWrites")
)


def _one_of(request: object, names: frozenset[str]) -> bool:
    return isinstance(request, Message) and request.DESCRIPTOR.full_name in names


def read_only(request: object) -> bool:
    """Whether ``request`` is one of READ_ONLY_REQUESTS."""
    return _one_of(request, READ_ONLY_REQUESTS)


def repeatable(request: object) -> bool:
    """Whether ``request`` is one of REPEATABLE_REQUESTS."""
    return _one_of(request, REPEATABLE_REQUESTS)


def retryable(failure: MemsvcError, has_request_id: bool, read_only: bool = False) -> bool:
    """Whether a failed attempt may be tried again (``has_request_id``: the call
    carries one, or is REPEATABLE_REQUESTS, whose second run has the first's effect).

    A refusal past the server's call limit, always: nothing was done. Otherwise only
    a call that may run twice: one with a request id (a retry has one effect) on
    UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED and CANCELLED (from the server's side),
    and a read (it has none) on those
    too, except that a read the server itself cut at its own deadline would only
    run as long again. A write without a request id is not retried on them: the
    attempt may have run (a backend error after the commit, an answer lost with its
    connection, a hung call), and a retry would undo a later write of someone else.
    (Its attempts never fail for want of a connection: they wait for one.)
    """
    if isinstance(failure, TooManyCalls):
        return True
    if has_request_id:
        return failure.code in RETRIED_WITH_REQUEST_ID
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
        # The channel the calls go over, set by the client once it has one: whether
        # it is connected tells an attempt that ran out of time waiting for a
        # connection from a slow one. None (a test's stand-in rpc): unknown, taken
        # as connected.
        self.channel: grpc.aio.Channel | None = None
        # Set by close(): a call waiting to retry ends at once, and none starts again.
        self._closed = asyncio.Event()
        # The client's grpc.aio calls in flight (unary attempts, watch streams).
        # close() cancels them itself: closing the channel would, but a channel
        # given to ``from_channel`` stays open, and others may be using it. Weak,
        # so that an ended call needs no untrack() to be forgotten; being here
        # keeps nothing alive, and nothing ends a call that is never cancelled
        # (grpc.aio keeps a call in flight alive by itself: a watch dropped
        # unclosed cancels its stream from its own finalizer).
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

    @property
    def connected(self) -> bool:
        """Whether the channel is connected (READY); True when it is unknown."""
        return self._state() in (None, grpc.ChannelConnectivity.READY)

    def _state(self) -> grpc.ChannelConnectivity | None:
        if self.channel is None:
            return None
        state: grpc.ChannelConnectivity = self.channel.get_state(try_to_connect=False)
        return state

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
        reads = read_only(request)
        # Calls whose attempts may run twice with one effect.
        once = request_id is not None or repeatable(request)
        # Only an attempt whose DEADLINE_EXCEEDED is retried is cut short: a write
        # without a request id, cut short, would fail and might still take effect.
        cut_short = once or reads
        attempt = 0
        previous: MemsvcError | None = None  # the last attempt's failure
        while True:
            attempt += 1
            attempt_timeout = policy.attempt_timeout if cut_short else None
            if deadline is not None:
                remaining = max(deadline - loop.time(), 0.0)
                attempt_timeout = (
                    remaining if attempt_timeout is None else min(attempt_timeout, remaining)
                )
            waits = self._waits_for_connection(previous, deadline)
            sent = self.metadata()
            call: Awaitable[Response] | None = None
            try:
                # None, not False: a channel's own service config may ask for waits.
                call = rpc(
                    request, timeout=attempt_timeout, metadata=sent, wait_for_ready=waits or None
                )
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
                # Not for a write that may not run twice: a channel down at the deadline
                # may have been up meanwhile, the write sent and run, and "could not be
                # reached" would invite sending it again. Its DEADLINE_EXCEEDED stays.
                if waits and (once or reads) and self._never_connected(failure):
                    failure = self._unreachable(failure, previous)
                previous = failure
                if self._token_rotated(failure.code, sent) and attempt < policy.max_attempts:
                    log.info("memsvc refused the token; retrying with the new one from its file")
                    continue
                if attempt >= policy.max_attempts or not retryable(failure, once, reads):
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

    def _waits_for_connection(self, previous: MemsvcError | None, deadline: float | None) -> bool:
        """Whether the next attempt waits for the channel to connect (gRPC's
        wait_for_ready) instead of failing at once while it is not connected, as
        gRPC fails calls for as long as its reconnection backoff lasts (up to 5 s
        with the SDK's options), however soon the server is back.

        After an UNAVAILABLE (the server may be restarting), within what is left of
        the call's budget; and always for a call with a deadline to bound the wait,
        whatever the channel's state says: READY lags a connection that just went
        away (a server restarting), and an attempt sent on it fails at once,
        unsent, which a write without a request id could not retry. A call
        without a deadline waits only after an UNAVAILABLE: its first attempt fails
        on a server that is not there instead of waiting, unbounded, for one that
        may never come.
        """
        if previous is not None and previous.code == grpc.StatusCode.UNAVAILABLE:
            return True
        return deadline is not None

    def _never_connected(self, failure: MemsvcError) -> bool:
        """Whether an attempt that waited for a connection ran out of time, it seems,
        still waiting: the channel is not connected at its deadline (it may have been
        in between, so only calls that may run twice take this for certain)."""
        return failure.code == grpc.StatusCode.DEADLINE_EXCEEDED and not self.connected

    def _unreachable(self, late: MemsvcError, previous: MemsvcError | None) -> Unavailable:
        """The error of an attempt whose deadline passed while it waited for a
        connection: memsvc was not reached, which a bare DEADLINE_EXCEEDED would
        not say (it reads as a server too slow to answer)."""
        state = self._state()
        why = (
            f"last failure: {previous}"
            if previous is not None
            else f"the channel stayed {state.name if state is not None else 'unconnected'}"
        )
        return Unavailable(
            f"memsvc could not be reached before the deadline: no connection ({why})",
            request_id=late.request_id,
            attempts=late.attempts,
        )
