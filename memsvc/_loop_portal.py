"""An event loop in a daemon thread, and a way to run coroutines on it from others.

The sync client runs its async twin on one; the test proxies (memsvc.testing)
run their listeners on one, so they keep forwarding whatever the caller's own
loop is doing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class LoopPortal:
    """The loop runs until ``stop()``; its tasks still running then are cancelled."""

    def __init__(self, name: str, owner: str) -> None:
        """``name`` names the thread; ``owner`` what the errors speak of."""
        self._owner = owner
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the loop and wait for its result (or its exception),
        at most ``timeout`` seconds (then TimeoutError, and the call is cancelled)."""
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError(f"{self._owner} cannot be called from its own loop")
        if self.loop.is_closed() or not self._thread.is_alive():
            coroutine.close()
            raise RuntimeError(f"{self._owner} is closed")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            # KeyboardInterrupt, a timeout and friends: stop the call too.
            future.cancel()
            raise

    def stop(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the loop; with ``wait``, join its thread (at most ``timeout`` seconds)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if wait and threading.current_thread() is not self._thread:
                self._thread.join(timeout)
