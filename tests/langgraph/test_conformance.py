"""LangGraph's own checkpointer conformance suite against MemsvcSaver, on both deployments.

``langgraph-checkpoint-conformance`` (pinned in the dev extra) detects which
capabilities a saver implements and runs each one's tests. Every base capability
and every extended one of the pinned version must be detected, run and pass: a
capability skipped (not detected) fails the test as surely as one that fails.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import (
    BASE_CAPABILITIES,
    EXTENDED_CAPABILITIES,
)

from memsvc.langgraph import MemsvcSaver
from memsvc.server import Server
from tests.conftest import Deployment


async def test_memsvc_saver_passes_every_capability(server: Server, deployment: Deployment):
    """All base and extended capabilities detected, run and passed; none skipped."""

    async def saver() -> AsyncIterator[MemsvcSaver]:
        # A project per capability suite: its tests reuse thread ids ("thread-0").
        async with MemsvcSaver(
            f"127.0.0.1:{server.port}", project_id=str(uuid.uuid4())
        ) as memsvc_saver:
            yield memsvc_saver

    registered = checkpointer_test(name=f"MemsvcSaver ({deployment.name})")(saver)
    report = await validate(registered)

    expected = {c.value for c in BASE_CAPABILITIES | EXTENDED_CAPABILITIES}
    assert set(report.results) == expected
    problems = {
        name: (
            "not detected (skipped)"
            if not result.detected
            else result.failures or f"skipped {result.tests_skipped}"
        )
        for name, result in report.results.items()
        if not (result.detected and result.passed is True and result.tests_skipped == 0)
    }
    assert not problems, f"capabilities not passing: {problems}"
    assert report.conformance_level() == "FULL"
    assert all(r.tests_passed > 0 for r in report.results.values())
