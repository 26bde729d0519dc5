"""A TCP listener that runs its own asyncio loop in a daemon thread.

The proxies tests put between memsvc and a backend (TcpProxy, WireMeter) keep
forwarding whatever the test's own loop is doing, and memsvc may run in another
process. This base holds what they share: starting and closing, and calling into
the loop from any thread with a timeout; the loop in its thread is the sync
client's (memsvc._loop_portal.LoopPortal). A subclass provides
``_listen`` (bind, set ``port``) and ``_shutdown`` (stop listening, drop its
connections), both run on the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

from memsvc._loop_portal import LoopPortal

T = TypeVar("T")

CONTROL_TIMEOUT = 10.0


class LoopThread:
    """``with Subclass(...) as listener``: started on entry, closed on exit."""

    def __init__(self, thread_name: str) -> None:
        self._thread_name = thread_name
        self._portal: LoopPortal | None = None

    def start(self) -> None:
        self._portal = LoopPortal(self._thread_name, type(self).__name__)
        self._call(self._listen())

    def close(self) -> None:
        """Shut the listener down and stop the thread; safe to call twice."""
        portal = self._portal
        if portal is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        portal.stop(timeout=CONTROL_TIMEOUT)
        self._portal = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the listener's loop and wait for its result."""
        if self._portal is None:
            coroutine.close()
            raise RuntimeError(f"{type(self).__name__} used before start() or after close()")
        return self._portal.run(coroutine, CONTROL_TIMEOUT)

    async def _listen(self) -> None:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        raise NotImplementedError
