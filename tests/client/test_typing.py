"""The SDK's types fit ordinary code: `make lint` type-checks this file (mypy --strict
over tests), and pytest runs it."""

from __future__ import annotations

from memsvc.client import AsyncClient, LifecycleEvent, WatchProgress
from tests.client.test_closing import NO_RETRY, SCOPE, StubServer


async def test_include_progress_may_be_a_bool_variable() -> None:
    """A plain bool (not a literal) chooses the item type at run time: the watch is
    typed as yielding either."""
    include_progress: bool = len(SCOPE) > 0  # True, but mypy sees a bool
    async with (
        StubServer(fail_after=None) as stub,
        AsyncClient(stub.target, retry=NO_RETRY) as client,
        client.watch(SCOPE[0], include_progress=include_progress) as items,
    ):
        first: LifecycleEvent | WatchProgress = await anext(items)
    assert first == WatchProgress(5)


async def test_a_session_watch_takes_a_bool_variable_too() -> None:
    include_progress: bool = len(SCOPE) > 0
    async with (
        StubServer(fail_after=None) as stub,
        AsyncClient(stub.target, retry=NO_RETRY) as client,
        client.session(*SCOPE).watch(include_progress=include_progress) as items,
    ):
        first: LifecycleEvent | WatchProgress = await anext(items)
    assert first == WatchProgress(5)
