"""MemsvcSaver's own resources: the clients its copies share, and its versions' randomness."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import uuid
from pathlib import Path

from memsvc.langgraph import MemsvcSaver
from memsvc.server import Server

ROOT = Path(__file__).resolve().parents[2]


async def test_graphs_compiled_with_strict_msgpack_share_the_savers_clients(server: Server):
    """With LANGGRAPH_STRICT_MSGPACK=true, compile() gives each graph a shallow copy of
    the saver (with_allowlist). The copies use the saver's one client, which closing
    the saver closes: no AsyncClient collected unclosed, no loop thread left behind."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.langgraph._strict_msgpack_graphs",
        f"127.0.0.1:{server.port}",
        str(uuid.uuid4()),
        cwd=ROOT,
        env={**os.environ, "LANGGRAPH_STRICT_MSGPACK": "true"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    report = json.loads(out)
    assert report == {
        # Copies indeed (else this test would test nothing), whose runs worked.
        "async_copies": 3,
        "async_results": [1, 2, 3],
        "sync_copies": 3,
        "sync_results": [1, 2, 3],
        "client_threads_running": 1,
        "client_threads_left": 0,
        "unclosed": [],
    }


def test_seeding_random_does_not_repeat_versions():
    """Programs seed the random module (for reproducible sampling, say): two savers, in
    two processes seeded alike, must not give a channel's next version one suffix."""
    versions = []
    for _ in range(2):
        random.seed(1234)
        versions.append(MemsvcSaver(project_id=str(uuid.uuid4())).get_next_version(None, None))
    assert versions[0] != versions[1]
    assert [v.split(".")[0] for v in versions] == ["0000000000000001"] * 2
