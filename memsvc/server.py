"""Server assembly: stores, services, health, reflection and graceful shutdown.

A :class:`Server` owns everything one memsvc process runs; nothing lives in
module globals. ``start()`` opens the stores (applying migrations unless told
not to), binds the API on TCP and optionally a Unix socket, and starts a
health monitor. ``stop()`` shuts down in the order clients need: health goes
NOT_SERVING, open streams end with UNAVAILABLE, new calls are refused while
in-flight calls get the grace period, then the stores close.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import grp
import logging
import os
import signal
import socket
import stat
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memsvc import tracing
from memsvc.api import ErrorInterceptor, WorkingMemoryServicer
from memsvc.api._auth import AuthInterceptor
from memsvc.api._data_removal import DataRemovalServicer
from memsvc.api._episodic import EpisodicMemoryServicer
from memsvc.api._errors import CallTracker
from memsvc.api._graph_checkpoints import GraphCheckpointServicer
from memsvc.api._lifecycle import LifecycleServicer, render_value
from memsvc.api._metrics import MetricsInterceptor
from memsvc.auth import CertificateFiles, Certificates, CredentialsError, TokenFile
from memsvc.config import Config, ConfigError, StartupError, bind_address, listen_is_loopback
from memsvc.domain import DurableStore, MemoryStore, WorkingMemory
from memsvc.domain._call_deadline import call_deadline
from memsvc.domain._episodes import Episodes
from memsvc.domain._graph_checkpoints import GraphCheckpoints, GraphSweep
from memsvc.domain._lifecycle import Lifecycle
from memsvc.domain._lifecycle_records import CheckpointRetention
from memsvc.domain._purge import Purger
from memsvc.domain._watch import EventHub
from memsvc.failpoints import Failpoints
from memsvc.metrics import Metrics
from memsvc.store import durable_store, working_memory_store
from memsvc.store._observe import Observable
from memsvc.store._probe import Reconnects
from memsvc.store.memory import InMemoryWorkingMemoryStore
from memsvc.store.sqlite import SqliteDurableStore
from memsvc.v1 import (
    data_removal_pb2,
    data_removal_pb2_grpc,
    episodic_pb2,
    episodic_pb2_grpc,
    errors_pb2,  # noqa: F401 (see enable_server_reflection below)
    graph_checkpoint_pb2,
    graph_checkpoint_pb2_grpc,
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    working_memory_pb2,
    working_memory_pb2_grpc,
)

log = logging.getLogger(__name__)

# Rows one retention job deletes per transaction (see sweep_until_caught_up).
SWEEP_BATCH = 1000
# The longest one shutdown step may take (beyond the grace period for the gRPC
# server) before it is logged and skipped, so a stop can never hang.
STEP_LIMIT_SECONDS = 10.0
# Spans still batched at shutdown wait this long for the trace collector.
TRACE_FLUSH_SECONDS = 2.0
# Once cancelled at shutdown, how long the background tasks (health monitor,
# retention, credential reloads) may take to end; they end while gRPC stops.
BACKGROUND_STOP_SECONDS = 2.0
# Releasing the background-jobs lease at shutdown: one short transaction. Bounded
# tightly: without it the lease only lapses later (three retention intervals).
LEASE_RELEASE_SECONDS = 1.0
# The longest Unix socket path, in bytes: sun_path holds 108 on Linux (104 on macOS
# and the BSDs), the terminating NUL included.
UNIX_SOCKET_PATH_BYTES = 107 if sys.platform.startswith("linux") else 103

WORKING_MEMORY_SERVICE = working_memory_pb2.DESCRIPTOR.services_by_name[
    "WorkingMemoryService"
].full_name
LIFECYCLE_SERVICE = lifecycle_pb2.DESCRIPTOR.services_by_name["LifecycleService"].full_name
EPISODIC_MEMORY_SERVICE = episodic_pb2.DESCRIPTOR.services_by_name[
    "EpisodicMemoryService"
].full_name
DATA_REMOVAL_SERVICE = data_removal_pb2.DESCRIPTOR.services_by_name["DataRemovalService"].full_name
GRAPH_CHECKPOINT_SERVICE = graph_checkpoint_pb2.DESCRIPTOR.services_by_name[
    "GraphCheckpointService"
].full_name
# On the probe port: "liveness" is the process (SERVING until shutdown), so a
# backend outage never restarts the sidecar; "readiness" and "" follow the backends.
LIVENESS = "liveness"
READINESS = "readiness"
# Services whose health follows the backends; "" is the server as a whole.
_HEALTH_SERVICES = (
    "",
    READINESS,
    WORKING_MEMORY_SERVICE,
    LIFECYCLE_SERVICE,
    EPISODIC_MEMORY_SERVICE,
    DATA_REMOVAL_SERVICE,
    GRAPH_CHECKPOINT_SERVICE,
)


# The largest request the probe port takes: a HealthCheckRequest names a service.
# Larger, gRPC refuses it (RESOURCE_EXHAUSTED) before reading it: the port is open
# to the whole cluster, and 64 concurrent Checks of 4 MB took 580 MB (a review).
PROBE_MESSAGE_BYTES = 1024
# The port takes no token, and Checks whose answers were never read held 100 MB per
# 10,000 (a review). A bound per connection, not per port (64 held Checks kept the
# kubelet's out, and it restarted the pod): a few Checks at once on a connection that
# lives for seconds; the kubelet opens one per probe.
PROBE_STREAMS_PER_CONNECTION = 4
PROBE_CONNECTION_AGE_MS = 10_000
PROBE_CONNECTION_AGE_GRACE_MS = 5_000
# How long the calls on a connection past max_connection_age_seconds may go on
# before it closes: unary calls are long over by then; a watch reconnects.
CONNECTION_AGE_GRACE_SECONDS = 300


class _ProbeHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 on the probe port: Check only, answered by the API's servicer.

    That port is open to the whole cluster, with no token and no interceptor (the
    kubelet's probes use Check), and a Watch holds a stream, and memory, for as long
    as its caller likes: there, any pod could open thousands. On the API, Watch is
    served, bounded by max_watchers."""

    def __init__(self, health_servicer: health.aio.HealthServicer) -> None:
        self._health = health_servicer

    async def Check(  # noqa: N802 (the gRPC method name)
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        return await self._health.Check(request, context)

    async def Watch(  # noqa: N802 (the gRPC method name)
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "the probe port serves Check only; Watch health on the API port",
        )


class Server:
    """One memsvc process: use ``async with Server(config) as server`` or start/stop."""

    def __init__(
        self,
        config: Config,
        *,
        working_memory: MemoryStore | None = None,
        durable: DurableStore | None = None,
        tracer_provider: Any = None,
    ) -> None:
        self.config = config
        self.working_memory_store = working_memory or working_memory_store(config)
        self.durable_store = durable or durable_store(config)
        self.health = health.aio.HealthServicer()
        self.metrics = Metrics()
        # Names this process to the others (the background-jobs lease).
        self.instance_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # With otel_tracing: the OpenTelemetry provider spans go to (tests pass one).
        self.tracer_provider = tracer_provider
        self.port: int | None = None
        # The probe port (grpc.health.v1 only) and the metrics port, when enabled.
        self.health_port: int | None = None
        self._probe: grpc.aio.Server | None = None
        self._calls = CallTracker()
        self._grpc: grpc.aio.Server | None = None
        # (device, inode) of the Unix socket this run made: only it is removed at stop.
        self._socket_inode: tuple[int, int] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.lifecycle: Lifecycle | None = None
        self.graphs: GraphCheckpoints | None = None
        self.episodes: Episodes | None = None
        self.purger: Purger | None = None
        self.hub: EventHub | None = None
        self._healthy: bool | None = None
        self._not_ready_because = ""  # what the last health check found wrong
        # Whether the durable store answered its last health check (None: not asked
        # yet): at shutdown, a lease release that would wait for nothing is skipped.
        self._durable_answered: bool | None = None
        # Without migrations (a Job runs them), the schema is checked once the
        # database answers: until it is, readiness is NOT_SERVING.
        self._schema_checked = config.migrate
        self._schema_behind = ""
        self._stopped = asyncio.Event()
        # Credentials (auth_tokens_file, tls_*), read at start and again when they change.
        self.tokens: TokenFile | None = None
        self.certificates: CertificateFiles | None = None
        self._auth: AuthInterceptor | None = None
        self._new_certificates: Certificates | None = None
        self._reloader: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()

    async def start(self) -> None:
        """Open the stores, migrate, bind the ports and start serving.

        On failure, whatever was opened is closed again before the error propagates.
        """
        try:
            await self._start()
        except BaseException:
            await self.stop(0)
            raise

    async def _start(self) -> None:
        socket_group = _socket_group(self.config.unix_socket_group)
        # Before any backend is opened: a missing tracing extra changes nothing.
        traced = None
        if self.config.otel_tracing:
            if self.tracer_provider is None:
                self.tracer_provider = tracing.make_tracer_provider()
            traced = tracing.server_interceptor(self.tracer_provider)
        if self.config.unix_socket:
            _check_socket_path(Path(self.config.unix_socket))
        self._load_credentials()
        for store in (self.working_memory_store, self.durable_store):
            if isinstance(store, Observable):
                store.observe = self.metrics.backend_observer(store.backend_name)
        await self.working_memory_store.open()
        await self.durable_store.open()
        if isinstance(self.durable_store, SqliteDurableStore):
            # The embedded deployment: one process per data directory (others may
            # share it only when they share the working memory too).
            self.durable_store.claim(
                alone=isinstance(self.working_memory_store, InMemoryWorkingMemoryStore)
            )
        if self.config.migrate:
            applied = await self.durable_store.migrate()
            log.info("schema migrations applied: %s", applied or "none pending")
            self._warn_if_schema_ahead(
                await self.durable_store.schema_version(),
                self.durable_store.bundled_schema_version(),
            )
        memory = WorkingMemory(self.working_memory_store, self.config.working_memory_limits())
        lifecycle = Lifecycle(
            self.working_memory_store,
            self.durable_store,
            memory,
            render_value,
            failpoints=Failpoints(self.config.failpoints),
            retention=CheckpointRetention(
                max_age_ms=self.config.checkpoint_max_age_seconds * 1000,
                keep_last=self.config.checkpoint_keep_last,
                request_id_ttl_ms=self.config.request_id_ttl_seconds * 1000,
                event_max_age_ms=self.config.event_max_age_seconds * 1000,
                event_keep_last=self.config.event_keep_last,
            ),
            max_checkpoints=self.config.max_checkpoints_per_session,
        )
        hub = EventHub(
            self.durable_store,
            max_watchers=self.config.max_watchers,
            poll_interval=self.config.event_poll_interval_seconds,
        )
        self.hub = hub
        hub.event_offered = lambda stored: self.metrics.event_offered(stored.event.time_ms)
        hub.watcher_lagged = self.metrics.lagging_watchers.inc
        self.metrics.watchers.set_function(lambda: hub.watchers)
        # Events committed here reach local watchers without a read of the store.
        self.durable_store.events_committed = hub.publish_committed
        self.lifecycle = lifecycle
        # Working memory asks the lifecycle why a session refused a call.
        memory.guard = lifecycle
        interceptors: list[Any] = [traced] if traced else []
        # Metrics outside the others: it counts every call by the status they set, refusals
        # for want of a token included. Tokens are checked before any error mapping.
        interceptors.append(MetricsInterceptor(self.metrics))
        if self.tokens is not None:
            self._auth = AuthInterceptor(self.tokens.table)
            interceptors.append(self._auth)
        interceptors.append(
            ErrorInterceptor(
                self._calls,
                self.config.max_concurrent_calls,
                self.config.default_deadline_seconds,
                max_other_streams=self.config.max_watchers,
            )
        )
        server = grpc.aio.server(
            interceptors=interceptors,
            options=self._grpc_options(),
        )
        working_memory_pb2_grpc.add_WorkingMemoryServiceServicer_to_server(
            WorkingMemoryServicer(memory), server
        )
        lifecycle_pb2_grpc.add_LifecycleServiceServicer_to_server(
            LifecycleServicer(lifecycle, hub, self.config.response_budget_bytes), server
        )
        episodes = Episodes(
            self.durable_store,
            max_similarity_candidates=self.config.max_similarity_candidates,
            page_bytes=self.config.response_budget_bytes,
            text_search_readers=self.durable_store.readers,
        )
        self.episodes = episodes
        episodic_pb2_grpc.add_EpisodicMemoryServiceServicer_to_server(
            EpisodicMemoryServicer(episodes), server
        )
        self.purger = Purger(self.working_memory_store, self.durable_store)
        self.purger.events_purged = hub.purged
        data_removal_pb2_grpc.add_DataRemovalServiceServicer_to_server(
            DataRemovalServicer(self.purger), server
        )
        self.graphs = GraphCheckpoints(
            self.durable_store, page_bytes=self.config.response_budget_bytes
        )
        # Terminate ends the session's linked graph threads in its own transaction.
        lifecycle.session_end_hooks.append(self.graphs.session_ended)
        graph_checkpoint_pb2_grpc.add_GraphCheckpointServiceServicer_to_server(
            GraphCheckpointServicer(self.graphs, self.config.max_message_bytes), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        # Reflection describes what the process has loaded: errors.proto has no
        # service, and only its import above lets a client look up
        # memsvc.v1.ErrorReason, whose names every error's ErrorInfo carries.
        reflection.enable_server_reflection(
            (
                WORKING_MEMORY_SERVICE,
                LIFECYCLE_SERVICE,
                EPISODIC_MEMORY_SERVICE,
                DATA_REMOVAL_SERVICE,
                GRAPH_CHECKPOINT_SERVICE,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        credentials = self._server_credentials() if self.certificates is not None else None
        with _binding("the gRPC API", self.config.listen):
            if credentials is not None:
                self.port = server.add_secure_port(self.config.listen, credentials)
            else:
                self.port = server.add_insecure_port(self.config.listen)
        if self.config.unix_socket:
            # No TLS on the socket: its file mode and group guard it (tokens still apply).
            _remove_stale_socket(Path(self.config.unix_socket))
            # Bound (and listening: a client may connect before the server starts) for
            # memsvc's user alone from its first moment, whatever the process's umask;
            # the group gets it just below, once it is the right group.
            umask = os.umask(0o177)
            try:
                with _binding("the gRPC API", f"unix:{self.config.unix_socket}"):
                    server.add_insecure_port(f"unix:{self.config.unix_socket}")
            finally:
                os.umask(umask)
            # This run's socket (bound now): stop() removes it, even after a failed
            # start, and nothing else found at its path.
            made = os.lstat(self.config.unix_socket)
            self._socket_inode = (made.st_dev, made.st_ino)
            # Its mode and group before the server starts, not after. Read-write for
            # the group too: an agent container that shares the
            # pod's fsGroup (or unix_socket_group) connects without memsvc's user.
            if socket_group is not None:
                _give_socket_to(self.config.unix_socket, socket_group)
            # By path, which chmod follows: only while the path is still the socket
            # bound above (never a link put in its place, whose target would get it).
            now = os.lstat(self.config.unix_socket)
            if not stat.S_ISSOCK(now.st_mode) or (now.st_dev, now.st_ino) != self._socket_inode:
                raise StartupError(
                    f"unix_socket {self.config.unix_socket}: replaced while memsvc set it up"
                )
            os.chmod(self.config.unix_socket, 0o660)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._check_health()
        if self._schema_behind:
            # Found at once: stop, rather than report ready and fail every call.
            raise StartupError(self._schema_behind)
        await server.start()
        self._grpc = server
        if self.config.health_listen:
            self._probe = grpc.aio.server(options=self._probe_options())
            health_pb2_grpc.add_HealthServicer_to_server(_ProbeHealth(self.health), self._probe)
            with _binding("health probes", self.config.health_listen):
                self.health_port = self._probe.add_insecure_port(
                    bind_address(self.config.health_listen)
                )
            await self._probe.start()
        if self.config.metrics_listen:
            with _binding("metrics", self.config.metrics_listen):
                self.metrics.start(bind_address(self.config.metrics_listen))
        self._monitor = asyncio.create_task(self._monitor_health(), name="memsvc-health")
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="memsvc-retention")
        if self.tokens is not None or self.certificates is not None:
            self._reloader = asyncio.create_task(self._reload_forever(), name="memsvc-credentials")
        host = self.config.listen.rsplit(":", 1)[0]
        log.info(
            "memsvc serving on %s:%d%s%s%s (%s; %s, %s)",
            host,
            self.port,
            f" and unix:{self.config.unix_socket}" if self.config.unix_socket else "",
            f", probes on port {self.health_port}" if self.health_port is not None else "",
            f", metrics on port {self.metrics.port}" if self.metrics.port is not None else "",
            self._security_summary(),
            self.working_memory_store.backend_name,
            self.durable_store.backend_name,
        )
        self._warn_if_open()

    async def stop(self, grace: float | None = None) -> None:
        """Shut down gracefully; safe to call more than once.

        Every step is bounded: a step that overruns (a handler that ignores its
        cancellation, a backend that stops answering) is logged with the stacks
        of the tasks still running and skipped, so the process always exits and
        the stores are always closed.
        """
        if self._stopped.is_set():
            return
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        # A start that failed closes what it opened: quietly, beside its error (it
        # never served: "shutting down" and "stopped" read as if it had).
        say = log.info if self._grpc is not None else log.debug
        say("shutting down (grace %.1fs)", grace)
        await self.health.enter_graceful_shutdown()
        # The background tasks end while gRPC stops, not before it: one cancelled
        # in a backend call may take seconds to unwind (a database that stopped
        # answering), and meanwhile new calls would still be accepted.
        background = [t for t in (self._monitor, self._sweeper, self._reloader) if t is not None]
        for task in background:
            task.cancel()
        tasks_ended = asyncio.ensure_future(_cancelled_tasks_end(background))
        if self._grpc is not None:
            # Let health watchers receive NOT_SERVING before their streams end.
            await asyncio.sleep(0.05)
            # gRPC first closes its listeners, then waits for the calls in flight:
            # from now on a new call is refused (UNAVAILABLE), where one that
            # slipped in before would be accepted and then cancelled.
            grpc_stopped = asyncio.ensure_future(self._grpc.stop(grace))
            await asyncio.sleep(0)
            ended = self._calls.end_streams()
            if ended:
                log.info("ended %d open stream(s) with UNAVAILABLE", ended)
            await _bounded("stopping the gRPC server", grpc_stopped, grace + STEP_LIMIT_SECONDS)
            # gRPC is done with the calls, but their handlers may still be
            # unwinding (grpc issue 37239): the stores close only after them.
            stuck = await self._calls.settle(STEP_LIMIT_SECONDS)
            if stuck:
                log.error(
                    "shutdown: %d handler(s) still running after %.1fs; closing the stores "
                    "under them:\n%s",
                    len(stuck),
                    STEP_LIMIT_SECONDS,
                    task_stacks(stuck),
                )
        await tasks_ended
        if self.purger is not None:
            await _bounded("finishing purges", self.purger.finished(), STEP_LIMIT_SECONDS)
        if self.lifecycle is not None:
            await _bounded(
                "settling the markers of answered pauses",
                self.lifecycle.settled(),
                STEP_LIMIT_SECONDS,
            )
            await self._release_background_lease()
        if self._probe is not None:
            await _bounded("stopping the probe server", self._probe.stop(0), STEP_LIMIT_SECONDS)
        # Its HTTP server's shutdown waits up to half a second for its poll loop: in a
        # thread, the event loop free meanwhile.
        await _bounded("stopping metrics", _in_daemon_thread(self.metrics.stop), STEP_LIMIT_SECONDS)
        if self.tracer_provider is not None and hasattr(self.tracer_provider, "shutdown"):
            await _flush_traces(self.tracer_provider)
        await _bounded(
            "closing working memory", self.working_memory_store.aclose(), STEP_LIMIT_SECONDS
        )
        await _bounded("closing the durable store", self.durable_store.aclose(), STEP_LIMIT_SECONDS)
        if self.config.unix_socket and self._socket_inode is not None:
            socket_path = Path(self.config.unix_socket)
            with contextlib.suppress(FileNotFoundError):
                found = socket_path.stat()  # noqa: ASYNC240 - one fast syscall
                if (found.st_dev, found.st_ino) == self._socket_inode:
                    socket_path.unlink()  # noqa: ASYNC240 - one fast syscall
        self._stopped.set()
        say("stopped")

    async def _release_background_lease(self) -> None:
        """Hand the background jobs to another replica now. Without this the lease
        lapses by itself, three retention intervals later: so the release is
        skipped when the durable store failed its last health check, and bounded
        tightly otherwise, never a long wait for a database that does not answer.
        A database call: only once no new call is accepted."""
        assert self.lifecycle is not None
        if self._sweeper is None:
            return  # the jobs never ran (a start that failed): no lease to hand over
        if self._durable_answered is False:
            log.info("shutdown: the database did not answer; its background-jobs lease lapses")
            return
        await _bounded(
            "releasing the background-jobs lease",
            self.lifecycle.release_background(self.instance_id),
            LEASE_RELEASE_SECONDS,
        )

    async def wait_stopped(self) -> None:
        """Return once ``stop()`` has finished."""
        await self._stopped.wait()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _grpc_options(self, max_receive_bytes: int | None = None) -> list[tuple[str, int]]:
        """The gRPC server's options: requests of at most ``max_receive_bytes``
        (max_message_bytes by default), refused by gRPC before they are read whole."""
        aging: list[tuple[str, int]] = []
        if self.config.max_connection_age_seconds:
            # A connection is admitted once, at its handshake: without an age, one
            # kept up by keepalive pings outlived the removal of its client's CA.
            aging = [
                ("grpc.max_connection_age_ms", self.config.max_connection_age_seconds * 1000),
                ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_SECONDS * 1000),
            ]
        return [
            *aging,
            ("grpc.max_receive_message_length", max_receive_bytes or self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            # Fail loudly when the port is taken instead of sharing it silently.
            ("grpc.so_reuseport", 0),
            # Ping idle connections so dead peers (and their streams) are noticed.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def _probe_options(self) -> list[tuple[str, int]]:
        """The probe port's options: the API's, its requests small and its
        connections short-lived with few calls each (PROBE_STREAMS_PER_CONNECTION)."""
        short_lived = {
            "grpc.max_connection_age_ms": PROBE_CONNECTION_AGE_MS,
            "grpc.max_connection_age_grace_ms": PROBE_CONNECTION_AGE_GRACE_MS,
            "grpc.max_concurrent_streams": PROBE_STREAMS_PER_CONNECTION,
        }
        options = [
            option
            for option in self._grpc_options(PROBE_MESSAGE_BYTES)
            if option[0] not in short_lived
        ]
        return [*options, *short_lived.items()]

    def _probe_timeout(self, store: object) -> float:
        """How long one probe of ``store`` may take: the interval, but never less than
        the store's connect timeout, since a probe whose connection was lost connects
        again first. Bounded by the interval alone, a backend whose connection takes
        longer than the interval (a few round trips to a database far away) would be
        NOT_SERVING for good while every call it serves succeeds."""
        interval = self.config.health_interval_seconds
        if isinstance(store, Reconnects):
            return max(interval, store.connect_timeout_seconds)
        return interval

    async def _check_health(self) -> None:
        problems = []
        for store in (self.working_memory_store, self.durable_store):
            problem = ""
            timeout = self._probe_timeout(store)
            try:
                # Under a deadline of its own, as a call's: a ping that hangs counts
                # in memsvc_backend_errors_total (OperationTimedOut), as one refused does.
                with call_deadline(timeout):
                    async with asyncio.timeout(timeout):
                        await store.ping()
            except TimeoutError:
                problem = f"{store.backend_name}: no answer within {timeout:g} s"
            except Exception as error:
                problem = f"{store.backend_name}: {error}"
            # Whether it answers, alone: a schema behind is memsvc_schema_behind.
            self.metrics.backend_up.labels(store.backend_name).set(0 if problem else 1)
            if store is self.durable_store:
                self._durable_answered = not problem
            if problem:
                problems.append(problem)
        if not problems and not self._schema_checked:
            try:
                async with asyncio.timeout(self._probe_timeout(self.durable_store)):
                    problem = await self._schema_problem()
            except Exception as error:
                problem = f"cannot read the schema version: {error!r}"
            if problem:
                problems.append(f"{self.durable_store.backend_name}: {problem}")
            self.metrics.schema_behind.set(1 if self._schema_behind else 0)
        healthy = not problems
        reasons = "; ".join(problems)
        # Logged again when the reason changes: a failover first cuts the connections,
        # then the address may lead to a standby, which only the second reason names.
        if healthy != self._healthy or reasons != self._not_ready_because:
            if healthy:
                log.info("backends reachable: serving")
            else:
                log.warning("backends not ready, health NOT_SERVING: %s", reasons)
            self._healthy = healthy
            self._not_ready_because = reasons
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in _HEALTH_SERVICES:
            await self.health.set(service, status)

    def _warn_if_schema_ahead(self, have: int, need: int) -> None:
        """Say so when a newer memsvc has migrated the database further than this one
        knows (a rollback): served, as migrations keep compatibility with the
        release before them, but nothing checks releases further back."""
        if have > need:
            log.warning(
                "the database's schema is at version %d, ahead of this memsvc's %d: a newer "
                "memsvc migrated it; serving it relies on those migrations keeping "
                "compatibility with this release",
                have,
                need,
            )

    async def _schema_problem(self) -> str:
        """Why the database's schema cannot serve this memsvc ('' once it can):
        behind the migrations it brings, every call would fail."""
        have = await self.durable_store.schema_version()
        need = self.durable_store.bundled_schema_version()
        if have < need:
            self._schema_behind = (
                f"the database's schema is at version {have}, and this memsvc needs {need}: "
                "run `memsvc migrate` first (or serve with migrations on)"
            )
            return self._schema_behind
        self._schema_checked = True
        self._schema_behind = ""
        self._warn_if_schema_ahead(have, need)
        return ""

    async def _sweep_forever(self) -> None:
        # Background jobs (retention, compaction) on the replica holding the lease.
        while True:
            await asyncio.sleep(self.config.retention_interval_seconds)
            await self.sweep_until_caught_up()

    async def sweep_until_caught_up(self) -> tuple[int, int, int]:
        """Run the background jobs, batch after batch while a job still fills its
        batch: each is a short transaction, and a backlog (more expired rows than one
        batch, which a busy project writes in seconds) is cleared in one interval
        instead of growing. Returns what was deleted (nothing on another replica)."""
        totals = (0, 0, 0)
        if self.lifecycle is None:
            return totals
        while True:
            try:
                # One replica at a time holds the lease; it lapses after three
                # missed intervals (a replica that died), and another takes over.
                swept = await self.lifecycle.sweep(
                    SWEEP_BATCH,
                    holder=self.instance_id,
                    lease_ms=int(3 * self.config.retention_interval_seconds * 1000),
                )
            except Exception as error:
                log.warning("retention sweep failed: %s", error)
                return totals
            if swept is None:
                return totals  # another replica runs the background jobs
            totals = (totals[0] + swept[0], totals[1] + swept[1], totals[2] + swept[2])
            if max(swept) < SWEEP_BATCH:
                break
        await self._sweep_graphs()
        if any(totals):
            log.info("retention deleted %d checkpoint(s), %d request id(s), %d event(s)", *totals)
        return totals

    async def _sweep_graphs(self) -> None:
        """Graph-checkpoint retention (TTL, keep_last, ended sessions), on the lease
        holder: batch after batch while one fills and changes something, so a
        backlog (more threads expiring per interval than a batch) is cleared."""
        if self.graphs is None:
            return
        total = GraphSweep()
        # Within one interval: under steady puts, threads keep asking to be pruned,
        # and the other jobs (and this replica's lease) must not wait behind them.
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + self.config.retention_interval_seconds
        while True:
            try:
                graphs = await self.graphs.sweep()
            except Exception as error:
                log.warning("graph checkpoint retention failed: %s", error)
                break
            total = GraphSweep(
                total.threads_expired + graphs.threads_expired,
                total.checkpoints_pruned + graphs.checkpoints_pruned,
                total.threads_ended + graphs.threads_ended,
            )
            progress = (
                graphs.threads_expired
                or graphs.checkpoints_pruned
                or graphs.threads_ended
                or graphs.walked
            )
            if not (graphs.more and progress) or loop.time() >= stop_at:
                break
        if total.threads_expired or total.checkpoints_pruned or total.threads_ended:
            log.info(
                "graph retention: %d thread(s) expired, %d checkpoint(s) pruned, "
                "%d thread(s) of ended sessions",
                total.threads_expired,
                total.checkpoints_pruned,
                total.threads_ended,
            )

    def _load_credentials(self) -> None:
        """Read the tokens and TLS files named by the configuration (ConfigError if unusable)."""
        config = self.config
        try:
            if config.auth_tokens_file:
                self.tokens = TokenFile(
                    config.auth_tokens_file, hold_seconds=config.auth_reload_interval_seconds
                )
            if config.tls_cert_file:
                self.certificates = CertificateFiles(
                    config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file or None
                )
        except CredentialsError as error:
            raise ConfigError(str(error)) from error
        for name, files in (("tokens", self.tokens), ("tls", self.certificates)):
            if files is not None:
                refused = self.metrics.credentials_refused.labels(name)
                refused.set_function(functools.partial(_refused, files))

    def _server_credentials(self) -> grpc.ServerCredentials:
        """TLS for the API, its certificates swapped for new handshakes when they change."""
        assert self.certificates is not None
        current = self.certificates.current

        def fetch() -> Any:
            # gRPC asks before each handshake: hand over new files once, else None.
            new, self._new_certificates = self._new_certificates, None
            return None if new is None else _certificate_configuration(new)

        return grpc.dynamic_ssl_server_credentials(
            _certificate_configuration(current),
            fetch,
            require_client_authentication=current.client_ca is not None,
        )

    async def reload_credentials(self) -> None:
        """Read the tokens and TLS files again if they changed, and put them in force.

        Runs every ``auth_reload_interval_seconds`` and on SIGHUP. A changed file that is
        unreadable or invalid is logged and ignored: the credentials in force stay.
        """
        async with self._reload_lock:  # the poll and SIGHUP may meet
            await self._reload_credentials()

    async def _reload_credentials(self) -> None:
        tokens, certificates = self.tokens, self.certificates
        if tokens is not None:
            table = await asyncio.to_thread(tokens.reload)
            if table is not None:
                tokens.table = table
                if self._auth is not None:
                    ended = self._auth.replace_tokens(table)
                    if ended:
                        log.info("ended %d stream(s) the new tokens no longer admit", ended)
        if certificates is not None:
            new = await asyncio.to_thread(certificates.reload)
            if new is not None:
                self._new_certificates = new

    async def _reload_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.auth_reload_interval_seconds)
            try:
                await self.reload_credentials()
            except Exception as error:  # never let a reload end the loop
                log.warning("checking the credential files failed: %s", error)

    def _security_summary(self) -> str:
        config = self.config
        if self.certificates is None:
            transport = "plaintext"
        elif config.tls_client_ca_file:
            transport = "mutual TLS"
        else:
            transport = "TLS"
        tokens = "bearer tokens" if self.tokens is not None else "no tokens"
        return f"{transport}, {tokens}"

    def _warn_if_open(self) -> None:
        config = self.config
        if listen_is_loopback(config.listen):
            return
        if self.tokens is not None:
            if self.certificates is None:
                log.warning(
                    "the API on %s takes bearer tokens without TLS: anyone who can see its "
                    "traffic can read the tokens (docs/security.md)",
                    config.listen,
                )
            return
        if self.certificates is None:
            log.warning(
                "the API on %s has neither tokens nor TLS (allow_insecure_remote): anyone who "
                "reaches it can read and change every agent's memory",
                config.listen,
            )
        elif not config.tls_client_ca_file:
            log.warning(
                "the API on %s has TLS but neither tokens nor client certificates: anyone who "
                "reaches it can call it",
                config.listen,
            )

    async def _monitor_health(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_seconds)
            await self._check_health()


async def _flush_traces(provider: Any) -> None:
    """Flush the spans still batched, for at most TRACE_FLUSH_SECONDS. The flush is
    synchronous, up to the exporter's own timeout against a collector that never
    answers, so it runs in a thread of its own, the event loop free meanwhile. A
    collector that is down is no hang of memsvc's (no task stacks): it costs the
    last spans, said once, and not the exporter's ten seconds more of shutdown. (A
    flush that fails is logged by _in_daemon_thread.)"""
    flushing = asyncio.ensure_future(_in_daemon_thread(provider.shutdown))
    done, _ = await asyncio.wait({flushing}, timeout=TRACE_FLUSH_SECONDS)
    if not done:
        flushing.cancel()
        log.warning(
            "shutdown: the trace collector took no spans within %.0fs; the last spans are dropped",
            TRACE_FLUSH_SECONDS,
        )


async def _bounded(step: str, work: Awaitable[object], seconds: float) -> None:
    """Await one shutdown step for at most ``seconds``; log, never raise, if it fails.

    An overrun is logged with the stack of every task still running, so the
    step that hung can be found from the log alone.
    """
    waiter = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({waiter}, timeout=seconds)
    if not done:
        waiter.cancel()
        others = asyncio.all_tasks() - {asyncio.current_task()}
        log.error(
            "shutdown: %s took over %.1fs, skipped; tasks:\n%s", step, seconds, task_stacks(others)
        )
        return
    if not waiter.cancelled() and waiter.exception() is not None:
        error = waiter.exception()
        if not isinstance(error, asyncio.CancelledError):
            log.warning("shutdown: %s failed: %r", step, error)


async def _cancelled_tasks_end(tasks: list[asyncio.Task[None]]) -> None:
    """Wait up to BACKGROUND_STOP_SECONDS for cancelled ``tasks`` to end. One still
    running then (a transaction's rollback on a connection that stopped answering)
    is cancelled once more and left behind, its stack logged."""
    if not tasks:
        return
    done, running = await asyncio.wait(tasks, timeout=BACKGROUND_STOP_SECONDS)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.warning("shutdown: %s had failed: %r", task.get_name(), task.exception())
    if running:
        for task in running:
            task.cancel()
        log.error(
            "shutdown: background task(s) still running after %.1fs, left behind:\n%s",
            BACKGROUND_STOP_SECONDS,
            task_stacks(running),
        )


def task_stacks(tasks: Iterable[asyncio.Task[Any]]) -> str:
    """Where each task is waiting, innermost frame last, for a log line."""
    lines = []
    for task in tasks:
        lines.append(f"  task {task.get_name()}:")
        # Task.print_stack() chokes on Cython frames (grpc's), whose line is None.
        for frame in task.get_stack(limit=8):
            code = frame.f_code
            lines.append(f"    {code.co_filename}:{frame.f_lineno or '?'} in {code.co_name}")
    return "\n".join(lines)


async def _in_daemon_thread(function: Callable[[], object]) -> None:
    """Run ``function`` in a daemon thread and wait for it: one that outlives its
    bound does not hold the process's exit, as an executor thread would."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        if not finished.done():
            finished.set_result(None)

    def run() -> None:
        try:
            function()
        except Exception:
            log.exception("%s failed", getattr(function, "__qualname__", function))
        finally:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(done)

    threading.Thread(target=run, name="memsvc-shutdown-step", daemon=True).start()
    await finished


def _check_socket_path(path: Path) -> None:
    """The Unix socket's path fits in an address, its directory exists, memsvc may
    create the socket in it, and no other kind of file is in the way: found before
    the stores open and migrate, not as gRPC's bare bind failure."""
    length = len(os.fsencode(path))
    if length > UNIX_SOCKET_PATH_BYTES:
        # A setting no retry or restart can fix: a configuration error (exit 2).
        raise ConfigError(
            f"unix_socket: {path} is {length} bytes long; a Unix socket's path may have at "
            f"most {UNIX_SOCKET_PATH_BYTES} (the address's sun_path): choose a shorter one"
        )
    _is_a_socket(path)
    directory = path.parent
    if not directory.is_dir():
        raise StartupError(
            f"cannot listen on unix:{path}: {directory} is not a directory (a missing "
            "volume mount, or a typo in unix_socket?)"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StartupError(
            f"cannot listen on unix:{path}: memsvc's user may not create files in {directory}"
        )


def _is_a_socket(path: Path) -> bool:
    """Whether a socket is at ``path`` (False: nothing); StartupError for anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket; choose another unix_socket")
    return True


def _remove_stale_socket(path: Path) -> None:
    """Remove a Unix socket left by a previous run; refuse to remove anything else,
    or a socket another process still serves on (its clients would lose it)."""
    if not _is_a_socket(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: left by a run that ended
        except OSError as error:  # not ours to connect to, or a listener too busy
            raise StartupError(
                f"cannot tell whether another process serves on {path} ({error}); "
                "remove it or choose another unix_socket"
            ) from error
        else:
            raise StartupError(
                f"another process serves on {path}; stop it or choose another unix_socket"
            )
    path.unlink(missing_ok=True)


def _certificate_configuration(certificates: Certificates) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(certificates.key, certificates.cert)], root_certificates=certificates.client_ca
    )


def _socket_group(group: str) -> int | None:
    """The gid ``unix_socket_group`` names (a name or a number), None when unset."""
    if not group:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"unix_socket_group: no group named {group!r}") from None


def _give_socket_to(path: str, gid: int) -> None:
    try:
        os.chown(path, -1, gid, follow_symlinks=False)
    except PermissionError:
        raise ConfigError(
            f"unix_socket_group: cannot give the socket to group {gid}: memsvc's user must "
            "be a member of it"
        ) from None


def _refused(files: TokenFile | CertificateFiles) -> float:
    """1.0 while ``files`` were changed into ones that are refused, else 0.0."""
    return float(files.refused)


def settle_heap() -> None:
    """Take what start-up built out of the cyclic garbage collector's way.

    Modules, protobuf descriptors, stores and servicers live as long as the
    process, yet every full collection walked them: about 65,000 objects, and
    with 1,000 watchers full collections of 37-56 ms (up to 80 ms) that stalled
    the event loop and every stream with it. Frozen, a full collection walks only
    what came later (1.7-12 ms in the same benchmark, docs/performance.md).
    """
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def _binding(what: str, address: str) -> Iterator[None]:
    """Binding ``address`` for ``what``: a failure says which address and why."""
    try:
        _bind_once(address)
        yield
    except (OSError, RuntimeError) as error:  # grpc raises RuntimeError, errno unknown
        errno_of = error.errno if isinstance(error, OSError) else None
        hint = {
            errno.EADDRINUSE: " (is another process using it?)",
            errno.EADDRNOTAVAIL: " (is the host an address of this machine?)",
            None: " (is another process using it, and is the host an address of this machine?)",
        }.get(errno_of, "")
        raise StartupError(f"cannot listen on {address} for {what}: {error}{hint}") from error


def _bind_once(address: str) -> None:
    """Bind a TCP ``host:port`` once with a plain socket and let it go, so that a
    port in use is found (OSError) before gRPC tries it: gRPC's C core would also
    write a line of its own to stderr, not JSON, into the JSON log. Port 0, Unix
    sockets and what does not parse or resolve here are left to gRPC, which binds
    as this does (SO_REUSEADDR, no SO_REUSEPORT) and reports what this let through."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or int(port) == 0 or host.startswith("unix"):
        return
    try:
        found = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        return
    family, kind, protocol, _, where = found[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(where)


async def serve(config: Config) -> None:
    """Run a server until SIGTERM or SIGINT, then shut it down gracefully.

    SIGHUP re-reads the tokens and TLS files at once.
    """
    server = Server(config)
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(server.reload_credentials())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # Before start: a signal sent once the port answers must be handled, not end the
    # process with the default action (a SIGTERM then stops it gracefully).
    loop.add_signal_handler(signal.SIGHUP, reload)
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    # A signal during start-up (which retries an unreachable backend for a while)
    # cancels it: start() closes what it opened.
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop_requested.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        log.info("stopped during start-up")
        return
    stopping.cancel()
    try:
        starting.result()
    except ConfigError as error:
        # A tokens or TLS file that cannot be used is a configuration error (exit 2).
        print(f"memsvc: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    settle_heap()
    await stop_requested.wait()
    await server.stop()
