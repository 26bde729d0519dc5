"""The sync client: the async client run on a private event loop in a background thread.

Each sync method submits the matching coroutine to that loop and waits for its
result, so both clients share one implementation (deadlines, retries, request ids,
watch resumption) and differ only in how a caller waits. A ``Client`` may be used
from several threads at once. Its loop thread is a daemon; ``close()`` (or the
``with`` block) stops it.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload

import grpc

from memsvc._loop_portal import LoopPortal
from memsvc.client._async import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    AsyncClient,
    AsyncEpisodesClient,
    AsyncSessionClient,
)
from memsvc.client._auth import TLS
from memsvc.client._errors import Cancelled
from memsvc.client._graphs import AsyncGraphClient
from memsvc.client._retry import RetryPolicy
from memsvc.client._types import (
    AsyncPager,
    Checkpoint,
    CheckpointEntry,
    Entry,
    Episode,
    EventTypeLike,
    KeyInfo,
    LifecycleEvent,
    OutcomeLike,
    Page,
    SearchResult,
    Seconds,
    Session,
    SessionStateLike,
    WatchProgress,
    WatchStart,
)
from memsvc.client._watch import AsyncWatch
from memsvc.v1 import graph_checkpoint_pb2

P = ParamSpec("P")
T = TypeVar("T")
Item = TypeVar("Item")


class _Wrapper:
    """A sync face of an async object; ``_blocking`` methods run on ``_portal``."""

    _portal: LoopPortal
    _inner: Any


class _ProjectWrapper(_Wrapper):
    """The sync face of a client bound to a project (sessions, episodes, graphs)."""

    def __init__(self, client: Client, inner: Any) -> None:
        # Held: a Client collected while something it made is in use would stop
        # the loop under it.
        self._client = client
        self._portal = client._portal
        self._inner = inner
        self.project_id: str = inner.project_id

    def __repr__(self) -> str:
        return repr(self._inner).removeprefix("Async")


def _blocking(
    method: Callable[Concatenate[Any, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[_Wrapper, P], T]:
    """The sync version of an async method of the wrapped class (same parameters)."""
    name = method.__name__

    @functools.wraps(method)
    def call(self: _Wrapper, /, *args: P.args, **kwargs: P.kwargs) -> T:
        result: T = self._portal.run(getattr(self._inner, name)(*args, **kwargs))
        return result

    return call


class Pager(Generic[T]):
    """A paginated listing: ``for item in pager`` reads every page as needed.

    ``pager.pages()`` iterates whole pages; ``pager.collect()`` reads all into a list.
    """

    def __init__(self, client: Client, pager: AsyncPager[T]) -> None:
        self._client = client  # held: its loop runs the pages (see _ProjectWrapper)
        self._portal = client._portal
        self._pager = pager

    def fetch_page(self, page_token: str | None = None) -> Page[T]:
        """One page: the first (or the one ``page_token`` names)."""
        return self._portal.run(self._pager.fetch_page(page_token))

    def pages(self) -> Iterator[Page[T]]:
        page = self.fetch_page()
        yield page
        while page.next_page_token is not None:
            page = self.fetch_page(page.next_page_token)
            yield page

    def collect(self, limit: int | None = None) -> list[T]:
        """Every item (or the first ``limit``), reading only the pages needed."""
        return self._portal.run(self._pager.collect(limit))

    def __iter__(self) -> Iterator[T]:
        for page in self.pages():
            yield from page.items


class Watch(Generic[Item]):
    """A blocking iterator of lifecycle events; see ``AsyncClient.watch``.

    ``with client.watch(...) as events: for event in events: ...``. One dropped
    without being closed releases its stream when collected, as the AsyncWatch it
    alone holds does (from this thread, on the client's loop).
    """

    def __init__(self, client: Client, watch: AsyncWatch[Item]) -> None:
        self._client = client  # held: its loop runs the stream (see _ProjectWrapper)
        self._portal = client._portal
        self._watch = watch

    @property
    def sequence(self) -> int | None:
        """The last sequence seen (event or progress)."""
        return self._watch.sequence

    @property
    def connections(self) -> int:
        return self._watch.connections

    def start(self) -> Watch[Item]:
        """Connect and wait for the server's first message (once)."""
        self._portal.run(self._watch.start())
        return self

    def close(self) -> None:
        if self._portal.closed:
            return  # the client was closed: its loop, and this stream, are gone
        try:
            self._portal.run(self._watch.aclose())
        except (Cancelled, RuntimeError):
            if not self._portal.closed:
                raise

    def __enter__(self) -> Watch[Item]:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Watch[Item]:
        return self

    def __next__(self) -> Item:
        try:
            return self._portal.run(self._watch.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None


class Client(_Wrapper):
    """A blocking memsvc client; same arguments and methods as :class:`AsyncClient`.

    ``with Client("127.0.0.1:50051") as client: ...``
    """

    _inner: AsyncClient

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
        # Built first: bad arguments raise before the loop thread starts.
        inner = AsyncClient(
            target,
            timeout=timeout,
            retry=retry,
            channel_options=channel_options,
            token=token,
            token_file=token_file,
            tls=tls,
            credentials=credentials,
            grpc_metadata=grpc_metadata,
        )
        self._portal = LoopPortal("memsvc-client", "the sync memsvc Client", cut_off=Cancelled)
        self._inner = inner
        self._closed = False

    @property
    def target(self) -> str:
        return self._inner.target

    @property
    def timeout(self) -> float | None:
        return self._inner.timeout

    @property
    def retry(self) -> RetryPolicy:
        return self._inner.retry

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the channel is connected; TimeoutError after ``timeout`` seconds,
        Cancelled when the client is closed meanwhile (from another thread)."""
        self._portal.run(self._inner.wait_ready(timeout))

    def close(self) -> None:
        """Close the channel and stop the loop thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            # A loop already gone (interpreter teardown, a forked child) has
            # nothing to close: no error, as for Watch.close().
            if not self._portal.closed:
                self._portal.run(self._inner.close())
        finally:
            self._portal.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        warnings.warn(
            f"unclosed {self!r}: use 'with' or close()", ResourceWarning, stacklevel=1, source=self
        )
        self._closed = True
        self._inner._owns_channel = False  # its loop is gone: the warning above says it all
        self._portal.stop(wait=False)

    def session(self, project_id: str, agent_instance_id: str, session_id: str) -> SessionClient:
        """The session named by these ids: its working memory, lifecycle and checkpoints."""
        return SessionClient(self, self._inner.session(project_id, agent_instance_id, session_id))

    def episodes(self, project_id: str) -> EpisodesClient:
        """A project's episodic memory."""
        return EpisodesClient(self, self._inner.episodes(project_id))

    def graphs(self, project_id: str) -> GraphClient:
        """A project's graph checkpoints (GraphCheckpointService)."""
        return GraphClient(self, self._inner.graphs(project_id))

    def list_sessions(
        self,
        project_id: str,
        *,
        agent_instance_id: str | None = None,
        state: SessionStateLike | None = None,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> Pager[Session]:
        """A project's sessions, newest first (ListSessions), optionally filtered."""
        return Pager(
            self,
            self._inner.list_sessions(
                project_id,
                agent_instance_id=agent_instance_id,
                state=state,
                page_size=page_size,
                page_token=page_token,
                timeout=timeout,
            ),
        )

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
    ) -> Watch[LifecycleEvent]: ...

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
    ) -> Watch[LifecycleEvent | WatchProgress]: ...

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
    ) -> Watch[Any]:
        """Follow lifecycle events live, reconnecting on its own; see AsyncClient.watch."""
        return Watch(
            self,
            self._inner._open_watch(
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
            ),
        )

    purge = _blocking(AsyncClient.purge)


class SessionClient(_ProjectWrapper):
    """One session (from ``client.session()``); methods as AsyncSessionClient's."""

    _inner: AsyncSessionClient

    def __init__(self, client: Client, inner: AsyncSessionClient) -> None:
        super().__init__(client, inner)
        self.agent_instance_id = inner.agent_instance_id
        self.session_id = inner.session_id

    set = _blocking(AsyncSessionClient.set)
    get = _blocking(AsyncSessionClient.get)
    get_entry = _blocking(AsyncSessionClient.get_entry)
    delete = _blocking(AsyncSessionClient.delete)
    get_all = _blocking(AsyncSessionClient.get_all)
    get_many = _blocking(AsyncSessionClient.get_many)
    set_many = _blocking(AsyncSessionClient.set_many)
    delete_many = _blocking(AsyncSessionClient.delete_many)
    spawn = _blocking(AsyncSessionClient.spawn)
    pause = _blocking(AsyncSessionClient.pause)
    resume = _blocking(AsyncSessionClient.resume)
    terminate = _blocking(AsyncSessionClient.terminate)
    describe = _blocking(AsyncSessionClient.describe)
    create_checkpoint = _blocking(AsyncSessionClient.create_checkpoint)
    get_checkpoint = _blocking(AsyncSessionClient.get_checkpoint)
    delete_checkpoint = _blocking(AsyncSessionClient.delete_checkpoint)
    purge = _blocking(AsyncSessionClient.purge)

    def keys(
        self,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> Pager[KeyInfo]:
        """The live keys with sizes and expiry, no values, in byte order (ListKeys)."""
        return Pager(
            self._client,
            self._inner.keys(page_size=page_size, page_token=page_token, timeout=timeout),
        )

    def entries(
        self,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> Pager[Entry]:
        """The live entries with values, in byte order of their keys (ListEntries)."""
        return Pager(
            self._client,
            self._inner.entries(page_size=page_size, page_token=page_token, timeout=timeout),
        )

    def checkpoints(
        self,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> Pager[Checkpoint]:
        """The session's checkpoints, newest first (ListCheckpoints)."""
        return Pager(
            self._client,
            self._inner.checkpoints(page_size=page_size, page_token=page_token, timeout=timeout),
        )

    def checkpoint_entries(
        self,
        checkpoint_id: str,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
    ) -> Pager[CheckpointEntry]:
        """A checkpoint's entries in byte order of their keys."""
        return Pager(
            self._client,
            self._inner.checkpoint_entries(
                checkpoint_id, page_size=page_size, page_token=page_token, timeout=timeout
            ),
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
    ) -> Watch[LifecycleEvent]: ...

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
    ) -> Watch[LifecycleEvent | WatchProgress]: ...

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
    ) -> Watch[Any]:
        """This session's lifecycle events: ``client.watch()`` filtered to it."""
        return Watch(
            self._client,
            self._inner.client._open_watch(
                project_id=self._inner.project_id,
                agent_instance_id=self._inner.agent_instance_id,
                session_id=self._inner.session_id,
                event_types=event_types,
                after_sequence=after_sequence,
                start=start,
                progress_interval=progress_interval,
                include_progress=include_progress,
                reconnect=reconnect,
                reconnect_timeout=reconnect_timeout,
            ),
        )


class EpisodesClient(_ProjectWrapper):
    """A project's episodic memory (from ``client.episodes()``)."""

    _inner: AsyncEpisodesClient

    record = _blocking(AsyncEpisodesClient.record)
    get = _blocking(AsyncEpisodesClient.get)
    delete = _blocking(AsyncEpisodesClient.delete)

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
    ) -> Pager[SearchResult]:
        """Episodes ranked best first (SearchEpisodes); see AsyncEpisodesClient.search."""
        return Pager(
            self._client,
            self._inner.search(
                query,
                embedding=embedding,
                agent_instance_id=agent_instance_id,
                session_id=session_id,
                outcome=outcome,
                task_type=task_type,
                start_time=start_time,
                end_time=end_time,
                min_importance=min_importance,
                include_embedding=include_embedding,
                page_size=page_size,
                page_token=page_token,
                timeout=timeout,
            ),
        )

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
    ) -> Pager[Episode]:
        """The project's episodes, newest first (ListEpisodes), optionally filtered."""
        return Pager(
            self._client,
            self._inner.list(
                agent_instance_id=agent_instance_id,
                session_id=session_id,
                outcome=outcome,
                task_type=task_type,
                start_time=start_time,
                end_time=end_time,
                min_importance=min_importance,
                include_embedding=include_embedding,
                page_size=page_size,
                page_token=page_token,
                timeout=timeout,
            ),
        )


class GraphClient(_ProjectWrapper):
    """A project's graph checkpoints (from ``client.graphs()``)."""

    _inner: AsyncGraphClient

    put_checkpoint = _blocking(AsyncGraphClient.put_checkpoint)
    put_writes = _blocking(AsyncGraphClient.put_writes)
    get_checkpoint = _blocking(AsyncGraphClient.get_checkpoint)
    delete_thread = _blocking(AsyncGraphClient.delete_thread)
    delete_runs = _blocking(AsyncGraphClient.delete_runs)
    copy_thread = _blocking(AsyncGraphClient.copy_thread)
    prune = _blocking(AsyncGraphClient.prune)
    prune_threads = _blocking(AsyncGraphClient.prune_threads)

    def checkpoints(
        self,
        thread_id: str | None = None,
        *,
        checkpoint_ns: str | None = None,
        checkpoint_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        before: str | None = None,
        page_size: int | None = None,
        page_token: str | None = None,
        channels: Iterable[str] = (),
        timeout: float | None = None,
    ) -> Pager[graph_checkpoint_pb2.GraphCheckpoint]:
        """Checkpoints newest first; see AsyncGraphClient.checkpoints."""
        return Pager(
            self._client,
            self._inner.checkpoints(
                thread_id,
                checkpoint_ns=checkpoint_ns,
                checkpoint_id=checkpoint_id,
                metadata=metadata,
                before=before,
                page_size=page_size,
                page_token=page_token,
                channels=channels,
                timeout=timeout,
            ),
        )
