"""Error messages that an operator reads."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from memsvc.api._errors import _abort, to_rpc_status
from memsvc.domain import BackendUnavailable, FieldViolation, InvalidArgument, KeyNotFound
from memsvc.domain._graph_checkpoints import GraphCheckpointNotFound


def test_an_unavailable_backend_names_its_cause_even_without_text():
    """A bare TimeoutError has no text: the message does not end in a dangling colon."""
    bare = BackendUnavailable("durable store (PostgreSQL)", TimeoutError())
    assert str(bare) == (
        "the durable store (PostgreSQL) backend is unavailable: TimeoutError; retry later"
    )
    refused = BackendUnavailable("working memory", ConnectionRefusedError("refused"))
    assert "ConnectionRefusedError: refused; retry later" in str(refused)


def _wire_bytes(status: status_pb2.Status) -> int:
    """What the status takes in trailers: the message as grpc-message encodes it, and
    the Status in base64 (grpc-status-details-bin)."""
    message = sum(
        1 if " " <= c <= "~" and c != "%" else 3 * len(c.encode()) for c in status.message
    )
    details: int = status.ByteSize()
    return message + (details + 2) // 3 * 4


# A character outside printable ASCII that repr() escapes: 10 characters each.
TAG = "\U000e0001"


def test_a_status_quoting_long_client_text_fits_in_trailers():
    """Found by a review: messages quote what the client sent (ids of up to 2 KiB, escaped
    by repr) and travel twice, in grpc-message and in the details; past 8 KiB clients
    refused the trailers with RESOURCE_EXHAUSTED instead of the error."""
    thread, namespace = TAG * 128, TAG * 512
    not_found = GraphCheckpointNotFound(thread, namespace, "")
    violations = [FieldViolation(f"channel_versions[{TAG * 64!r}]", TAG * 512)] * 25
    for error in (not_found, InvalidArgument(violations)):
        status = to_rpc_status(error)
        assert _wire_bytes(status) < 8 << 10, type(error).__name__
        assert status.code != code_pb2.INTERNAL
    error = InvalidArgument(violations)
    status = to_rpc_status(error)
    bad_request = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad_request)
    shown = list(bad_request.field_violations)
    # The first that fit, then one entry counting all the others.
    assert 2 <= len(shown) < len(error.violations)
    assert shown[-1].field == ""
    assert (
        shown[-1].description
        == f"and {len(violations) - len(shown) + 1} more violation(s) like these"
    )


def test_a_long_metadata_value_programs_read_is_kept_whole():
    """A key of 512 bytes in KeyNotFound's metadata: the SDK reads it back."""
    key = "k" * 512
    info = error_details_pb2.ErrorInfo()
    assert to_rpc_status(KeyNotFound("s", key)).details[0].Unpack(info)
    assert info.metadata["key"] == key


def test_a_short_status_is_left_whole():
    error = InvalidArgument([FieldViolation("key", "is required"), FieldViolation("ttl", "< 0")])
    status = to_rpc_status(error)
    assert status.message == error.message
    bad_request = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("key", "is required"),
        ("ttl", "< 0"),
    ]


async def test_a_status_the_client_left_before_is_ended_as_a_cancellation():
    """Found by a review: a call failing as its client's deadline ran out tried to
    send its status to nobody, and gRPC logged the failed send as an ERROR with a
    traceback. It ends as a cancellation, which gRPC ends quietly."""

    class Gone:
        async def abort(self, *status: object) -> None:
            raise grpc.aio.InternalError('Failed "execute_batch"')

    with pytest.raises(asyncio.CancelledError):
        await _abort(Gone(), BackendUnavailable("working memory (Redis)", TimeoutError()), "/m")
