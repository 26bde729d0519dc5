# ASYNC109: ``timeout`` is the gRPC deadline of a call, the name gRPC APIs use.
# ruff: noqa: ASYNC109
"""The async client: every RPC of memsvc.v1 as a typed method on plain Python values."""

from __future__ import annotations

import asyncio
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, TypedDict, overload

import grpc

from memsvc import __version__
from memsvc.client import _convert
from memsvc.client._auth import TLS, BearerToken
from memsvc.client._errors import Cancelled, KeyNotFound
from memsvc.client._graphs import AsyncGraphClient
from memsvc.client._retry import Invoker, RetryPolicy
from memsvc.client._types import (
    AsyncPager,
    Checkpoint,
    CheckpointEntry,
    DeleteManyResult,
    Entry,
    Episode,
    EventTypeLike,
    JSONValue,
    KeyInfo,
    LifecycleEvent,
    OutcomeLike,
    Page,
    PauseResult,
    PurgeReport,
    ResumeResult,
    SearchResult,
    Seconds,
    Session,
    SessionStateLike,
    SetResult,
    TerminateResult,
    WatchProgress,
    WatchStart,
    WithTTL,
)
from memsvc.client._values import (
    fill_duration,
    fill_timestamp,
    fill_ttl,
    to_struct,
    to_value,
)
from memsvc.client._watch import EVENTS_PER_MESSAGE, AsyncWatch
from memsvc.v1 import (
    data_removal_pb2,
    data_removal_pb2_grpc,
    episodic_pb2,
    episodic_pb2_grpc,
    graph_checkpoint_pb2_grpc,
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    working_memory_pb2,
    working_memory_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0

# Defaults a caller's channel_options override, name by name.
DEFAULT_CHANNEL_OPTIONS: dict[str, str | int] = {
    "grpc.primary_user_agent": f"memsvc-python/{__version__}",
    # Notice a dead peer on a quiet stream (memsvc permits pings every 10 s).
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
    # Reconnect to a restarted sidecar within seconds, not grpc's default 2 minutes.
    "grpc.initial_reconnect_backoff_ms": 250,
    "grpc.min_reconnect_backoff_ms": 250,
    "grpc.max_reconnect_backoff_ms": 5_000,
    # Any size memsvc sends: its max_message_bytes bounds responses (grpc's client
    # default, 4 MiB, would refuse what a memsvc configured larger sends).
    "grpc.max_receive_message_length": -1,
}


# How often wait_ready() looks at the channel's state. grpc's channel_ready() would
# wake at the change instead, but a close ends its wait badly: a closed channel
# fails it with UsageError, and, cancelled, its watch stays registered with gRPC
# until the channel goes (one from ``from_channel`` may never go).
READY_POLL_SECONDS = 0.05


class _Missing:
    """The default of ``get(key, default=...)``: raise KeyNotFound."""

    def __repr__(self) -> str:
        return "<raise KeyNotFound>"


_MISSING: Any = _Missing()


def _bearer(token: str | None, token_file: str | os.PathLike[str] | None) -> BearerToken | None:
    if token is not None and token_file is not None:
        raise ValueError("give token or token_file, not both")
    if token is not None:
        return BearerToken(token)
    if token_file is not None:
        return BearerToken(file=token_file)
    return None


def _request_id(given: str | None) -> str:
    return given if given else str(uuid.uuid4())


def _page_size(page_size: int | None) -> int:
    return 0 if page_size is None else page_size


class AsyncClient:
    """An async memsvc client over one gRPC channel.

    ``async with AsyncClient("127.0.0.1:50051") as client: ...``. The channel opens on
    first use (inside the running event loop) and closes with ``close()`` or the
    ``async with`` block. A client is cheap to share between tasks.

    Args:
        target: ``host:port``, or ``unix:/path/to/socket``.
        timeout: default deadline of each call in seconds, covering all its attempts
            (None: no deadline). Every method also takes ``timeout=``.
        retry: the RetryPolicy (default: ``RetryPolicy()``, 5 attempts).
        channel_options: gRPC channel options, over the SDK's defaults.
        token: a bearer token, sent as ``authorization: Bearer <token>`` with every call.
        token_file: a file holding the token instead (a mounted Secret, say); read again
            when it changes, so the token can rotate under a running client.
        tls: TLS to the server: ``True`` trusts the system's root certificates;
            ``TLS(ca_file=..., cert_file=..., key_file=...)`` names the CA and, for
            mutual TLS, the client certificate. None (default): plaintext.
        credentials: gRPC channel credentials for full control of TLS (instead of ``tls``).
        grpc_metadata: gRPC metadata sent with every call.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        channel_options: Mapping[str, str | int] | Sequence[tuple[str, str | int]] = (),
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        tls: TLS | bool | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        grpc_metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.target = target
        options = dict(DEFAULT_CHANNEL_OPTIONS)
        if tls is True:
            tls = TLS()
        if isinstance(tls, TLS):
            if credentials is not None:
                raise ValueError("give tls or credentials, not both")
            credentials = tls.channel_credentials()
            options.update(tls.channel_options())
        options.update(
            channel_options.items() if isinstance(channel_options, Mapping) else channel_options
        )
        self._channel_options = list(options.items())
        self._credentials = credentials
        self._channel: Any = None
        self._owns_channel = True
        bearer = _bearer(token, token_file)
        if bearer is not None and any(key.lower() == "authorization" for key, _ in grpc_metadata):
            # memsvc refuses a call with two (which one counts must not depend on order).
            raise ValueError(
                "give token or token_file, or an authorization in grpc_metadata, not both"
            )
        self._invoke = Invoker(retry or RetryPolicy(), timeout, grpc_metadata, bearer)
        self._stubs: tuple[Any, Any, Any, Any, Any] | None = None
        # The event loop of its first call: gRPC's channels serve that loop only.
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_channel(
        cls,
        channel: grpc.aio.Channel,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        grpc_metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncClient:
        """A client over a channel the caller owns (``close()`` leaves it open, and
        cancels only this client's calls and watches on it)."""
        client = cls(
            timeout=timeout,
            retry=retry,
            token=token,
            token_file=token_file,
            grpc_metadata=grpc_metadata,
        )
        client.target = ""
        client._channel = client._invoke.channel = channel
        client._owns_channel = False
        return client

    @property
    def timeout(self) -> float | None:
        """The default deadline of a call, in seconds."""
        return self._invoke.timeout

    @property
    def retry(self) -> RetryPolicy:
        return self._invoke.policy

    @property
    def channel(self) -> grpc.aio.Channel:
        """The gRPC channel (opened now if it is not yet)."""
        if self._invoke.closed:
            raise RuntimeError(f"{self!r} is closed")
        self._bound_to_this_loop()
        if self._channel is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(
                    self.target, options=self._channel_options
                )
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=self._channel_options
                )
            self._invoke.channel = self._channel
        return self._channel

    def _bound_to_this_loop(self) -> None:
        """Bind the client to the running event loop at its first use in one, and
        refuse any other loop after: gRPC's channel serves the loop it was made in,
        and its own error says only "Event loop is closed" (or nothing: a hang)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # read outside any loop (the channel property): nothing to check
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(
                f"{self!r} belongs to the event loop it was first used in, not this"
                " one: create a client in each event loop (each asyncio.run())"
            )

    def _stub(self, index: int) -> Any:
        if self._stubs is not None:
            self._bound_to_this_loop()
        else:
            channel = self.channel  # refuses a closed client, binds the loop
            self._stubs = (
                working_memory_pb2_grpc.WorkingMemoryServiceStub(channel),
                lifecycle_pb2_grpc.LifecycleServiceStub(channel),
                episodic_pb2_grpc.EpisodicMemoryServiceStub(channel),
                data_removal_pb2_grpc.DataRemovalServiceStub(channel),
                graph_checkpoint_pb2_grpc.GraphCheckpointServiceStub(channel),
            )
        return self._stubs[index]

    @property
    def _wm(self) -> Any:
        return self._stub(0)

    @property
    def _lifecycle(self) -> Any:
        return self._stub(1)

    @property
    def _episodic(self) -> Any:
        return self._stub(2)

    @property
    def _removal(self) -> Any:
        return self._stub(3)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the channel is connected (a sidecar still starting, say).

        Raises TimeoutError after ``timeout`` seconds, and Cancelled when the client
        is closed meanwhile (as calls in flight then do).
        """
        channel = self.channel
        async with asyncio.timeout(timeout):
            while channel.get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY:
                if await self._invoke.closed_within(READY_POLL_SECONDS):
                    raise Cancelled(
                        "wait_ready() was cancelled: the client was closed while it waited"
                    )

    async def close(self) -> None:
        """Close the channel (unless it came from ``from_channel``); idempotent.

        Calls in flight and open watches raise Cancelled (over a channel from
        ``from_channel`` too); later calls raise RuntimeError.
        """
        # What tells the client, its calls and watches it is closed; it cancels
        # their gRPC calls itself, as the channel may stay open.
        self._invoke.close()
        channel, self._channel = self._channel, None
        self._stubs = None
        # The invoker's reference too: a closed grpc.aio channel still referenced
        # keeps gRPC's poller thread (and a forked child's gRPC) going.
        self._invoke.channel = None
        if channel is not None and self._owns_channel:
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r})"

    def __del__(self) -> None:
        if getattr(self, "_owns_channel", False) and getattr(self, "_channel", None) is not None:
            warnings.warn(
                f"unclosed {self!r}: use 'async with' or await close()",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )

    # Scopes.

    def session(
        self, project_id: str, agent_instance_id: str, session_id: str
    ) -> AsyncSessionClient:
        """The session named by these ids: its working memory, lifecycle and checkpoints."""
        return AsyncSessionClient(self, project_id, agent_instance_id, session_id)

    def episodes(self, project_id: str) -> AsyncEpisodesClient:
        """A project's episodic memory."""
        return AsyncEpisodesClient(self, project_id)

    # LifecycleService, project level.

    def graphs(self, project_id: str) -> AsyncGraphClient:
        """A project's graph checkpoints (GraphCheckpointService)."""
        return AsyncGraphClient(self, project_id)

    def list_sessions(
        self,
        project_id: str,
        *,
        agent_instance_id: str | None = None,
        state: SessionStateLike | None = None,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> AsyncPager[Session]:
        """A project's sessions, newest first (ListSessions), optionally filtered."""
        request = lifecycle_pb2.ListSessionsRequest(
            project_id=project_id,
            agent_instance_id=agent_instance_id or "",
            page_size=_page_size(page_size),
        )
        if state is not None:
            request.state = _convert.state_wire(state)

        async def fetch(token: str) -> Page[Session]:
            response = await self._invoke(
                self._lifecycle.ListSessions, _convert.page_request(request, token), timeout=timeout
            )
            return Page(
                tuple(_convert.session(s) for s in response.sessions),
                response.next_page_token or None,
            )

        return AsyncPager(fetch, page_token)

    @overload
    def watch(
        self,
        project_id: str | None = None,
        *,
        agent_instance_id: str | None = None,
        session_id: str | None = None,
        event_types: Iterable[EventTypeLike] | None = None,
        after_sequence: int | None = None,
        start: WatchStart = "now",
        progress_interval: Seconds | None = None,
        include_progress: Literal[False] = False,
        reconnect: bool = True,
        reconnect_timeout: float | None = None,
    ) -> AsyncWatch[LifecycleEvent]: ...

    @overload
    def watch(
        self,
        project_id: str | None = None,
        *,
        agent_instance_id: str | None = None,
        session_id: str | None = None,
        event_types: Iterable[EventTypeLike] | None = None,
        after_sequence: int | None = None,
        start: WatchStart = "now",
        progress_interval: Seconds | None = None,
        include_progress: bool = False,
        reconnect: bool = True,
        reconnect_timeout: float | None = None,
    ) -> AsyncWatch[LifecycleEvent | WatchProgress]: ...

    def watch(
        self,
        project_id: str | None = None,
        *,
        agent_instance_id: str | None = None,
        session_id: str | None = None,
        event_types: Iterable[EventTypeLike] | None = None,
        after_sequence: int | None = None,
        start: WatchStart = "now",
        progress_interval: Seconds | None = None,
        include_progress: bool = False,
        reconnect: bool = True,
        reconnect_timeout: float | None = None,
    ) -> AsyncWatch[Any]:
        """Follow lifecycle events live (WatchLifecycle), reconnecting on its own.

        Filters (``None`` matches everything): project, agent instance, session, event
        types (an empty collection is refused). Start: after ``after_sequence`` (a
        cursor saved from ``watch.sequence``), else ``start`` = "now" or "oldest"
        (every retained event). ``after_sequence=0`` means from the first event ever,
        which fails with WatchPositionCompacted once retention compacted it: use
        ``start="oldest"`` for every retained event.

        On UNAVAILABLE (a server shutting down or unreachable), ABORTED,
        DEADLINE_EXCEEDED, CANCELLED from the server's side (a proxy resetting the
        stream), a stream that ends or one silent for three progress intervals, the
        watch reconnects with the retry policy's backoff and resumes
        after the last sequence it saw (events and progress both count): no event is
        repeated or skipped. It gives up after ``reconnect_timeout`` seconds (> 0; None:
        never) without a working stream, counted from the loss of the last one or from
        ``start()``, raising ``Unavailable`` chained to the last error; with
        ``reconnect=False`` it ends at the first failure. A cursor older than the
        retained events raises ``WatchPositionCompacted`` (with ``oldest_sequence``).
        Use it as ``async with client.watch(...) as events``.
        """
        return self._open_watch(
            project_id=project_id,
            agent_instance_id=agent_instance_id,
            session_id=session_id,
            event_types=event_types,
            after_sequence=after_sequence,
            start=start,
            progress_interval=progress_interval,
            include_progress=include_progress,
            reconnect=reconnect,
            reconnect_timeout=reconnect_timeout,
        )

    def _open_watch(
        self,
        *,
        project_id: str | None,
        agent_instance_id: str | None,
        session_id: str | None,
        event_types: Iterable[EventTypeLike] | None,
        after_sequence: int | None,
        start: WatchStart,
        progress_interval: Seconds | None,
        include_progress: bool,
        reconnect: bool,
        reconnect_timeout: float | None,
    ) -> AsyncWatch[Any]:
        request = lifecycle_pb2.WatchLifecycleRequest(
            project_id=project_id or "",
            agent_instance_id=agent_instance_id or "",
            session_id=session_id or "",
        )
        if event_types is not None:
            wanted = _convert.event_types_wire(event_types)
            if not wanted:
                # The server reads no type as every type: a filter that emptied
                # (nothing selected) must not widen to everything.
                raise ValueError("event_types is empty: pass None to watch every type")
            request.event_types.extend(wanted)
        if reconnect_timeout is not None and not reconnect_timeout > 0:
            # It bounds the first connection too, which 0 s would always fail.
            raise ValueError(
                "reconnect_timeout must be > 0 seconds (None: never give up); "
                "reconnect=False ends the watch at its first failure"
            )
        if after_sequence is not None:
            if after_sequence < 0:
                raise ValueError("after_sequence must not be negative")
            request.after_sequence = after_sequence
        elif start == "oldest":
            request.start = lifecycle_pb2.WATCH_START_OLDEST
        elif start == "now":
            request.start = lifecycle_pb2.WATCH_START_NOW
        else:
            raise ValueError(f"start must be 'now' or 'oldest', got {start!r}")
        if progress_interval is not None:
            fill_duration(progress_interval, request.progress_interval, "progress_interval")
        request.max_events_per_message = EVENTS_PER_MESSAGE

        def open_stream(
            message: lifecycle_pb2.WatchLifecycleRequest, metadata: Sequence[tuple[str, str]]
        ) -> Any:
            # A resuming watch's stream waits for the channel to connect (gRPC's
            # wait_for_ready), as unary attempts do, rather than fail at once for as
            # long as gRPC waits out its reconnection backoff after a restart (up to
            # 5 s, the watch's own backoff then added). The wait is bounded as a
            # silent stream's is: by the silence limit and reconnect_timeout.
            return self._lifecycle.WatchLifecycle(
                message, metadata=metadata, wait_for_ready=reconnect or None
            )

        return AsyncWatch(
            open_stream,
            request,
            include_progress=include_progress,
            policy=self._invoke.policy,
            reconnect=reconnect,
            reconnect_timeout=reconnect_timeout,
            grpc_metadata=self._invoke.metadata,
            token_rotated=self._invoke.token_rotated,
            closing=self._invoke,
        )

    # DataRemovalService.

    async def purge(
        self,
        project_id: str,
        agent_instance_id: str | None = None,
        session_id: str | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> PurgeReport:
        """Forget a project, an agent instance or a session everywhere (PurgeData).

        Idempotent; the request id (made for you) makes a retry return the first report.
        """
        rid = _request_id(request_id)
        request = data_removal_pb2.PurgeDataRequest(
            project_id=project_id,
            agent_instance_id=agent_instance_id or "",
            session_id=session_id or "",
            request_id=rid,
        )
        response = await self._invoke(
            self._removal.PurgeData, request, timeout=timeout, request_id=rid
        )
        return _convert.purge_report(response)


def _entry_inputs(
    values: Mapping[str, JSONValue],
    ttl: Seconds | None,
    target: Any,
    what: str,
) -> None:
    """Fill repeated EntryInput ``target`` from a mapping (values may be WithTTL)."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{what}: expected a mapping of key to value")
    for key, given in values.items():
        entry_ttl = ttl
        if isinstance(given, WithTTL):
            given, entry_ttl = given.value, given.ttl
        entry = target.add(key=key)
        to_value(given, entry.value)
        if entry_ttl is not None:
            fill_ttl(entry_ttl, entry.ttl, f"{what}[{key!r}].ttl")


class _Ids(TypedDict):
    project_id: str
    agent_instance_id: str
    session_id: str


class AsyncSessionClient:
    """One session: working memory, lifecycle and checkpoints (from ``client.session()``).

    Creating it calls nothing; it names the session for the calls below.
    """

    def __init__(
        self, client: AsyncClient, project_id: str, agent_instance_id: str, session_id: str
    ) -> None:
        self.client = client
        self.project_id = project_id
        self.agent_instance_id = agent_instance_id
        self.session_id = session_id
        self._ids = _Ids(
            project_id=project_id, agent_instance_id=agent_instance_id, session_id=session_id
        )

    def __repr__(self) -> str:
        return (
            f"AsyncSessionClient(project_id={self.project_id!r}, "
            f"agent_instance_id={self.agent_instance_id!r}, session_id={self.session_id!r})"
        )

    # WorkingMemoryService.

    async def set(
        self,
        key: str,
        value: JSONValue,
        *,
        ttl: Seconds | None = None,
        timeout: float | None = None,
    ) -> SetResult:
        """Store ``value`` under ``key`` (Set), replacing value and TTL.

        ``ttl``: seconds or a timedelta (more than 0), rounded up to milliseconds;
        None: no expiry (and an earlier TTL is removed). 0 raises ValueError: the
        wire would read it as no expiry.
        """
        client = self.client
        request = working_memory_pb2.SetRequest(**self._ids, key=key)
        to_value(value, request.value)
        if ttl is not None:
            fill_ttl(ttl, request.ttl, "ttl")
        return _convert.set_result(await client._invoke(client._wm.Set, request, timeout=timeout))

    async def get(self, key: str, default: Any = _MISSING, *, timeout: float | None = None) -> Any:
        """The value under ``key`` (Get).

        Raises KeyNotFound when it is absent or expired, unless ``default`` is given.
        """
        try:
            return (await self.get_entry(key, timeout=timeout)).value
        except KeyNotFound:
            if default is _MISSING:
                raise
            return default

    async def get_entry(self, key: str, *, timeout: float | None = None) -> Entry:
        """The entry under ``key``, with its expiry (Get). Raises KeyNotFound."""
        client = self.client
        request = working_memory_pb2.GetRequest(**self._ids, key=key)
        response = await client._invoke(client._wm.Get, request, timeout=timeout)
        return _convert.entry(response.entry)

    async def delete(self, key: str, *, timeout: float | None = None) -> bool:
        """Remove ``key`` (Delete); whether it existed. Absent keys are fine."""
        client = self.client
        request = working_memory_pb2.DeleteRequest(**self._ids, key=key)
        response = await client._invoke(client._wm.Delete, request, timeout=timeout)
        return bool(response.existed)

    def keys(
        self,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> AsyncPager[KeyInfo]:
        """The live keys with sizes and expiry, no values, in byte order (ListKeys)."""
        client = self.client
        request = working_memory_pb2.ListKeysRequest(**self._ids, page_size=_page_size(page_size))

        async def fetch(token: str) -> Page[KeyInfo]:
            response = await client._invoke(
                client._wm.ListKeys, _convert.page_request(request, token), timeout=timeout
            )
            return Page(
                tuple(_convert.key_info(k) for k in response.keys),
                response.next_page_token or None,
            )

        return AsyncPager(fetch, page_token)

    def entries(
        self,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> AsyncPager[Entry]:
        """The live entries with values, in byte order of their keys (ListEntries)."""
        return self._entries(page_size, page_token, lambda: timeout)

    def _entries(
        self, page_size: int | None, page_token: str | None, timeout: Callable[[], float | None]
    ) -> AsyncPager[Entry]:
        """``entries()``, each page's timeout taken from ``timeout()`` when it is read."""
        client = self.client
        request = working_memory_pb2.ListEntriesRequest(
            **self._ids, page_size=_page_size(page_size)
        )

        async def fetch(token: str) -> Page[Entry]:
            response = await client._invoke(
                client._wm.ListEntries, _convert.page_request(request, token), timeout=timeout()
            )
            return Page(
                tuple(_convert.entry(e) for e in response.entries),
                response.next_page_token or None,
            )

        return AsyncPager(fetch, page_token)

    async def get_all(self, *, timeout: float | None = None) -> dict[str, JSONValue]:
        """The whole working memory as a dict, read page by page (ListEntries);
        ``timeout`` is the budget of all the pages together."""
        invoke = self.client._invoke
        deadline = invoke.deadline(timeout)
        pager = self._entries(None, None, lambda: invoke.remaining(deadline))
        return {entry.key: entry.value async for entry in pager}

    async def get_many(
        self, keys: Iterable[str], *, timeout: float | None = None
    ) -> dict[str, JSONValue]:
        """The values of up to 1,000 keys (BatchGet); absent keys are left out.

        Keys the server leaves unprocessed (past 3 MiB of values) are read with
        further calls, so the result is complete; ``timeout`` is the budget of them all.
        """
        client = self.client
        wanted = list(keys)
        found: dict[str, JSONValue] = {}
        deadline = client._invoke.deadline(timeout)
        while wanted:
            request = working_memory_pb2.BatchGetRequest(**self._ids, keys=wanted)
            response = await client._invoke(
                client._wm.BatchGet, request, timeout=client._invoke.remaining(deadline)
            )
            for entry in response.entries:
                found[entry.key] = _convert.entry(entry).value
            remaining = list(response.unprocessed_keys)
            if len(remaining) >= len(wanted):
                break  # no progress: never loop forever
            wanted = remaining
        return found

    async def set_many(
        self,
        values: Mapping[str, JSONValue],
        *,
        ttl: Seconds | None = None,
        timeout: float | None = None,
    ) -> list[SetResult]:
        """Write up to 1,000 entries atomically, all or none (BatchSet).

        ``ttl`` applies to every entry; wrap a value as ``WithTTL(value, ttl)`` to give
        it its own. Results are in the mapping's order.
        """
        if not values:
            return []
        client = self.client
        request = working_memory_pb2.BatchSetRequest(**self._ids)
        _entry_inputs(values, ttl, request.entries, "entries")
        response = await client._invoke(client._wm.BatchSet, request, timeout=timeout)
        return [_convert.set_result(result) for result in response.results]

    async def delete_many(
        self, keys: Iterable[str], *, timeout: float | None = None
    ) -> DeleteManyResult:
        """Remove up to 1,000 keys atomically (BatchDelete); absent keys are fine."""
        wanted = list(keys)
        if not wanted:
            return DeleteManyResult((), ())
        client = self.client
        request = working_memory_pb2.BatchDeleteRequest(**self._ids, keys=wanted)
        response = await client._invoke(client._wm.BatchDelete, request, timeout=timeout)
        return DeleteManyResult(tuple(response.deleted_keys), tuple(response.absent_keys))

    # LifecycleService.

    async def spawn(
        self,
        initial: Mapping[str, JSONValue] | None = None,
        *,
        agent_type_id: str | None = None,
        metadata: Mapping[str, JSONValue] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Session:
        """Create the session, ACTIVE, optionally seeding its working memory (Spawn).

        ``initial``: key -> value (``WithTTL(value, ttl)`` for an expiring one).
        Raises SessionAlreadyExists when the id is or was in use.
        """
        client = self.client
        rid = _request_id(request_id)
        request = lifecycle_pb2.SpawnRequest(
            **self._ids, agent_type_id=agent_type_id or "", request_id=rid
        )
        if initial:
            _entry_inputs(initial, None, request.initial_entries, "initial")
        to_struct(metadata, request.metadata)
        response = await client._invoke(
            client._lifecycle.Spawn, request, timeout=timeout, request_id=rid
        )
        return _convert.session(response.session)

    async def pause(
        self,
        *,
        checkpoint_id: str | None = None,
        metadata: Mapping[str, JSONValue] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> PauseResult:
        """Snapshot the working memory into a checkpoint and refuse writes (Pause)."""
        client = self.client
        rid = _request_id(request_id)
        request = lifecycle_pb2.PauseRequest(
            **self._ids, checkpoint_id=checkpoint_id or "", request_id=rid
        )
        to_struct(metadata, request.metadata)
        response = await client._invoke(
            client._lifecycle.Pause, request, timeout=timeout, request_id=rid
        )
        return PauseResult(
            _convert.session(response.session), _convert.checkpoint(response.checkpoint)
        )

    async def resume(
        self,
        checkpoint_id: str | None = None,
        *,
        merge: bool = False,
        metadata: Mapping[str, JSONValue] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> ResumeResult:
        """Make the session ACTIVE from a checkpoint (Resume).

        ``checkpoint_id`` None: the one its Pause created. ``merge=False``: the working
        memory becomes exactly the checkpoint; True: the checkpoint's entries are
        written over the current ones. On an ACTIVE session this is a rollback.
        """
        client = self.client
        rid = _request_id(request_id)
        request = lifecycle_pb2.ResumeRequest(
            **self._ids,
            checkpoint_id=checkpoint_id or "",
            merge_with_current=merge,
            request_id=rid,
        )
        to_struct(metadata, request.metadata)
        response = await client._invoke(
            client._lifecycle.Resume, request, timeout=timeout, request_id=rid
        )
        return ResumeResult(
            _convert.session(response.session),
            _convert.checkpoint(response.checkpoint),
            response.entries_restored,
        )

    async def terminate(
        self,
        *,
        task_description: str | None = None,
        outcome: OutcomeLike | None = None,
        lessons_learned: Iterable[str] = (),
        consolidate: bool = True,
        keep_working_memory: bool = False,
        metadata: Mapping[str, JSONValue] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> TerminateResult:
        """End the session for good (Terminate).

        By default records one episode of it (``consolidate=False``: none; ``outcome``
        None means success) and deletes its working memory and checkpoints
        (``keep_working_memory=True`` keeps both, read-only).
        """
        client = self.client
        rid = _request_id(request_id)
        request = lifecycle_pb2.TerminateRequest(
            **self._ids,
            task_description=task_description or "",
            lessons_learned=list(lessons_learned),
            skip_consolidation=not consolidate,
            keep_working_memory=keep_working_memory,
            request_id=rid,
        )
        if outcome is not None:
            request.outcome = _convert.outcome_wire(outcome)
        to_struct(metadata, request.metadata)
        response = await client._invoke(
            client._lifecycle.Terminate, request, timeout=timeout, request_id=rid
        )
        return TerminateResult(
            session=_convert.session(response.session),
            episode_id=response.episode_id or None,
            entries_consolidated=response.entries_consolidated,
            entries_cleared=response.entries_cleared,
            outcome=_convert.outcome(response.outcome),
        )

    async def describe(self, *, timeout: float | None = None) -> Session:
        """The session's state, version and working-memory status (GetSession).

        Raises SessionNotFound for a session never spawned.
        """
        client = self.client
        request = lifecycle_pb2.GetSessionRequest(**self._ids)
        response = await client._invoke(client._lifecycle.GetSession, request, timeout=timeout)
        return _convert.session(response.session)

    async def create_checkpoint(
        self,
        *,
        checkpoint_id: str | None = None,
        metadata: Mapping[str, JSONValue] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Checkpoint:
        """Snapshot an ACTIVE session's working memory without pausing it (CreateCheckpoint)."""
        client = self.client
        rid = _request_id(request_id)
        request = lifecycle_pb2.CreateCheckpointRequest(
            **self._ids, checkpoint_id=checkpoint_id or "", request_id=rid
        )
        to_struct(metadata, request.metadata)
        response = await client._invoke(
            client._lifecycle.CreateCheckpoint, request, timeout=timeout, request_id=rid
        )
        return _convert.checkpoint(response.checkpoint)

    def checkpoints(
        self,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> AsyncPager[Checkpoint]:
        """The session's checkpoints, newest first (ListCheckpoints)."""
        client = self.client
        request = lifecycle_pb2.ListCheckpointsRequest(**self._ids, page_size=_page_size(page_size))

        async def fetch(token: str) -> Page[Checkpoint]:
            response = await client._invoke(
                client._lifecycle.ListCheckpoints,
                _convert.page_request(request, token),
                timeout=timeout,
            )
            return Page(
                tuple(_convert.checkpoint(c) for c in response.checkpoints),
                response.next_page_token or None,
            )

        return AsyncPager(fetch, page_token)

    async def get_checkpoint(
        self, checkpoint_id: str, *, timeout: float | None = None
    ) -> Checkpoint:
        """One checkpoint's metadata (GetCheckpoint). Raises CheckpointNotFound."""
        client = self.client
        request = lifecycle_pb2.GetCheckpointRequest(**self._ids, checkpoint_id=checkpoint_id)
        response = await client._invoke(client._lifecycle.GetCheckpoint, request, timeout=timeout)
        return _convert.checkpoint(response.checkpoint)

    def checkpoint_entries(
        self,
        checkpoint_id: str,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> AsyncPager[CheckpointEntry]:
        """A checkpoint's entries in byte order of their keys (GetCheckpoint with entries)."""
        client = self.client
        request = lifecycle_pb2.GetCheckpointRequest(
            **self._ids,
            checkpoint_id=checkpoint_id,
            include_entries=True,
            page_size=_page_size(page_size),
        )

        async def fetch(token: str) -> Page[CheckpointEntry]:
            response = await client._invoke(
                client._lifecycle.GetCheckpoint,
                _convert.page_request(request, token),
                timeout=timeout,
            )
            return Page(
                tuple(_convert.checkpoint_entry(e) for e in response.entries),
                response.next_page_token or None,
            )

        return AsyncPager(fetch, page_token)

    async def delete_checkpoint(
        self,
        checkpoint_id: str,
        *,
        metadata: Mapping[str, JSONValue] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Delete a checkpoint (DeleteCheckpoint); never a paused session's resume point."""
        client = self.client
        rid = _request_id(request_id)
        request = lifecycle_pb2.DeleteCheckpointRequest(
            **self._ids, checkpoint_id=checkpoint_id, request_id=rid
        )
        to_struct(metadata, request.metadata)
        await client._invoke(
            client._lifecycle.DeleteCheckpoint, request, timeout=timeout, request_id=rid
        )

    @overload
    def watch(
        self,
        *,
        event_types: Iterable[EventTypeLike] | None = None,
        after_sequence: int | None = None,
        start: WatchStart = "now",
        progress_interval: Seconds | None = None,
        include_progress: Literal[False] = False,
        reconnect: bool = True,
        reconnect_timeout: float | None = None,
    ) -> AsyncWatch[LifecycleEvent]: ...

    @overload
    def watch(
        self,
        *,
        event_types: Iterable[EventTypeLike] | None = None,
        after_sequence: int | None = None,
        start: WatchStart = "now",
        progress_interval: Seconds | None = None,
        include_progress: bool = False,
        reconnect: bool = True,
        reconnect_timeout: float | None = None,
    ) -> AsyncWatch[LifecycleEvent | WatchProgress]: ...

    def watch(
        self,
        *,
        event_types: Iterable[EventTypeLike] | None = None,
        after_sequence: int | None = None,
        start: WatchStart = "now",
        progress_interval: Seconds | None = None,
        include_progress: bool = False,
        reconnect: bool = True,
        reconnect_timeout: float | None = None,
    ) -> AsyncWatch[Any]:
        """This session's lifecycle events: ``client.watch()`` filtered to it."""
        return self.client._open_watch(
            project_id=self.project_id,
            agent_instance_id=self.agent_instance_id,
            session_id=self.session_id,
            event_types=event_types,
            after_sequence=after_sequence,
            start=start,
            progress_interval=progress_interval,
            include_progress=include_progress,
            reconnect=reconnect,
            reconnect_timeout=reconnect_timeout,
        )

    # DataRemovalService.

    async def purge(
        self, *, request_id: str | None = None, timeout: float | None = None
    ) -> PurgeReport:
        """Forget this session everywhere (PurgeData); its id may be spawned again."""
        return await self.client.purge(
            self.project_id,
            self.agent_instance_id,
            self.session_id,
            request_id=request_id,
            timeout=timeout,
        )


def _episode_filter(
    target: episodic_pb2.EpisodeFilter,
    *,
    agent_instance_id: str | None,
    session_id: str | None,
    outcome: OutcomeLike | None,
    task_type: str | None,
    start_time: datetime | None,
    end_time: datetime | None,
    min_importance: float | None,
) -> None:
    target.agent_instance_id = agent_instance_id or ""
    target.session_id = session_id or ""
    if outcome is not None:
        target.outcome = _convert.outcome_wire(outcome)
    target.task_type = task_type or ""
    if start_time is not None:
        fill_timestamp(start_time, target.start_time, "start_time")
    if end_time is not None:
        fill_timestamp(end_time, target.end_time, "end_time")
    if min_importance is not None:
        target.min_importance = min_importance


class AsyncEpisodesClient:
    """A project's episodic memory (from ``client.episodes(project_id)``)."""

    def __init__(self, client: AsyncClient, project_id: str) -> None:
        self.client = client
        self.project_id = project_id

    def __repr__(self) -> str:
        return f"AsyncEpisodesClient(project_id={self.project_id!r})"

    async def record(
        self,
        *,
        agent_instance_id: str,
        session_id: str,
        task_type: str,
        outcome: OutcomeLike,
        task_description: str = "",
        outcome_details: str = "",
        actions: Iterable[Mapping[str, JSONValue]] = (),
        context_summary: str = "",
        lessons_learned: Iterable[str] = (),
        duration: Seconds | None = None,
        tokens_used: int = 0,
        importance: float = 0.0,
        metadata: Mapping[str, JSONValue] | None = None,
        embedding: Sequence[float] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Episode:
        """Store one episode (RecordEpisode); returns it with its id and time.

        The request id (made for you) makes a retry return the first answer.
        """
        client = self.client
        rid = _request_id(request_id)
        episode = episodic_pb2.Episode(
            project_id=self.project_id,
            agent_instance_id=agent_instance_id,
            session_id=session_id,
            task_type=task_type,
            task_description=task_description,
            outcome=_convert.outcome_wire(outcome),
            outcome_details=outcome_details,
            context_summary=context_summary,
            lessons_learned=list(lessons_learned),
            tokens_used=tokens_used,
            importance=importance,
        )
        for index, action in enumerate(actions):
            to_struct(action, episode.actions.add(), f"actions[{index}]")
        if duration is not None:
            fill_duration(duration, episode.duration, "duration")
        to_struct(metadata, episode.metadata)
        if embedding is not None:
            episode.embedding.extend(embedding)
        request = episodic_pb2.RecordEpisodeRequest(episode=episode, request_id=rid)
        response = await client._invoke(
            client._episodic.RecordEpisode, request, timeout=timeout, request_id=rid
        )
        return _convert.episode(response.episode)

    async def get(
        self, episode_id: str, *, include_embedding: bool = False, timeout: float | None = None
    ) -> Episode:
        """One episode (GetEpisode). Raises EpisodeNotFound."""
        client = self.client
        request = episodic_pb2.GetEpisodeRequest(
            project_id=self.project_id, episode_id=episode_id, include_embedding=include_embedding
        )
        response = await client._invoke(client._episodic.GetEpisode, request, timeout=timeout)
        return _convert.episode(response.episode)

    async def delete(
        self,
        episode_id: str,
        *,
        allow_missing: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Forget one episode (DeleteEpisode). Raises EpisodeNotFound unless
        ``allow_missing``. The request id (made for you) makes a retry after a lost
        answer succeed as the first attempt did, instead of finding nothing."""
        client = self.client
        rid = _request_id(request_id)
        request = episodic_pb2.DeleteEpisodeRequest(
            project_id=self.project_id,
            episode_id=episode_id,
            allow_missing=allow_missing,
            request_id=rid,
        )
        await client._invoke(
            client._episodic.DeleteEpisode, request, timeout=timeout, request_id=rid
        )

    def search(
        self,
        query: str | None = None,
        *,
        embedding: Sequence[float] | None = None,
        agent_instance_id: str | None = None,
        session_id: str | None = None,
        outcome: OutcomeLike | None = None,
        task_type: str | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        min_importance: float | None = None,
        include_embedding: bool = False,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> AsyncPager[SearchResult]:
        """Episodes ranked best first (SearchEpisodes).

        ``query``: words (stemmed, all must match) and "quoted phrases" over task
        description, lessons learned and context summary. ``embedding``: rank by
        cosine similarity instead (``query``, if also given, only filters).
        """
        client = self.client
        request = episodic_pb2.SearchEpisodesRequest(
            project_id=self.project_id,
            query=query or "",
            include_embedding=include_embedding,
            page_size=_page_size(page_size),
        )
        if embedding is not None:
            request.query_embedding.extend(embedding)
        _episode_filter(
            request.filter,
            agent_instance_id=agent_instance_id,
            session_id=session_id,
            outcome=outcome,
            task_type=task_type,
            start_time=start_time,
            end_time=end_time,
            min_importance=min_importance,
        )

        async def fetch(token: str) -> Page[SearchResult]:
            response = await client._invoke(
                client._episodic.SearchEpisodes,
                _convert.page_request(request, token),
                timeout=timeout,
            )
            return Page(
                tuple(_convert.search_result(r) for r in response.results),
                response.next_page_token or None,
            )

        return AsyncPager(fetch, page_token)

    def list(
        self,
        *,
        agent_instance_id: str | None = None,
        session_id: str | None = None,
        outcome: OutcomeLike | None = None,
        task_type: str | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        min_importance: float | None = None,
        include_embedding: bool = False,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> AsyncPager[Episode]:
        """The project's episodes, newest first (ListEpisodes), optionally filtered.

        ``start_time`` is inclusive, ``end_time`` exclusive (aware datetimes).
        """
        client = self.client
        request = episodic_pb2.ListEpisodesRequest(
            project_id=self.project_id,
            include_embedding=include_embedding,
            page_size=_page_size(page_size),
        )
        _episode_filter(
            request.filter,
            agent_instance_id=agent_instance_id,
            session_id=session_id,
            outcome=outcome,
            task_type=task_type,
            start_time=start_time,
            end_time=end_time,
            min_importance=min_importance,
        )

        async def fetch(token: str) -> Page[Episode]:
            response = await client._invoke(
                client._episodic.ListEpisodes,
                _convert.page_request(request, token),
                timeout=timeout,
            )
            return Page(
                tuple(_convert.episode(e) for e in response.episodes),
                response.next_page_token or None,
            )

        return AsyncPager(fetch, page_token)
