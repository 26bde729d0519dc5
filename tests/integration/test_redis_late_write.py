"""A write memsvc gave up on never runs late.

memsvc gives up on a Redis command after ``socket_timeout`` and runs it again on a
new connection. If the network held the first copy back (a partition), TCP would
deliver it once the network heals, after the retry and after the client's next
write, which it would then silently undo. The connection memsvc gives up on is
closed with a reset, so the kernel drops its unsent bytes.

The proxy here holds what memsvc sends on a connection, as a partition does, and
then plays the network: bytes a partition held are still in the sender's kernel,
so they arrive late if the sender closed gracefully (FIN), and never if it reset
the connection (RST), which drops them. (It reads the held bytes only after memsvc
has closed; whether that close was a reset is what the test checks.)
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from memsvc.domain import EntryWrite, SessionRef
from memsvc.store.redis import RedisWorkingMemoryStore
from tests.conftest import REDIS_URL, track_project


class _Link:
    """One proxied connection; its client-to-Redis direction can be held."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.flowing = threading.Event()
        self.flowing.set()
        self.forwarded_after_release = 0
        self.released = False
        self.threads: list[threading.Thread] = []


class HoldingProxy:
    """Forwards 127.0.0.1:port to Redis; hold() stops reading from the connections
    open at that moment (their bytes stay in the kernel), release() reads again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._links: list[_Link] = []
        self._held: list[_Link] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            link = _Link(client, socket.create_connection(self._upstream))
            self._links.append(link)
            for source, sink, gated in (
                (client, link.upstream, True),
                (link.upstream, client, False),
            ):
                thread = threading.Thread(
                    target=self._pump, args=(link, source, sink, gated), daemon=True
                )
                link.threads.append(thread)
                thread.start()

    def _pump(self, link: _Link, source: socket.socket, sink: socket.socket, gated: bool) -> None:
        try:
            while not self._closed:
                if gated and not link.flowing.wait(0.05):
                    continue  # held
                if gated and link.released:
                    self._deliver_late(link, source, sink)
                    return
                readable, _, _ = select.select([source], [], [], 0.05)
                if not readable or (gated and not link.flowing.is_set()):
                    continue
                data = source.recv(65536)
                if not data:
                    return
                sink.sendall(data)
        except OSError:
            return
        finally:
            for end in (source, sink):
                end.close()

    @staticmethod
    def _deliver_late(link: _Link, source: socket.socket, sink: socket.socket) -> None:
        """The held bytes, as the network delivers them once it heals: all of them
        if the client closed gracefully, none if it reset the connection."""
        held = b""
        while True:
            try:
                data = source.recv(65536)
            except ConnectionResetError:
                return  # reset: the sender's kernel dropped them
            if not data:
                break
            held += data
        link.forwarded_after_release = len(held)
        sink.sendall(held)
        sink.recv(65536)  # Redis ran it (its answer goes nowhere)

    def hold(self) -> None:
        self._held = [link for link in self._links if link.flowing.is_set()]
        for link in self._held:
            link.flowing.clear()

    def release(self) -> int:
        """Let the held connections go on; the bytes they forwarded then, once they
        ended (a held connection whose client gave up ends)."""
        for link in self._held:
            link.released = True
            link.flowing.set()
        for link in self._held:
            for thread in link.threads:
                thread.join(10)
        return sum(link.forwarded_after_release for link in self._held)

    def close(self) -> None:
        self._closed = True
        self._listener.close()


@pytest.fixture
async def proxied_store() -> AsyncIterator[tuple[RedisWorkingMemoryStore, HoldingProxy]]:
    target = urlsplit(REDIS_URL)
    proxy = HoldingProxy((target.hostname or "127.0.0.1", target.port or 6379))
    store = RedisWorkingMemoryStore(
        f"redis://127.0.0.1:{proxy.port}{target.path or '/0'}",
        max_session_keys=100,
        max_session_bytes=100_000,
        max_connections=1,  # one connection, held: the retry opens another
        socket_timeout_seconds=0.5,
    )
    await store.open()
    try:
        yield store, proxy
    finally:
        await store.aclose()
        proxy.close()


async def test_a_write_given_up_on_does_not_undo_a_later_one(
    proxied_store: tuple[RedisWorkingMemoryStore, HoldingProxy],
):
    store, proxy = proxied_store
    session = SessionRef(track_project(str(uuid.uuid4())), str(uuid.uuid4()), "late-write")
    await store.begin_spawn(session, "op-spawn", "epoch-1", [])
    await store.finish(session, "op-spawn", "active", swap=False, clear=False)
    try:
        proxy.hold()  # what memsvc sends on its one connection stays in the kernel now
        await store.set_entries(session, [EntryWrite("k", b"first", None)])  # retried
        await store.set_entries(session, [EntryWrite("k", b"second", None)])
        late = await asyncio.to_thread(proxy.release)  # the network heals
        items, _ = await store.list_entries(session, None, 10, 1 << 20)
        assert {item.key: item.value for item in items} == {"k": b"second"}
        assert late == 0, "the first copy of the write reached Redis after the retry"
    finally:
        await store.begin_snapshot(session, "op-end", "terminating", True, {"active"})
        await store.finish(session, "op-end", None, swap=False, clear=True)
