"""Redis connections that take their unsent bytes with them when they close.

memsvc gives up on a command after ``socket_timeout`` and runs it again on a new
connection (every backend call is retried). Closed gracefully, the connection it
gave up on still delivers what the kernel holds for it: once a partition heals,
TCP retransmits the old command, and Redis runs it after the retry, after the
client's next write even, which it then silently undoes (a Set of the old value,
a Delete of a key written since). A connection whose socket lingers for 0 seconds
closes with a reset instead: the kernel drops the unsent bytes and sends nothing
more. Lifecycle steps are fenced besides (a late copy of a settled step changes
nothing, ADR 0004); data writes have only this.

A Redis Cluster client takes no connection class (redis-py builds each node's
connections itself): cluster_client sets it on the nodes, so that cluster
connections reset when closed too.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from typing import Any

from redis.asyncio.connection import Connection, SSLConnection

# RESP2, whichever redis-py defaults to (RESP3 from redis-py 8). The replies memsvc
# reads are the same either way (a script's reply is converted as RESP2 unless it
# asks otherwise), but hiredis reads a RESP3 map, HGETALL's reply, about ten times
# slower than the flat array RESP2 sends: 0.49 ms against 0.05 ms at 1,000 entries,
# on the path of every Pause (measured in the twenty-sixth session).
REDIS_PROTOCOL = 2

# struct linger {l_onoff = 1, l_linger = 0}: close() resets the connection.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)
# How long a closing TLS connection waits for the peer's close_notify.
_TLS_SHUTDOWN_SECONDS = 0.1


class _ResetsOnClose:
    """A redis-py connection whose close drops the bytes it has not sent."""

    _writer: Any

    async def _connect(self) -> None:
        await super()._connect()  # type: ignore[misc]
        sock = self._writer.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)


class ResettingConnection(_ResetsOnClose, Connection):
    """redis://: TCP."""


class ResettingSSLConnection(_ResetsOnClose, SSLConnection):
    """rediss://: TCP with TLS. Its close first sends TLS's close_notify and waits
    for the peer's (30 s by default), all that time leaving the socket open and
    TCP retransmitting what it held: the wait is cut to a moment."""

    def _connection_arguments(self) -> Mapping[str, Any]:
        return {**super()._connection_arguments(), "ssl_shutdown_timeout": _TLS_SHUTDOWN_SECONDS}


def connection_class_for(url: str) -> type[Connection] | None:
    """The connection class for a single-node URL; None (redis-py's choice) for a
    Unix socket, which no network partition holds bytes for."""
    scheme = url.split(":", 1)[0].lower()
    return {"redis": ResettingConnection, "rediss": ResettingSSLConnection}.get(scheme)
