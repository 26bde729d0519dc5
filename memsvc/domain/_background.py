"""Work that outlives the call that started it.

A Pause's last step runs after its answer, a heal is shared by every call that
meets the same marker, a purge runs to its end when its client stops waiting.
Such work runs without the call's deadline (see _call_deadline), may be joined
by later calls, and is awaited at shutdown before the stores close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Hashable
from typing import Any, Generic, TypeVar

from memsvc.domain._call_deadline import past_the_call

log = logging.getLogger(__name__)

T = TypeVar("T")


class BackgroundWork(Generic[T]):
    """Tasks past their calls, at most one per key at a time.

    A caller waits for one with :meth:`wait` (its cancellation ends its wait, not
    the work) and gets what it raised. A failure that no caller was waiting for
    when the work ended is logged here, once: nobody else will say it.
    """

    def __init__(self, what: str, failure_level: int = logging.WARNING) -> None:
        self._what = what  # for the log: "a purge", "a heal"
        # A failure nobody waited for is logged at this level.
        self._failure_level = failure_level
        # Each running task under its key (unkeyed work under a key of its own).
        self._running: dict[Hashable, asyncio.Task[T]] = {}
        self._waiting: dict[asyncio.Task[T], int] = {}

    def start(self, key: Hashable | None, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """The work running under ``key``: started now, unless some is already
        (then ``work`` is closed unrun, and the running one is the answer). With
        no key, the work is never joined."""
        whose = "" if key is None else f" ({key})"
        if key is None:
            key = object()
        running = self._running.get(key)
        if running is not None:
            work.close()
            return running
        task = asyncio.get_running_loop().create_task(work, context=past_the_call())
        self._running[key] = task

        def ended(finished: asyncio.Task[T]) -> None:
            del self._running[key]
            waiting = self._waiting.pop(finished, 0)
            if finished.cancelled():
                return
            error = finished.exception()  # retrieved either way: never "unretrieved"
            if error is not None and not waiting:
                self._said(whose, error)

        # Before any caller's wait (shield's callback comes after): when it runs,
        # the callers still waiting are those that will get the failure.
        task.add_done_callback(ended)
        return task

    async def wait(self, task: asyncio.Task[T]) -> T:
        """``task``'s result for a caller; its cancellation leaves the task running."""
        self._waiting[task] = self._waiting.get(task, 0) + 1
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and not task.cancelled() and (error := task.exception()):
                # Cancelled as the work failed: counted as waiting when it ended, this
                # caller will not deliver the failure, so it is said here.
                self._said("", error)
            raise
        finally:
            if task in self._waiting and not task.done():
                self._waiting[task] -= 1
            # The failure raised from here holds this frame in its traceback: the
            # frame must not hold the task, which holds the failure (a reference
            # cycle that kept the caller's frames, its request among them, until a
            # garbage collection).
            del task

    def __len__(self) -> int:
        """How many are running."""
        return len(self._running)

    async def finished(self) -> None:
        """Wait for all the work running now, and any it starts meanwhile."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def cancelled(self) -> None:
        """Cancel all the work running now, and any started meanwhile; wait for it."""
        while self._running:
            running = list(self._running.values())
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    def _said(self, whose: str, error: BaseException) -> None:
        # What failed comes first: warnings of one kind (this template and its first
        # argument) are said once every 30 s during an outage (memsvc.log.RepeatLimit).
        log.log(
            self._failure_level,
            "%s%s failed after its call had stopped waiting: %s",
            self._what,
            whose,
            error,
        )
