"""A counting TCP proxy: what crosses the wire between memsvc and one backend.

tests/integration/test_round_trips.py counts memsvc's round trips to PostgreSQL
with it, and ``bench.costs`` puts one :class:`WireMeter` between memsvc and its Redis, one
between memsvc and PostgreSQL and one between the client and memsvc's gRPC
port. Each forwards bytes unchanged and counts, over all its connections:

* bytes each way (``bytes_up``: client to server, ``bytes_down``: back);
* round trips: the times a client sends after the server has answered (or
  first), so a pipeline or a batch of statements sent together is one, and a
  reply that arrives in several TCP reads is one;
* commands, for ``protocol="redis"``: top-level RESP arrays the client sends
  (a script call is one, whatever it runs inside Redis), by command name;
* statements, for ``protocol="postgres"``: simple-query (``Q``) and Execute
  (``E``) messages of the frontend protocol, by the first word of their SQL
  (from the ``Q`` text or the preceding ``Parse``). The startup packets
  (SSLRequest, StartupMessage) are skipped; TLS must be off (``sslmode=disable``).

It runs its own event loop in a daemon thread (like memsvc.testing's TcpProxy),
so the measured process may be another one. :meth:`snapshot` copies the
counters at any moment; the difference of two snapshots is what moved between
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field

from memsvc.testing._loop_thread import LoopThread

_CHUNK = 65536
_STARTUP_CODES_THEN_STARTUP = (80877103, 80877104)  # SSLRequest, GSSENCRequest


@dataclass
class WireCounts:
    """Counters of one meter (cumulative) or their difference."""

    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    round_trips: int = 0
    commands: int = 0  # Redis commands or PostgreSQL statements
    by_name: Counter[str] = field(default_factory=Counter)

    def minus(self, earlier: WireCounts) -> WireCounts:
        names = Counter(self.by_name)
        names.subtract(earlier.by_name)
        return WireCounts(
            self.connections - earlier.connections,
            self.bytes_up - earlier.bytes_up,
            self.bytes_down - earlier.bytes_down,
            self.round_trips - earlier.round_trips,
            self.commands - earlier.commands,
            Counter({name: n for name, n in names.items() if n > 0}),
        )


class _RedisParser:
    """Counts complete top-level RESP arrays in the client's byte stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes, counts: WireCounts) -> None:
        self._buffer += data
        position = 0
        buffer = self._buffer
        while True:
            parsed = self._command(buffer, position)
            if parsed is None:
                break
            position, name = parsed
            counts.commands += 1
            counts.by_name[name] += 1
        del buffer[:position]

    @staticmethod
    def _line(buffer: bytearray, position: int) -> tuple[int, bytes] | None:
        end = buffer.find(b"\r\n", position)
        return None if end < 0 else (end + 2, bytes(buffer[position:end]))

    def _command(self, buffer: bytearray, position: int) -> tuple[int, str] | None:
        header = self._line(buffer, position)
        if header is None:
            return None
        position, line = header
        if not line.startswith(b"*"):  # an inline command: one line
            return position, line.split(b" ", 1)[0].decode(errors="replace").lower()
        name = ""
        for index in range(int(line[1:])):
            bulk = self._line(buffer, position)
            if bulk is None:
                return None
            position, length_line = bulk
            length = int(length_line[1:])
            if len(buffer) < position + length + 2:
                return None
            if index == 0:
                name = bytes(buffer[position : position + length]).decode(errors="replace")
            position += length + 2
        return position, name.lower()


class _PostgresParser:
    """Counts Q and E messages in the frontend's byte stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._startup = True
        self._parsed = "?"  # first word of the last Parse: what the next Execute runs

    def feed(self, data: bytes, counts: WireCounts) -> None:
        self._buffer += data
        buffer = self._buffer
        position = 0
        while True:
            if self._startup:
                if len(buffer) < position + 8:
                    break
                length, code = struct.unpack_from("!ii", buffer, position)
                if len(buffer) < position + length:
                    break
                position += length
                self._startup = code in _STARTUP_CODES_THEN_STARTUP
                continue
            if len(buffer) < position + 5:
                break
            kind = buffer[position : position + 1]
            (length,) = struct.unpack_from("!i", buffer, position + 1)
            if len(buffer) < position + 1 + length:
                break
            body = bytes(buffer[position + 5 : position + 1 + length])
            position += 1 + length
            if kind == b"P":
                query = body.split(b"\0", 2)[1]
                self._parsed = _first_word(query)
            elif kind == b"Q":
                counts.commands += 1
                counts.by_name[_first_word(body)] += 1
            elif kind == b"E":
                counts.commands += 1
                counts.by_name[self._parsed] += 1
        del buffer[:position]


def _first_word(sql: bytes) -> str:
    words = sql.strip(b"\0 \t\r\n").split(None, 1)
    return words[0].decode(errors="replace").upper() if words else "?"


class WireMeter(LoopThread):
    """``with WireMeter(upstream_port, "redis") as meter``: connect to ``meter.port``."""

    def __init__(self, upstream_port: int, protocol: str = "raw") -> None:
        if protocol not in ("raw", "redis", "postgres"):
            raise ValueError(f"unknown protocol {protocol!r}")
        super().__init__("wire-meter")
        self.upstream_port = upstream_port
        self.protocol = protocol
        self.port = 0
        self._counts = WireCounts()
        self._lock = threading.Lock()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def snapshot(self) -> WireCounts:
        with self._lock:
            c = self._counts
            return WireCounts(
                c.connections, c.bytes_up, c.bytes_down, c.round_trips, c.commands,
                Counter(c.by_name),
            )  # fmt: skip

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        current = asyncio.current_task()
        if current is not None:
            self._tasks.add(current)
            current.add_done_callback(self._tasks.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        with self._lock:
            self._counts.connections += 1
        parser: _RedisParser | _PostgresParser | None = None
        if self.protocol == "redis":
            parser = _RedisParser()
        elif self.protocol == "postgres":
            parser = _PostgresParser()
        answered = [True]  # the server has answered what the client sent last

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, up: bool) -> None:
            while data := await source.read(_CHUNK):
                with self._lock:
                    counts = self._counts
                    if up:
                        counts.bytes_up += len(data)
                        if answered[0]:
                            counts.round_trips += 1
                            answered[0] = False
                        if parser is not None:
                            parser.feed(data, counts)
                    else:
                        counts.bytes_down += len(data)
                        answered[0] = True
                sink.write(data)
                await sink.drain()
            with contextlib.suppress(OSError):
                sink.write_eof()

        tasks = [
            asyncio.create_task(pump(reader, up_writer, True)),
            asyncio.create_task(pump(up_reader, writer, False)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            pass  # closing the meter: the connection just ends
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for each in (writer, up_writer):
                each.close()
                self._writers.discard(each)
