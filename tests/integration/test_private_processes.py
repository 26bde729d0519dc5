"""The private Redis servers of the fault and cluster tests start even when the port
free_port() found is taken before they bind it; and free_port() chooses ports
that outgoing connections never get.

Another test's outgoing connection can get that port as its ephemeral port in
the moment between the choice and the bind; the server then exits at once. A
fresh-clone CI run once waited 30 s for such a node and failed the cluster
migration test. These tests take the port first, with a socket bound but not
listening (so a connection to it is refused, as to a server not yet up).
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from memsvc.testing import PrivateRedis, PrivateRedisCluster, _cluster, _processes, free_port
from tests.conftest import IN_CI

if shutil.which("redis-server") is None:
    if IN_CI:
        raise RuntimeError("CI=true and redis-server is not installed")
    pytest.skip("redis-server is not installed", allow_module_level=True)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port held by a socket that is bound, not listening: a server cannot bind it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


def answers(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=5) as client:
        return bool(client.ping())


def test_a_private_redis_whose_port_is_taken_starts_on_another(
    tmp_path: Path, taken_port: int
) -> None:
    server = PrivateRedis(taken_port, tmp_path)
    server.start()
    try:
        assert server.port != taken_port
        assert answers(server.port)
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.kill()


def test_a_private_redis_handed_the_port_of_another_starts_on_its_own(tmp_path: Path) -> None:
    """Two servers handed one port: the second cannot bind it, and waiting for the
    port would find the first listening. Found by a review."""
    first = PrivateRedis(free_port(), tmp_path / "first")
    first.start()
    try:
        second = PrivateRedis(first.port, tmp_path / "second")
        second.start()
        try:
            assert second.port != first.port
            with redis.Redis(port=second.port, socket_timeout=5) as client:
                pid = int(client.info("server")["process_id"])
            assert second._process is not None and pid == second._process.pid
        finally:
            second.kill()
    finally:
        first.kill()


def test_a_private_redis_that_never_binds_fails_at_once_with_its_log(
    tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_processes, "free_port", lambda: taken_port)
    server = PrivateRedis(taken_port, tmp_path)
    # Not a TimeoutError: each attempt ends when the server exits.
    with pytest.raises(_processes.ExitedBeforeListening, match=r"(?i)address already in use"):
        server.start()


def test_a_cluster_node_whose_port_is_taken_starts_on_another(
    tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed_out: list[int] = []

    def taken_first() -> int:
        port = taken_port if not handed_out else free_port()
        handed_out.append(port)
        return port

    monkeypatch.setattr(_cluster, "free_port", taken_first)
    with PrivateRedisCluster(tmp_path) as cluster:
        assert handed_out[0] == taken_port
        assert taken_port not in cluster.ports
        assert len(cluster.ports) == 3
        assert all(answers(port) for port in cluster.ports)


def test_free_ports_lie_below_the_ephemeral_range_that_connections_draw_from() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports), ports
    assert len(ports) > 1  # chosen at random, not the same port each time
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
