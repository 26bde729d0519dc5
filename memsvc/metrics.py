"""Prometheus metrics of one memsvc process, served on their own port.

Each :class:`Server` owns a :class:`Metrics` with its own registry (several
servers may share a test process). Names follow the usual gRPC conventions
(``grpc_server_*``, as go-grpc-prometheus and the Java and Python exporters
use them) so existing dashboards work; memsvc's own metrics start ``memsvc_``.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    make_wsgi_app,
)

from memsvc.domain import BackendUnavailable
from memsvc.store._observe import BackendObserver

# From 0.5 ms: a cached working-memory Get takes about that long.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


# Each connection to the metrics port has a thread of its own until it closes
# (prometheus_client's own server waits on an idle one for good: a few thousand
# left open made as many threads). A connection whose request has not arrived
# whole within SCRAPE_IDLE_SECONDS is closed, and past MAX_SCRAPES at once more
# are refused (a scraper tries again at its next interval).
SCRAPE_IDLE_SECONDS = 10.0
MAX_SCRAPES = 16


class _ScrapeHandler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(SCRAPE_IDLE_SECONDS)
        # The socket's timeout bounds each read only: a request sent a header every
        # few seconds held its slot for good, and 16 of them shut the port. The
        # whole request head must arrive in time.
        self._head_due = threading.Timer(SCRAPE_IDLE_SECONDS, self._cut_off)
        self._head_due.daemon = True
        self._head_due.start()

    def _cut_off(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        self._head_due.cancel()
        return parsed

    def finish(self) -> None:
        self._head_due.cancel()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class _MetricsServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _serve_metrics(
    host: str, port: int, registry: CollectorRegistry
) -> tuple[WSGIServer, threading.Thread]:
    """An HTTP server of ``registry`` on a thread of its own."""
    family, _, _, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server_class = type("_Server", (_MetricsServer,), {"address_family": family})
    server: WSGIServer = make_server(
        str(address[0]), port, make_wsgi_app(registry), server_class, handler_class=_ScrapeHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="memsvc-metrics", daemon=True)
    thread.start()
    return server, thread


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
        self.credentials_refused = Gauge(
            "memsvc_credentials_file_refused",
            "1 while the tokens file (file=tokens) or the TLS files (file=tls) were changed"
            " into ones memsvc refuses (the log says why): the last good ones stay in"
            " force, and what the change holds, a revocation too, is not.",
            ("file",),
            registry=self.registry,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self.port: int | None = None

    def start(self, listen: str) -> None:
        """Serve ``/metrics`` over HTTP on ``host:port`` (port 0: a free one)."""
        host, _, port = listen.rpartition(":")
        self._http = _serve_metrics(host.strip("[]"), int(port), self.registry)
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
                # The driver's class, not the retries' wrapper: ConnectionError,
                # PoolTimeout, OperationTimedOut... on every backend alike.
                cause = error.__cause__ if isinstance(error, BackendUnavailable) else None
                kind = type(cause or error).__name__
                self.backend_errors.labels(backend, operation, kind).inc()

        return observe

    def event_offered(self, event_time_ms: int) -> None:
        self.event_delay.observe(max(0.0, time.time() - event_time_ms / 1000))
