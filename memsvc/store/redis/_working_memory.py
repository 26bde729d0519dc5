"""Working memory in Redis: one hash per session, driven by Lua scripts.

The layout, its reasons and its costs are in
docs/decisions/0002-redis-working-memory-layout.md. In short: every key of a
session sits under one hash tag (one Cluster slot), each operation is one
EVALSHA (one round trip, atomic), and expiry, limits and the lifecycle state
marker are handled inside that script. The same store runs on one Redis
(``redis://``) or on a Redis Cluster (``redis+cluster://``,
docs/decisions/0007-redis-cluster.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from importlib import resources
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from memsvc.config import StartupError, redacted
from memsvc.domain import (
    BackendUnavailable,
    BatchRead,
    EntryWrite,
    KeyMeta,
    SessionLimitExceeded,
    SessionNotWritable,
    SessionRef,
    StoredEntry,
    WriteResult,
)
from memsvc.domain._session_memory import (
    ContentsNeeded,
    LostOperation,
    Marker,
    MarkerStateError,
    NoSession,
    ResumePoint,
    Snapshot,
)
from memsvc.domain._snapshot import encode_flat, encode_snapshot
from memsvc.domain._working_memory import ENTRY_FRAMING_BYTES
from memsvc.store._observe import BackendObserver, ignore, observed
from memsvc.store._retry import with_retries
from memsvc.store.redis._cluster import (
    CLUSTER_TRANSIENT_ERRORS,
    SLOT_MOVING_ERRORS,
    ConnectionLimit,
    cluster_client,
    is_cluster_url,
    masters_of,
)
from memsvc.store.redis._connections import REDIS_PROTOCOL, connection_class_for

log = logging.getLogger(__name__)

T = TypeVar("T")

# Cluster mode: the masters an operation will use, by the client's slot map (each
# holds one of its connections there meanwhile: see ConnectionLimit).
Route = Callable[[RedisCluster], Collection[str]]

# Errors after which the same command may succeed: connection loss, timeouts, a
# Redis still loading its data, and refusals of a Redis that cannot take writes
# now: a replica (the old primary after a failover: the retry reconnects, see
# _away_from_replicas) or one out of memory under ``noeviction``. Conditions of the backend,
# so UNAVAILABLE once retries run out, never INTERNAL. NOSCRIPT is handled by
# the Script objects.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    ConnectionError,
)

KEY_PREFIX = "memsvc:wm"
LIFECYCLE_SCRIPTS = (
    "lifecycle_begin_spawn",
    "lifecycle_begin_snapshot",
    "lifecycle_begin_restore",
    "lifecycle_finish",
    "lifecycle_abort",
)

# Cluster mode: how long one attempt waits for a moving slot to settle (polling
# from every 10 ms to every 200 ms), within the caller's retry budget and deadline.
SLOT_WAIT_SECONDS = 3.0


def guard_key(session: SessionRef) -> str:
    """A key of the session's slot that is never written, declared by every script.

    While a Redis Cluster slot migrates, a node refuses a script (TRYAGAIN, or
    ASK to the other node, which answers TRYAGAIN) unless it holds every key the
    script declares. This key never exists, so no script of the session runs
    during a migration: without it a script could start with all its keys on
    the old node and fail midway on a key it had just deleted, leaving half its
    writes (ADR 0007). On a single Redis it costs nothing.
    """
    return f"{_key_base(session)}:g"


def staging_keys(session: SessionRef) -> list[str]:
    """The staging copies of the data keys that a Resume builds (ADR 0004)."""
    return _all_keys(_key_base(session))[4:]


def _all_keys(base: str) -> list[str]:
    """Every key a session with this key base may have: its four, then staging."""
    keys = [f"{base}:d", f"{base}:x", f"{base}:k", f"{base}:m"]
    return [*keys, *(f"{key}'" for key in keys[:3])]


def session_keys(session: SessionRef) -> list[str]:
    """The four Redis keys of a session's working memory, under one hash tag.

    The tag is built from the two UUIDs (32 hex digits each, fixed length) and
    the session id in unpadded URL-safe base64, whose alphabet has no ``{``,
    ``}`` or ``:``; the mapping is injective, so two sessions never share a
    key, and Redis Cluster hashes exactly the tag.
    """
    return _all_keys(_key_base(session))[:4]


def _key_base(session: SessionRef) -> str:
    return f"{KEY_PREFIX}:{{{_tag_start(session)}}}"


def _session_of_tag(tag: str) -> SessionRef | None:
    """The session whose keys carry this hash tag (None: not one memsvc writes)."""
    try:
        project, agent, encoded = tag.split(".", 2)
        session_id = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        return SessionRef(str(uuid.UUID(hex=project)), str(uuid.UUID(hex=agent)), session_id)
    except ValueError:  # also binascii.Error and UnicodeDecodeError
        log.warning("a key under %s is not a session's: {%s}", KEY_PREFIX, tag)
        return None


def _tag_start(scope: SessionRef) -> str:
    """The hash tag of a session, or how the tags of a scope's sessions start (a
    project's, or an agent instance's: the ids left empty are left out)."""
    tag = scope.project_id.replace("-", "") + "."
    if scope.agent_instance_id:
        tag += scope.agent_instance_id.replace("-", "") + "."
        if scope.session_id:
            tag += base64.urlsafe_b64encode(scope.session_id.encode()).decode().rstrip("=")
    return tag


# A snapshot step's reply (as lifecycle_begin_snapshot gives it), then the keys,
# the values and the expiry times of the keys that have one.
_SnapshotRead = tuple[list[Any], list[bytes], list[bytes], dict[bytes, float | bytes]]


def _script_keys(session: SessionRef, staging: bool) -> list[str]:
    """The KEYS of a session's script. The guard key comes last: KEYS[5] of the
    data scripts, KEYS[8] of the lifecycle ones (which also see the staging
    keys); no script reads it (see guard_key)."""
    return [
        *session_keys(session),
        *(staging_keys(session) if staging else []),
        guard_key(session),
    ]


# Each script's flags, in its shebang: Redis 7 checks a flagged script's memory
# before it starts, and refuses it whole when it is out of memory (noeviction)
# unless it may run then (allow-oom). An unflagged script was checked only at its
# first write, which a purge's or a Spawn's DEL, freeing memory, always passed:
# data then went into a full Redis unchecked, up to the container's OOM kill.
# allow-oom: the scripts that only mark a session or free memory (a Terminate must
# be able to free a full Redis); no-writes: the one that only reads.
_SCRIPT_FLAGS = {
    "set_entries": "",
    "lifecycle_begin_spawn": "",
    "lifecycle_begin_restore": "",
    "get_entries": "allow-oom",
    "list_entries": "allow-oom",
    "delete_entries": "allow-oom",
    "lifecycle_begin_snapshot": "allow-oom",
    "lifecycle_finish": "allow-oom",
    "lifecycle_abort": "allow-oom",
    "read_marker": "no-writes",
}


def _load_script(name: str) -> str:
    package = resources.files("memsvc.store.redis") / "lua"
    prelude = (package / "_prelude.lua").read_text()
    flags = _SCRIPT_FLAGS[name]
    shebang = f"#!lua flags={flags}\n" if flags else "#!lua\n"
    return shebang + prelude + "\n" + (package / f"{name}.lua").read_text()


def _expiry(raw: bytes | None) -> int | None:
    return None if raw is None else int(float(raw))


class RedisWorkingMemoryStore:
    """Working memory in Redis (or a Redis-compatible server)."""

    backend_name = "working memory (Redis)"

    def __init__(
        self,
        url: str,
        *,
        max_session_keys: int,
        max_session_bytes: int,
        max_connections: int = 8,
        socket_timeout_seconds: float = 2.0,
    ) -> None:
        self._url = url
        self._max_keys = max_session_keys
        self._max_bytes = max_session_bytes
        self._max_connections = max_connections
        self._socket_timeout = socket_timeout_seconds
        self._cluster = is_cluster_url(url)
        self._transient = TRANSIENT_ERRORS + (CLUSTER_TRANSIENT_ERRORS if self._cluster else ())
        self._client: aioredis.Redis | RedisCluster | None = None
        # The readiness probe's own client (one connection per node): a pool that
        # busy calls hold whole says nothing about Redis, and would turn a busy
        # replica unready.
        self._probe: aioredis.Redis | RedisCluster | None = None
        # Cluster mode only: the per-node pools do not wait for a connection.
        self._limit: ConnectionLimit | None = None
        self._scripts: dict[str, AsyncScript] = {}
        # Whether maxmemory-policy was read (and warned of): at start, or once Redis
        # answers a probe.
        self._policy_read = False
        if self._cluster:
            self.backend_name = "working memory (Redis Cluster)"
        # Told each operation's time and outcome (the server's metrics).
        self.observe: BackendObserver = ignore

    @staticmethod
    def url_problem(url: str) -> str | None:
        """What is wrong with ``url`` that redis-py would find only at start (an
        option it does not take, a bad option value: a traceback) or never (a
        database that is not a number: database 0 instead). Nothing connects."""
        parts = urlsplit(url)
        if parts.scheme in ("redis", "rediss") and not re.fullmatch(r"/?\d*", parts.path):
            return f"has {parts.path!r} where the database number goes (redis://host:port/0)"
        store = RedisWorkingMemoryStore(url, max_session_keys=1, max_session_bytes=1)
        try:
            client = store._new_client(1)
            if isinstance(client, aioredis.Redis):
                # A connection object (not connected) takes the URL's options.
                client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        except (ValueError, TypeError, redis_errors.RedisError) as error:
            return f"is not a URL redis-py takes: {error}"
        return None

    def _new_client(self, max_connections: int) -> aioredis.Redis | RedisCluster:
        """A client with ``max_connections`` connections (per node of a cluster)."""
        if self._cluster:
            return cluster_client(
                self._url, max_connections=max_connections, socket_timeout=self._socket_timeout
            )
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url,
            max_connections=max_connections,
            timeout=self._socket_timeout,
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=self._socket_timeout,
            # memsvc's own bounded retries (store/_retry.py) are the only ones.
            retry=Retry(NoBackoff(), 0),
            protocol=REDIS_PROTOCOL,
        )
        # Set after from_url, whose URL options (rediss://) always win.
        pool.connection_class = connection_class_for(self._url) or pool.connection_class
        return aioredis.Redis.from_pool(pool)

    async def open(self) -> None:
        self._client = self._new_client(self._max_connections)
        self._probe = self._new_client(1)
        if self._cluster:
            # A pool of max_connections per node, and as many operations in flight there.
            self._limit = ConnectionLimit(self._max_connections, self._socket_timeout)
        for name in (
            "set_entries",
            "get_entries",
            "delete_entries",
            "list_entries",
            "read_marker",
            *LIFECYCLE_SCRIPTS,
        ):
            self._scripts[name] = self._client.register_script(_load_script(name))
        # Load the scripts now, so the first calls do not pay a NOSCRIPT round trip
        # (SCRIPT LOAD goes to every master of a cluster). Redis may be down at
        # start, or a master may join later: then a NOSCRIPT reply makes the Script
        # object load it (on every master) and run it again.
        try:
            for script in self._scripts.values():
                await self._client.script_load(script.script)
        except redis_errors.AuthenticationError as error:
            # A ConnectionError to redis-py, but no retry helps: the URL is to fix
            # (else memsvc served, NOT_SERVING, every call UNAVAILABLE).
            raise StartupError(
                f"Redis refused memsvc's credentials ({error}): check the user and password"
                f" in working_memory_url; got {redacted(self._url)!r}"
            ) from error
        except self._transient as error:
            log.warning("could not preload Lua scripts (Redis unreachable): %s", error)
            return
        except redis_errors.ResponseError as error:
            # Refused as memsvc connects (SELECT of a database number the server
            # does not have): no retry helps, the URL is to fix.
            raise StartupError(
                f"Redis refused memsvc's connection ({error}): check working_memory_url"
                f" (its database number, for one); got {redacted(self._url)!r}"
            ) from error
        await self._warn_if_evicting(self._redis)

    async def _warn_if_evicting(self, client: aioredis.Redis | RedisCluster) -> None:
        """Redis must keep what memsvc stores (maxmemory-policy noeviction,
        docs/deployment.md): one that evicts drops sessions, or parts of them,
        which memsvc then reports lost (purge in lua/_prelude.lua)."""
        try:
            if isinstance(client, RedisCluster):
                info: dict[str, Any] = await client.info(
                    "memory", target_nodes=RedisCluster.PRIMARIES
                )
            else:
                info = await client.info("memory")
        except self._transient as error:
            log.warning("could not read Redis's maxmemory-policy (read again later): %s", error)
            return
        except redis_errors.ResponseError as error:  # INFO renamed or refused: for good
            self._policy_read = True
            log.warning("could not read Redis's maxmemory-policy: %s", error)
            return
        self._policy_read = True
        # Asked of every primary, a cluster client answers for each, keyed by node.
        nodes = info.values() if "maxmemory_policy" not in info else [info]
        policies = {
            str(node.get("maxmemory_policy")) for node in nodes if isinstance(node, dict)
        } - {"None", "noeviction"}
        if policies:
            log.warning(
                "Redis may evict working memory (maxmemory-policy %s): memsvc reports "
                "the sessions it can tell were evicted as lost, not every one; set "
                "noeviction",
                ", ".join(sorted(policies)),
            )

    async def aclose(self) -> None:
        clients, self._client, self._probe = (self._client, self._probe), None, None
        async with contextlib.AsyncExitStack() as closing:  # each, whatever another raises
            for client in clients:
                if client is not None:
                    closing.push_async_callback(client.aclose)

    @property
    def connect_timeout_seconds(self) -> float:
        """How long the probe's connection attempt may take (per node of a cluster)."""
        return self._socket_timeout

    async def ping(self) -> None:
        """Redis answers, on the probe's own connection (every master of a cluster:
        a master that is down makes its slots fail)."""
        probe = self._probe
        if probe is None:
            raise RuntimeError("RedisWorkingMemoryStore used before open()")

        async def ping_once() -> object:
            if isinstance(probe, RedisCluster):
                return await probe.ping(target_nodes=RedisCluster.PRIMARIES)
            return await probe.ping()

        async def ping_on_a_live_connection() -> object:
            try:
                return await ping_once()
            except redis_errors.ConnectionError:
                # The probe's connection may be what was lost (a client kill, a
                # restart that is over): a new one asks again before the probe
                # reports Redis unready. A Redis that is down refuses this one too.
                return await ping_once()

        with observed(self.observe, "ping", self.backend_name):
            await with_retries(
                ping_on_a_live_connection,
                backend=self.backend_name,
                transient=self._transient,
                attempts=1,
            )
        if not self._policy_read:
            # Redis was away at start (a sidecar often starts first): said now, on
            # the probe's own connection (a busy pool must not fail the probe).
            await self._warn_if_evicting(probe)

    async def set_entries(
        self, session: SessionRef, writes: Sequence[EntryWrite]
    ) -> list[WriteResult]:
        args: list[Any] = [self._max_keys, self._max_bytes]
        for write in writes:
            args += [write.key, write.value, write.ttl_ms or 0]
        reply = await self._run("set_entries", session, args)
        status = reply[0]
        if status == b"state":
            raise SessionNotWritable(session.session_id, reply[1].decode())
        if status == b"limit":
            raise SessionLimitExceeded(
                what=reply[1].decode(),
                limit=int(reply[2]),
                current=int(reply[3]),
                requested=int(reply[4]),
            )
        return [
            WriteResult(write.key, int(reply[2 + 2 * i]) or None, bool(reply[1 + 2 * i]))
            for i, write in enumerate(writes)
        ]

    async def get_entries(
        self, session: SessionRef, keys: Sequence[str], budget_bytes: int
    ) -> BatchRead:
        reply = await self._run("get_entries", session, [budget_bytes, *keys])
        processed = int(reply[0])
        if processed < 0:
            raise NoSession(session.session_id, reply[1].decode())
        found: list[StoredEntry] = []
        missing: list[str] = []
        for i, key in enumerate(keys[:processed]):
            value = reply[1 + 2 * i]
            if value is None:
                missing.append(key)
            else:
                found.append(StoredEntry(key, value, _expiry(reply[2 + 2 * i])))
        return BatchRead(found, missing, list(keys[processed:]))

    async def delete_entries(self, session: SessionRef, keys: Sequence[str]) -> list[bool]:
        reply = await self._run("delete_entries", session, list(keys))
        if reply[0] == b"state":
            raise SessionNotWritable(session.session_id, reply[1].decode())
        return [bool(flag) for flag in reply[1:]]

    async def list_keys(
        self, session: SessionRef, after: str | None, limit: int
    ) -> tuple[list[KeyMeta], bool]:
        reply = await self._run("list_entries", session, [after or "", limit, 0, 0, 0])
        if int(reply[0]) < 0:
            raise NoSession(session.session_id, reply[1].decode())
        items = [
            KeyMeta(reply[i].decode(), int(reply[i + 1]), _expiry(reply[i + 2]))
            for i in range(1, len(reply), 3)
        ]
        return items, bool(reply[0])

    async def list_entries(
        self, session: SessionRef, after: str | None, limit: int, budget_bytes: int
    ) -> tuple[list[StoredEntry], bool]:
        reply = await self._run(
            "list_entries", session, [after or "", limit, 1, budget_bytes, ENTRY_FRAMING_BYTES]
        )
        if int(reply[0]) < 0:
            raise NoSession(session.session_id, reply[1].decode())
        items = [
            StoredEntry(reply[i].decode(), reply[i + 1], _expiry(reply[i + 2]))
            for i in range(1, len(reply), 3)
        ]
        return items, bool(reply[0])

    # Lifecycle steps (SessionMemoryStore, ADR 0004): one script each, over the
    # session's keys and its staging keys.

    async def read_marker(self, session: SessionRef) -> Marker | None:
        reply = await self._run("read_marker", session, [])
        fields = dict(zip(reply[0::2], reply[1::2], strict=True))
        state = fields.get(b"state")
        if state is None:
            return None

        def text(name: bytes) -> str | None:
            raw = fields.get(name)
            return None if raw is None else raw.decode()

        return Marker(
            state=state.decode(),
            epoch=text(b"epoch"),
            op=text(b"op"),
            prior=text(b"prior"),
            next_epoch=text(b"next_epoch"),
            clear=fields.get(b"clear") == b"1",
            snapshot=text(b"snapshot"),
        )

    async def begin_spawn(
        self, session: SessionRef, op: str, epoch: str, writes: Sequence[EntryWrite]
    ) -> None:
        args: list[Any] = [op, epoch, ""]
        for write in writes:
            args += [write.key, write.value, write.ttl_ms or 0]
        reply = await self._run_lifecycle("lifecycle_begin_spawn", session, args)
        if reply[0] == b"exists":
            # This call holds the session's new row, so the memory there is an
            # orphan (a dead Spawn's, or the database lost the session): replace
            # it, naming it. The script leaves that to the call itself: a late
            # copy of another Spawn's step would otherwise wipe a live session.
            args[2] = reply[1]
            reply = await self._run_lifecycle("lifecycle_begin_spawn", session, args)
            if reply[0] == b"exists":
                # Changed again within a round trip (a late step of another call):
                # nothing was written; a retry sees what is there then.
                raise BackendUnavailable(
                    self.backend_name, RuntimeError("the session's memory changed during Spawn")
                )
        _refuse_late(reply)

    async def begin_snapshot(
        self,
        session: SessionRef,
        op: str,
        new_state: str | None,
        clear_on_finish: bool,
        allowed: Collection[str],
        with_contents: bool = True,
        checkpoint_id: str = "",
        epoch: str | None = None,
    ) -> Snapshot:
        # On a single Redis the script only checks and sets the marker, and the
        # contents come from plain HGETALL and ZRANGE queued behind it in one
        # MULTI/EXEC: as atomic, but the script does not copy every entry into Lua
        # and back (at 1,000 keys 0.4 ms of Redis time against 0.12 ms). On a
        # cluster the script reads them itself: its guard key is what makes a node
        # refuse it whole while the slot migrates (ADR 0007).
        native = with_contents and not self._cluster

        def args_for(script_reads: bool) -> list[Any]:
            flags = ["1" if clear_on_finish else "0", "1" if script_reads else "0"]
            return [op, new_state or "", *flags, checkpoint_id, epoch or "", *allowed]

        read = await self._snapshot_in_transaction(session, args_for(False)) if native else None
        if read is None:
            read = await self._snapshot_by_script(session, args_for(with_contents))
        reply, keys, values, expire_at = read
        _refuse_late(reply)
        if reply[0] == b"state":
            raise MarkerStateError(reply[1].decode())
        if not with_contents:
            counts = (int(reply[5]), int(reply[6]), int(reply[7]))
            return Snapshot(reply[1].decode(), EMPTY_SNAPSHOT, *counts)
        blob, count, size, timed = encode_flat(keys, values, expire_at, int(reply[4]))
        return Snapshot(reply[1].decode(), blob, count, size, timed)

    async def _snapshot_by_script(self, session: SessionRef, args: list[Any]) -> _SnapshotRead:
        """lifecycle_begin_snapshot, reading the contents itself (when asked)."""
        reply = await self._run_lifecycle("lifecycle_begin_snapshot", session, args)
        if reply[0] != b"ok":
            return reply, [], [], {}
        data, expiries = reply[2], reply[3]
        expire_at = dict(zip(expiries[0::2], expiries[1::2], strict=True))
        return reply, data[0::2], data[1::2], expire_at

    async def _snapshot_in_transaction(
        self, session: SessionRef, args: list[Any]
    ) -> _SnapshotRead | None:
        """lifecycle_begin_snapshot without contents, then HGETALL of the data and
        ZRANGE WITHSCORES of the expiries, in one MULTI/EXEC (one round trip);
        None, having changed nothing, when Redis refuses the transaction (out of
        memory: Redis 7.0 refuses the script inside MULTI even though it may run
        then, as a Terminate frees memory; alone it runs)."""
        script = self._scripts["lifecycle_begin_snapshot"]
        keys = _script_keys(session, staging=True)
        data, expiries = session_keys(session)[:2]

        async def attempt(load_script: bool) -> list[Any] | None:
            if load_script:
                await self._redis.script_load(script.script)
            pipe = self._redis.pipeline(transaction=True)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.hgetall(data)
            pipe.zrange(expiries, 0, -1, withscores=True)
            try:
                results: list[Any] = await pipe.execute(raise_on_error=False)
            except redis_errors.OutOfMemoryError:
                return None  # refused while queued: the transaction was discarded whole
            if isinstance(results[0], redis_errors.NoScriptError) and not load_script:
                # Redis restarted or flushed its scripts. Nothing ran (EVALSHA
                # failed, the reads change nothing): load it and send it all again.
                return await attempt(load_script=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            return results

        results = await self._retrying(
            lambda: attempt(load_script=False),
            name="lifecycle_begin_snapshot",
            on=lambda client: masters_of(client, keys[:1]),
        )
        if results is None:
            return None
        reply, entries, expire_at = results
        # (member, score) pairs whatever the protocol (RESP2 or RESP3).
        return reply, list(entries), list(entries.values()), dict(expire_at)

    async def begin_restore(
        self,
        session: SessionRef,
        op: str,
        next_epoch: str,
        snapshot: bytes | None,
        merge: bool,
        allowed: Collection[str],
        held: ResumePoint | None = None,
    ) -> int:
        merge_flag = "1" if merge else "0"
        args: list[Any] = [op, next_epoch, merge_flag, self._max_keys, self._max_bytes]
        args += [",".join(allowed), snapshot or b""]
        args += (
            [held.checkpoint_id, held.key_count, held.size_bytes, held.epoch]
            if held
            else ["", 0, 0, ""]
        )
        reply = await self._run_lifecycle("lifecycle_begin_restore", session, args)
        _refuse_late(reply)
        if reply[0] == b"state":
            raise MarkerStateError(reply[1].decode())
        if reply[0] == b"contents":
            raise ContentsNeeded()
        if reply[0] == b"limit":
            raise SessionLimitExceeded(
                what=reply[1].decode(),
                limit=int(reply[2]),
                current=int(reply[3]),
                requested=int(reply[4]),
            )
        return int(reply[1])

    async def finish(
        self, session: SessionRef, op: str, final_state: str | None, swap: bool, clear: bool
    ) -> None:
        args = [op, final_state or "", "1" if swap else "0", "1" if clear else "0"]
        reply = await self._run_lifecycle("lifecycle_finish", session, args)
        if reply[0] == b"lost":
            raise LostOperation(reply[1].decode())

    async def abort(self, session: SessionRef, op: str) -> str:
        reply = await self._run_lifecycle("lifecycle_abort", session, [op])
        if reply[0] == b"lost":
            raise LostOperation(reply[1].decode())
        return str(reply[1].decode())

    async def forget(self, sessions: Sequence[SessionRef]) -> int:
        return await self._delete_sessions([_key_base(session) for session in sessions])

    async def sessions_in(self, scope: SessionRef) -> list[SessionRef]:
        """A SCAN of the scope's keys' common start, which walks the whole keyspace
        (every master of a cluster): a purge is rare. Page by page, each page a
        retried call of its own, so a keyspace of any size is walked within the
        call's deadline (one budget for the whole walk cut a large one short, and
        each retry started it over)."""
        if scope.session_id:
            return [scope]
        pattern = f"{KEY_PREFIX}:{{{_tag_start(scope)}*"
        found: dict[str, SessionRef | None] = {}
        client = self._redis
        nodes: list[Any] = [None]
        if isinstance(client, RedisCluster):
            # The slot map is read lazily: a purge may be the client's first call.
            await self._retrying(client.initialize, name="scan", on=_nowhere)
            nodes = client.get_primaries()
        for node in nodes:
            where: Route = _nowhere if node is None else functools.partial(_only, node.name)
            cursor = 0
            while True:
                cursor, keys = await self._retrying(
                    functools.partial(self._scan_page, node, cursor, pattern),
                    name="scan",
                    on=where,
                )
                for key in keys:
                    name = key.decode(errors="replace") if isinstance(key, bytes) else key
                    tag = name.split("{", 1)[1].split("}", 1)[0]
                    if tag not in found:
                        found[tag] = _session_of_tag(tag)
                if cursor == 0:
                    break
        return [session for session in found.values() if session is not None]

    async def _scan_page(self, node: Any, cursor: int, pattern: str) -> tuple[int, list[Any]]:
        """One SCAN page from ``cursor``: of the single Redis, or of one cluster node
        (whose reply maps node names to cursors)."""
        client: Any = self._redis
        if node is None:
            next_cursor, keys = await client.scan(cursor=cursor, match=pattern, count=1000)
            return int(next_cursor), list(keys)
        cursors, keys = await client.scan(
            cursor=cursor, match=pattern, count=1000, target_nodes=node
        )
        return int(cursors[node.name]), list(keys)

    async def _delete_sessions(self, bases: Sequence[str]) -> int:
        """One DEL of each session's keys (one slot per session), pipelined;
        how many sessions had any.

        On a cluster the pipeline is split by node and sent to all of them at
        once; a DEL refused because its slot is moving is sent again, alone,
        until it succeeds (only the refused ones: the count stays exact).
        """
        if not bases:
            return 0
        pending = list(bases)
        forgotten = 0

        async def delete_pending() -> int:
            nonlocal pending, forgotten
            pipe = self._redis.pipeline(transaction=False)
            for base in pending:
                pipe.delete(*_all_keys(base))
            results = await pipe.execute(raise_on_error=False)
            refused: list[str] = []
            error: BaseException | None = None
            for base, result in zip(pending, results, strict=True):
                if isinstance(result, BaseException):
                    refused.append(base)
                    error = error or result
                elif result:
                    forgotten += 1
            pending = refused
            if error is not None:
                raise error
            return forgotten

        # DEL is idempotent: a retry after a lost reply deletes nothing twice.
        return await self._retrying(
            delete_pending,
            name="forget",
            on=lambda client: masters_of(client, (_all_keys(base)[0] for base in pending)),
        )

    async def _run_lifecycle(self, script: str, session: SessionRef, args: list[Any]) -> list[Any]:
        """Lifecycle scripts also see the session's staging keys (KEYS[5..7])."""
        return await self._run(script, session, args, staging=True)

    @property
    def _redis(self) -> aioredis.Redis | RedisCluster:
        if self._client is None:
            raise RuntimeError("RedisWorkingMemoryStore used before open()")
        return self._client

    async def _run(
        self, script: str, session: SessionRef, args: list[Any], staging: bool = False
    ) -> list[Any]:
        keys = _script_keys(session, staging)
        runner = self._scripts[script]
        reply = await self._retrying(
            lambda: runner(keys=keys, args=args, client=self._redis),
            name=script,
            on=lambda client: masters_of(client, keys[:1]),
        )
        assert isinstance(reply, list)
        return reply

    async def _retrying(
        self, operation: Callable[[], Awaitable[T]], *, name: str, on: Route, attempts: int = 4
    ) -> T:
        """``operation`` with memsvc's bounded retries; in cluster mode, ``on``
        names the masters it uses (it waits for a connection on each)."""
        attempt = (
            self._away_from_replicas(operation)
            if self._limit is None
            else lambda: self._through_moves(operation, on)
        )
        with observed(self.observe, name, self.backend_name):
            return await with_retries(
                attempt, backend=self.backend_name, transient=self._transient, attempts=attempts
            )

    def _away_from_replicas(
        self, operation: Callable[[], Awaitable[T]]
    ) -> Callable[[], Awaitable[T]]:
        """``operation``, retiring the pool's connections when Redis answers
        READONLY: the primary they reached is a replica now (a failover behind a
        DNS name or a Service), and every pooled connection would reach it again
        (reads too, which a replica answers, a replication lag behind). The idle
        ones are closed now, the ones in use when they come back; the retry opens
        a new one, to wherever the address leads now."""

        async def attempt() -> T:
            try:
                return await operation()
            except redis_errors.ReadOnlyError:
                # A single Redis (a cluster's client follows its own failovers).
                pool = cast(aioredis.Redis, self._redis).connection_pool
                await pool.update_active_connections_for_reconnect()  # type: ignore[no-untyped-call]
                await pool.disconnect(inuse_connections=False)
                raise

        return attempt

    async def _through_moves(self, operation: Callable[[], Awaitable[T]], on: Route) -> T:
        """Cluster mode: run ``operation``, waiting while its slot is moving.

        A refusal in SLOT_MOVING_ERRORS means nothing ran, so the operation is
        simply sent again (redis-py has already followed the redirects it could)
        until the slot settles, for up to SLOT_WAIT_SECONDS; then the refusal
        goes to with_retries like any transient error. Each try holds a
        connection slot on each master ``on`` names (ConnectionLimit), released
        while it waits.
        """
        assert self._limit is not None
        client = cast(RedisCluster, self._redis)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + SLOT_WAIT_SECONDS
        pause = 0.01
        while True:
            try:
                # The slot map first, to know the masters: read on the client's
                # first call, a no-op after it.
                await client.initialize()
                async with self._limit.slots(on(client)):
                    return await operation()
            except SLOT_MOVING_ERRORS as error:
                if loop.time() + pause >= give_up_at:
                    raise
                log.debug("Redis Cluster slot moving, waiting %.0f ms: %r", pause * 1000, error)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)


def _nowhere(client: RedisCluster) -> Collection[str]:
    """The route of an operation that no node's connection limit holds back."""
    return ()


def _only(name: str, client: RedisCluster) -> Collection[str]:
    """The route of an operation sent to the node ``name`` itself."""
    return (name,)


EMPTY_SNAPSHOT = encode_snapshot([])


def _refuse_late(reply: list[Any]) -> None:
    """A step 1 refused as a copy of an operation already settled: it cannot be this
    call's (operation ids are unique per call), so say the operation is gone."""
    if reply[0] == b"late":
        raise LostOperation("settled")
