"""Container health check for the memsvc image: one grpc.health.v1 Check, exit 0 or 1.

Usage: ``python healthcheck.py [SERVICE [HOST:PORT]]``.

Without an address it asks the probe port that memsvc serves (``MEMSVC_HEALTH_LISTEN``,
default ``127.0.0.1:8081``; the image sets ``0.0.0.0:8081``), or, when that is switched
off (empty), the API (``MEMSVC_LISTEN``, default ``127.0.0.1:50051``), which serves the
same services, in plaintext: with TLS on (``MEMSVC_TLS_CERT_FILE``) it fails, saying to
turn the probe port on.
A wildcard host (``0.0.0.0``, ``::``) is asked on loopback. The service defaults to
``liveness`` (the process is up); ``readiness`` also needs the backends.

Exit status: 0 SERVING; 1 anything else (NOT_SERVING, unknown service, no answer).
The Dockerfile's HEALTHCHECK runs it; Kubernetes uses its own gRPC probes instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

DEFAULT_HEALTH_LISTEN = "127.0.0.1:8081"
DEFAULT_LISTEN = "127.0.0.1:50051"
TIMEOUT_SECONDS = 3.0
_WILDCARDS = {"", "0.0.0.0", "::", "[::]", "*"}


def _local(listen: str) -> str:
    """The address a local client dials for a ``host:port`` a server listens on."""
    host, _, port = listen.rpartition(":")
    if host in _WILDCARDS:
        host = "127.0.0.1"
    return f"{host}:{port}"


def target(service: str, env: Mapping[str, str]) -> tuple[str, str]:
    """The address and service name to check, from memsvc's own settings."""
    health_listen = env.get("MEMSVC_HEALTH_LISTEN", DEFAULT_HEALTH_LISTEN)
    if health_listen:
        return _local(health_listen), service
    # No probe port: the API serves the same health services (liveness, readiness).
    return _local(env.get("MEMSVC_LISTEN", DEFAULT_LISTEN)), service


def check(address: str, service: str, timeout: float = TIMEOUT_SECONDS) -> bool:
    """True when ``address`` answers SERVING for ``service``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            print(f"health check of {service!r} at {address} failed: {error.code()}")
            return False
    serving: bool = response.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        print(f"health check of {service!r} at {address}: {name}")
    return serving


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    service = argv[0] if argv else "liveness"
    if len(argv) > 1:
        address = argv[1]
    else:
        if env.get("MEMSVC_HEALTH_LISTEN", DEFAULT_HEALTH_LISTEN) == "" and env.get(
            "MEMSVC_TLS_CERT_FILE"
        ):
            # The API speaks TLS (mutual, maybe) and this check has no credentials: it
            # would report the container unhealthy for ever without saying why.
            print(
                "health check: the probe port is off (MEMSVC_HEALTH_LISTEN is empty) and "
                "the API needs TLS: turn the probe port on for the container's health check"
            )
            return 1
        address, service = target(service, env)
    return 0 if check(address, service) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
