"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import redis.asyncio as aioredis
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from redis.asyncio.cluster import ClusterNode, RedisCluster

from memsvc.config import Config
from memsvc.store.redis._cluster import is_cluster_url, parse_cluster_url


@dataclass
class ErrorDetails:
    """What a program can read from a failed call."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: dict[str, str] = field(default_factory=dict)
    quota_subjects: list[str] = field(default_factory=list)
    retry_delay_seconds: float | None = None


def details_of(error: grpc.aio.AioRpcError) -> ErrorDetails:
    """Decode the status details (ErrorInfo, BadRequest, QuotaFailure) of an error."""
    result = ErrorDetails(error.code(), error.details() or "")
    status = rpc_status.from_call(error)
    if status is None:
        return result
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "memsvc.dev"
            result.reason, result.metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            result.violations = {v.field: v.description for v in bad.field_violations}
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            result.quota_subjects = [v.subject for v in quota.violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            result.retry_delay_seconds = retry.retry_delay.ToTimedelta().total_seconds()
    return result


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode) -> ErrorDetails:
    """Await a call that must fail with ``code``; return its details."""
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        details = details_of(error)
        assert details.code == code, f"expected {code}, got {details.code}: {details.message}"
        return details
    raise AssertionError(f"expected {code}, but the call succeeded with {response!r}")


def embedded_config(data_dir: Path) -> Config:
    """A server on a free local port over the embedded SQLite store in ``data_dir``,
    without the health and metrics listeners (for tests that bring their own
    working-memory store)."""
    return local_server_config(data_dir)


def local_server_config(data_dir: Path, database_url: str = "", **settings: Any) -> Config:
    """A server on a free local port, its data in ``data_dir``, over ``database_url``
    (empty: the embedded SQLite store), without the health and metrics listeners
    unless ``settings`` (any other Config fields) say otherwise."""
    defaults: dict[str, Any] = {"health_listen": "", "metrics_listen": ""}
    return Config(
        listen="127.0.0.1:0",
        data_dir=str(data_dir),
        database_url=database_url,
        **{**defaults, **settings},
    )


def value(python: Any) -> struct_pb2.Value:
    """A google.protobuf.Value holding a JSON-like Python value."""
    message = struct_pb2.Value()
    json_format.ParseDict(python, message)
    return message


def python(message: struct_pb2.Value) -> Any:
    """The JSON-like Python value held by a google.protobuf.Value."""
    return json_format.MessageToDict(message)


def forge_page_token(token: str, position: str) -> str:
    """``token`` with its position replaced by ``position`` (JSON text): its
    fingerprint still matches the request (it binds the request, not the position)."""
    padded = token + "=" * (-len(token) % 4)
    document = json.loads(base64.urlsafe_b64decode(padded))
    document["a"] = position
    return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")


async def eventually(
    condition: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, interval: float = 0.05
) -> None:
    """Poll until ``condition`` holds; fail after ``timeout`` seconds.

    The timeout only bounds a broken test; nothing is measured.
    """
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        await asyncio.sleep(interval)


class _DurableStore(Protocol):
    async def open(self) -> None: ...

    async def migrate(self) -> Any: ...

    async def aclose(self) -> None: ...


S = TypeVar("S", bound=_DurableStore)


@contextlib.asynccontextmanager
async def migrated(store: S) -> AsyncIterator[S]:
    """``store`` opened and migrated for the block, closed after it."""
    await store.open()
    await store.migrate()
    try:
        yield store
    finally:
        await store.aclose()


def durable_store_at(url: str) -> Any:
    """A durable store (not yet open) for a sqlite:// or postgresql:// URL."""
    from memsvc.store.postgres import PostgresDurableStore
    from memsvc.store.sqlite import SqliteDurableStore

    return SqliteDurableStore(url) if url.startswith("sqlite") else PostgresDurableStore(url)


async def sql_rows(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of one SQL statement (``?`` placeholders) run straight on a durable
    store's database, so tests can check what is really stored."""
    if url.startswith("sqlite"):
        import sqlite3

        from memsvc.store.sqlite import sqlite_path

        with contextlib.closing(sqlite3.connect(sqlite_path(url))) as db:
            rows = list(db.execute(statement, params).fetchall())
            db.commit()
            return rows
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(statement.replace("?", "%s"), params)
        return [] if cursor.description is None else list(await cursor.fetchall())


async def waiting_for_locks(url: str) -> int:
    """Backends of a PostgreSQL database waiting for a lock."""
    (row,) = await sql_rows(
        url,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    return int(row[0])


def metric(server: Any, name: str, **labels: str) -> float | None:
    """The value of one sample on a server's Prometheus endpoint (None: absent)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{server.metrics.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def reuse(module_name: str, namespace: dict[str, Any], *, leave_out: Collection[str] = ()) -> None:
    """Copy every test, fixture and helper of ``module_name`` into ``namespace``.

    pytest then collects the tests a second time in the reusing module, where
    the reusing package's conftest.py points the deployment elsewhere (a Redis
    Cluster, a pooler); the module's
    own fixtures (its autouse ``_spawned``, its ``config_overrides``) come along,
    so the suite runs exactly as written. Names in ``leave_out`` stay behind.
    """
    module = importlib.import_module(module_name)
    for name, item in vars(module).items():
        if not name.startswith("__") and name not in leave_out:
            namespace.setdefault(name, item)


async def next_event(call: Any, timeout: float = 10) -> Any:
    """The next event (a memsvc.v1.LifecycleEvent) of a WatchLifecycle call,
    progress messages skipped."""
    while True:
        message = await asyncio.wait_for(call.read(), timeout)
        assert message is not grpc.aio.EOF
        if message.HasField("event"):
            return message.event


async def one_by_one(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """An EventHub stream (with the default ``max_events=1``) item by item: each
    event alone (its list of one unpacked), progress positions as they are."""
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        async for item in stream:
            if isinstance(item, list):
                assert len(item) == 1, f"{len(item)} events in a list, asked for one"
                yield item[0]
            else:
                yield item


async def take_events(stream: Any, count: int) -> list[int]:
    """The sequences of the next ``count`` events of an EventHub stream (progress
    positions skipped)."""
    from memsvc.domain._watch import StoredEvent

    got: list[int] = []
    while len(got) < count:
        item = await asyncio.wait_for(anext(stream), 10)
        if isinstance(item, StoredEvent):
            got.append(item.sequence)
    return got


# Lifecycle checks shared by the contract, fault and crash-recovery tests --------


@dataclass(frozen=True)
class LoggedEvent:
    """One row of lifecycle_events, as the database holds it."""

    sequence: int
    event_type: int
    ref: str | None  # the checkpoint id, or the episode id
    request_id: str | None


async def lifecycle_log(database_url: str, scope: dict[str, Any]) -> list[LoggedEvent]:
    """Every event of the session named by ``scope``, in sequence order, read
    straight from the durable store."""
    rows = await sql_rows(
        database_url,
        "SELECT sequence, event_type, coalesce(checkpoint_id, CAST(episode_id AS TEXT)),"
        " request_id FROM lifecycle_events WHERE project_id = ? AND session_id = ?"
        " ORDER BY sequence",
        scope["project_id"],
        scope["session_id"],
    )
    return [LoggedEvent(int(r[0]), int(r[1]), r[2], r[3]) for r in rows]


async def whole_memory(wm: Any, scope: dict[str, Any]) -> dict[str, Any]:
    """A session's whole working memory (every key and value, every page)."""
    from memsvc.v1 import working_memory_pb2 as pb

    found: dict[str, Any] = {}
    token = ""
    while True:
        page = await wm.ListEntries(
            pb.ListEntriesRequest(**scope, page_size=1000, page_token=token), timeout=10
        )
        found.update({entry.key: python(entry.value) for entry in page.entries})
        if not (token := page.next_page_token):
            return found


async def checkpoint_with_contents(
    life: Any, scope: dict[str, Any], checkpoint_id: str
) -> tuple[Any, dict[str, Any]]:
    """A checkpoint (``lifecycle_pb2.Checkpoint``) and every entry it holds, decoded."""
    from memsvc.v1 import lifecycle_pb2 as lc

    found: dict[str, Any] = {}
    token = ""
    while True:
        reply = await life.GetCheckpoint(
            lc.GetCheckpointRequest(**scope, checkpoint_id=checkpoint_id, include_entries=True,
                                    page_size=1000, page_token=token),
            timeout=10,
        )  # fmt: skip
        found.update({entry.key: python(entry.value) for entry in reply.entries})
        if not (token := reply.next_page_token):
            return reply.checkpoint, found


async def checkpoint_contents(
    life: Any, scope: dict[str, Any], checkpoint_id: str
) -> dict[str, Any]:
    """Every entry a checkpoint holds, decoded."""
    return (await checkpoint_with_contents(life, scope, checkpoint_id))[1]


async def session_episodes(channel: grpc.aio.Channel, scope: dict[str, Any]) -> list[str]:
    """The ids of the episodes recorded for the session named by ``scope``."""
    from memsvc.v1 import episodic_pb2 as ep
    from memsvc.v1.episodic_pb2_grpc import EpisodicMemoryServiceStub

    episodic = EpisodicMemoryServiceStub(channel)
    wanted = ep.EpisodeFilter(
        agent_instance_id=scope["agent_instance_id"], session_id=scope["session_id"]
    )
    found: list[str] = []
    token = ""
    while True:
        page = await episodic.ListEpisodes(
            ep.ListEpisodesRequest(project_id=scope["project_id"], filter=wanted,
                                   page_size=100, page_token=token),
            timeout=10,
        )  # fmt: skip
        found += [episode.episode_id for episode in page.episodes]
        if not (token := page.next_page_token):
            return found


def results_of(monkeypatch: Any, owner: Any, name: str, key: Callable[[Any], Any]) -> list[Any]:
    """``key`` of every result of ``owner.name`` from now on (the test's end undoes
    it): what a store read made of its rows, say."""
    seen: list[Any] = []
    real = getattr(owner, name)

    def recording(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        seen.append(key(result))
        return result

    monkeypatch.setattr(owner, name, recording)
    return seen


def redis_client(url: str) -> aioredis.Redis | RedisCluster:
    """A redis-py client of the working-memory Redis at ``url``, for a test's own
    reads and writes: a cluster client for ``redis+cluster://`` (a session's keys
    share one slot, so commands on several of them work there too)."""
    if is_cluster_url(url):
        nodes, options = parse_cluster_url(url)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes], **options
        )
    return aioredis.Redis.from_url(url)
