"""A refused call lets go of its request when it ends, not at the next garbage
collection.

gRPC keeps a call's AbortError on its state, and the error's traceback held every
frame of the handler, the request among them: a reference cycle. A burst of 256
refused 4 MB BatchSets peaked at 810 MiB of resident memory (bench.memory_burst);
with the frames let go once each call is done, about 420.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import types
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import grpc

from memsvc.api._intercept import _detach
from memsvc.server import Server
from memsvc.v1 import data_removal_pb2 as dr
from memsvc.v1 import working_memory_pb2 as wm
from memsvc.v1.data_removal_pb2_grpc import DataRemovalServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.client._credentials import new_token, write_tokens
from tests.helpers import eventually, expect_error, local_server_config

VALUE = "x" * 100_000


def refused_batch() -> wm.BatchSetRequest:
    """A BatchSet of 400 KB to a session never spawned (FAILED_PRECONDITION)."""
    request = wm.BatchSetRequest(
        project_id=str(uuid.uuid4()), agent_instance_id=str(uuid.uuid4()), session_id="s"
    )
    for index in range(4):
        entry = request.entries.add(key=f"k{index}")
        entry.value.string_value = VALUE
    return request


@contextmanager
def garbage_frames() -> Iterator[list[str]]:
    """With the collector off inside the block, the frames that only a collection
    would have freed (filled in at the block's end: where their code lives)."""
    found: list[str] = []
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.extend(
            f"{item.f_code.co_qualname} ({item.f_code.co_filename})"
            for item in gc.garbage
            if isinstance(item, types.FrameType)
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def refuse(server: Server, code: grpc.StatusCode, metadata: tuple[tuple[str, str], ...]):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        batch_set = WorkingMemoryServiceStub(channel).BatchSet
        await expect_error(batch_set(refused_batch(), metadata=metadata), code)  # warm
        with garbage_frames() as frames:
            for _ in range(5):
                await expect_error(batch_set(refused_batch(), metadata=metadata), code)

            async def answered() -> bool:
                return server._calls.unanswered == 0

            await eventually(answered)
        assert frames == [], "refused calls left their frames to the garbage collector"


async def test_a_call_refused_by_memsvc_leaves_no_frames_to_collect(tmp_path: Path):
    async with Server(local_server_config(tmp_path)) as server:
        await refuse(server, grpc.StatusCode.FAILED_PRECONDITION, ())


async def test_a_call_refused_for_its_token_leaves_no_frames_to_collect(tmp_path: Path):
    tokens = tmp_path / "tokens"
    write_tokens(tokens, new_token())
    config = replace(local_server_config(tmp_path), auth_tokens_file=str(tokens))
    async with Server(config) as server:
        wrong = (("authorization", f"Bearer {new_token()}"),)
        await refuse(server, grpc.StatusCode.UNAUTHENTICATED, wrong)


async def hold_the_database(data_dir: Path) -> asyncio.subprocess.Process:
    """A process that holds the embedded database's write lock (a purge fails)."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None);"
        " c.execute('BEGIN IMMEDIATE'); print('held', flush=True); time.sleep(60)",
        str(data_dir / "memsvc.db"),
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdout is not None and (await holder.stdout.readline()) == b"held\n"
    return holder


def test_the_cleanup_touches_the_call_s_own_abort_error_only():
    """The error a call was refused with may be shared with other calls still
    running (BackgroundWork): its traceback and frames stay as they are."""

    def failing() -> None:
        shared = "a local of a frame that must stay"  # noqa: F841 (read below)
        raise RuntimeError("shared")

    try:
        failing()
    except RuntimeError as error:
        shared_error = error
    try:
        raise grpc.aio.AbortError("aborted") from shared_error
    except grpc.aio.AbortError as error:
        aborted = error
    assert shared_error.__traceback__ is not None
    kept = shared_error.__traceback__
    _detach(aborted, None)
    assert aborted.__traceback__ is None and aborted.__cause__ is None
    assert shared_error.__traceback__ is kept
    assert kept.tb_next is not None and "shared" in kept.tb_next.tb_frame.f_locals


async def test_calls_that_share_one_failure_each_end_with_it(tmp_path: Path, caplog):
    """Found by a review of the fix: calls that join one purge (one request id) are
    all refused with the same error object, whose traceback each raise rewrites. A
    first version cleared the frames of that traceback when a call was done: another
    call's, whose handler was still running, and Python closed it ("cannot reuse
    already awaited coroutine")."""
    async with Server(local_server_config(tmp_path)) as server:
        # Another process holds SQLite's write lock: the purge fails, once, for all.
        holder = await hold_the_database(tmp_path)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                purge = DataRemovalServiceStub(channel).PurgeData
                request = dr.PurgeDataRequest(
                    project_id=str(uuid.uuid4()), request_id=str(uuid.uuid4())
                )

                async def joined(delay: float) -> grpc.StatusCode:
                    await asyncio.sleep(delay)
                    try:
                        await purge(request, timeout=30)
                    except grpc.aio.AioRpcError as error:
                        return error.code()
                    return grpc.StatusCode.OK

                with caplog.at_level(logging.ERROR, logger="grpc"):
                    codes = await asyncio.gather(*(joined(0.05 * i) for i in range(8)))
                    await asyncio.sleep(0.5)  # the done callbacks of the last calls
        finally:
            holder.kill()
            await holder.wait()
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 8
    assert [r.getMessage() for r in caplog.records if r.name.startswith("grpc")] == []


async def test_a_call_refused_with_a_background_failure_leaves_no_frames(tmp_path: Path):
    """Found by a review: BackgroundWork.wait held the failed task in its frame, and
    the task held the failure, whose traceback held the frame: the caller's frames,
    its request among them, waited for a garbage collection."""
    async with Server(local_server_config(tmp_path)) as server:
        holder = await hold_the_database(tmp_path)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                purge = DataRemovalServiceStub(channel).PurgeData
                request = dr.PurgeDataRequest(project_id=str(uuid.uuid4()))
                with garbage_frames() as frames:
                    await expect_error(purge(request, timeout=30), grpc.StatusCode.UNAVAILABLE)
                    await asyncio.sleep(0.2)  # the call's done callback
        finally:
            holder.kill()
            await holder.wait()
    # Those that hold the request (the servicer and the interceptors around it): the
    # store's own cycles (aiosqlite's, on the error it failed with) hold none.
    holding = [frame for frame in frames if "/memsvc/api/" in frame]
    assert holding == [], "\n".join(frames)
