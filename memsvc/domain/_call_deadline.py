"""The deadline of the call being served, which bounds every backend retry made
for it (memsvc/store/_retry.py).

The gRPC layer sets it for each call (:func:`call_deadline`). Work that runs after
the call answered (a Pause's last step, a heal) must not inherit it: the client's
deadline no longer bounds anything, and a short one would make that work give up
on the first backend hiccup (:func:`past_the_call`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Iterator

# Absolute deadline of the current call on the event loop's clock (loop.time()).
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "memsvc_call_deadline", default=None
)


@contextlib.contextmanager
def call_deadline(seconds_left: float | None) -> Iterator[None]:
    """Bound every backend retry inside this block by ``seconds_left``."""
    absolute = None if seconds_left is None else asyncio.get_running_loop().time() + seconds_left
    token = _deadline.set(absolute)
    try:
        yield
    finally:
        _deadline.reset(token)


def current_deadline() -> float | None:
    """The current call's deadline on the loop's clock; None outside a call."""
    return _deadline.get()


def past_the_call() -> contextvars.Context:
    """A copy of the current context without the call's deadline."""
    context = contextvars.copy_context()
    context.run(_deadline.set, None)
    return context
