"""The status code the metrics count a call under."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from memsvc.api._metrics import _code


class EndedCall:
    """The parts of a ServicerContext that ``_code`` reads, as a call left them."""

    def __init__(self, *, cancelled: bool, code: Any = None, remaining: float | None = 5.0):
        self._cancelled, self._code, self._remaining = cancelled, code, remaining

    def cancelled(self) -> bool:
        return self._cancelled

    def code(self) -> Any:
        return self._code

    def time_remaining(self) -> float | None:
        return self._remaining


@pytest.mark.parametrize(
    ("call", "interrupted", "expected"),
    [
        (EndedCall(cancelled=False), False, "OK"),
        # Found by a review: a watch whose client left while a write waited ended
        # quietly (nobody to answer), and was counted OK.
        (EndedCall(cancelled=True), False, "CANCELLED"),
        (EndedCall(cancelled=False), True, "CANCELLED"),
        (EndedCall(cancelled=False, code=grpc.StatusCode.NOT_FOUND), False, "NOT_FOUND"),
        (EndedCall(cancelled=True, remaining=0.0), False, "DEADLINE_EXCEEDED"),
    ],
)
def test_a_call_is_counted_under_the_status_it_ended_with(
    call: EndedCall, interrupted: bool, expected: str
) -> None:
    assert _code(call, interrupted) == expected


@pytest.mark.parametrize(
    ("timeout", "remaining", "expected"),
    [
        # Found by a review: a client with a deadline of 1.2 s gives up at it; the
        # server, sent the time left rounded up, still had about 8 ms.
        (1.2083, 0.0075, "DEADLINE_EXCEEDED"),
        (300.0, 2.5, "DEADLINE_EXCEEDED"),  # three significant figures of 300 s
        (1.2083, 0.4, "CANCELLED"),  # a client that gave up well before
        (300.0, 10.0, "CANCELLED"),
    ],
)
def test_a_call_its_client_ended_at_its_deadline_is_counted_deadline_exceeded(
    timeout: float, remaining: float, expected: str
) -> None:
    assert _code(EndedCall(cancelled=True, remaining=remaining), timeout=timeout) == expected
    # Ended by the server before its deadline, it keeps the status it ended with.
    found = EndedCall(cancelled=False, code=grpc.StatusCode.NOT_FOUND, remaining=remaining)
    assert _code(found, timeout=timeout) == "NOT_FOUND"
