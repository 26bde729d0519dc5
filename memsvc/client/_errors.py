"""Errors: one exception class per status code, refined by memsvc's ErrorReason.

Every failed call raises a :class:`MemsvcError`. Its class says the gRPC status code
and, where memsvc gives a reason, the reason, so ``except NotFound`` catches every
missing thing and ``except KeyNotFound`` only keys::

    MemsvcError                      .code .message .reason .metadata .violations
    |                                .retry_delay .request_id .attempts
    +-- InvalidArgument              (.violations: field -> what is wrong)
    |   +-- RequestIdReused
    +-- NotFound
    |   +-- KeyNotFound              (.key)
    |   +-- SessionNotFound
    |   +-- CheckpointNotFound       (.checkpoint_id)
    |   +-- EpisodeNotFound          (.episode_id)
    |   +-- GraphCheckpointNotFound  (.checkpoint_id)
    +-- AlreadyExists
    |   +-- SessionAlreadyExists     (.state)
    |   +-- CheckpointAlreadyExists
    +-- FailedPrecondition
    |   +-- InvalidTransition        (.state)
    |   +-- SessionNotWritable       (.state)
    |   +-- CheckpointProtected
    |   +-- WorkingMemoryLost
    |   +-- RequestPurged            (a retry of a call whose data a purge forgot)
    |   +-- SimilarityScopeTooLarge
    |   +-- GraphCheckpointConflict  (.latest_checkpoint_id): the writer fence refused a put
    |   +-- GraphPruneRefused        (.refused_thread_ids .checkpoints_deleted): no
    |                                status, raised by prune() for what memsvc left
    +-- ResourceExhausted
    |   +-- SessionLimitExceeded     (.limit)
    |   +-- TooManyWatchers
    +-- OutOfRange
    |   +-- WatchPositionCompacted   (.oldest_sequence, .after_sequence)
    +-- Unavailable
    |   +-- BackendUnavailable
    |   +-- ServerShuttingDown       (reconnect, to another replica where there is one)
    +-- Unauthenticated              (no valid bearer token)
    +-- PermissionDenied             (.project_id: outside the token's projects)
    +-- DeadlineExceeded, Aborted, Cancelled, Internal, Unknown, Unimplemented, DataLoss

A reason arriving with a status code it does not belong to gives the code's class.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from memsvc.client._types import SessionState

ERROR_DOMAIN = "memsvc.dev"


class ErrorReason(enum.StrEnum):
    """The machine-readable causes memsvc reports (``memsvc.v1.ErrorReason`` names)."""

    INVALID_ARGUMENT = "ERROR_REASON_INVALID_ARGUMENT"
    KEY_NOT_FOUND = "ERROR_REASON_KEY_NOT_FOUND"
    SESSION_KEY_LIMIT = "ERROR_REASON_SESSION_KEY_LIMIT"
    SESSION_SIZE_LIMIT = "ERROR_REASON_SESSION_SIZE_LIMIT"
    BACKEND_UNAVAILABLE = "ERROR_REASON_BACKEND_UNAVAILABLE"
    SESSION_NOT_WRITABLE = "ERROR_REASON_SESSION_NOT_WRITABLE"
    INVALID_TRANSITION = "ERROR_REASON_INVALID_TRANSITION"
    SESSION_NOT_FOUND = "ERROR_REASON_SESSION_NOT_FOUND"
    SESSION_ALREADY_EXISTS = "ERROR_REASON_SESSION_ALREADY_EXISTS"
    CHECKPOINT_NOT_FOUND = "ERROR_REASON_CHECKPOINT_NOT_FOUND"
    CHECKPOINT_ALREADY_EXISTS = "ERROR_REASON_CHECKPOINT_ALREADY_EXISTS"
    CHECKPOINT_PROTECTED = "ERROR_REASON_CHECKPOINT_PROTECTED"
    REQUEST_ID_REUSED = "ERROR_REASON_REQUEST_ID_REUSED"
    WORKING_MEMORY_LOST = "ERROR_REASON_WORKING_MEMORY_LOST"
    WATCH_POSITION_COMPACTED = "ERROR_REASON_WATCH_POSITION_COMPACTED"
    WATCH_POSITION_AHEAD = "ERROR_REASON_WATCH_POSITION_AHEAD"
    TOO_MANY_WATCHERS = "ERROR_REASON_TOO_MANY_WATCHERS"
    EPISODE_NOT_FOUND = "ERROR_REASON_EPISODE_NOT_FOUND"
    SIMILARITY_SCOPE_TOO_LARGE = "ERROR_REASON_SIMILARITY_SCOPE_TOO_LARGE"
    UNAUTHENTICATED = "ERROR_REASON_UNAUTHENTICATED"
    PERMISSION_DENIED = "ERROR_REASON_PERMISSION_DENIED"
    TOO_MANY_CALLS = "ERROR_REASON_TOO_MANY_CALLS"
    CHECKPOINT_LIMIT = "ERROR_REASON_CHECKPOINT_LIMIT"
    DEADLINE_EXCEEDED = "ERROR_REASON_DEADLINE_EXCEEDED"
    GRAPH_CHECKPOINT_CONFLICT = "ERROR_REASON_GRAPH_CHECKPOINT_CONFLICT"
    GRAPH_CHECKPOINT_NOT_FOUND = "ERROR_REASON_GRAPH_CHECKPOINT_NOT_FOUND"
    GRAPH_CHECKPOINT_TOO_LARGE = "ERROR_REASON_GRAPH_CHECKPOINT_TOO_LARGE"
    REQUEST_PURGED = "ERROR_REASON_REQUEST_PURGED"
    SERVER_SHUTTING_DOWN = "ERROR_REASON_SERVER_SHUTTING_DOWN"


class MemsvcError(Exception):
    """A failed memsvc call.

    Attributes:
        code: the gRPC status code.
        message: the status message.
        reason: the ``ErrorReason`` name from ``google.rpc.ErrorInfo`` ("" when none;
            an :class:`ErrorReason` member when this SDK knows it).
        metadata: ErrorInfo metadata: the ids and limits involved.
        violations: for INVALID_ARGUMENT, field path -> what is wrong with it.
        retry_delay: seconds the server asks to wait before retrying (RetryInfo).
        request_id: the request id the call carried, if any.
        attempts: how many attempts were made (retries included).
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        violations: Mapping[str, str] | None = None,
        retry_delay: float | None = None,
        request_id: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.violations: dict[str, str] = dict(violations or {})
        self.retry_delay = retry_delay
        self.request_id = request_id
        self.attempts = attempts

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.reason:
            text += f" [{self.reason}]"
        if self.violations:
            text += " (" + "; ".join(f"{f}: {d}" for f, d in self.violations.items()) + ")"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


# One class per status code.
class Cancelled(MemsvcError):
    code = grpc.StatusCode.CANCELLED


class Unknown(MemsvcError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(MemsvcError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(MemsvcError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(MemsvcError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MemsvcError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(MemsvcError):
    """The token is valid but not for this project (``project_id``: the one asked for;
    empty for a watch of every project)."""

    code = grpc.StatusCode.PERMISSION_DENIED

    @property
    def project_id(self) -> str:
        return self.metadata.get("project_id", "")


class ResourceExhausted(MemsvcError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(MemsvcError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(MemsvcError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(MemsvcError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(MemsvcError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(MemsvcError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(MemsvcError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(MemsvcError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(MemsvcError):
    """No valid bearer token: none sent, or one the server does not know (revoked)."""

    code = grpc.StatusCode.UNAUTHENTICATED


# Refinements by reason.
class RequestIdReused(InvalidArgument):
    """The request id was used before with other arguments."""


class KeyNotFound(NotFound):
    """The key is absent (or expired) in the session's working memory."""

    @property
    def key(self) -> str:
        return self.metadata.get("key", "")


class SessionNotFound(NotFound):
    """The session was never spawned (or, for reads, was terminated)."""


class CheckpointNotFound(NotFound):
    """No such checkpoint (or retention removed it)."""

    @property
    def checkpoint_id(self) -> str:
        return self.metadata.get("checkpoint_id", "")


class EpisodeNotFound(NotFound):
    """No episode with this id in the project."""

    @property
    def episode_id(self) -> str:
        return self.metadata.get("episode_id", "")


class GraphCheckpointNotFound(NotFound):
    """No such graph checkpoint (or the thread and namespace have none)."""

    @property
    def checkpoint_id(self) -> str:
        return self.metadata.get("checkpoint_id", "")


class GraphCheckpointConflict(FailedPrecondition):
    """The writer fence refused a put: its parent is no longer the thread's latest."""

    @property
    def latest_checkpoint_id(self) -> str:
        """The thread's latest checkpoint ("" when it has none)."""
        return self.metadata.get("latest_checkpoint_id", "")


class GraphPruneRefused(FailedPrecondition):
    """A keep_latest prune left threads that use a LangGraph DeltaChannel.

    The call itself succeeded: memsvc reports the threads it refused to prune in
    its answer (``refused_thread_ids``), and ``prune()`` raises this so that they are
    not taken as pruned. When it found one first, none of the threads was pruned;
    ``checkpoints_deleted`` counts what was (of the others, when a thread gained
    the metadata while they were pruned).
    """

    def __init__(self, refused_thread_ids: list[str], checkpoints_deleted: int) -> None:
        super().__init__(
            "keep_latest left the threads that use a DeltaChannel, which rebuilds its "
            "values from older checkpoints: " + ", ".join(map(repr, refused_thread_ids))
        )
        self.refused_thread_ids = refused_thread_ids
        self.checkpoints_deleted = checkpoints_deleted


class SessionAlreadyExists(AlreadyExists):
    """The session id is in use, or was (terminated ids are never reused)."""

    @property
    def state(self) -> SessionState:
        """The session's state (UNKNOWN when memsvc did not say)."""
        return _session_state(self.metadata.get("state", ""))


class CheckpointAlreadyExists(AlreadyExists):
    """The session already has a checkpoint with this id."""


class InvalidTransition(FailedPrecondition):
    """The lifecycle operation is not allowed from the session's current state."""

    @property
    def state(self) -> SessionState:
        """The session's current state (UNKNOWN when the details name none: no
        state, or a step under way)."""
        return _session_state(self.metadata.get("state", ""))


class SessionNotWritable(FailedPrecondition):
    """The session does not take writes now (not spawned, paused, terminated)."""

    @property
    def state(self) -> str:
        """Why, as its working memory says: "not spawned", "paused", "terminated",
        or an operation under way ("pausing", "resuming", "terminating"...). Not a
        SessionState: a session being paused is still ACTIVE."""
        return self.metadata.get("state", "")


class CheckpointProtected(FailedPrecondition):
    """The checkpoint is a paused session's resume point."""


class WorkingMemoryLost(FailedPrecondition):
    """The working-memory store lost the session's memory: resume from a checkpoint."""


class RequestPurged(FailedPrecondition):
    """A retry of a call whose data and answer a PurgeData forgot: not run again
    (that would bring the data back). A new call needs a new request id."""


class SimilarityScopeTooLarge(FailedPrecondition):
    """A similarity search would compare too many episodes: narrow the filters."""


class SessionLimitExceeded(ResourceExhausted):
    """A write would take the session past its key or size limit (nothing was written)."""

    @property
    def limit(self) -> int | None:
        return _int(self.metadata.get("limit"))


class TooManyWatchers(ResourceExhausted):
    """The server already serves its maximum number of watch streams."""


class TooManyCalls(ResourceExhausted):
    """The server already runs its maximum number of calls; nothing was done, so
    retrying after a backoff is safe."""


class CheckpointLimitExceeded(ResourceExhausted):
    """The session already has its maximum number of checkpoints (nothing changed):
    delete some before taking another."""

    @property
    def limit(self) -> int | None:
        return _int(self.metadata.get("limit"))


class GraphCheckpointTooLarge(ResourceExhausted):
    """A graph checkpoint with all its values is larger than one response memsvc may
    send (its ``max_message_bytes``): raise that limit on memsvc."""

    @property
    def limit(self) -> int | None:
        return _int(self.metadata.get("limit"))

    @property
    def size(self) -> int | None:
        return _int(self.metadata.get("size"))


class BackendUnavailable(Unavailable):
    """A memsvc backend is down. The SDK retries reads and calls with a request id
    within the call's deadline; a write without one may have committed first, so
    it is raised (see docs/client.md, Retries)."""


class ServerShuttingDown(Unavailable):
    """The memsvc process is shutting down and ended the stream; a watch reconnects."""


class WatchPositionRefused(OutOfRange):
    """A watch's start position is not one the event log can serve."""

    @property
    def after_sequence(self) -> int | None:
        """The position the watch asked to resume after."""
        return _int(self.metadata.get("after_sequence"))


class WatchPositionCompacted(WatchPositionRefused):
    """A watch asked to resume from a position older than the retained events.

    Events after ``after_sequence`` up to ``oldest_sequence`` are gone; start again
    from ``oldest_sequence`` (``after_sequence=error.oldest_sequence``) or from now.
    """

    @property
    def oldest_sequence(self) -> int | None:
        """The oldest position a watch may resume after."""
        return _int(self.metadata.get("oldest_sequence"))


class WatchPositionAhead(WatchPositionRefused):
    """A watch asked to resume after a position past the latest event: a cursor
    that is not of this event log (another deployment's, or from before a
    database restore). Resume after ``latest_sequence``, or start from now."""

    @property
    def latest_sequence(self) -> int | None:
        """The latest event's sequence when the watch was refused."""
        return _int(self.metadata.get("latest_sequence"))


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


_BY_CODE: dict[grpc.StatusCode, type[MemsvcError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}

_BY_REASON: dict[str, type[MemsvcError]] = {
    ErrorReason.INVALID_ARGUMENT: InvalidArgument,
    ErrorReason.REQUEST_ID_REUSED: RequestIdReused,
    ErrorReason.KEY_NOT_FOUND: KeyNotFound,
    ErrorReason.SESSION_NOT_FOUND: SessionNotFound,
    ErrorReason.CHECKPOINT_NOT_FOUND: CheckpointNotFound,
    ErrorReason.EPISODE_NOT_FOUND: EpisodeNotFound,
    ErrorReason.SESSION_ALREADY_EXISTS: SessionAlreadyExists,
    ErrorReason.CHECKPOINT_ALREADY_EXISTS: CheckpointAlreadyExists,
    ErrorReason.INVALID_TRANSITION: InvalidTransition,
    ErrorReason.SESSION_NOT_WRITABLE: SessionNotWritable,
    ErrorReason.CHECKPOINT_PROTECTED: CheckpointProtected,
    ErrorReason.WORKING_MEMORY_LOST: WorkingMemoryLost,
    ErrorReason.SIMILARITY_SCOPE_TOO_LARGE: SimilarityScopeTooLarge,
    ErrorReason.SESSION_KEY_LIMIT: SessionLimitExceeded,
    ErrorReason.SESSION_SIZE_LIMIT: SessionLimitExceeded,
    ErrorReason.TOO_MANY_WATCHERS: TooManyWatchers,
    ErrorReason.TOO_MANY_CALLS: TooManyCalls,
    ErrorReason.CHECKPOINT_LIMIT: CheckpointLimitExceeded,
    ErrorReason.GRAPH_CHECKPOINT_TOO_LARGE: GraphCheckpointTooLarge,
    ErrorReason.REQUEST_PURGED: RequestPurged,
    ErrorReason.DEADLINE_EXCEEDED: DeadlineExceeded,
    ErrorReason.BACKEND_UNAVAILABLE: BackendUnavailable,
    ErrorReason.SERVER_SHUTTING_DOWN: ServerShuttingDown,
    ErrorReason.WATCH_POSITION_COMPACTED: WatchPositionCompacted,
    ErrorReason.WATCH_POSITION_AHEAD: WatchPositionAhead,
    ErrorReason.GRAPH_CHECKPOINT_CONFLICT: GraphCheckpointConflict,
    ErrorReason.GRAPH_CHECKPOINT_NOT_FOUND: GraphCheckpointNotFound,
}


_REASONS = frozenset(reason.value for reason in ErrorReason)


def error_class(code: grpc.StatusCode, reason: str) -> type[MemsvcError]:
    """The most specific class for a status code and reason.

    A reason refines only its own status code: a reason arriving with another code
    (say, through a proxy) gives the code's class.
    """
    by_code = _BY_CODE.get(code, MemsvcError)
    by_reason = _BY_REASON.get(reason)
    if by_reason is not None and issubclass(by_reason, by_code):
        return by_reason
    return by_code


def from_rpc_error(
    error: grpc.RpcError, *, request_id: str | None = None, attempts: int = 1
) -> MemsvcError:
    """The MemsvcError for a failed gRPC call, its rich status details decoded."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or ""
    reason = ""
    metadata: dict[str, str] = {}
    violations: dict[str, str] = {}
    retry_delay: float | None = None
    for detail in _details(error):
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.update((v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
    return error_class(code, reason)(
        message,
        code=code,
        reason=ErrorReason(reason) if reason in _REASONS else reason,
        metadata=metadata,
        violations=violations,
        retry_delay=retry_delay,
        request_id=request_id,
        attempts=attempts,
    )


def _details(error: grpc.RpcError) -> list[Any]:
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError):
        # A status whose details disagree with the call's code, or an error object
        # without trailing metadata: keep the code and message alone.
        return []
    return [] if status is None else list(status.details)


def _session_state(named: str) -> SessionState:
    """A session state as an error's details name it (memsvc writes them in capitals)."""
    try:
        return SessionState(named.lower())
    except ValueError:
        return SessionState.UNKNOWN
