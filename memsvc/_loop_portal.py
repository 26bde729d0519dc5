"""An event loop in a daemon thread, and a way to run coroutines on it from others.

The sync client runs its async twin on one; the test proxies (memsvc.testing)
run their listeners on one, so they keep forwarding whatever the caller's own
loop is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import CancelledError, Future
from typing import Any, TypeVar

T = TypeVar("T")


class LoopPortal:
    """The loop runs until ``stop()``; its tasks still running then are cancelled."""

    def __init__(
        self, name: str, owner: str, cut_off: Callable[[str], BaseException] = RuntimeError
    ) -> None:
        """``name`` names the thread; ``owner`` what the errors speak of; ``cut_off``
        makes the error a call still waiting when the loop stops raises."""
        self._owner = owner
        self._cut_off = cut_off
        # A fork copies the portal but not its thread: a child's calls are refused
        # by name, not as a closed portal's (and before the lock, which a thread of
        # the parent may have held as it forked).
        self._pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        # Calls submitted and not finished; after the loop ends, any left (submitted
        # as it ended, never run) are cancelled, so no caller waits forever.
        # Re-entrant: a collected Client's __del__ may stop() from inside run().
        self._lock = threading.RLock()
        self._waiting: set[Future[Any]] = set()
        self._stopping = self._ended = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        """Whether the loop was stopped (or has ended): calls are refused."""
        return self._stopping or self._ended or not self._thread.is_alive()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # A call submitted as the loop stopped may start a task during this
            # clean-up: cancel until none is left.
            while pending := asyncio.all_tasks(self.loop):
                for task in pending:
                    task.cancel()
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            with self._lock:
                self._ended = True
                left, self._waiting = self._waiting, set()
            # Submitted and never run: their callers would wait forever.
            for future in left:
                future.cancel()
            self.loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the loop and wait for its result (or its exception),
        at most ``timeout`` seconds (then TimeoutError, and the call is cancelled).
        After ``stop()``, or in a process forked after the portal was made,
        RuntimeError; a call the stop cut off raises ``cut_off``."""
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError(f"{self._owner} cannot be called from its own loop")
        if os.getpid() != self._pid:
            coroutine.close()
            raise RuntimeError(
                f"{self._owner} was created in process {self._pid}, which this one forked "
                "from, and its loop thread stayed there: create one in each process, "
                "after the fork"
            )
        with self._lock:
            if self.closed or self.loop.is_closed():
                coroutine.close()
                raise RuntimeError(f"{self._owner} is closed")
            future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
            self._waiting.add(future)
        future.add_done_callback(self._finished)
        try:
            return future.result(timeout)
        except CancelledError:
            if self.closed:
                raise self._cut_off(f"{self._owner} was closed while the call ran") from None
            raise
        except BaseException:
            # KeyboardInterrupt, a timeout and friends: stop the call too.
            future.cancel()
            raise

    def _finished(self, future: Future[Any]) -> None:
        with self._lock:
            self._waiting.discard(future)

    def stop(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the loop; with ``wait``, join its thread (at most ``timeout`` seconds)."""
        with self._lock:  # no run() submits between the flag and the stop
            self._stopping = True
            if self._thread.is_alive():
                with contextlib.suppress(RuntimeError):  # closed meanwhile
                    self.loop.call_soon_threadsafe(self.loop.stop)
        if wait and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
