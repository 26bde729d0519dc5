"""How a store reports the time and outcome of each backend operation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

from memsvc.domain import BackendUnavailable, MemsvcError, Rollback
from memsvc.domain._call_deadline import current_deadline

BackendObserver = Callable[[str, float, BaseException | None], None]
"""Told (operation, seconds, error or None) after each backend operation."""


@runtime_checkable
class Observable(Protocol):
    """A store that reports its backend operations."""

    observe: BackendObserver


def ignore(operation: str, seconds: float, error: BaseException | None) -> None:
    """The observer of a store nobody measures."""


class OperationTimedOut(Exception):
    """Reported for an operation still waiting on its backend when the deadline
    it ran under passed (the call's, or the health probe's): a backend that hangs
    instead of refusing, as in a partition, fails calls this way."""


# A cancellation this close to the deadline is the deadline's: gRPC cancels a call
# at its deadline on a clock of its own, a moment apart from the event loop's.
_DEADLINE_SLACK_SECONDS = 0.05
# Set on a cancellation an inner block counted, so that the blocks around it do not.
_COUNTED = "_memsvc_timeout_counted"


@contextlib.contextmanager
def observed(observe: BackendObserver, operation: str, backend: str) -> Iterator[None]:
    """Report the block's duration, and its error if it raises, to ``observe``.

    A domain error raised inside a transaction (an invalid transition, say) is
    the caller's, not the backend's, a cancelled call is the client's (unless it
    was cancelled at its deadline: OperationTimedOut), and a Rollback is on
    purpose: all count as answers, not failures. So is another backend's
    unavailability than ``backend``'s (this one), raised inside its block (a Redis
    step inside a database transaction).
    """
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        yield
    except asyncio.CancelledError as cancelled:
        deadline = current_deadline()
        loop = asyncio.get_running_loop()
        at_deadline = deadline is not None and loop.time() >= deadline - _DEADLINE_SLACK_SECONDS
        # Counted by the innermost block only, the one whose backend was awaited: a
        # Redis step that hangs inside a database transaction is not the database's.
        if at_deadline and not getattr(cancelled, _COUNTED, False):
            setattr(cancelled, _COUNTED, True)
            error = OperationTimedOut(f"{operation}: no answer from the {backend} by the deadline")
        raise
    except BaseException as raised:
        domain = isinstance(raised, MemsvcError) and not isinstance(raised, BackendUnavailable)
        elsewhere = (
            isinstance(raised, BackendUnavailable) and raised.metadata.get("backend") != backend
        )
        if not (domain or elsewhere) and not isinstance(raised, Rollback):
            error = raised
        raise
    finally:
        observe(operation, time.perf_counter() - started, error)
