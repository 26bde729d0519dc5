"""The fault suite's machinery: memsvc as a process, traffic that keeps a ledger of
what memsvc acknowledged, and the audit that checks none of it was lost.

memsvc runs as a subprocess (``memsvc serve``), so a SIGKILL or a failpoint crash
is a real process death. Every call carries a deadline, and every lifecycle call
and RecordEpisode a request id that its retries reuse, as a client should.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memsvc.testing import PrivateRedis, free_port, wait_for_port
from memsvc.v1 import episodic_pb2 as ep
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.episodic_pb2_grpc import EpisodicMemoryServiceStub
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import (
    ErrorDetails,
    checkpoint_with_contents,
    details_of,
    value,
    whole_memory,
)

T = TypeVar("T")

MEMSVC = str(Path(sys.executable).parent / "memsvc")

# The settings every memsvc of this suite runs with (docs/reliability.md says why).
MEMSVC_FLAGS = [
    "--health-listen=",
    "--metrics-listen=",
    # Health follows the backends within a fraction of a second (the probe's own
    # timeout is this interval too).
    "--health-interval-seconds=0.3",
    # The event tail's safety-net poll, when no NOTIFY wakes it (a LISTEN
    # connection lost with PostgreSQL only comes back with the next watcher).
    "--event-poll-interval-seconds=0.2",
    "--shutdown-grace-seconds=1",
    "--log-format=text",
]
# libpq waits forever for a connection by default; memsvc's pool would then keep
# a slot busy for as long as a blackhole lasts.
DATABASE_OPTIONS = "?connect_timeout=2"

# Each attempt of a call; memsvc's own retries stop at this deadline.
ATTEMPT_TIMEOUT = 3.0
# What a call may fail with while a backend is down or unreachable: retryable.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

STATE_OF_EVENT = {
    lc.EVENT_TYPE_SESSION_SPAWNED: lc.SESSION_STATE_ACTIVE,
    lc.EVENT_TYPE_SESSION_RESUMED: lc.SESSION_STATE_ACTIVE,
    lc.EVENT_TYPE_SESSION_PAUSED: lc.SESSION_STATE_PAUSED,
    lc.EVENT_TYPE_SESSION_TERMINATED: lc.SESSION_STATE_TERMINATED,
}


# Processes ----------------------------------------------------------------------


class AofRedis(PrivateRedis):
    """A private redis-server that keeps its data: an append-only file fsynced before
    every reply, so a killed Redis restarts with everything it acknowledged."""

    def persistence_arguments(self) -> list[str]:
        return ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]


class MemsvcProcess:
    """``memsvc serve`` in a process of its own, on a port that stays the same
    across restarts (clients reconnect by themselves)."""

    def __init__(self, workdir: Path, working_memory_url: str, database_url: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.working_memory_url = working_memory_url
        self.database_url = database_url
        self.log_path = workdir / "memsvc.log"
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(
        self,
        failpoints: str = "",
        timeout: float = 30,
        env: dict[str, Any] | None = None,
        args: Iterable[str] = (),
    ) -> None:
        """Start ``memsvc serve`` (``args``: more flags, which win over the suite's)."""
        command = [MEMSVC, "serve", "--listen", self.target, "--data-dir", str(self.workdir),
                   "--working-memory-url", self.working_memory_url,
                   "--database-url", self.database_url, *MEMSVC_FLAGS, *args]  # fmt: skip
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MEMSVC_")}
        environment.update(env or {})
        if failpoints:
            environment["MEMSVC_FAILPOINTS"] = failpoints
        with self.log_path.open("ab") as log:
            log.write(f"--- start (failpoints: {failpoints or 'none'})\n".encode())
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=self.workdir
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"memsvc exited with {self.process.returncode} at start:\n{self.log_tail()}"
                )
            try:
                wait_for_port(self.port, timeout=0.2)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"memsvc did not listen:\n{self.log_tail()}") from None

    def wait(self, timeout: float = 30) -> int:
        """Wait for the process to end by itself; its exit status."""
        assert self.process is not None
        code = self.process.wait(timeout)
        self.process = None
        return code

    def kill(self) -> int:
        """SIGKILL: no cleanup of any kind runs."""
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGKILL)
        return self.wait(10)

    def stop(self) -> None:
        """SIGTERM (graceful shutdown), SIGKILL if it takes too long."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# Calls --------------------------------------------------------------------------


@dataclass
class Stubs:
    """The gRPC stubs of one channel to memsvc."""

    channel: grpc.aio.Channel

    def __post_init__(self) -> None:
        self.life = LifecycleServiceStub(self.channel)
        self.wm = WorkingMemoryServiceStub(self.channel)
        self.episodic = EpisodicMemoryServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def health_status(self) -> int:
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return -1
        return int(reply.status)


async def eventually(
    condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` (a bound, not a measure)."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def wait_serving(stubs: Stubs, serving: bool = True, timeout: float = 25.0) -> None:
    wanted = SERVING if serving else NOT_SERVING

    async def reached() -> bool:
        return bool(await stubs.health_status() == wanted)

    await eventually(reached, f"health {'SERVING' if serving else 'NOT_SERVING'}", timeout)


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(data)
    return message


@dataclass(frozen=True)
class Failure:
    """One failed attempt, as a client saw it."""

    method: str
    code: grpc.StatusCode
    reason: str
    message: str
    at: float


class LostWorkingMemory(Exception):
    """A call was refused with ERROR_REASON_WORKING_MEMORY_LOST."""


# The ledger: what memsvc acknowledged ----------------------------------------------


@dataclass
class SessionLedger:
    """One session as its acknowledged calls left it."""

    ids: dict[str, Any]
    state: int = lc.SESSION_STATE_ACTIVE
    # The working memory it must hold (None: unknown, after a loss).
    memory: dict[str, Any] | None = field(default_factory=dict)
    # (event type, request id) of each acknowledged lifecycle call, in order.
    events: list[tuple[int, str]] = field(default_factory=list)
    # Acknowledged checkpoints that must exist, with their contents (None: unknown).
    checkpoints: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    # The checkpoint of each acknowledged Pause, in order.
    paused_into: list[str] = field(default_factory=list)
    last_checkpoint: str | None = None
    episode_id: str | None = None
    memory_kept: bool = True


@dataclass
class Ledger:
    project_id: str
    sessions: list[SessionLedger] = field(default_factory=list)
    # Episodes that must exist: id -> the episode as recorded (None: by Terminate).
    episodes: dict[str, ep.Episode | None] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    acknowledged: int = 0
    # Sessions terminated with fewer entries than they held (a lost working memory).
    silent_losses: list[str] = field(default_factory=list)

    def failures_between(self, start: float, end: float) -> list[Failure]:
        return [f for f in self.failures if start <= f.at <= end]


def unexpected(failures: Iterable[Failure], allowed: frozenset[Any] = RETRYABLE) -> list[str]:
    """The failures whose code (or code and reason) is not allowed, described."""
    return [
        f"{f.method}: {f.code.name} {f.reason} {f.message!r}"
        for f in failures
        if f.code not in allowed and (f.code, f.reason) not in allowed
    ]


class Client:
    """Calls memsvc as a careful client: a deadline per attempt, and retries of
    UNAVAILABLE and DEADLINE_EXCEEDED with the same request, so the same request id."""

    def __init__(self, stubs: Stubs, ledger: Ledger, give_up_after: float = 45.0) -> None:
        self.stubs = stubs
        self.ledger = ledger
        self.give_up_after = give_up_after

    async def call(self, method: str, attempt: Callable[[float], Awaitable[T]]) -> T:
        started = time.monotonic()
        backoff = 0.05
        while True:
            try:
                result = await attempt(ATTEMPT_TIMEOUT)
            except grpc.aio.AioRpcError as error:
                details = details_of(error)
                self.ledger.failures.append(
                    Failure(method, details.code, details.reason, details.message,
                            time.monotonic())
                )  # fmt: skip
                if details.reason == "ERROR_REASON_WORKING_MEMORY_LOST":
                    raise LostWorkingMemory(method) from error
                if details.code not in RETRYABLE:
                    raise
                if time.monotonic() - started > self.give_up_after:
                    raise AssertionError(
                        f"{method} still failing after {self.give_up_after}s: {details}"
                    ) from error
                await asyncio.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 0.5)
                continue
            self.ledger.acknowledged += 1
            return result


# Traffic ------------------------------------------------------------------------


class Worker:
    """Runs sessions through their whole lifecycle, over and over, and writes down
    every acknowledged effect in the ledger."""

    def __init__(self, client: Client, number: int, stop: asyncio.Event) -> None:
        self.client = client
        self.ledger = client.ledger
        self.number = number
        self.stop = stop
        self.steps = 0
        self.agent = str(uuid.uuid4())

    async def run(self) -> None:
        cycle = 0
        while not self.stop.is_set():
            session = SessionLedger(
                {"project_id": self.ledger.project_id, "agent_instance_id": self.agent,
                 "session_id": f"w{self.number}-{cycle}"}
            )  # fmt: skip
            try:
                await self._cycle(session, keep=cycle % 2 == 0)
            except LostWorkingMemory:
                await self._end_lost(session)
            cycle += 1

    async def _step(self, session: SessionLedger, step: Callable[[], Awaitable[None]]) -> None:
        """One step; a working memory found lost is restored from the last checkpoint
        (or the session is given up), as an agent would do."""
        try:
            await step()
        except LostWorkingMemory:
            if session.last_checkpoint is None:
                raise
            await self.resume(session, session.last_checkpoint)
            await step()
        self.steps += 1

    async def _cycle(self, session: SessionLedger, keep: bool) -> None:
        await self.spawn(session)
        self.steps += 1
        for step in (
            lambda: self.set(session, "notes", [f"cycle of {session.ids['session_id']}"]),
            lambda: self.pause(session),
            lambda: self.resume(session, None),
            lambda: self.set(session, "result", {"ok": True, "n": self.steps}),
            lambda: self.terminate(session, keep),
            lambda: self.record_episode(session),
        ):
            if self.stop.is_set():
                return
            await self._step(session, step)

    async def _end_lost(self, session: SessionLedger) -> None:
        """The working memory is gone and there is no checkpoint: end the session,
        without an episode (memsvc refuses to make one of a lost memory)."""
        if session.state != lc.SESSION_STATE_TERMINATED:
            session.memory = None
            await self.terminate(session, keep=False, consolidate=False)

    async def spawn(self, session: SessionLedger) -> None:
        rid = str(uuid.uuid4())
        # An object of several fields, as agents send: a Spawn retried on a restarted
        # memsvc must still match the request id's first arguments.
        seed = {
            "plan": ["search", "summarise", self.number],
            "attempt": {"n": 1, "by": self.number},
        }
        request = lc.SpawnRequest(
            **session.ids,
            initial_entries=[pb.EntryInput(key=k, value=value(v)) for k, v in seed.items()],
            request_id=rid,
        )
        await self.client.call("Spawn", lambda t: self.client.stubs.life.Spawn(request, timeout=t))
        self.ledger.sessions.append(session)
        session.memory = dict(seed)
        session.events.append((lc.EVENT_TYPE_SESSION_SPAWNED, rid))

    async def set(self, session: SessionLedger, key: str, data: Any) -> None:
        request = pb.SetRequest(**session.ids, key=key, value=value(data))
        await self.client.call("Set", lambda t: self.client.stubs.wm.Set(request, timeout=t))
        if session.memory is not None:
            session.memory[key] = data

    async def pause(self, session: SessionLedger) -> None:
        rid = str(uuid.uuid4())
        request = lc.PauseRequest(**session.ids, request_id=rid)
        reply = await self.client.call(
            "Pause", lambda t: self.client.stubs.life.Pause(request, timeout=t)
        )
        checkpoint_id = reply.checkpoint.checkpoint_id
        session.state = lc.SESSION_STATE_PAUSED
        session.events.append((lc.EVENT_TYPE_SESSION_PAUSED, rid))
        session.paused_into.append(checkpoint_id)
        session.checkpoints[checkpoint_id] = (
            None if session.memory is None else dict(session.memory)
        )
        session.last_checkpoint = checkpoint_id

    async def resume(self, session: SessionLedger, checkpoint_id: str | None) -> None:
        rid = str(uuid.uuid4())
        request = lc.ResumeRequest(**session.ids, checkpoint_id=checkpoint_id or "", request_id=rid)
        await self.client.call(
            "Resume", lambda t: self.client.stubs.life.Resume(request, timeout=t)
        )
        session.state = lc.SESSION_STATE_ACTIVE
        session.events.append((lc.EVENT_TYPE_SESSION_RESUMED, rid))
        contents = session.checkpoints.get(checkpoint_id or session.last_checkpoint or "")
        session.memory = None if contents is None else dict(contents)

    async def terminate(self, session: SessionLedger, keep: bool, consolidate: bool = True) -> None:
        rid = str(uuid.uuid4())
        request = lc.TerminateRequest(
            **session.ids,
            task_description=f"fault suite {session.ids['session_id']}",
            keep_working_memory=keep,
            skip_consolidation=not consolidate,
            request_id=rid,
        )
        reply = await self.client.call(
            "Terminate", lambda t: self.client.stubs.life.Terminate(request, timeout=t)
        )
        session.state = lc.SESSION_STATE_TERMINATED
        if not keep:  # each checkpoint it deletes is announced first, oldest first
            session.events += [(lc.EVENT_TYPE_CHECKPOINT_DELETED, rid)] * len(session.checkpoints)
        session.events.append((lc.EVENT_TYPE_SESSION_TERMINATED, rid))
        session.episode_id = reply.episode_id
        if (
            consolidate
            and session.memory is not None
            and reply.entries_consolidated != len(session.memory)
        ):
            # An episode of less than the session held: Terminate refuses a lost
            # working memory, so this would be a loss nothing reported.
            self.ledger.silent_losses.append(session.ids["session_id"])
            session.memory = None
        session.memory_kept = keep
        if consolidate:
            self.ledger.episodes[reply.episode_id] = None
        if not keep:
            session.checkpoints.clear()  # Terminate deletes them: acknowledged, not lost

    async def record_episode(self, session: SessionLedger) -> None:
        rid = str(uuid.uuid4())
        sent = ep.Episode(
            project_id=session.ids["project_id"],
            agent_instance_id=session.ids["agent_instance_id"],
            session_id=session.ids["session_id"],
            task_type="fault_suite",
            task_description=f"lessons of {session.ids['session_id']}",
            outcome=lc.OUTCOME_SUCCESS,
            lessons_learned=["retry with the same request id"],
            duration=duration_pb2.Duration(seconds=3),
            importance=0.5,
        )
        request = ep.RecordEpisodeRequest(episode=sent, request_id=rid)
        reply = await self.client.call(
            "RecordEpisode", lambda t: self.client.stubs.episodic.RecordEpisode(request, timeout=t)
        )
        self.ledger.episodes[reply.episode.episode_id] = sent


@dataclass
class SeenEvent:
    sequence: int
    event_id: str
    event_type: int
    session_id: str
    request_id: str
    checkpoint_id: str
    episode_id: str

    @classmethod
    def of(cls, event: lc.LifecycleEvent) -> SeenEvent:
        return cls(int(event.sequence), event.event_id, int(event.event_type), event.session_id,
                   event.request_id, event.checkpoint_id, event.episode_id)  # fmt: skip


class Traffic:
    """Workers and a live watcher (the SDK's, which reconnects by itself) on one memsvc."""

    def __init__(self, target: str, project_id: str, workers: int = 3) -> None:
        self.target = target
        self.ledger = Ledger(project_id)
        self.stop_event = asyncio.Event()
        self.watched: list[SeenEvent] = []
        self._workers_count = workers
        self._channel: grpc.aio.Channel | None = None
        self.workers: list[Worker] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._watch_task: asyncio.Task[None] | None = None
        self._sdk: Any = None

    @property
    def stubs(self) -> Stubs:
        assert self._channel is not None
        return Stubs(self._channel)

    async def __aenter__(self) -> Traffic:
        from memsvc.client import AsyncClient, RetryPolicy

        self._channel = grpc.aio.insecure_channel(self.target)
        client = Client(self.stubs, self.ledger)
        self.workers = [Worker(client, n, self.stop_event) for n in range(self._workers_count)]
        self._tasks = [
            asyncio.create_task(w.run(), name=f"worker-{w.number}") for w in self.workers
        ]
        self._sdk = AsyncClient(
            self.target, retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.5)
        )
        self._watch_task = asyncio.create_task(self._watch(), name="watcher")
        return self

    async def _watch(self) -> None:
        async with self._sdk.watch(
            self.ledger.project_id, start="oldest", progress_interval=0.2
        ) as events:
            async for event in events:
                self.watched.append(
                    SeenEvent(event.sequence, event.event_id, _event_type_number(event.event_type),
                              event.session_id, event.request_id or "",
                              event.checkpoint_id or "", event.episode_id or "")
                )  # fmt: skip

    def check_alive(self) -> None:
        """Raise the error of any worker that died (a non-retryable failure)."""
        for task in [*self._tasks, *([self._watch_task] if self._watch_task else [])]:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def progress(self, steps: int = 2, timeout: float = 30.0, what: str = "") -> None:
        """Wait until every worker has made ``steps`` more acknowledged steps."""
        wanted = [w.steps + steps for w in self.workers]

        async def done() -> bool:
            self.check_alive()
            return all(w.steps >= n for w, n in zip(self.workers, wanted, strict=True))

        await eventually(done, f"every worker makes {steps} steps {what}".strip(), timeout)

    async def finish(self, timeout: float = 60.0) -> None:
        """Let every worker end its current step, then stop them."""
        self.stop_event.set()
        async with asyncio.timeout(timeout):
            await asyncio.gather(*self._tasks)

    async def wait_watched(self, last_sequence: int, timeout: float = 20.0) -> None:
        async def caught_up() -> bool:
            self.check_alive()
            return bool(self.watched) and self.watched[-1].sequence >= last_sequence

        await eventually(caught_up, f"the live watcher reaches sequence {last_sequence}", timeout)

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop_event.set()
        tasks = [*self._tasks, *([self._watch_task] if self._watch_task else [])]
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._sdk is not None:
            await self._sdk.close()
        if self._channel is not None:
            await self._channel.close()


def _event_type_number(event_type: Any) -> int:
    """The wire number of the SDK's EventType (an enum named after the proto's)."""
    name = f"EVENT_TYPE_{str(getattr(event_type, 'name', event_type)).upper()}"
    return int(lc.EventType.Value(name))


# Reading back ---------------------------------------------------------------------


async def read_log(stubs: Stubs, **scope: Any) -> list[lc.LifecycleEvent]:
    """Every retained event (of the scope), from the oldest, up to the latest
    sequence as of the call: read with WatchLifecycle, as a client would."""
    now = stubs.life.WatchLifecycle(lc.WatchLifecycleRequest(**scope), timeout=10)
    first = await now.read()
    now.cancel()
    assert first.HasField("progress")
    head = int(first.progress.sequence)
    call = stubs.life.WatchLifecycle(
        lc.WatchLifecycleRequest(
            **scope,
            start=lc.WATCH_START_OLDEST,
            progress_interval=duration_pb2.Duration(nanos=100_000_000),
        ),
        timeout=20,
    )
    events: list[lc.LifecycleEvent] = []
    try:
        while True:
            message = await call.read()
            assert message is not grpc.aio.EOF, "the watch stream ended"
            if message.HasField("event"):
                events.append(message.event)
                if message.event.sequence >= head:
                    return events
            elif message.progress.sequence >= head:
                return events
    finally:
        call.cancel()


async def checkpoint_ids(stubs: Stubs, ids: dict[str, Any]) -> list[str]:
    reply = await stubs.life.ListCheckpoints(
        lc.ListCheckpointsRequest(**ids, page_size=1000), timeout=10
    )
    return [c.checkpoint_id for c in reply.checkpoints]


async def episodes_of(stubs: Stubs, project_id: str, **filters: Any) -> list[ep.Episode]:
    found: list[ep.Episode] = []
    token = ""
    while True:
        page = await stubs.episodic.ListEpisodes(
            ep.ListEpisodesRequest(project_id=project_id, filter=ep.EpisodeFilter(**filters),
                                   page_size=1000, page_token=token),
            timeout=10,
        )  # fmt: skip
        found += page.episodes
        token = page.next_page_token
        if not token:
            return found


async def expect_code(call: Awaitable[Any], *codes: grpc.StatusCode) -> ErrorDetails:
    try:
        reply = await call
    except grpc.aio.AioRpcError as error:
        details = details_of(error)
        assert details.code in codes, f"expected {codes}, got {details}"
        return details
    raise AssertionError(f"expected {codes}, but the call succeeded: {reply!r}")


# The audit ----------------------------------------------------------------------


# What a refused write names as the session's state, for the states that refuse.
REFUSING_STATE: dict[int, str] = {
    lc.SESSION_STATE_PAUSED: "paused",
    lc.SESSION_STATE_TERMINATED: "terminated",
}


async def expect_writes_as_in(stubs: Stubs, ids: dict[str, Any], state: int) -> None:
    """A write to a session whose memory is kept goes as its database state says:
    accepted when ACTIVE, refused for being PAUSED or TERMINATED otherwise. A marker
    a dead call left transitional (``pausing``, ``resuming``...) must not outlive the
    first refused call, which heals it: its name in a refusal is a defect."""
    touch = pb.SetRequest(**ids, key="audit-touch", value=value(1))
    if state == lc.SESSION_STATE_ACTIVE:
        await stubs.wm.Set(touch, timeout=10)
        await stubs.wm.Delete(pb.DeleteRequest(**ids, key="audit-touch"), timeout=10)
        return
    refused = await expect_code(
        stubs.wm.Set(touch, timeout=10), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert refused.reason == "ERROR_REASON_SESSION_NOT_WRITABLE", (ids, refused)
    assert refused.metadata.get("state") == REFUSING_STATE[state], (ids, refused)


async def audit(
    stubs: Stubs,
    ledger: Ledger,
    watched: list[SeenEvent] | None = None,
    working_memory_lost: bool = False,
) -> None:
    """Everything memsvc acknowledged is there, complete, and agrees with itself.

    - each session's state is the last acknowledged one, and its event history is
      exactly its acknowledged calls, one event per request id, in order;
    - each acknowledged checkpoint exists with all of its contents (and no other);
    - the working memory of each live session is what its calls left, and takes
      writes only if the session is ACTIVE;
    - each acknowledged episode exists once;
    - the event log is gap-free from 1 (the database is the test's own), and the
      live watcher saw exactly that log, in order.

    With ``working_memory_lost`` (a Redis that came back empty), the working memory
    a terminated session kept may be gone (its reads say NOT_FOUND, terminated).
    """
    log = await read_log(stubs, project_id=ledger.project_id)
    sequences = [int(e.sequence) for e in log]
    assert sequences == list(range(1, len(log) + 1)), f"event log has gaps: {sequences}"
    by_session: dict[str, list[lc.LifecycleEvent]] = {}
    for event in log:
        by_session.setdefault(event.session_id, []).append(event)
    assert set(by_session) == {s.ids["session_id"] for s in ledger.sessions}, (
        "events of sessions nobody spawned, or spawned sessions without events"
    )
    for session in ledger.sessions:
        ids = session.ids
        events = by_session[ids["session_id"]]
        got = [(int(e.event_type), e.request_id) for e in events]
        assert got == session.events, f"{ids['session_id']}: event history {got}"
        reply = await stubs.life.GetSession(lc.GetSessionRequest(**ids), timeout=10)
        assert reply.session.state == session.state, ids
        # The state machine and the event log agree: the last transition is the state.
        transitions = [e for e in events if e.event_type in STATE_OF_EVENT]
        assert STATE_OF_EVENT[transitions[-1].event_type] == reply.session.state, ids
        assert reply.session.version == len(transitions), ids
        paused_into = [
            e.checkpoint_id for e in events if e.event_type == lc.EVENT_TYPE_SESSION_PAUSED
        ]
        assert paused_into == session.paused_into, ids
        for event in events:
            if event.event_type == lc.EVENT_TYPE_SESSION_TERMINATED:
                assert event.episode_id == session.episode_id
        assert sorted(await checkpoint_ids(stubs, ids)) == sorted(session.checkpoints), ids
        for checkpoint_id, contents in session.checkpoints.items():
            checkpoint, stored = await checkpoint_with_contents(stubs.life, ids, checkpoint_id)
            assert checkpoint.key_count == len(stored)
            if contents is not None:
                assert stored == contents, f"checkpoint {checkpoint_id} of {ids['session_id']}"
        if session.state != lc.SESSION_STATE_TERMINATED:
            assert reply.session.working_memory_status == lc.WORKING_MEMORY_STATUS_INTACT, ids
        if session.state != lc.SESSION_STATE_TERMINATED or session.memory_kept:
            # Read before any write: a read alone must see what a call that died
            # past its commit committed (no write settling its marker first).
            if session.memory is not None:
                try:
                    assert await whole_memory(stubs.wm, ids) == session.memory, ids
                except grpc.aio.AioRpcError as error:
                    if not (working_memory_lost and session.state == lc.SESSION_STATE_TERMINATED):
                        raise
                    assert error.code() == grpc.StatusCode.NOT_FOUND, error
            await expect_writes_as_in(stubs, ids, session.state)
        else:
            await expect_code(
                stubs.wm.Get(pb.GetRequest(**ids, key="plan"), timeout=10),
                grpc.StatusCode.NOT_FOUND,
            )
    stored_episodes = await episodes_of(stubs, ledger.project_id)
    ids_stored = [e.episode_id for e in stored_episodes]
    assert sorted(ids_stored) == sorted(ledger.episodes), "episodes lost or recorded twice"
    for episode in stored_episodes:
        sent = ledger.episodes[episode.episode_id]
        if sent is not None:
            assert (episode.task_description, list(episode.lessons_learned)) == (
                sent.task_description,
                list(sent.lessons_learned),
            )
    if watched is not None:
        assert [(e.sequence, e.event_id) for e in watched] == [
            (int(e.sequence), e.event_id) for e in log
        ], "the live watcher's events differ from the log"


# A fault under traffic --------------------------------------------------------------


@dataclass
class FaultRun:
    """What happened around one fault."""

    traffic: Traffic
    probe: SessionLedger
    started: float = 0.0
    ended: float = 0.0

    @property
    def ledger(self) -> Ledger:
        return self.traffic.ledger

    def failures_during(self) -> list[Failure]:
        return self.ledger.failures_between(self.started, self.ended)

    async def met_by_traffic(self, timeout: float = 20.0) -> None:
        """Keep the fault until some worker call has failed on it."""

        async def met() -> bool:
            self.traffic.check_alive()
            return any(f.at >= self.started for f in self.ledger.failures)

        await eventually(met, "a worker call fails on the fault", timeout)

    def summary(self) -> str:
        codes: dict[str, int] = {}
        for failure in self.ledger.failures:
            name = f"{failure.method}:{failure.code.name}"
            codes[name] = codes.get(name, 0) + 1
        return (
            f"{self.ledger.acknowledged} calls acknowledged, {len(self.ledger.sessions)} "
            f"sessions, {len(self.traffic.watched)} events watched, fault "
            f"{self.ended - self.started:.1f}s, {len(self.failures_during())} failed "
            f"attempts during it, all failures: {codes}"
        )


async def spawn_probe(traffic: Traffic) -> SessionLedger:
    """A session of the test's own, with a checkpoint, for probes during the fault."""
    worker = Worker(Client(traffic.stubs, traffic.ledger), 99, traffic.stop_event)
    probe = SessionLedger(
        {"project_id": traffic.ledger.project_id, "agent_instance_id": worker.agent,
         "session_id": "probe"}
    )  # fmt: skip
    await worker.spawn(probe)
    rid = str(uuid.uuid4())
    reply = await traffic.stubs.life.CreateCheckpoint(
        lc.CreateCheckpointRequest(**probe.ids, checkpoint_id="probe-1", request_id=rid),
        timeout=10,
    )
    probe.events.append((lc.EVENT_TYPE_CHECKPOINT_CREATED, rid))
    assert probe.memory is not None
    probe.checkpoints[reply.checkpoint.checkpoint_id] = dict(probe.memory)
    probe.last_checkpoint = reply.checkpoint.checkpoint_id
    return probe


async def under_traffic(
    memsvc: MemsvcProcess,
    inject: Callable[[FaultRun], Awaitable[None]],
    heal: Callable[[FaultRun], Awaitable[None]],
    *,
    allowed: frozenset[Any] = RETRYABLE,
    after_heal: Callable[[FaultRun], Awaitable[None]] | None = None,
    working_memory_lost: bool = False,
) -> FaultRun:
    """Traffic before, during and after a fault; then the audit.

    ``inject`` starts the fault and checks what must hold while it lasts, ``heal``
    ends it. memsvc is never restarted: it must recover by itself (health SERVING
    again, every worker making progress). Every failed call must have a code in
    ``allowed``; everything acknowledged must pass :func:`audit`. A working memory
    lost (``working_memory_lost``) must be reported, never consolidated as it is.
    """
    async with Traffic(memsvc.target, str(uuid.uuid4())) as traffic:
        await wait_serving(traffic.stubs)
        run = FaultRun(traffic, await spawn_probe(traffic))
        await traffic.progress(2, what="before the fault")
        assert not traffic.ledger.failures, unexpected(traffic.ledger.failures, frozenset())
        run.started = time.monotonic()
        await inject(run)
        await heal(run)
        run.ended = time.monotonic()
        await wait_serving(traffic.stubs)
        if after_heal is not None:
            await after_heal(run)
        # Recovery without a restart: every worker makes progress again.
        await traffic.progress(3, what="after the fault")
        await traffic.finish()
        assert not unexpected(traffic.ledger.failures, allowed), unexpected(
            traffic.ledger.failures, allowed
        )
        # Even when the working memory was lost: it is reported, never consolidated.
        assert not traffic.ledger.silent_losses, traffic.ledger.silent_losses
        log = await read_log(traffic.stubs, project_id=traffic.ledger.project_id)
        await traffic.wait_watched(int(log[-1].sequence))
        await audit(traffic.stubs, traffic.ledger, traffic.watched, working_memory_lost)
        print(run.summary())
        return run
