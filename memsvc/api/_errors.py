"""Domain errors to gRPC status codes with rich details, in one interceptor.

Handlers raise ``memsvc.domain`` errors; :class:`ErrorInterceptor` turns each
into its status code with a ``google.rpc.ErrorInfo`` (reason, domain, metadata)
and, where they apply, ``BadRequest`` field violations, ``QuotaFailure`` and
``RetryInfo``. Any other exception becomes INTERNAL with a generic message and
a logged traceback, so internals never leak to callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from memsvc.api._intercept import (
    OWN_METHOD_PREFIX,
    HandlerWrapper,
    Undecodable,
    abort,
    lenient,
    within,
)
from memsvc.domain import (
    AlreadyExists,
    BackendUnavailable,
    FailedPrecondition,
    InvalidArgument,
    MemsvcError,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from memsvc.domain._call_deadline import call_deadline
from memsvc.domain._errors import (
    DeadlineExceeded,
    FieldViolation,
    PermissionDenied,
    ServerShuttingDown,
    TooManyCalls,
    Unauthenticated,
    more_violations,
)
from memsvc.domain._watch import TooManyWatchers
from memsvc.log import rpc_method

log = logging.getLogger(__name__)

# What grpc raises from a stream's write once its client has gone.
_STREAM_BROKEN = (grpc.aio.InternalError, grpc.aio.UsageError)

ERROR_DOMAIN = "memsvc.dev"
# Only memsvc's own services are wrapped; health and reflection are left as they are.

_CODES: tuple[tuple[type[MemsvcError], code_pb2.Code.ValueType], ...] = (
    (InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (NotFound, code_pb2.NOT_FOUND),
    (AlreadyExists, code_pb2.ALREADY_EXISTS),
    (FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (ResourceExhausted, code_pb2.RESOURCE_EXHAUSTED),
    (OutOfRange, code_pb2.OUT_OF_RANGE),
    (BackendUnavailable, code_pb2.UNAVAILABLE),
    (ServerShuttingDown, code_pb2.UNAVAILABLE),
    (DeadlineExceeded, code_pb2.DEADLINE_EXCEEDED),
    (Unauthenticated, code_pb2.UNAUTHENTICATED),
    (PermissionDenied, code_pb2.PERMISSION_DENIED),
)


# A status travels in trailers, which gRPC clients refuse past 8 KiB (a soft limit:
# some calls already fail there, every one past 16 KiB): the message percent-encoded
# (grpc-message: 3 bytes for each byte outside printable ASCII), and the whole Status
# base64-encoded (grpc-status-details-bin, 4/3 of it). Messages and details quote
# what the client sent (ids of up to 2 KiB, escaped), so both are bounded here.
_MESSAGE_WIRE_BYTES = 1024
_STATUS_BYTES = 4096
# Of a violation's field or description; and of a metadata value, which programs
# read (a key, a thread id: at most 512 bytes), so only the longest are cut (a
# namespace stored before its limit, 2 KiB).
_QUOTED_CHARS = 256
_METADATA_CHARS = 1024


def _shortened(text: str, limit: int) -> str:
    """``text``, cut (and marked so) to take at most ``limit`` bytes as grpc-message
    encodes it (3 bytes for each byte outside printable ASCII)."""
    sizes = [1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode()) for char in text]
    if sum(sizes) <= limit:
        return text
    used = 9  # the ellipsis: 3 bytes, each encoded
    for index, size in enumerate(sizes):
        used += size
        if used > limit:
            return text[:index] + "\u2026"
    return text  # not reached: the whole text is over the limit


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def to_rpc_status(error: MemsvcError, request: object = None) -> status_pb2.Status:
    """The google.rpc.Status that reports ``error`` to a caller, small enough for
    trailers (see _STATUS_BYTES): long quotes are cut, and of many violations the
    first that fit are kept (one at least; the message names the first three).
    An error that names a session gets the rest of its identity from ``request``."""
    code = next((c for cls, c in _CODES if isinstance(error, cls)), code_pb2.INTERNAL)
    message = _shortened(error.message, _MESSAGE_WIRE_BYTES)
    metadata = {
        key: _cut(value, _METADATA_CHARS)
        for key, value in {**_session_scope(error, request), **error.metadata}.items()
    }
    details: list[Any] = [
        error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)
    ]
    violations: list[FieldViolation] = []
    more = 0  # violations left out, which an "and N more" entry stands for
    if isinstance(error, InvalidArgument):
        more = error.unreported
        violations = list(error.violations[: len(error.violations) - (1 if more else 0)])
    if isinstance(error, ResourceExhausted):
        details.append(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=error.subject, description=message
                    )
                ]
            )
        )
    if isinstance(error, BackendUnavailable):
        details.append(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1)))
    while True:
        shown = [*violations, *([more_violations(more)] if more else [])]
        status = _status(code, message, details, shown)
        if status.ByteSize() <= _STATUS_BYTES or len(violations) <= 1:
            return status
        violations.pop()  # the last one shown, which the "and N more" entry then counts
        more += 1


def _session_scope(error: MemsvcError, request: object) -> dict[str, str]:
    """The project and agent instance of the session ``error`` names, from the
    request that named it: a session id is unique only within its agent instance,
    and a client with many sessions must know which one failed."""
    if "session_id" not in error.metadata:
        return {}
    scope = {}
    for field in ("project_id", "agent_instance_id"):
        value = getattr(request, field, None)
        if isinstance(value, str) and value:
            scope[field] = value.lower()  # as memsvc keeps UUIDs
    return scope


def _status(
    code: int, message: str, details: list[Any], violations: list[FieldViolation]
) -> status_pb2.Status:
    if violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=_cut(v.field, _QUOTED_CHARS),
                    description=_cut(v.description, _QUOTED_CHARS),
                )
                for v in violations
            ]
        )
        details = [*details, bad_request]
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code, message=message, details=packed)


async def _abort(
    context: grpc.aio.ServicerContext, error: BaseException, method: str, request: object = None
) -> None:
    try:
        if isinstance(error, MemsvcError):
            if isinstance(error, BackendUnavailable):
                log.warning("%s failed: %s", method, error.message)
            status = rpc_status.to_status(to_rpc_status(error, request))
            await abort(context, status.code, status.details, status.trailing_metadata)
        log.error("unexpected error in %s", method, exc_info=error)
        await abort(
            context, grpc.StatusCode.INTERNAL, "internal error; the server log has the details"
        )
    except _STREAM_BROKEN as gone:
        # The client left as the call failed (often the same deadline ran out on
        # both sides), before gRPC knew: sending the status fails. Nobody to tell;
        # ended as a cancellation, which gRPC ends quietly (it logs the failed
        # send as an error of the servicer's).
        log.info("%s: no status sent: the client left (%s)", method, gone)
        raise asyncio.CancelledError from gone


@dataclass(frozen=True)
class CallLimits:
    """What one process allows its unary calls (config: max_concurrent_calls,
    default_deadline_seconds)."""

    max_concurrent_calls: int
    default_deadline_seconds: float


class CallTracker:
    """Knows every call in flight, so shutdown can end streams and wait for the rest.

    ``server.stop(grace)`` would otherwise wait the whole grace period for
    streams that never end on their own (health Watch, event watchers): at
    shutdown, :meth:`end_streams` cancels them, and each ends with UNAVAILABLE
    so its client knows to reconnect elsewhere. And grpc.aio's ``stop()``
    returns once the calls are over for gRPC core, which is before their
    handlers have unwound (grpc issue 37239): :meth:`settle` waits for those,
    so the stores are never closed under a handler still using them.
    """

    def __init__(self) -> None:
        self._streams: set[asyncio.Task[Any]] = set()
        self._unary: set[asyncio.Task[Any]] = set()
        # The streams of services not memsvc's own (grpc.health.v1 Watch, reflection).
        self._other_streams: set[asyncio.Task[Any]] = set()
        # Unary calls gRPC is not done with (see answering): memsvc's, and other
        # services' (health Checks, which need no token).
        self._unanswered: set[object] = set()
        self._unanswered_other: set[object] = set()
        self.shutting_down = False

    @contextlib.contextmanager
    def tracking(self, *, stream: bool, own: bool = True) -> Iterator[None]:
        """Count the current task as a call in flight for the duration of the block."""
        task = asyncio.current_task()
        assert task is not None
        counts = [self._streams if stream else self._unary]
        if stream and not own:
            counts.append(self._other_streams)
        for calls in counts:
            calls.add(task)
        try:
            yield
        finally:
            for calls in counts:
                calls.discard(task)

    @property
    def other_streams(self) -> int:
        """Streams of other services open now (the current one included)."""
        return len(self._other_streams)

    @property
    def unary_in_flight(self) -> int:
        """Unary calls running now (the current one included, inside ``tracking``)."""
        return len(self._unary)

    def answering(self, context: grpc.aio.ServicerContext, *, own: bool = True) -> int:
        """Count a unary call until gRPC is done with it, not only while its handler
        runs; return how many of its kind (memsvc's, or another service's) are
        counted now, this one included. An answer waits in memory until its client
        reads it: one that never read (its HTTP/2 window at 0) held every answer it
        asked for, 3 MB each, gigabytes in seconds, while its calls counted for
        nothing once their handlers returned (a review)."""
        token = object()
        counted = self._unanswered if own else self._unanswered_other
        counted.add(token)
        context.add_done_callback(lambda _: counted.discard(token))
        return len(counted)

    @property
    def unanswered(self) -> int:
        """memsvc's unary calls whose answer gRPC has not finished sending."""
        return len(self._unanswered)

    @property
    def unanswered_other(self) -> int:
        """Other services' unary calls (health Checks) not yet answered."""
        return len(self._unanswered_other)

    def end_streams(self) -> int:
        """Cancel every open stream; return how many there were."""
        self.shutting_down = True
        for task in self._streams:
            task.cancel()
        return len(self._streams)

    async def settle(self, seconds: float) -> set[asyncio.Task[Any]]:
        """Cancel the handlers still running and wait up to ``seconds`` for them to
        unwind; return those that did not."""
        running = self._streams | self._unary
        for task in running:
            task.cancel()
        if not running:
            return set()
        _, pending = await asyncio.wait(running, timeout=seconds)
        return pending


class ErrorInterceptor(HandlerWrapper):
    """Maps domain errors to statuses, sets each call's deadline and log context,
    and registers every call with the CallTracker."""

    own_only = False  # every handler: streams are tracked for shutdown too

    def __init__(
        self,
        calls: CallTracker,
        max_concurrent_calls: int,
        default_deadline_seconds: float,
        max_other_streams: int,
    ) -> None:
        super().__init__()
        self._calls = calls
        self._limits = CallLimits(max_concurrent_calls, default_deadline_seconds)
        # Health Watch and reflection streams need no token (probes have none):
        # without a bound, anyone who reaches the port could open them until memory
        # runs out.
        self._max_other_streams = max_other_streams

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        own = method.startswith(OWN_METHOD_PREFIX)
        # Our handlers refuse an unparsable request with INVALID_ARGUMENT (not grpc's
        # UNKNOWN). Health and reflection, which need no token, take small requests
        # only: a health Watch kept its 4 MB service name (19 MB resident) for as
        # long as its caller liked (a review).
        deserializer = (
            lenient(handler.request_deserializer)
            if own
            else within(handler.request_deserializer, _other_request_bytes(method))
        )
        if handler.unary_unary is not None:
            behavior = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(
                _map_errors(behavior, method, self._calls, self._limits)
                if own
                else _refusing_undecodable(behavior, method, self._calls),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._track_stream(handler.unary_stream, method, own),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            # Reflection's: a tool (grpcui, evans) keeps one open; untracked, it held
            # every shutdown for its whole grace period.
            return grpc.stream_stream_rpc_method_handler(
                self._track_stream(handler.stream_stream, method, own),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _track_stream(self, behavior: Callable[..., Any], method: str, own: bool) -> Any:
        """Wrap a server-streaming or bidirectional handler (whose ``request`` is then
        the requests' iterator), either style grpc.aio allows: an async generator
        that yields responses, or a coroutine that calls context.write()."""
        calls = self._calls
        limit = self._max_other_streams

        async def refuse_beyond_the_limit(context: grpc.aio.ServicerContext) -> None:
            if not own and calls.other_streams > limit:
                await _abort(context, TooManyWatchers(limit), method)

        def requests_of(request: Any, context: grpc.aio.ServicerContext) -> Any:
            """A server-streaming call's request as it is; a bidirectional one's
            iterator, ending the call at the first request it could not take."""
            if not hasattr(request, "__aiter__"):
                return request

            async def checked() -> AsyncIterator[Any]:
                async for each in request:
                    await _refuse_undecodable(context, each, method)
                    yield each

            return checked()

        async def end_with_status(
            context: grpc.aio.ServicerContext, error: BaseException, request: object
        ) -> None:
            if isinstance(error, asyncio.CancelledError):
                if not calls.shutting_down:
                    raise error
                await _abort(context, ServerShuttingDown(), method)
            if isinstance(error, grpc.aio.AbortError) or not own:
                raise error
            if context.cancelled() or isinstance(error, _STREAM_BROKEN):
                # The client left (a cancel, a deadline, a dropped connection) while
                # a write waited for it: grpc fails the write (ExecuteBatchError, an
                # InternalError) before it marks the call cancelled. Nobody to answer,
                # and no error of memsvc's: the handler just ends (raised, grpc would
                # log it as a servicer error; aborted, memsvc as INTERNAL).
                log.info("%s: the stream ended: the client left (%s)", method, error)
                return
            await _abort(context, error, method, request)

        if inspect.isasyncgenfunction(behavior):

            async def generator(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                rpc_method.set(method)
                with calls.tracking(stream=True, own=own):
                    try:
                        refuse_when_shutting_down(calls)
                        await refuse_beyond_the_limit(context)
                        await _refuse_undecodable(context, request, method)
                        async for response in behavior(requests_of(request, context), context):
                            yield response
                    except (Exception, asyncio.CancelledError) as error:
                        await end_with_status(context, error, request)

            return generator

        async def writer(request: Any, context: grpc.aio.ServicerContext) -> None:
            rpc_method.set(method)
            with calls.tracking(stream=True, own=own):
                try:
                    refuse_when_shutting_down(calls)
                    await refuse_beyond_the_limit(context)
                    await _refuse_undecodable(context, request, method)
                    await behavior(requests_of(request, context), context)
                except (Exception, asyncio.CancelledError) as error:
                    await end_with_status(context, error, request)

        return writer


# Unary calls of other services (health Checks) counted at once until answered.
OTHER_UNARY_CALLS = 64
# The largest request health and reflection take (service names, symbol and file
# names): anything larger is INVALID_ARGUMENT, never parsed.
_HEALTH_REQUEST_BYTES = 1024
_REFLECTION_REQUEST_BYTES = 64 * 1024


def _other_request_bytes(method: str) -> int:
    if method.startswith("/grpc.health."):
        return _HEALTH_REQUEST_BYTES
    return _REFLECTION_REQUEST_BYTES


async def _refuse_undecodable(
    context: grpc.aio.ServicerContext, request: object, method: str
) -> None:
    """End the call with INVALID_ARGUMENT when ``request`` could not be taken (not
    parsed, or larger than its method takes)."""
    if isinstance(request, Undecodable):
        await _abort(context, request.error(), method)


def _refusing_undecodable(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    method: str,
    calls: CallTracker,
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """Another service's unary ``behavior`` (a health Check, which needs no token),
    refusing a request :func:`within` did not parse with INVALID_ARGUMENT, and one
    beyond OTHER_UNARY_CALLS until answered: a bound of their own, so that a client
    without a token holding unread answers cannot take memsvc's calls' slots."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if calls.answering(context, own=False) > OTHER_UNARY_CALLS:
            await _abort(context, TooManyCalls(OTHER_UNARY_CALLS), method)
        await _refuse_undecodable(context, request, method)
        return await behavior(request, context)

    return unary


def refuse_when_shutting_down(calls: CallTracker) -> None:
    """A stream that opens once shutdown has ended the others ends as they did
    (UNAVAILABLE: reconnect elsewhere), instead of running until the grace period
    cancels it, which the client would not take as a cue to reconnect."""
    if calls.shutting_down:
        raise asyncio.CancelledError


def _map_errors(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    method: str,
    calls: CallTracker,
    limits: CallLimits,
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        rpc_method.set(method)
        client_deadline = context.time_remaining()
        seconds = limits.default_deadline_seconds if client_deadline is None else client_deadline
        # The client's deadline ends the call by itself; the default one is ours to enforce.
        own_deadline = asyncio.timeout(seconds if client_deadline is None else None)
        counted = calls.answering(context)
        with calls.tracking(stream=False), call_deadline(seconds):
            try:
                if counted > limits.max_concurrent_calls:
                    raise TooManyCalls(limits.max_concurrent_calls)
                if isinstance(request, Undecodable):
                    raise request.error()
                async with own_deadline:
                    return await behavior(request, context)
            except TimeoutError as error:
                if not own_deadline.expired():
                    await _abort(context, error, method, request)
                await _abort(context, DeadlineExceeded(seconds), method)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as error:
                await _abort(context, error, method, request)

    return unary_unary
