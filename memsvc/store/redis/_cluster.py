"""Redis Cluster mode of the working-memory store (ADR 0007).

``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` for TLS)
selects redis-py's asyncio cluster client; the hosts are startup nodes, from
which the client learns the whole slot map. Everything else (scripts, keys,
retries) is the store's, shared with single-node Redis: every key of a session
sits under one hash tag, so each operation goes to one slot of one node.

While a session's slot migrates between masters (``CLUSTER SETSLOT ...
MIGRATING/IMPORTING``), Redis refuses the session's scripts with ``TRYAGAIN``
or redirects them with ``ASK``; every script declares the session's guard key,
which never exists, so no script can run, even in part, until the slot is
settled (see ``guard_key``). Those refusals are :data:`SLOT_MOVING_ERRORS`:
the store waits them out within the caller's retry budget.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection, Iterable
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis.exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from memsvc.config import redacted
from memsvc.store.redis._connections import (
    REDIS_PROTOCOL,
    ResettingConnection,
    ResettingSSLConnection,
)

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

# A command that Redis refused without running it because its slot is moving
# (or the cluster is reconfiguring): TRYAGAIN, an ASK or MOVED redirect that
# redis-py did not follow to the end ("TTL exhausted" is a ClusterError),
# CLUSTERDOWN (also a ClusterError), or a slot missing from the client's map.
# Retrying any of these is safe whatever the operation: it has not run.
SLOT_MOVING_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.TryAgainError,
    redis_errors.AskError,  # MovedError is a subclass
    redis_errors.ClusterError,  # ClusterDownError, MasterDownError, "TTL exhausted."
    redis_errors.SlotNotCoveredError,
)

# Cluster-mode transient errors on top of the single-node ones. redis-py raises
# RedisClusterException itself when it cannot build a slot map (no startup node
# reachable, slots not covered); its other uses are misuse (keys of several
# slots in one command), which memsvc's keys, all under one tag, cannot cause.
CLUSTER_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    *SLOT_MOVING_ERRORS,
    redis_errors.RedisClusterException,
)


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return url.partition("://")[0] in CLUSTER_SCHEMES


def _split_host(item: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, colon, port = item.rpartition(":")
        if not colon:
            host, port = item, ""
    if not host:
        raise ValueError(f"a cluster node needs a host, got {item!r}")
    try:
        return unquote(host), int(port) if port else 6379
    except ValueError:
        raise ValueError(f"bad port in cluster node {item!r}") from None


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The startup nodes and the client options of a cluster URL.

    ``redis+cluster://[user[:password]@]host:port[,host:port...][/0][?option=value...]``:
    query options are those of redis-py's ``from_url`` (``ssl_ca_certs=...``,
    ``socket_keepalive=...``); Redis Cluster has database 0 only.
    """
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL (redis+cluster://...): {redacted(url)!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = [_split_host(item) for item in hosts.split(",") if item]
    if not nodes:
        # Without the URL, which may hold a password: Config quotes it redacted.
        raise ValueError("a Redis Cluster URL names at least one node")
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"Redis Cluster has database 0 only, got {parts.path!r}")
    # redis-py parses the credentials and options, as it does for redis:// URLs.
    netloc = f"{userinfo}@placeholder" if userinfo else "placeholder"
    options: dict[str, Any] = dict(parse_url(urlunsplit(("redis", netloc, "", parts.query, ""))))
    for name in ("host", "port", "connection_class"):
        options.pop(name, None)
    if int(options.pop("db", 0) or 0) != 0:
        raise ValueError("Redis Cluster has database 0 only")
    if parts.scheme == "rediss+cluster":
        options["ssl"] = True
    return nodes, options


def cluster_client(url: str, *, max_connections: int, socket_timeout: float) -> RedisCluster:
    """An asyncio cluster client for ``url`` (not yet connected).

    ``max_connections`` bounds the connections to each node. redis-py's own
    retries are off (memsvc's bounded retries are the only ones), and MOVED
    replies patch the slot map one slot at a time instead of rebuilding it
    every few redirects: a rebuild closes the connections that other calls
    are using at that moment.
    """
    nodes, options = parse_cluster_url(url)
    # RESP2 unless the URL asks otherwise (?protocol=3), as for a single Redis.
    options.setdefault("protocol", REDIS_PROTOCOL)
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        max_connections=max_connections,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
        reinitialize_steps=0,
        **options,
    )
    # Connections that reset when closed, as single-node ones (see _connections):
    # redis-py takes no connection class for a cluster, so it is set where nodes
    # take theirs. The client's startup nodes exist (not yet connected); every
    # node found later is built from the nodes manager's keyword arguments.
    resetting = ResettingSSLConnection if options.get("ssl") else ResettingConnection
    client.nodes_manager.connection_kwargs["connection_class"] = resetting
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = resetting
    return client


class ConnectionLimit:
    """At most ``size`` operations in flight on each node; the next waits up to
    ``timeout`` seconds.

    The cluster client's per-node pools do not wait for a free connection (they
    raise MaxConnectionsError at once); this gives cluster mode the waiting of
    the single-node BlockingConnectionPool, node by node: an operation holds one
    connection on each node it uses, so no node sees more than ``size``
    connections from this process, and a master that stops answering holds up
    the operations on its own slots only, not those of the others.
    """

    def __init__(self, size: int, timeout: float) -> None:
        self._size = size
        self._timeout = timeout
        # By node name (host:port); as many as the cluster has had masters.
        self._semaphores: dict[str, asyncio.Semaphore] = {}

    @contextlib.asynccontextmanager
    async def slots(self, nodes: Collection[str]) -> AsyncIterator[None]:
        """A slot on each of ``nodes`` (none: an operation that no node limits)."""
        held: list[asyncio.Semaphore] = []
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    # In one order for every operation: two that need the same
                    # nodes never hold one each and wait for the other's.
                    for name in sorted(nodes):
                        semaphore = self._semaphores.get(name)
                        if semaphore is None:
                            semaphore = self._semaphores[name] = asyncio.Semaphore(self._size)
                        await semaphore.acquire()
                        held.append(semaphore)
            except TimeoutError:
                raise redis_errors.ConnectionError(
                    f"no Redis connection free within {self._timeout:g}s"
                    f" (on {', '.join(sorted(nodes))})"
                ) from None
            yield
        finally:
            for semaphore in held:
                semaphore.release()


def masters_of(client: RedisCluster, keys: Iterable[str]) -> set[str]:
    """The names of the masters that hold ``keys`` in the client's slot map (read
    by ``initialize()``). A slot missing from it raises SlotNotCoveredError, one of
    SLOT_MOVING_ERRORS: the operation waits for a map that covers it."""
    return {client.nodes_manager.get_node_from_slot(client.keyslot(key)).name for key in keys}
