"""The one error tree of memsvc's domain.

Every failure a caller should see is raised as one of these; the gRPC layer maps
each class to a status code (``memsvc.api``) and never needs to parse messages.

    MemsvcError                     reason (ErrorReason name), metadata
    ├── InvalidArgument             INVALID_ARGUMENT, with field violations
    │   └── RequestIdConflict
    ├── NotFound                    NOT_FOUND
    │   ├── KeyNotFound
    │   ├── SessionNotFound
    │   ├── CheckpointNotFound
    │   └── EpisodeNotFound
    ├── AlreadyExists               ALREADY_EXISTS
    │   ├── SessionAlreadyExists
    │   └── CheckpointAlreadyExists
    ├── FailedPrecondition          FAILED_PRECONDITION
    │   ├── SessionNotWritable
    │   ├── InvalidTransition
    │   ├── CheckpointProtected
    │   ├── WorkingMemoryLost
    │   └── SimilarityScopeTooLarge
    ├── ResourceExhausted
    │   └── SessionLimitExceeded    RESOURCE_EXHAUSTED, with the limit
    ├── OutOfRange                  OUT_OF_RANGE
    ├── BackendUnavailable          UNAVAILABLE (retryable)
    ├── Unauthenticated             UNAUTHENTICATED (no valid bearer token)
    └── PermissionDenied            PERMISSION_DENIED (the token's projects exclude it)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad request field: its path (``entries[2].key``) and what to fix."""

    field: str
    description: str


class Rollback(Exception):
    """Raised in a transaction block to end it on purpose, changing nothing (a
    retried request answered from the request log): nobody's failure."""


class MemsvcError(Exception):
    """Base of every error memsvc reports to callers.

    ``reason`` is the name of a ``memsvc.v1.ErrorReason`` value and ``metadata``
    holds the identifiers and limits a program needs to act on the error.
    """

    reason: str = "ERROR_REASON_UNSPECIFIED"

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


def more_violations(count: int) -> FieldViolation:
    """The entry of a report that stands for ``count`` violations left out of it."""
    return FieldViolation("", f"and {count} more violation(s) like these")


class InvalidArgument(MemsvcError):
    """The request is malformed; ``violations`` names every bad field."""

    reason = "ERROR_REASON_INVALID_ARGUMENT"

    # The first violations only: a status travels in trailers that gRPC clients
    # refuse past 8 KiB, and a batch of 1,000 bad keys would not fit (the API keeps
    # of these the first that fit, api/_errors.py).
    MAX_REPORTED = 20

    def __init__(self, violations: list[FieldViolation]) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one violation")
        reported = violations[: self.MAX_REPORTED]
        # How many are left out (the last violation reported then stands for them).
        self.unreported = max(0, len(violations) - self.MAX_REPORTED)
        if self.unreported:
            reported.append(more_violations(self.unreported))
        message = "; ".join(f"{v.field}: {v.description}" for v in reported[:3])
        if len(violations) > 3:
            message += f" (and {len(violations) - 3} more: see the BadRequest details)"
        super().__init__(f"invalid request: {message}")
        self.violations = tuple(reported)

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        """Build the error for one bad field."""
        return cls([FieldViolation(field, description)])


class NotFound(MemsvcError):
    """The thing asked for does not exist."""


class KeyNotFound(NotFound):
    """A working-memory key does not exist or has expired."""

    reason = "ERROR_REASON_KEY_NOT_FOUND"

    def __init__(self, session_id: str, key: str) -> None:
        super().__init__(
            f"key {key!r} not found in session {session_id!r} (never set, deleted or expired)",
            metadata={"session_id": session_id, "key": key},
        )


class AlreadyExists(MemsvcError):
    """The thing to create exists already."""


class FailedPrecondition(MemsvcError):
    """The request is valid but the system is not in a state to perform it."""


class SessionNotWritable(FailedPrecondition):
    """The session's state forbids writes to its working memory."""

    reason = "ERROR_REASON_SESSION_NOT_WRITABLE"

    _WHY: ClassVar[dict[str, str]] = {
        "not spawned": "was never spawned; call Spawn first",
        "terminated": "is terminated; its working memory takes no more writes",
        "paused": "is paused; its working memory is read-only until it is resumed",
    }

    def __init__(self, session_id: str, state: str) -> None:
        why = self._WHY.get(
            state, f"is {state}; its working memory accepts no writes until that completes"
        )
        super().__init__(
            f"session {session_id!r} {why}",
            metadata={"session_id": session_id, "state": state},
        )


class ResourceExhausted(MemsvcError):
    """A configured limit would be exceeded; ``subject`` names the quota."""

    subject = "limit"


class TooManyCalls(ResourceExhausted):
    """The process already runs ``max_concurrent_calls`` calls."""

    reason = "ERROR_REASON_TOO_MANY_CALLS"
    subject = "concurrent calls"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this memsvc already runs {limit} calls; retry with backoff or on another replica",
            metadata={"limit": str(limit)},
        )


class CheckpointLimitExceeded(ResourceExhausted):
    """A session already has ``max_checkpoints_per_session`` checkpoints."""

    reason = "ERROR_REASON_CHECKPOINT_LIMIT"
    subject = "checkpoints per session"

    def __init__(self, session_id: str, limit: int) -> None:
        super().__init__(
            f"session {session_id!r} already has {limit} checkpoints, its limit; delete "
            "some (or let checkpoint_keep_last prune them) before taking another",
            metadata={"limit": str(limit), "session_id": session_id},
        )


class DeadlineExceeded(MemsvcError):
    """The call ran past its deadline; whether it took effect is unknown."""

    reason = "ERROR_REASON_DEADLINE_EXCEEDED"

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"the call did not finish within its deadline of {seconds:g}s; its effect is "
            "unknown: retry a call that took a request_id with the same one, and a read as "
            "it was; any other write may have run: read what it would change before "
            "writing again",
            metadata={"deadline_seconds": f"{seconds:g}"},
        )


class SessionLimitExceeded(ResourceExhausted):
    """A write would take a session past its key-count or byte limit."""

    def __init__(self, *, what: str, limit: int, current: int, requested: int) -> None:
        self.reason = (
            "ERROR_REASON_SESSION_KEY_LIMIT"
            if what == "keys"
            else "ERROR_REASON_SESSION_SIZE_LIMIT"
        )
        self.subject = "session keys" if what == "keys" else "session bytes"
        unit = "keys" if what == "keys" else "bytes"
        super().__init__(
            f"the session would hold {requested} {unit}, over its limit of {limit} "
            f"(it holds {current}); delete keys or raise the limit",
            metadata={"limit": str(limit), "current": str(current), "requested": str(requested)},
        )
        self.limit = limit


class OutOfRange(MemsvcError):
    """A position is outside what is retained."""


class BackendUnavailable(MemsvcError):
    """A backend could not be reached within the retry budget; retrying is safe."""

    reason = "ERROR_REASON_BACKEND_UNAVAILABLE"

    def __init__(self, backend: str, cause: BaseException | None = None) -> None:
        detail = ""
        if cause is not None:
            text = str(cause)  # empty for some (a bare TimeoutError)
            detail = f": {type(cause).__name__}" + (f": {text}" if text else "")
        super().__init__(
            f"the {backend} backend is unavailable{detail}; retry later",
            metadata={"backend": backend},
        )


class ServerShuttingDown(MemsvcError):
    """This process is shutting down: what it ended goes on elsewhere (reconnect)."""

    reason = "ERROR_REASON_SERVER_SHUTTING_DOWN"

    def __init__(self) -> None:
        super().__init__(
            "this memsvc is shutting down; reconnect (to another replica) to go on: a watch"
            " resumes after the last sequence it received"
        )


class InvalidTransition(FailedPrecondition):
    """The operation is not allowed from the session's current state."""

    reason = "ERROR_REASON_INVALID_TRANSITION"

    def __init__(self, session_id: str, state: str, operation: str, hint: str = "") -> None:
        super().__init__(
            f"cannot {operation} session {session_id!r}: it is {state}{hint}",
            metadata={"session_id": session_id, "state": state},
        )


class SessionNotFound(NotFound):
    """The session was never spawned (or, for working-memory reads, has ended)."""

    reason = "ERROR_REASON_SESSION_NOT_FOUND"

    def __init__(self, session_id: str, terminated: bool = False) -> None:
        why = "is terminated" if terminated else "was never spawned; call Spawn first"
        super().__init__(f"session {session_id!r} {why}", metadata={"session_id": session_id})


class SessionAlreadyExists(AlreadyExists):
    """The session id is taken (terminated ids are never reused)."""

    reason = "ERROR_REASON_SESSION_ALREADY_EXISTS"

    def __init__(self, session_id: str, state: str) -> None:
        super().__init__(
            f"session {session_id!r} already exists ({state}); session ids are never reused",
            metadata={"session_id": session_id, "state": state},
        )


class CheckpointNotFound(NotFound):
    """No such checkpoint in this session."""

    reason = "ERROR_REASON_CHECKPOINT_NOT_FOUND"

    def __init__(self, session_id: str, checkpoint_id: str) -> None:
        super().__init__(
            f"checkpoint {checkpoint_id!r} not found in session {session_id!r}",
            metadata={"session_id": session_id, "checkpoint_id": checkpoint_id},
        )


class CheckpointAlreadyExists(AlreadyExists):
    """The session already has a checkpoint with this id."""

    reason = "ERROR_REASON_CHECKPOINT_ALREADY_EXISTS"

    def __init__(self, session_id: str, checkpoint_id: str) -> None:
        super().__init__(
            f"session {session_id!r} already has a checkpoint {checkpoint_id!r}; choose "
            "another id or leave it empty",
            metadata={"session_id": session_id, "checkpoint_id": checkpoint_id},
        )


class CheckpointProtected(FailedPrecondition):
    """The checkpoint is the resume point of a PAUSED session."""

    reason = "ERROR_REASON_CHECKPOINT_PROTECTED"

    def __init__(self, session_id: str, checkpoint_id: str) -> None:
        super().__init__(
            f"checkpoint {checkpoint_id!r} is the resume point of paused session "
            f"{session_id!r}; resume or terminate the session first",
            metadata={"session_id": session_id, "checkpoint_id": checkpoint_id},
        )


class RequestPurged(FailedPrecondition):
    """A retry of a call whose effect and answer a purge forgot: not run again."""

    reason = "ERROR_REASON_REQUEST_PURGED"

    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"request {request_id} was served before a PurgeData forgot its data and its "
            "answer: it is not run again (that would bring the data back); use a new "
            "request id for a new call",
            metadata={"request_id": request_id},
        )


class RequestIdConflict(InvalidArgument):
    """A request id was reused with different arguments."""

    reason = "ERROR_REASON_REQUEST_ID_REUSED"

    def __init__(self, request_id: str) -> None:
        super().__init__(
            [
                FieldViolation(
                    "request_id",
                    "was already used with different arguments; use a new id for a new call",
                )
            ]
        )
        self.metadata = {"request_id": request_id}


class WorkingMemoryLost(FailedPrecondition):
    """The working-memory store lost the session's memory."""

    reason = "ERROR_REASON_WORKING_MEMORY_LOST"

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"the working memory of session {session_id!r} was lost by its store, or is "
            "not what memsvc left there (a store restored from an older copy); Resume it "
            "from a checkpoint, or, with none to resume from, Terminate it with "
            "skip_consolidation",
            metadata={"session_id": session_id},
        )


class EpisodeNotFound(NotFound):
    """No such episode in this project."""

    reason = "ERROR_REASON_EPISODE_NOT_FOUND"

    def __init__(self, episode_id: str) -> None:
        super().__init__(
            f"episode {episode_id!r} not found in this project",
            metadata={"episode_id": episode_id},
        )


class SimilarityScopeTooLarge(FailedPrecondition):
    """A similarity search would compare more episodes than allowed."""

    reason = "ERROR_REASON_SIMILARITY_SCOPE_TOO_LARGE"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"more than {limit} episodes match the filters of this similarity search; "
            "narrow them (agent instance, session, task type, time range, importance or a "
            "text query)",
            metadata={"candidates": str(limit + 1), "limit": str(limit)},
        )


class Unauthenticated(MemsvcError):
    """The call carries no valid bearer token (missing, malformed, unknown or revoked)."""

    reason = "ERROR_REASON_UNAUTHENTICATED"


class PermissionDenied(MemsvcError):
    """The caller's token is bound to projects that do not include the one asked for."""

    reason = "ERROR_REASON_PERMISSION_DENIED"

    def __init__(self, message: str, project_id: str) -> None:
        super().__init__(message, metadata={"project_id": project_id})
