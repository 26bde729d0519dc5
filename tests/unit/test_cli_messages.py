"""What the operator commands print for a failed call."""

from __future__ import annotations

import grpc

from memsvc.cli_client import describe_error
from memsvc.client import MemsvcError


def test_an_unreachable_server_gets_the_address_hint():
    error = MemsvcError("failed to connect", code=grpc.StatusCode.UNAVAILABLE)
    assert "is memsvc running at 127.0.0.1:50051?" in describe_error(error, "127.0.0.1:50051")


def test_a_backend_down_is_not_blamed_on_the_server():
    """Found by a review: memsvc answered, yet the CLI asked whether it was running."""
    error = MemsvcError(
        "the working memory (Redis) backend is unavailable: ConnectionError; retry later",
        code=grpc.StatusCode.UNAVAILABLE,
        reason="ERROR_REASON_BACKEND_UNAVAILABLE",
    )
    text = describe_error(error, "127.0.0.1:50051")
    assert "is memsvc running" not in text
    assert "the backend named above is down" in text
