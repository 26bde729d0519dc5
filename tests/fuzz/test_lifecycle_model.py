"""Random lifecycle and working-memory calls agree with a small model of the rules.

A Hypothesis RuleBasedStateMachine drives two sessions of one project through
Spawn, Set, Get, Delete, Pause, Resume (default or named checkpoint, clear or
merge), CreateCheckpoint, DeleteCheckpoint, Terminate (keeping the working memory
or not), GetSession, ListEntries and ListCheckpoints, against a plain-Python model
of docs/api.md and the proto comments, and compares every answer: the status code
and ErrorInfo reason of an error, the values, state, version and checkpoints of a
success.

How it runs on the real server: the machine is synchronous (RuleBasedStateMachine
has no async rules), the server is the usual ``server`` fixture (both
deployments) on the test's asyncio event loop. The test hands the whole
Hypothesis run to a worker thread with ``asyncio.to_thread``, and the machine
talks to the server through a *synchronous* ``grpc.insecure_channel`` on the
server's port. The event loop stays free to serve while the worker thread blocks
on its calls, so there is no nested loop, no loop shared between threads and no
second server: the machine is an ordinary gRPC client, like any agent.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc
import pytest
from google.protobuf import json_format
from grpc_status import rpc_status
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from memsvc.server import Server
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import python, value

SESSIONS = st.sampled_from(["s1", "s2"])
KEYS = st.sampled_from(["a", "b", "c"])
VALUES = st.one_of(st.integers(-3, 3), st.text("xyz", max_size=3), st.booleans())
NAMED_CHECKPOINTS = st.sampled_from(["", "cp-a", "cp-b"])

OK = None
NOT_WRITABLE = (grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_SESSION_NOT_WRITABLE")
INVALID_TRANSITION = (grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_INVALID_TRANSITION")
SESSION_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "ERROR_REASON_SESSION_NOT_FOUND")
KEY_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "ERROR_REASON_KEY_NOT_FOUND")
CHECKPOINT_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "ERROR_REASON_CHECKPOINT_NOT_FOUND")
SESSION_EXISTS = (grpc.StatusCode.ALREADY_EXISTS, "ERROR_REASON_SESSION_ALREADY_EXISTS")
CHECKPOINT_EXISTS = (grpc.StatusCode.ALREADY_EXISTS, "ERROR_REASON_CHECKPOINT_ALREADY_EXISTS")
PROTECTED = (grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_CHECKPOINT_PROTECTED")

Outcome = tuple[Any, tuple[grpc.StatusCode, str] | None]


@dataclass
class Session:
    """The model of one session."""

    state: int = lc.SESSION_STATE_ACTIVE
    entries: dict[str, Any] = field(default_factory=dict)
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    resume: str = ""
    version: int = 1
    kept: bool = False  # terminated with keep_working_memory


def reason_of(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    if status is None:
        return ""
    from google.rpc import error_details_pb2

    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


class LifecycleMachine(RuleBasedStateMachine):
    port: ClassVar[int]
    projects: ClassVar[list[str]]

    def __init__(self) -> None:
        super().__init__()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.life = LifecycleServiceStub(self.channel)
        self.wm = WorkingMemoryServiceStub(self.channel)
        self.project = str(uuid.uuid4())
        self.agent = str(uuid.uuid4())
        self.projects.append(self.project)
        self.model: dict[str, Session] = {}
        self.auto_ids: list[str] = []

    def teardown(self) -> None:
        self.channel.close()

    # Plumbing -------------------------------------------------------------------

    def scope(self, name: str) -> dict[str, Any]:
        return {"project_id": self.project, "agent_instance_id": self.agent, "session_id": name}

    def call(self, method: Any, request: Any, expected: tuple[grpc.StatusCode, str] | None) -> Any:
        """Call; the outcome must be ``expected`` (None: success). Returns the response."""
        try:
            response = method(request, timeout=15)
        except grpc.RpcError as error:
            got = (error.code(), reason_of(error))
            assert got == expected, f"{type(request).__name__}: expected {expected}, got {got}"
            return None
        assert expected is None, f"{type(request).__name__}: expected {expected}, got OK"
        return response

    def checkpoint_ids(self, data: st.DataObject) -> str:
        choices = st.sampled_from(["", "cp-a", "cp-b", "nope", *self.auto_ids])
        return data.draw(choices, label="checkpoint_id")

    def read_refusal(self, name: str) -> tuple[grpc.StatusCode, str] | None:
        session = self.model.get(name)
        if session is None:
            return SESSION_NOT_FOUND
        if session.state == lc.SESSION_STATE_TERMINATED and not session.kept:
            return SESSION_NOT_FOUND
        return None

    def write_refusal(self, name: str) -> tuple[grpc.StatusCode, str] | None:
        session = self.model.get(name)
        if session is None or session.state != lc.SESSION_STATE_ACTIVE:
            return NOT_WRITABLE
        return None

    # Working memory -------------------------------------------------------------

    @rule(name=SESSIONS, initial=st.dictionaries(KEYS, VALUES, max_size=3))
    def spawn(self, name: str, initial: dict[str, Any]) -> None:
        entries = [pb.EntryInput(key=k, value=value(v)) for k, v in initial.items()]
        expected = SESSION_EXISTS if name in self.model else OK
        response = self.call(
            self.life.Spawn, lc.SpawnRequest(**self.scope(name), initial_entries=entries), expected
        )
        if response is not None:
            assert response.session.state == lc.SESSION_STATE_ACTIVE
            assert response.session.version == 1
            assert response.initial_entries_written == len(initial)
            self.model[name] = Session(entries=dict(initial))

    @rule(name=SESSIONS, key=KEYS, item=VALUES)
    def set(self, name: str, key: str, item: Any) -> None:
        request = pb.SetRequest(**self.scope(name), key=key, value=value(item))
        response = self.call(self.wm.Set, request, self.write_refusal(name))
        if response is not None:
            session = self.model[name]
            assert response.created == (key not in session.entries)
            session.entries[key] = item

    @rule(name=SESSIONS, key=KEYS)
    def get(self, name: str, key: str) -> None:
        expected = self.read_refusal(name)
        if expected is None and key not in self.model[name].entries:
            expected = KEY_NOT_FOUND
        response = self.call(self.wm.Get, pb.GetRequest(**self.scope(name), key=key), expected)
        if response is not None:
            assert python(response.entry.value) == self.model[name].entries[key]

    @rule(name=SESSIONS, key=KEYS)
    def delete(self, name: str, key: str) -> None:
        request = pb.DeleteRequest(**self.scope(name), key=key)
        response = self.call(self.wm.Delete, request, self.write_refusal(name))
        if response is not None:
            session = self.model[name]
            assert response.existed == (key in session.entries)
            session.entries.pop(key, None)

    @rule(name=SESSIONS)
    def list_entries(self, name: str) -> None:
        request = pb.ListEntriesRequest(**self.scope(name), page_size=1000)
        response = self.call(self.wm.ListEntries, request, self.read_refusal(name))
        if response is not None:
            got = {e.key: python(e.value) for e in response.entries}
            assert got == self.model[name].entries

    # Lifecycle ------------------------------------------------------------------

    def new_checkpoint_refusal(self, name: str, checkpoint_id: str) -> Any:
        session = self.model.get(name)
        if session is None:
            return SESSION_NOT_FOUND
        if session.state != lc.SESSION_STATE_ACTIVE:
            return INVALID_TRANSITION
        if checkpoint_id and checkpoint_id in session.checkpoints:
            return CHECKPOINT_EXISTS
        return None

    def record_checkpoint(self, name: str, checkpoint: lc.Checkpoint, requested: str) -> str:
        session = self.model[name]
        if requested:
            assert checkpoint.checkpoint_id == requested
        else:
            self.auto_ids.append(checkpoint.checkpoint_id)
        assert checkpoint.key_count == len(session.entries)
        session.checkpoints[checkpoint.checkpoint_id] = dict(session.entries)
        return str(checkpoint.checkpoint_id)

    @rule(name=SESSIONS, checkpoint_id=NAMED_CHECKPOINTS)
    def pause(self, name: str, checkpoint_id: str) -> None:
        request = lc.PauseRequest(**self.scope(name), checkpoint_id=checkpoint_id)
        expected = self.new_checkpoint_refusal(name, checkpoint_id)
        response = self.call(self.life.Pause, request, expected)
        if response is not None:
            session = self.model[name]
            session.resume = self.record_checkpoint(name, response.checkpoint, checkpoint_id)
            session.state = lc.SESSION_STATE_PAUSED
            session.version += 1
            self.check_session(response.session, session)

    @rule(name=SESSIONS, checkpoint_id=NAMED_CHECKPOINTS)
    def create_checkpoint(self, name: str, checkpoint_id: str) -> None:
        request = lc.CreateCheckpointRequest(**self.scope(name), checkpoint_id=checkpoint_id)
        expected = self.new_checkpoint_refusal(name, checkpoint_id)
        response = self.call(self.life.CreateCheckpoint, request, expected)
        if response is not None:
            self.record_checkpoint(name, response.checkpoint, checkpoint_id)

    @rule(name=SESSIONS, merge=st.booleans(), data=st.data())
    def resume(self, name: str, merge: bool, data: st.DataObject) -> None:
        checkpoint_id = self.checkpoint_ids(data)
        session = self.model.get(name)
        wanted = checkpoint_id or (session.resume if session else "")
        if session is None:
            expected: Any = SESSION_NOT_FOUND
        elif session.state == lc.SESSION_STATE_TERMINATED or not wanted:
            expected = INVALID_TRANSITION
        elif wanted not in session.checkpoints:
            expected = CHECKPOINT_NOT_FOUND
        else:
            expected = OK
        request = lc.ResumeRequest(
            **self.scope(name), checkpoint_id=checkpoint_id, merge_with_current=merge
        )
        response = self.call(self.life.Resume, request, expected)
        if response is not None and session is not None:
            restored = session.checkpoints[wanted]
            assert response.checkpoint.checkpoint_id == wanted
            assert response.entries_restored == len(restored)
            session.entries = {**session.entries, **restored} if merge else dict(restored)
            session.state = lc.SESSION_STATE_ACTIVE
            session.resume = ""
            session.version += 1
            self.check_session(response.session, session)

    @rule(name=SESSIONS, data=st.data())
    def delete_checkpoint(self, name: str, data: st.DataObject) -> None:
        checkpoint_id = self.checkpoint_ids(data) or "cp-a"
        session = self.model.get(name)
        if session is None:
            expected: Any = SESSION_NOT_FOUND
        elif session.state == lc.SESSION_STATE_PAUSED and session.resume == checkpoint_id:
            expected = PROTECTED
        elif checkpoint_id not in session.checkpoints:
            expected = CHECKPOINT_NOT_FOUND
        else:
            expected = OK
        request = lc.DeleteCheckpointRequest(**self.scope(name), checkpoint_id=checkpoint_id)
        if self.call(self.life.DeleteCheckpoint, request, expected) is not None:
            assert session is not None
            del session.checkpoints[checkpoint_id]

    @rule(name=SESSIONS, keep=st.booleans(), skip=st.booleans())
    def terminate(self, name: str, keep: bool, skip: bool) -> None:
        session = self.model.get(name)
        if session is None:
            expected: Any = SESSION_NOT_FOUND
        elif session.state == lc.SESSION_STATE_TERMINATED:
            expected = INVALID_TRANSITION
        else:
            expected = OK
        request = lc.TerminateRequest(
            **self.scope(name), keep_working_memory=keep, skip_consolidation=skip
        )
        response = self.call(self.life.Terminate, request, expected)
        if response is not None and session is not None:
            assert response.entries_cleared == (0 if keep else len(session.entries))
            assert bool(response.episode_id) == (not skip)
            session.state = lc.SESSION_STATE_TERMINATED
            session.version += 1
            session.resume = ""
            session.kept = keep
            if not keep:
                session.entries, session.checkpoints = {}, {}
            self.check_session(response.session, session)

    @rule(name=SESSIONS)
    def get_session(self, name: str) -> None:
        expected = None if name in self.model else SESSION_NOT_FOUND
        request = lc.GetSessionRequest(**self.scope(name))
        response = self.call(self.life.GetSession, request, expected)
        if response is not None:
            self.check_session(response.session, self.model[name])

    @rule(name=SESSIONS)
    def list_checkpoints(self, name: str) -> None:
        expected = None if name in self.model else SESSION_NOT_FOUND
        request = lc.ListCheckpointsRequest(**self.scope(name), page_size=1000)
        response = self.call(self.life.ListCheckpoints, request, expected)
        if response is not None:
            session = self.model[name]
            got = {c.checkpoint_id: c.key_count for c in response.checkpoints}
            assert got == {k: len(v) for k, v in session.checkpoints.items()}
            for checkpoint in response.checkpoints:
                protected = (
                    session.state == lc.SESSION_STATE_PAUSED
                    and checkpoint.checkpoint_id == session.resume
                )
                assert checkpoint.HasField("expire_time") != protected, checkpoint

    def check_session(self, got: lc.Session, want: Session) -> None:
        actual = (got.state, got.version, got.resume_checkpoint_id)
        assert actual == (want.state, want.version, want.resume), json_format.MessageToDict(got)


MODEL_SETTINGS = settings(
    max_examples=20,
    stateful_step_count=30,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.timeout(180)
async def test_lifecycle_and_working_memory_follow_the_model(
    server: Server, projects: list[str]
) -> None:
    machine = type(
        "BoundLifecycleMachine", (LifecycleMachine,), {"port": server.port, "projects": projects}
    )
    await asyncio.to_thread(run_state_machine_as_test, machine, settings=MODEL_SETTINGS)
