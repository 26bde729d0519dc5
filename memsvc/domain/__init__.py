"""memsvc's domain: rules, data types and storage ports, free of gRPC and I/O."""

from memsvc.domain._durable import DurableStore
from memsvc.domain._errors import (
    AlreadyExists,
    BackendUnavailable,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    KeyNotFound,
    MemsvcError,
    NotFound,
    ResourceExhausted,
    SessionLimitExceeded,
    SessionNotWritable,
)
from memsvc.domain._ids import MAX_KEY_BYTES, MAX_SESSION_ID_CHARS, SessionRef
from memsvc.domain._working_memory import (
    BatchRead,
    EntryWrite,
    KeyMeta,
    Page,
    StoredEntry,
    WorkingMemory,
    WorkingMemoryLimits,
    WorkingMemoryStore,
    WriteResult,
)

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_SESSION_ID_CHARS",
    "AlreadyExists",
    "BackendUnavailable",
    "BatchRead",
    "DurableStore",
    "EntryWrite",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "KeyMeta",
    "KeyNotFound",
    "MemsvcError",
    "NotFound",
    "Page",
    "ResourceExhausted",
    "SessionLimitExceeded",
    "SessionNotWritable",
    "SessionRef",
    "StoredEntry",
    "WorkingMemory",
    "WorkingMemoryLimits",
    "WorkingMemoryStore",
    "WriteResult",
]
