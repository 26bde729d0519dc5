"""A TCP listener that runs its own asyncio loop in a daemon thread.

The proxies tests put between memsvc and a backend (TcpProxy, WireMeter) keep
forwarding whatever the test's own loop is doing, and memsvc may run in another
process. This base holds what they share: the thread and its loop, starting and
closing, and calling into the loop from any thread. A subclass provides
``_listen`` (bind, set ``port``) and ``_shutdown`` (stop listening, drop its
connections), both run on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")

CONTROL_TIMEOUT = 10.0


class LoopThread:
    """``with Subclass(...) as listener``: started on entry, closed on exit."""

    def __init__(self, thread_name: str) -> None:
        self._thread_name = thread_name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=self._thread_name, daemon=True
        )
        self._thread.start()
        self._call(self._listen())

    def close(self) -> None:
        """Shut the listener down and stop the thread; safe to call twice."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=CONTROL_TIMEOUT)
        loop.close()
        self._loop = None

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
        if self._loop is None:
            coroutine.close()
            raise RuntimeError(f"{type(self).__name__} used before start() or after close()")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CONTROL_TIMEOUT)

    async def _listen(self) -> None:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        raise NotImplementedError
