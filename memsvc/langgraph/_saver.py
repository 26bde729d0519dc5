"""MemsvcSaver: a LangGraph checkpointer whose storage is memsvc's GraphCheckpointService.

What LangGraph hands a checkpointer is split as the PostgreSQL saver splits it: the
checkpoint document (without its channel values) and each channel value are
encoded by the saver's serializer (``serde``, LangGraph's JsonPlusSerializer by
default) into (type, bytes) pairs; memsvc stores them without reading them. A
channel value is sent only in the checkpoint where its version is new
(``new_versions``) and stored once per (thread, namespace, channel, version);
small scalars (None, booleans, numbers, strings of up to 64 characters) stay in
the document instead, where they take less room than a row of their own.
Metadata travels as JSON, which memsvc filters on.

The async methods use an :class:`memsvc.client.AsyncClient` (its channel opens in
the caller's event loop on first use); the sync ones use a :class:`memsvc.client.Client`,
whose private loop runs in a background thread, so sync graphs work as well. Both
are held by one :class:`_Clients` that the saver's shallow copies share.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    DeltaChannelHistory,
    get_checkpoint_id,
    get_serializable_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from memsvc.client import (
    TLS,
    AsyncClient,
    AsyncGraphClient,
    Client,
    GraphCheckpointNotFound,
    GraphClient,
    GraphPruneRefused,
    RetryPolicy,
)
from memsvc.client._async import DEFAULT_TARGET, DEFAULT_TIMEOUT
from memsvc.langgraph._delta import DeltaWalk
from memsvc.v1 import graph_checkpoint_pb2 as pb

_END_ACTIONS = {
    None: pb.GRAPH_SESSION_END_ACTION_UNSPECIFIED,
    "keep_latest": pb.GRAPH_SESSION_END_ACTION_KEEP_LATEST,
    "delete": pb.GRAPH_SESSION_END_ACTION_DELETE,
}


@dataclass(frozen=True)
class SessionLink:
    """Links the saver's threads to a memsvc session.

    When the session is terminated, memsvc applies ``on_end`` to the threads
    ("keep_latest": only each namespace's latest checkpoint stays; "delete": the
    threads go); purging the session, its agent instance or its project forgets them.
    """

    agent_instance_id: str
    session_id: str
    on_end: Literal["keep_latest", "delete"] | None = None


class _Clients:
    """A saver's clients, opened on first use and shared by its shallow copies."""

    def __init__(self, target: str, client_args: dict[str, Any], given: AsyncClient | None) -> None:
        self._target = target
        self._client_args = client_args
        self._own_async = given is None
        self._async: AsyncClient | None = given
        self._sync: Client | None = None
        # Sync graphs may run in several threads: one blocking client (and loop
        # thread) for them all.
        self._sync_lock = threading.Lock()

    def async_client(self) -> AsyncClient:
        if self._async is None:
            self._async = AsyncClient(self._target, **self._client_args)
        return self._async

    def sync_client(self) -> Client:
        if not self._own_async:
            # The given client's address and credentials are its own: a blocking
            # client made from this saver's arguments would reach another server.
            raise RuntimeError(
                "MemsvcSaver(client=...) serves LangGraph's async methods only (ainvoke, "
                "aget_state...); for the sync ones, give target= and the credentials instead"
            )
        with self._sync_lock:
            if self._sync is None:
                self._sync = Client(self._target, **self._client_args)
            return self._sync

    async def aclose(self) -> None:
        """Close the clients opened here (a given AsyncClient is its owner's)."""
        if self._own_async and self._async is not None:
            client, self._async = self._async, None
            await client.close()
        self.close()

    def close(self) -> None:
        """Close the blocking client, if one was opened."""
        with self._sync_lock:
            client, self._sync = self._sync, None
        if client is not None:
            client.close()


class MemsvcSaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer that stores checkpoints in memsvc.

    Args:
        target: memsvc's address (``host:port`` or ``unix:/path``).
        project_id: the project (a UUID) every thread belongs to; tokens bound to
            projects apply.
        fence: refuse a put whose parent is no longer its thread's latest checkpoint
            (``memsvc.client.GraphCheckpointConflict``) instead of forking silently.
        ttl: seconds after a thread's last write when memsvc forgets it (None: never).
        keep_last: checkpoints memsvc keeps per thread and namespace (0: all).
        session: link the threads to a memsvc session (see :class:`SessionLink`).
        serde: LangGraph serializer (default: JsonPlusSerializer).
        timeout, retry, token, token_file, tls: as for :class:`memsvc.client.AsyncClient`.
        client: an AsyncClient to use (the caller closes it); the saver then serves
            the async methods only, and a sync one raises RuntimeError.

    Use ``async with MemsvcSaver(...) as saver`` (or ``with`` for sync graphs), or
    call ``aclose()`` / ``close()``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        project_id: str,
        fence: bool = False,
        ttl: float | None = None,
        keep_last: int = 0,
        session: SessionLink | None = None,
        serde: SerializerProtocol | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        tls: TLS | bool | None = None,
        client: AsyncClient | None = None,
    ) -> None:
        super().__init__(serde=serde)
        self.project_id = project_id
        self.fence = fence
        # Shared by the shallow copies LangGraph makes (with_allowlist, when
        # LANGGRAPH_STRICT_MSGPACK is on, gives each compiled graph one): they use the
        # same clients, and closing the saver closes the clients its copies opened.
        client_args = {
            "timeout": timeout,
            "retry": retry,
            "token": token,
            "token_file": token_file,
            "tls": tls,
        }
        self._clients = _Clients(target, client_args, client)
        self._options = _options(ttl, keep_last, session)

    @property
    def _agraphs(self) -> AsyncGraphClient:
        return self._clients.async_client().graphs(self.project_id)

    @property
    def _graphs(self) -> GraphClient:
        return self._clients.sync_client().graphs(self.project_id)

    async def aclose(self) -> None:
        """Close the clients this saver (or a copy of it) opened."""
        await self._clients.aclose()

    def close(self) -> None:
        """Close the sync client (an async one opened too needs ``aclose()``)."""
        self._clients.close()

    async def __aenter__(self) -> MemsvcSaver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> MemsvcSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Versions: a zero-padded counter (so versions sort as they increase) and a random
    # suffix (so two forks of a thread never give one version two values), as the
    # PostgreSQL saver's, but 29 characters instead of 49: every checkpoint lists one
    # per channel.

    def get_next_version(self, current: str | None, channel: None) -> str:
        if current is None:
            current_v = 0
        elif isinstance(current, int):
            current_v = current
        else:
            current_v = int(current.split(".")[0])
        # From the system's randomness, not the random module's generator: a program
        # that seeds that one would give its processes the same suffixes.
        return f"{current_v + 1:016}.{secrets.randbits(48):012x}"

    # Encoding.

    def _put_request(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> tuple[pb.GraphCheckpoint, RunnableConfig]:
        configurable = config["configurable"]
        thread_id = str(configurable["thread_id"])
        ns = str(configurable.get("checkpoint_ns", ""))
        document: dict[str, Any] = dict(checkpoint)
        values = document.pop("channel_values", {}) or {}
        # Small scalars ride in the document, as the PostgreSQL saver keeps them: a
        # shared row of their own would take more room than the value.
        document["channel_values"] = {k: v for k, v in values.items() if _inline(v)}
        versions = {k: str(v) for k, v in checkpoint["channel_versions"].items()}
        if all(isinstance(v, str) for v in checkpoint["channel_versions"].values()):
            # memsvc keeps them in its version map: not stored twice.
            del document["channel_versions"]
        doc_type, doc = self.serde.dumps_typed(document)
        message = pb.GraphCheckpoint(
            thread_id=thread_id,
            checkpoint_ns=ns,
            checkpoint_id=checkpoint["id"],
            parent_checkpoint_id=configurable.get("checkpoint_id") or "",
            checkpoint=pb.TypedValue(type=doc_type, data=doc),
            metadata_json=json.dumps(
                get_serializable_checkpoint_metadata(config, metadata), ensure_ascii=False
            ),
            channel_versions=versions,
        )
        for channel, version in new_versions.items():
            if (
                channel in values
                and channel not in document["channel_values"]
                and versions.get(channel) == str(version)
            ):
                value_type, data = self.serde.dumps_typed(values[channel])
                message.channel_values.add(
                    channel=channel,
                    version=str(version),
                    value=pb.TypedValue(type=value_type, data=data),
                )
        next_config: RunnableConfig = {
            "configurable": {
                "thread_id": thread_id,
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint["id"],
            }
        }
        return message, next_config

    def _writes(
        self, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str
    ) -> tuple[list[pb.GraphWrite], bool]:
        # As the PostgreSQL saver: special channels (errors, interrupts) replace.
        replace = all(channel in WRITES_IDX_MAP for channel, _ in writes)
        # A special channel written twice in one batch (a node that called interrupt()
        # twice resumes with two RESUME writes) has one index: keep one write, as the
        # PostgreSQL saver's statements do, the last when replacing (its upsert), else
        # the first (its ON CONFLICT DO NOTHING). memsvc refuses repeated indexes.
        by_index: dict[int, pb.GraphWrite] = {}
        for index, (channel, value) in enumerate(writes):
            idx = WRITES_IDX_MAP.get(channel, index)
            if idx in by_index and not replace:
                continue
            value_type, data = self.serde.dumps_typed(value)
            by_index[idx] = pb.GraphWrite(
                task_id=task_id,
                task_path=task_path,
                idx=idx,
                channel=channel,
                value=pb.TypedValue(type=value_type, data=data),
            )
        return list(by_index.values()), replace

    def _tuple(self, message: pb.GraphCheckpoint) -> CheckpointTuple:
        document: dict[str, Any] = self.serde.loads_typed(
            (message.checkpoint.type, message.checkpoint.data)
        )
        if "channel_versions" not in document:
            document["channel_versions"] = dict(message.channel_versions)
        document["channel_values"] = {
            **(document.get("channel_values") or {}),
            **{
                v.channel: self.serde.loads_typed((v.value.type, v.value.data))
                for v in message.channel_values
                if v.value.type != "empty"
            },
        }
        config: RunnableConfig = {
            "configurable": {
                "thread_id": message.thread_id,
                "checkpoint_ns": message.checkpoint_ns,
                "checkpoint_id": message.checkpoint_id,
            }
        }
        parent: RunnableConfig | None = None
        if message.parent_checkpoint_id:
            parent = {
                "configurable": {
                    "thread_id": message.thread_id,
                    "checkpoint_ns": message.checkpoint_ns,
                    "checkpoint_id": message.parent_checkpoint_id,
                }
            }
        writes = [
            (w.task_id, w.channel, self.serde.loads_typed((w.value.type, w.value.data)))
            for w in message.pending_writes
        ]
        metadata: CheckpointMetadata = json.loads(message.metadata_json or "{}")
        return CheckpointTuple(config, document, metadata, parent, writes)  # type: ignore[arg-type]

    # Async.

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        message, next_config = self._put_request(config, checkpoint, metadata, new_versions)
        await self._agraphs.put_checkpoint(
            message, require_latest_parent=self.fence, options=self._options
        )
        return next_config

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        if not writes:
            return
        configurable = config["configurable"]
        messages, replace = self._writes(writes, task_id, task_path)
        await self._agraphs.put_writes(
            str(configurable["thread_id"]),
            str(configurable["checkpoint_id"]),
            messages,
            checkpoint_ns=str(configurable.get("checkpoint_ns", "")),
            replace=replace,
        )

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await self._aread(config, ())

    async def _aread(
        self, config: RunnableConfig, channels: Sequence[str]
    ) -> CheckpointTuple | None:
        """The checkpoint, with only ``channels``' values and writes if any are named."""
        configurable = config["configurable"]
        try:
            message = await self._agraphs.get_checkpoint(
                str(configurable["thread_id"]),
                get_checkpoint_id(config),
                checkpoint_ns=str(configurable.get("checkpoint_ns", "")),
                channels=channels,
            )
        except GraphCheckpointNotFound:
            return None
        return self._tuple(message)

    async def aget_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """LangGraph's walk (see DeltaWalk), reading only ``channels``' values and
        writes of each ancestor."""
        if not channels:
            return {}
        walk = DeltaWalk(config, channels)
        walk.begin(await self._aread(config, channels))
        while walk.wanting:
            walk.take(await self._aread(walk.next_config, channels))
        return walk.history()

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        if limit is not None and limit <= 0:
            return
        thread_id, ns, checkpoint_id = _list_scope(config)
        pager = self._agraphs.checkpoints(
            thread_id,
            checkpoint_ns=ns,
            checkpoint_id=checkpoint_id,
            metadata=filter,
            before=get_checkpoint_id(before) if before else None,
            page_size=min(limit, 1000) if limit else None,
        )
        count = 0
        async for page in pager.pages():
            for message in page.items:
                yield self._tuple(message)
                count += 1
                if limit is not None and count >= limit:
                    return

    async def adelete_thread(self, thread_id: str) -> None:
        await self._agraphs.delete_thread(str(thread_id))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        if run_ids:
            await self._agraphs.delete_runs(_ids(run_ids, "run_ids"))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._agraphs.copy_thread(str(source_thread_id), str(target_thread_id))

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """As LangGraph's PostgreSQL saver: "keep_latest" refuses threads that use a
        DeltaChannel (NotImplementedError, and none of the threads is pruned), whose
        values older checkpoints rebuild. memsvc tells from the checkpoints' metadata,
        in its store: nothing of the threads is read here."""
        ids = _ids(thread_ids, "thread_ids")
        if ids:
            with _delta_threads_refused():
                await self._agraphs.prune(ids, strategy=_strategy(strategy))

    # Sync.

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        message, next_config = self._put_request(config, checkpoint, metadata, new_versions)
        self._graphs.put_checkpoint(
            message, require_latest_parent=self.fence, options=self._options
        )
        return next_config

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        if not writes:
            return
        configurable = config["configurable"]
        messages, replace = self._writes(writes, task_id, task_path)
        self._graphs.put_writes(
            str(configurable["thread_id"]),
            str(configurable["checkpoint_id"]),
            messages,
            checkpoint_ns=str(configurable.get("checkpoint_ns", "")),
            replace=replace,
        )

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._read(config, ())

    def _read(self, config: RunnableConfig, channels: Sequence[str]) -> CheckpointTuple | None:
        """As _aread."""
        configurable = config["configurable"]
        try:
            message = self._graphs.get_checkpoint(
                str(configurable["thread_id"]),
                get_checkpoint_id(config),
                checkpoint_ns=str(configurable.get("checkpoint_ns", "")),
                channels=channels,
            )
        except GraphCheckpointNotFound:
            return None
        return self._tuple(message)

    def get_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """As aget_delta_channel_history."""
        if not channels:
            return {}
        walk = DeltaWalk(config, channels)
        walk.begin(self._read(config, channels))
        while walk.wanting:
            walk.take(self._read(walk.next_config, channels))
        return walk.history()

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        if limit is not None and limit <= 0:
            return
        thread_id, ns, checkpoint_id = _list_scope(config)
        pager = self._graphs.checkpoints(
            thread_id,
            checkpoint_ns=ns,
            checkpoint_id=checkpoint_id,
            metadata=filter,
            before=get_checkpoint_id(before) if before else None,
            page_size=min(limit, 1000) if limit else None,
        )
        for count, message in enumerate(pager, start=1):
            yield self._tuple(message)
            if limit is not None and count >= limit:
                return

    def delete_thread(self, thread_id: str) -> None:
        self._graphs.delete_thread(str(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        if run_ids:
            self._graphs.delete_runs(_ids(run_ids, "run_ids"))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._graphs.copy_thread(str(source_thread_id), str(target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """See :meth:`aprune`."""
        ids = _ids(thread_ids, "thread_ids")
        if ids:
            with _delta_threads_refused():
                self._graphs.prune(ids, strategy=_strategy(strategy))


INLINE_MAX_CHARS = 64


def _inline(value: Any) -> bool:
    """A value kept in the checkpoint document: None, a bool, a number, a short string."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, str) and len(value) <= INLINE_MAX_CHARS


def _options(
    ttl: float | None, keep_last: int, session: SessionLink | None
) -> pb.GraphThreadOptions | None:
    if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
        # Not made 1 ms: that would forget the thread at the next sweep.
        raise ValueError(f"ttl must be a positive number of seconds, or None for never: {ttl!r}")
    if ttl is None and not keep_last and session is None:
        return None
    options = pb.GraphThreadOptions(keep_last=keep_last)
    if ttl is not None:
        options.ttl.FromMilliseconds(max(1, round(ttl * 1000)))
    if session is not None:
        options.session.CopyFrom(
            pb.GraphSessionLink(
                agent_instance_id=session.agent_instance_id,
                session_id=session.session_id,
                on_session_end=_END_ACTIONS[session.on_end],
            )
        )
    return options


@contextlib.contextmanager
def _delta_threads_refused() -> Iterator[None]:
    """The SDK's prune refuses threads with a DeltaChannel's metadata keys (under
    keep_latest): LangGraph's savers say so with NotImplementedError."""
    try:
        yield
    except GraphPruneRefused as refused:
        raise NotImplementedError(
            "keep_latest can't prune threads that use a DeltaChannel: "
            + ", ".join(map(repr, refused.refused_thread_ids))
        ) from refused


def _ids(ids: Sequence[str], name: str) -> list[str]:
    """A sequence of ids as strings; a lone string is refused, as the PostgreSQL
    saver does (iterated, "ab" would mean the ids "a" and "b")."""
    if isinstance(ids, str | bytes):
        raise TypeError(f"{name} must be a sequence of ids, not a {type(ids).__name__}")
    return [str(item) for item in ids]


def _strategy(strategy: str) -> Literal["keep_latest", "delete"]:
    if strategy == "keep_latest":
        return "keep_latest"
    if strategy == "delete":
        return "delete"
    raise ValueError(f"unknown prune strategy {strategy!r}: use 'keep_latest' or 'delete'")


def _list_scope(config: RunnableConfig | None) -> tuple[str | None, str | None, str | None]:
    """The thread, namespace and checkpoint id a listing keeps to (None: any). As
    LangGraph's savers, a config without ``checkpoint_ns`` lists every namespace,
    also when it names a checkpoint id (a subgraph's checkpoint is found by its id)."""
    if config is None:
        return None, None, None
    configurable = config.get("configurable") or {}
    thread_id = configurable.get("thread_id")
    ns = configurable.get("checkpoint_ns")
    return (
        None if thread_id is None else str(thread_id),
        None if ns is None else str(ns),
        get_checkpoint_id(config) or None,
    )
