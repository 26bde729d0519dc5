"""Prometheus metrics of one memsvc process, served on their own port.

Each :class:`Server` owns a :class:`Metrics` with its own registry (several
servers may share a test process). Names follow the usual gRPC conventions
(``grpc_server_*``, as go-grpc-prometheus and the Java and Python exporters
use them) so existing dashboards work; memsvc's own metrics start ``memsvc_``.
"""

from __future__ import annotations

import threading
import time
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from memsvc.store._observe import BackendObserver

# From 0.5 ms: a cached working-memory Get takes about that long.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Metrics:
    """The metrics of one process; ``start``/``stop`` the HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds...: the
        # figures deployment.md sizes a sidecar by.
        ProcessCollector(registry=self.registry)
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self.rpc_started = Counter(
            "grpc_server_started", "RPCs started.", labels, registry=self.registry
        )
        self.rpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed, by status code.",
            (*labels, "grpc_code"),
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time to complete a unary RPC.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.backend_seconds = Histogram(
            "memsvc_backend_operation_seconds",
            "Time of one backend operation (retries included).",
            ("backend", "operation"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.backend_errors = Counter(
            "memsvc_backend_errors",
            "Backend operations that failed, by error type.",
            ("backend", "operation", "error"),
            registry=self.registry,
        )
        self.backend_up = Gauge(
            "memsvc_backend_up",
            "1 while the backend answers the health probe, else 0.",
            ("backend",),
            registry=self.registry,
        )
        self.schema_behind = Gauge(
            "memsvc_schema_behind",
            "1 while the database's schema is behind this memsvc's migrations (readiness"
            " is NOT_SERVING until `memsvc migrate` runs), else 0.",
            registry=self.registry,
        )
        self.watchers = Gauge(
            "memsvc_watchers", "Open WatchLifecycle streams.", registry=self.registry
        )
        self.event_delay = Histogram(
            "memsvc_watch_event_delay_seconds",
            "From an event's commit to its hand-over to this process's watchers.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.lagging_watchers = Counter(
            "memsvc_watch_lagging",
            "Times a watcher fell behind and went back to reading the log itself.",
            registry=self.registry,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self.port: int | None = None

    def start(self, listen: str) -> None:
        """Serve ``/metrics`` over HTTP on ``host:port`` (port 0: a free one)."""
        host, _, port = listen.rpartition(":")
        self._http = start_http_server(int(port), host.strip("[]"), self.registry)
        self.port = self._http[0].server_port

    def stop(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None

    def backend_observer(self, backend: str) -> BackendObserver:
        """The callback a store reports each operation to."""

        def observe(operation: str, seconds: float, error: BaseException | None) -> None:
            self.backend_seconds.labels(backend, operation).observe(seconds)
            if error is not None:
                self.backend_errors.labels(backend, operation, type(error).__name__).inc()

        return observe

    def event_offered(self, event_time_ms: int) -> None:
        self.event_delay.observe(max(0.0, time.time() - event_time_ms / 1000))
