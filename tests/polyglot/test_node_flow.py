"""A Node.js agent (@grpc/grpc-js, @grpc/proto-loader) drives the full flow against memsvc.

flow.mjs does the calls and checks each answer; this test starts a real `memsvc serve`
with a bearer token bound to the flow's project, runs it, and checks its JSON summary
and, from Python, that the server holds what the Node client was told. One more run
adds mutual TLS.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from memsvc.v1 import episodic_pb2, lifecycle_pb2
from memsvc.v1.episodic_pb2_grpc import EpisodicMemoryServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.client._credentials import make_pki, new_token
from tests.polyglot.conftest import HERE, NodeToolchain, RunningMemsvc, Security, serving

FLOW = HERE / "flow.mjs"
# flow.mjs gives up by itself after 30 s; this only catches a Node that hangs anyway.
FLOW_TIMEOUT_SECONDS = 40.0

LIFECYCLE = [
    "EVENT_TYPE_SESSION_SPAWNED",
    "EVENT_TYPE_SESSION_PAUSED",
    "EVENT_TYPE_SESSION_RESUMED",
    "EVENT_TYPE_CHECKPOINT_DELETED",
    "EVENT_TYPE_SESSION_TERMINATED",
]


def run_flow(
    node: NodeToolchain, server: RunningMemsvc, folder: Path, project: str
) -> dict[str, Any]:
    """Run flow.mjs against the server (with its token and TLS, as the CLI's variables
    give them) in ``project``; its JSON summary, or a failure with both sides' logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
    env |= server.security.client_env(folder)
    ids = [project, str(uuid.uuid4()), f"node-{uuid.uuid4().hex[:8]}"]
    try:
        done = subprocess.run(
            [node.node, str(FLOW), server.address, *ids],
            cwd=HERE,
            capture_output=True,
            text=True,
            env=env,
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
    node_toolchain: NodeToolchain, memsvc: RunningMemsvc, flow_project: str, tmp_path: Path
) -> None:
    summary = run_flow(node_toolchain, memsvc, tmp_path, flow_project)

    assert summary["ok"] is True
    assert summary["tls"] is False
    # The token is needed, and bound to the flow's project.
    assert summary["access"] == {
        "without_token": {"code": "UNAUTHENTICATED", "reason": "ERROR_REASON_UNAUTHENTICATED"},
        "other_project": {
            "code": "PERMISSION_DENIED",
            "reason": "ERROR_REASON_PERMISSION_DENIED",
        },
    }
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


def test_node_client_over_mutual_tls_with_a_token(
    node_toolchain: NodeToolchain, tmp_path: Path
) -> None:
    """The same flow with every protection on: mutual TLS and an unbound token."""
    security = Security(token=new_token(), pki=make_pki(tmp_path / "pki"), mutual=True)
    project = str(uuid.uuid4())
    with serving(tmp_path, security=security) as server:
        summary = run_flow(node_toolchain, server, tmp_path, project)
        assert summary["ok"] is True and summary["tls"] is True
        assert summary["access"]["without_token"]["code"] == "UNAUTHENTICATED"
        # This token is not bound to a project.
        assert summary["access"]["other_project"] == {"code": "OK", "reason": ""}
        assert_server_agrees(server, summary)


def assert_server_agrees(server: RunningMemsvc, summary: dict[str, Any]) -> None:
    """Read back, from Python, the session and episode the Node client reported."""
    ids = {k: summary[k] for k in ("project_id", "agent_instance_id", "session_id")}
    with server.channel() as channel:
        session = (
            LifecycleServiceStub(channel)
            .GetSession(lifecycle_pb2.GetSessionRequest(**ids), timeout=5, metadata=server.metadata)
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
                metadata=server.metadata,
            )
            .episode
        )
    assert (episode.session_id, episode.task_type) == (ids["session_id"], "session_completion")
    # The episode's context is the working memory the Node client wrote (as JSON).
    assert '"search"' in episode.context_summary, episode.context_summary
