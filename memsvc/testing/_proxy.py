"""A TCP proxy between memsvc and a backend, for tests that break the network.

:class:`TcpProxy` listens on 127.0.0.1 and forwards every connection to an
upstream port. It runs its own event loop in a daemon thread, so it keeps
forwarding whatever the test's own loop is doing, and memsvc can run in another
process. The test switches it, at any moment, between:

- :meth:`restore`: plain forwarding (the initial mode);
- :meth:`delay`: every chunk arrives ``seconds`` late, in both directions;
- :meth:`blackhole`: connections (open and new) are accepted but nothing is
  forwarded; bytes are read and dropped, as a network that loses every packet.
  Their byte streams now have holes, so :meth:`restore` resets them;
- :meth:`hold`: the open connections stop forwarding but keep their bytes (a
  partition TCP will retransmit through); new connections pass. :meth:`release`
  (or :meth:`restore`) delivers what was held, late;
- :meth:`reset`: every open connection is closed with a TCP RST, now;
- :meth:`refuse`: the port stops listening, so connecting is refused
  (:meth:`restore` listens again on the same port);
- :meth:`lose_reply_after`: the next time the client sends bytes containing a
  pattern (say ``b"COMMIT"``), they reach the server, but the server's answer is
  dropped and the connection reset: the request took effect, its reply is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from dataclasses import dataclass, field

from memsvc.testing._loop_thread import LoopThread

log = logging.getLogger(__name__)

_CHUNK = 65536


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    # Set while this connection forwards; cleared while it is held.
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    # Bytes are dropped from the moment the connection is blackholed.
    dropping: bool = False
    # The client sent the armed pattern: drop the server's next answer, then reset.
    losing_reply: bool = False
    # The client sent bytes the server has not answered yet (a request in flight).
    awaiting_reply: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class TcpProxy(LoopThread):
    """``with TcpProxy(upstream_port) as proxy``: connect to ``proxy.port`` instead."""

    def __init__(
        self, upstream_port: int, *, upstream_host: str = "127.0.0.1", port: int = 0
    ) -> None:
        super().__init__(f"tcp-proxy-{upstream_port}")
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self.mode = "pass"
        self.latency = 0.0
        # Counters, for tests to check that a fault really hit something.
        self.accepted = 0
        self.resets = 0
        self.replies_lost = 0
        self._lose_after: bytes | None = None
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    # Control (from any thread) ------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return len(self._links)

    def restore(self) -> None:
        """Forward everything again, at once: listen if refused, no latency, held
        bytes delivered, blackholed connections reset (their streams have holes)."""
        self._call(self._restore())

    def delay(self, seconds: float) -> None:
        """Deliver every chunk ``seconds`` after it was read, both ways."""
        self._call(self._set(mode="delay", latency=seconds))

    def blackhole(self) -> None:
        """Accept and swallow: nothing is forwarded, bytes are dropped."""
        self._call(self._set(mode="blackhole"))

    def hold(self) -> None:
        """Stop forwarding on the open connections, keeping their bytes; new ones pass."""
        self._call(self._hold())

    def release(self) -> None:
        """Deliver what :meth:`hold` kept, and forward on those connections again."""
        self._call(self._release())

    def reset(self, idle_only: bool = False) -> int:
        """Close every open connection with a TCP RST; return how many there were.

        ``idle_only``: only connections with no request in flight (the server has
        answered everything the client sent), so no request's outcome is unknown.
        """
        return self._call(self._reset_all(idle_only))

    def lose_reply_after(self, pattern: bytes) -> None:
        """Arm a one-shot fault: the next client bytes containing ``pattern`` are
        delivered, the server's answer to them is dropped and the connection reset."""
        self._call(self._arm(pattern))

    def refuse(self) -> None:
        """Stop listening: new connections are refused (open ones are left alone)."""
        self._call(self._unlisten())

    # On the proxy's loop ------------------------------------------------------

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _set(self, *, mode: str, latency: float = 0.0) -> None:
        self.mode, self.latency = mode, latency
        if mode == "blackhole":
            for link in self._links:
                link.dropping = True

    async def _arm(self, pattern: bytes) -> None:
        self._lose_after = pattern

    async def _hold(self) -> None:
        for link in self._links:
            link.flowing.clear()

    async def _release(self) -> None:
        for link in self._links:
            link.flowing.set()

    async def _restore(self) -> None:
        self.mode, self.latency = "pass", 0.0
        for link in [link for link in self._links if link.dropping]:
            self._abort(link)
        await self._release()
        await self._listen()

    async def _reset_all(self, idle_only: bool = False) -> int:
        links = [link for link in self._links if not (idle_only and link.awaiting_reply)]
        for link in links:
            self._abort(link)
        return len(links)

    async def _shutdown(self) -> None:
        await self._unlisten()
        await self._reset_all()

    def _abort(self, link: _Link) -> None:
        """Close both sides with RST (SO_LINGER 0), and forget the link."""
        self.resets += 1
        for writer in (link.client, link.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()
        self._links.discard(link)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(client=writer, dropping=self.mode == "blackhole")
        link.flowing.set()
        self._links.add(link)
        task = asyncio.current_task()
        assert task is not None
        link.tasks.add(task)
        try:
            if link.dropping:
                # A blackholed connection never reaches upstream: swallow its bytes.
                while link in self._links and await reader.read(_CHUNK):
                    pass
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                # Upstream refuses: so does the proxy (an RST to the client).
                self._abort(link)
                return
            link.upstream = up_writer
            if link not in self._links:  # reset or blackholed meanwhile
                self._abort(link)
                return
            pumps = [
                asyncio.create_task(self._pump(link, reader, up_writer, upstream_bound=True)),
                asyncio.create_task(self._pump(link, up_reader, writer, upstream_bound=False)),
            ]
            link.tasks.update(pumps)
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in done:
                if not pump.cancelled() and pump.exception() is not None:
                    log.debug("proxy connection ended: %r", pump.exception())
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        finally:
            if link in self._links:
                self._links.discard(link)
                for other in (link.client, link.upstream):
                    if other is not None:
                        other.close()
                for other_task in link.tasks:
                    if other_task is not task:
                        other_task.cancel()

    async def _pump(
        self,
        link: _Link,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        upstream_bound: bool,
    ) -> None:
        """Copy ``source`` to ``sink`` as the mode says, until either side ends."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=64)

        async def read() -> None:
            while True:
                await link.flowing.wait()  # held: leave the bytes in the kernel
                data = await source.read(_CHUNK)
                if link.dropping:
                    if not data:
                        return
                    continue  # blackholed: swallowed
                await queue.put((loop.time() + self.latency, data))
                if not data:
                    return

        async def write() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await link.flowing.wait()
                if link.dropping:
                    continue
                if not data:
                    return
                if not upstream_bound and link.losing_reply:
                    # The answer to the armed request: lost, with the connection.
                    self.replies_lost += 1
                    self._abort(link)
                    return
                if upstream_bound and self._lose_after and self._lose_after in data:
                    self._lose_after = None
                    link.losing_reply = True
                link.awaiting_reply = upstream_bound
                sink.write(data)
                await sink.drain()

        tasks = [asyncio.create_task(read()), asyncio.create_task(write())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                # A reset connection ends the pump like EOF does.
                if not task.cancelled() and isinstance(task.exception(), OSError | EOFError):
                    return
                # A reader that stopped at EOF hands over to the writer to flush.
                if task is tasks[0] and task.exception() is None and not link.dropping:
                    with contextlib.suppress(OSError, EOFError):
                        await tasks[1]
        finally:
            for task in tasks:
                task.cancel()
