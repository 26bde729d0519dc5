"""A private Redis Cluster for tests: masters on free local ports, and slot migration."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from memsvc.testing._backends import free_port
from memsvc.testing._processes import launch_redis


async def _command(client: aioredis.Redis, *args: Any) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed")
    return path


class PrivateRedisCluster:
    """``masters`` redis-server processes in cluster mode, joined by ``redis-cli --cluster create``.

    No replicas and nothing kept on disk. Every wait is bounded; ``stop`` kills
    the servers. Use as a context manager, or call ``start`` and ``stop``.
    """

    def __init__(self, workdir: Path, masters: int = 3, node_timeout_ms: int = 5000) -> None:
        self.workdir = workdir
        self.masters = masters
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The memsvc working-memory URL: every master as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def __enter__(self) -> PrivateRedisCluster:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        cli = _binary("redis-cli")  # redis-server: launch_redis looks for it
        deadline = time.monotonic() + timeout
        try:
            for index in range(self.masters):
                self._start_node(self.workdir / f"node-{index}", deadline)
            subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=max(1.0, deadline - time.monotonic()),
            )  # fmt: skip
            self._wait_until_settled(deadline)
        except BaseException:
            self.stop()
            raise

    def _start_node(self, workdir: Path, deadline: float) -> None:
        """One master, listening; on fresh ports again if the first ones were taken."""
        workdir.mkdir(parents=True, exist_ok=True)

        def arguments(port: int) -> list[str]:
            # The bus port is chosen too (cluster-port, Redis 7): port + 10000,
            # the default, may be taken or out of range.
            bus_port = free_port()
            while bus_port == port:
                bus_port = free_port()
            (workdir / "nodes.conf").unlink(missing_ok=True)  # a failed start's node id
            return ["--cluster-port", str(bus_port), "--cluster-enabled", "yes",
                    "--cluster-config-file", str(workdir / "nodes.conf"),
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    "--save", "", "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip

        process, port = launch_redis(
            arguments,
            free_port(),
            workdir / "redis.log",
            timeout=max(1.0, deadline - time.monotonic()),
            next_port=free_port,  # this module's: tests replace it
        )
        self._processes.append(process)
        self.ports.append(port)

    def stop(self) -> None:
        """Kill every server (nothing is kept, so nothing needs a clean shutdown)."""
        for process in self._processes:
            process.kill()
        for process in self._processes:
            process.wait(timeout=10)
        self._processes.clear()

    def node_id(self, port: int) -> str:
        with redis.Redis(port=port, socket_timeout=5) as client:
            return str(client.execute_command("CLUSTER MYID").decode())

    def owner_of(self, slot: int, port: int | None = None) -> int:
        """The port of the master that owns ``slot``, as the node at ``port`` sees it."""
        with redis.Redis(port=port or self.ports[0], socket_timeout=5) as client:
            for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise LookupError(f"slot {slot} has no owner")

    def owner_of_key(self, key: str) -> int:
        return self.owner_of(key_slot(key.encode()))

    def keys_in_slot(self, slot: int, port: int) -> int:
        """How many keys of ``slot`` the node at ``port`` holds."""
        with redis.Redis(port=port, socket_timeout=5) as client:
            return int(client.execute_command("CLUSTER COUNTKEYSINSLOT", slot))

    def flush(self) -> None:
        """Delete every key on every master."""
        for port in self.ports:
            with redis.Redis(port=port, socket_timeout=5) as client:
                client.flushall()

    def _wait_until_settled(self, deadline: float) -> None:
        """Until every node says cluster_state:ok and all agree on the slot map."""
        while True:
            views = []
            try:
                for port in self.ports:
                    with redis.Redis(port=port, socket_timeout=2) as client:
                        info: dict[str, Any] = client.execute_command("CLUSTER INFO")
                        slots = sorted(
                            (int(s), int(e), int(m[1]))
                            for s, e, m, *_ in client.execute_command("CLUSTER SLOTS")
                        )
                        views.append((info.get("cluster_state") == "ok", tuple(slots)))
                if all(ok for ok, _ in views) and len({slots for _, slots in views}) == 1:
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis Cluster on {self.ports} did not settle: {views}")
            time.sleep(0.05)

    async def migrate_slot(
        self,
        slot: int,
        to_port: int,
        *,
        batch: int = 10,
        pause_seconds: float = 0.0,
        on_step: Callable[[int], Awaitable[Any]] | None = None,
        timeout_seconds: float = 30.0,
    ) -> None:
        """Move ``slot`` to the master at ``to_port`` as ``redis-cli --cluster reshard``
        does, without blocking the event loop.

        IMPORTING on the target, MIGRATING on the owner, MIGRATE of the slot's keys
        ``batch`` at a time, then ``SETSLOT NODE`` on the target, the owner and the
        other masters; returns when every master sees the new owner.
        ``pause_seconds`` is slept after the slot opens and after each batch (it
        widens the window in which clients meet the migration), and ``on_step(n)``
        is awaited at the same moments, ``n`` being the batches moved so far. If
        ``on_step`` raises, the migration still completes (without further pauses
        or steps), so the cluster is left settled, and then the error is raised.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds

        def check_deadline(what: str) -> None:
            if loop.time() > deadline:
                raise TimeoutError(f"{what} (slot {slot}) took more than {timeout_seconds}s")

        from_port = await asyncio.to_thread(self.owner_of, slot)
        if from_port == to_port:
            raise ValueError(f"slot {slot} is already on 127.0.0.1:{to_port}")
        clients = {port: aioredis.Redis(port=port, socket_timeout=10) for port in self.ports}
        try:
            source, target = clients[from_port], clients[to_port]
            source_id = (await _command(source, "CLUSTER MYID")).decode()
            target_id = (await _command(target, "CLUSTER MYID")).decode()
            await _command(target, "CLUSTER SETSLOT", slot, "IMPORTING", source_id)
            await _command(source, "CLUSTER SETSLOT", slot, "MIGRATING", target_id)
            moved = 0
            step_error: BaseException | None = None
            while True:
                if step_error is None:
                    await asyncio.sleep(pause_seconds)
                    if on_step is not None:
                        try:
                            await on_step(moved)
                        except Exception as error:
                            step_error = error
                keys = await _command(source, "CLUSTER GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                await _command(
                    source, "MIGRATE", "127.0.0.1", to_port, "", 0, 10_000, "KEYS", *keys
                )
                moved += 1
                check_deadline("moving the keys")
            # The target first: from then on the owner's ASK redirects are served.
            await _command(target, "CLUSTER SETSLOT", slot, "NODE", target_id)
            await _command(source, "CLUSTER SETSLOT", slot, "NODE", target_id)
            for port, client in clients.items():
                if port not in (from_port, to_port):
                    await _command(client, "CLUSTER SETSLOT", slot, "NODE", target_id)
            for port in clients:
                while await asyncio.to_thread(self.owner_of, slot, port) != to_port:
                    check_deadline("agreeing on the new owner")
                    await asyncio.sleep(0.05)
            if step_error is not None:
                raise step_error
        finally:
            for client in clients.values():
                await client.aclose()
