"""A lifecycle transaction that commits, but whose commit's answer never reaches
memsvc: the connection to PostgreSQL is reset right after the server committed.

memsvc cannot know whether it committed; the caller gets UNAVAILABLE and retries
with the same request id. Whatever memsvc does meanwhile, the working memory must
follow what the database committed (ADR 0004: the database decides), and the
retry must return the first answer.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest

from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from tests.faults._support import Stubs, expect_code, wait_serving
from tests.faults.conftest import RigFactory
from tests.faults.test_crash_boundaries import (
    ACTIVE,
    LATER,
    PAUSED,
    SEED,
    TERMINATED,
    Session,
    prepare,
    the_call,
)
from tests.helpers import value, whole_memory

# PostgreSQL's Sync message: type S, length 4.
SYNC = b"S\x00\x00\x00\x04"
AFTER = {"spawn": ACTIVE, "pause": PAUSED, "resume": ACTIVE, "terminate": TERMINATED}


async def writable(stubs: Stubs, ids: dict[str, Any]) -> bool:
    try:
        await stubs.wm.Set(pb.SetRequest(**ids, key="probe", value=value(1)), timeout=10)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
        return False
    await stubs.wm.Delete(pb.DeleteRequest(**ids, key="probe"), timeout=10)
    return True


@pytest.mark.timeout(60)
@pytest.mark.parametrize("operation", list(AFTER))
async def test_working_memory_follows_a_commit_whose_answer_was_lost(
    make_rig: RigFactory, operation: str
):
    rig = make_rig(proxies=True)
    memsvc = rig.start()
    proxy = rig.postgres_proxy
    assert proxy is not None
    session = Session(
        {"project_id": str(uuid.uuid4()), "agent_instance_id": str(uuid.uuid4()),
         "session_id": f"lost-commit-{operation}"}
    )  # fmt: skip
    request_id = str(uuid.uuid4())
    async with grpc.aio.insecure_channel(memsvc.target) as channel:
        stubs = Stubs(channel)
        await wait_serving(stubs)
        await prepare(stubs, session, "resume" if operation == "resume" else operation)
        # The transaction ends with the pipeline's Sync, which commits (ADR 0009).
        proxy.lose_reply_after(SYNC)
        await expect_code(
            the_call(stubs, session, operation, request_id), grpc.StatusCode.UNAVAILABLE
        )
        if proxy.replies_lost != 1:
            raise RuntimeError("the commit's answer was not the one lost")
        # The database committed.
        got = (await stubs.life.GetSession(lc.GetSessionRequest(**session.ids))).session
        if got.state != AFTER[operation]:
            raise RuntimeError(f"the commit did not happen: {got.state}")
        # The working memory must agree with it (before any retry).
        assert await writable(stubs, session.ids) == (AFTER[operation] == ACTIVE)
        expected = {
            "spawn": SEED,
            "pause": {**SEED, **LATER},
            "resume": SEED,
        }.get(operation)
        if expected is not None:
            assert await whole_memory(stubs.wm, session.ids) == expected
        # And the retry completes with the first answer.
        await the_call(stubs, session, operation, request_id)
        assert await writable(stubs, session.ids) == (AFTER[operation] == ACTIVE)
