"""BackgroundWork: work past its call, joined by key, its failure said once."""

from __future__ import annotations

import asyncio
import logging

import pytest

from memsvc.domain._background import BackgroundWork


async def test_work_of_a_key_is_joined_not_started_again():
    work = BackgroundWork[int]("a job")
    release = asyncio.Event()
    runs = 0

    async def job() -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        return runs

    first = work.start("k", job())
    second = work.start("k", job())  # closed unrun: no "never awaited" warning
    unkeyed = work.start(None, job())
    assert second is first and unkeyed is not first
    assert len(work) == 2
    release.set()
    assert await work.wait(first) == await work.wait(second)
    await work.finished()
    assert runs == 2 and len(work) == 0
    assert work.start("k", job()) is not first  # ended: the key is free again
    await work.finished()


async def test_a_waiting_callers_cancellation_leaves_the_work_running():
    work = BackgroundWork[str]("a job")
    release = asyncio.Event()

    async def job() -> str:
        await release.wait()
        return "done"

    task = work.start("k", job())
    waiter = asyncio.ensure_future(work.wait(task))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not task.done()
    release.set()
    assert await work.wait(task) == "done"


@pytest.mark.parametrize("awaited", [True, False])
async def test_a_failure_is_said_once(awaited: bool, caplog: pytest.LogCaptureFixture):
    """To the caller that waits for it, or, when none does, in the log."""
    work = BackgroundWork[None]("a job")
    release = asyncio.Event()

    async def job() -> None:
        await release.wait()
        raise RuntimeError("broken")

    task = work.start("k", job())
    waiter = asyncio.ensure_future(work.wait(task))
    await asyncio.sleep(0)
    if not awaited:
        waiter.cancel()
    with caplog.at_level(logging.WARNING, logger="memsvc.domain._background"):
        release.set()
        if awaited:
            with pytest.raises(RuntimeError, match="broken"):
                await waiter
        await work.finished()
        await asyncio.sleep(0)
    # Named by its key, so a heal's log names its session.
    logged = "a job (k) failed after its call had stopped waiting: broken" in caplog.text
    assert logged is not awaited


async def test_a_caller_cancelled_as_the_work_fails_leaves_it_said(
    caplog: pytest.LogCaptureFixture,
):
    """The failure and the caller's cancellation in one turn of the loop: the caller
    gets CancelledError, so the failure goes to the log. Found by a review."""
    work = BackgroundWork[None]("a job")
    release = asyncio.Event()

    async def job() -> None:
        await release.wait()
        raise RuntimeError("broken")

    task = work.start(("session", 1), job())
    waiter = asyncio.ensure_future(work.wait(task))
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="memsvc.domain._background"):
        release.set()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await work.finished()
    assert "a job failed after its call had stopped waiting: broken" in caplog.text


async def test_a_purge_that_fails_unwaited_is_an_error(caplog: pytest.LogCaptureFixture):
    """A purge whose client stopped waiting and then failed: that line is the only
    record that a data removal did not complete, so it is an error, which no limit
    on repeated warnings drops (a review)."""
    from memsvc.domain._purge import Purger

    work = Purger(memory=None, database=None)._purges  # type: ignore[arg-type]

    async def job() -> None:
        raise RuntimeError("database gone")

    with caplog.at_level(logging.WARNING, logger="memsvc.domain._background"):
        work.start("project p", job())  # type: ignore[arg-type]
        await work.finished()
        await asyncio.sleep(0)
    [said] = [r for r in caplog.records if "database gone" in r.getMessage()]
    assert said.levelno == logging.ERROR
    assert said.getMessage().startswith("a purge (project p) failed after its call")
