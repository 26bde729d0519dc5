"""A Node.js agent (@grpc/grpc-js, @grpc/proto-loader) drives the full flow against memsvc.

flow.mjs does the calls and checks each answer; this test starts a real `memsvc serve`,
runs it, and checks its JSON summary and, from Python, that the server holds what the
Node client was told.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import grpc

from memsvc.v1 import episodic_pb2, lifecycle_pb2
from memsvc.v1.episodic_pb2_grpc import EpisodicMemoryServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.polyglot.conftest import HERE, NodeToolchain, RunningMemsvc

FLOW = HERE / "flow.mjs"
# flow.mjs gives up by itself after 30 s; this only catches a Node that hangs anyway.
FLOW_TIMEOUT_SECONDS = 40.0

LIFECYCLE = [
    "EVENT_TYPE_SESSION_SPAWNED",
    "EVENT_TYPE_SESSION_PAUSED",
    "EVENT_TYPE_SESSION_RESUMED",
    "EVENT_TYPE_SESSION_TERMINATED",
]


def run_flow(node: NodeToolchain, server: RunningMemsvc) -> dict[str, Any]:
    """Run flow.mjs against the server; its JSON summary, or a failure with both sides' logs."""
    try:
        done = subprocess.run(
            [node.node, str(FLOW), server.address],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=FLOW_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired as error:
        raise AssertionError(
            f"flow.mjs ran over {FLOW_TIMEOUT_SECONDS}s:\n{error.stderr!r}\n"
            f"--- memsvc log ---\n{server.log_tail()}"
        ) from None
    assert done.returncode == 0, (
        f"flow.mjs (Node.js {node.version}) failed with {done.returncode}:\n"
        f"{done.stderr}{done.stdout}\n--- memsvc log ---\n{server.log_tail()}"
    )
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def test_node_client_drives_spawn_set_pause_resume_terminate_and_watch(
    node_toolchain: NodeToolchain, memsvc: RunningMemsvc
) -> None:
    summary = run_flow(node_toolchain, memsvc)

    assert summary["ok"] is True
    assert summary["paused_write"] == {
        "code": "FAILED_PRECONDITION",
        "reason": "ERROR_REASON_SESSION_NOT_WRITABLE",
        "state": "paused",
    }
    events = summary["events"]
    assert [e["event_type"] for e in events] == LIFECYCLE
    # int64 arrive as strings in JSON (proto-loader's longs: String).
    sequences = [int(summary["watch_started_after"])] + [int(e["sequence"]) for e in events]
    assert sequences == sorted(set(sequences)), f"sequences must increase: {sequences}"
    # The reconnected watch started after the PAUSED event and resumed exactly there.
    assert summary["resumed_watch_started_after"] == events[1]["sequence"]
    assert summary["resumed_watch"] == events[2:]

    assert_server_agrees(memsvc, summary)


def assert_server_agrees(server: RunningMemsvc, summary: dict[str, Any]) -> None:
    """Read back, from Python, the session and episode the Node client reported."""
    ids = {k: summary[k] for k in ("project_id", "agent_instance_id", "session_id")}
    with grpc.insecure_channel(server.address) as channel:
        session = (
            LifecycleServiceStub(channel)
            .GetSession(lifecycle_pb2.GetSessionRequest(**ids), timeout=5)
            .session
        )
        assert session.state == lifecycle_pb2.SESSION_STATE_TERMINATED
        assert session.version == 4  # spawn, pause, resume, terminate: nothing else
        episode = (
            EpisodicMemoryServiceStub(channel)
            .GetEpisode(
                episodic_pb2.GetEpisodeRequest(
                    project_id=ids["project_id"], episode_id=summary["episode_id"]
                ),
                timeout=5,
            )
            .episode
        )
    assert (episode.session_id, episode.task_type) == (ids["session_id"], "session_completion")
    # The episode's context is the working memory the Node client wrote (as JSON).
    assert '"search"' in episode.context_summary, episode.context_summary
