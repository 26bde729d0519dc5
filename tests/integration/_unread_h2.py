"""A gRPC client that never reads its answers: an HTTP/2 connection whose stream
windows are 0, so the server can send headers but no DATA (a review's tool, made
small). It answers the server's SETTINGS and PINGs, so the connection stays up."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

_DATA, _HEADERS, _SETTINGS, _PING = 0, 1, 4, 6
_END_STREAM, _END_HEADERS, _ACK = 1, 4, 1
_INITIAL_WINDOW_SIZE = 4


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack(">I", stream) + payload
    )


def _length(n: int) -> bytes:
    """An HPACK string length (7-bit prefix, no Huffman)."""
    if n < 127:
        return bytes([n])
    out, n = [127], n - 127
    while n >= 128:
        out.append((n & 127) | 128)
        n >>= 7
    return bytes([*out, n])


def _header(name: str, value: str) -> bytes:
    """A literal header field without indexing."""
    raw_name, raw_value = name.encode(), value.encode()
    return b"\x00" + _length(len(raw_name)) + raw_name + _length(len(raw_value)) + raw_value


class UnreadingClient:
    """Sends unary gRPC requests on one connection and reads none of the answers."""

    def __init__(self, port: int) -> None:
        self._socket = socket.create_connection(("127.0.0.1", port))
        self._lock = threading.Lock()
        self._next_stream = 1
        window_zero = struct.pack(">HI", _INITIAL_WINDOW_SIZE, 0)
        self._send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(_SETTINGS, 0, 0, window_zero))
        threading.Thread(target=self._answer, daemon=True).start()

    def call(self, path: str, request: bytes) -> None:
        headers = b"".join(
            _header(name, value)
            for name, value in (
                (":method", "POST"), (":scheme", "http"), (":path", path),
                (":authority", "127.0.0.1"), ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )  # fmt: skip
        message = b"\x00" + struct.pack(">I", len(request)) + request
        with self._lock:
            stream, self._next_stream = self._next_stream, self._next_stream + 2
        self._send(
            _frame(_HEADERS, _END_HEADERS, stream, headers)
            + _frame(_DATA, _END_STREAM, stream, message)
        )

    def close(self) -> None:
        # shutdown first: the answering thread's blocked recv holds the socket open.
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()

    def _send(self, data: bytes) -> None:
        with self._lock:
            self._socket.sendall(data)

    def _answer(self) -> None:
        try:
            while True:
                head = self._read(9)
                kind, flags = head[3], head[4]
                payload = self._read(int.from_bytes(head[:3], "big"))
                if kind == _SETTINGS and not flags & _ACK:
                    self._send(_frame(_SETTINGS, _ACK, 0))
                elif kind == _PING and not flags & _ACK:
                    self._send(_frame(_PING, _ACK, 0, payload))
        except OSError:
            pass  # closed

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self._socket.recv(count - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data
