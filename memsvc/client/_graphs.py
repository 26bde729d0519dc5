# ASYNC109: ``timeout`` is the gRPC deadline of a call, the name gRPC APIs use.
# ruff: noqa: ASYNC109
"""Graph checkpoints in the SDK: GraphCheckpointService for one project.

These calls carry LangGraph's data as the messages of ``memsvc.v1.graph_checkpoint``
(``GraphCheckpoint``, ``GraphWrite``): values are the serializer's (type, bytes)
pairs, which only the client reads. ``memsvc.langgraph.MemsvcSaver`` is the
friendly face over them; use these for tools (the CLI) or other frameworks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from memsvc.client._convert import page_request
from memsvc.client._errors import GraphPruneRefused
from memsvc.client._types import AsyncPager, Page
from memsvc.v1 import graph_checkpoint_pb2 as pb

if TYPE_CHECKING:
    from memsvc.client._async import AsyncClient

PruneStrategy = Literal["keep_latest", "delete"]
_STRATEGIES = {
    "keep_latest": pb.GRAPH_PRUNE_STRATEGY_KEEP_LATEST,
    "delete": pb.GRAPH_PRUNE_STRATEGY_DELETE,
}
# What a DeltaChannel leaves in checkpoint metadata (LangGraph Python: its update
# counters since the last snapshot; LangGraph.js: a marker on its threads). It
# rebuilds its value from older checkpoints' writes, so a keep_latest prune, which
# keeps no older checkpoint, would silently empty it: prunes refuse such threads.
DELTA_METADATA_KEYS = ("counters_since_delta_snapshot", "delta_writes_versioned")


class AsyncGraphClient:
    """A project's graph checkpoints (from ``client.graphs(project_id)``)."""

    def __init__(self, client: AsyncClient, project_id: str) -> None:
        self.client = client
        self.project_id = project_id

    def __repr__(self) -> str:
        return f"AsyncGraphClient(project_id={self.project_id!r})"

    @property
    def _stub(self) -> Any:
        return self.client._stub(4)

    async def put_checkpoint(
        self,
        checkpoint: pb.GraphCheckpoint,
        *,
        require_latest_parent: bool = False,
        options: pb.GraphThreadOptions | None = None,
        timeout: float | None = None,
    ) -> int:
        """Store a checkpoint with its changed values (PutGraphCheckpoint); returns
        how many values were new. Raises GraphCheckpointConflict when
        ``require_latest_parent`` and another writer moved the thread on.

        Retried by the SDK as a call with a request id is: putting the same
        checkpoint again stores the same step (docs/client.md, Retries).
        """
        request = pb.PutGraphCheckpointRequest(
            project_id=self.project_id,
            checkpoint=checkpoint,
            require_latest_parent=require_latest_parent,
            options=options,
        )
        response = await self.client._invoke(
            self._stub.PutGraphCheckpoint, request, timeout=timeout
        )
        return int(response.values_stored)

    async def put_writes(
        self,
        thread_id: str,
        checkpoint_id: str,
        writes: Sequence[pb.GraphWrite],
        *,
        checkpoint_ns: str = "",
        replace: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Store pending writes against a checkpoint (PutGraphWrites); retried by the
        SDK, as putting them again stores the same writes."""
        request = pb.PutGraphWritesRequest(
            project_id=self.project_id,
            thread_id=thread_id,
            checkpoint_ns=checkpoint_ns,
            checkpoint_id=checkpoint_id,
            writes=writes,
            replace=replace,
        )
        await self.client._invoke(self._stub.PutGraphWrites, request, timeout=timeout)

    async def get_checkpoint(
        self,
        thread_id: str,
        checkpoint_id: str | None = None,
        *,
        checkpoint_ns: str = "",
        channels: Iterable[str] = (),
        timeout: float | None = None,
    ) -> pb.GraphCheckpoint:
        """One checkpoint, the latest without an id (GetGraphCheckpoint), with its
        values and writes (only those of ``channels``, if any are named). Raises
        GraphCheckpointNotFound."""
        request = pb.GetGraphCheckpointRequest(
            project_id=self.project_id,
            thread_id=thread_id,
            checkpoint_ns=checkpoint_ns,
            checkpoint_id=checkpoint_id or "",
            channels=list(channels),
        )
        response = await self.client._invoke(
            self._stub.GetGraphCheckpoint, request, timeout=timeout
        )
        checkpoint: pb.GraphCheckpoint = response.checkpoint
        return checkpoint

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
    ) -> AsyncPager[pb.GraphCheckpoint]:
        """Checkpoints newest first (ListGraphCheckpoints): of a thread (or all),
        one namespace (or all), one checkpoint id (or all: an id may be in several
        namespaces), whose metadata holds ``metadata``, before a checkpoint id;
        with only the values and writes of ``channels``, if any are named."""
        request = pb.ListGraphCheckpointsRequest(
            project_id=self.project_id,
            thread_id=thread_id or "",
            checkpoint_id=checkpoint_id or "",
            metadata_filter_json=json.dumps(dict(metadata)) if metadata else "",
            before_checkpoint_id=before or "",
            page_size=page_size or 0,
            channels=list(channels),
        )
        if checkpoint_ns is not None:
            request.checkpoint_ns = checkpoint_ns
        client = self.client

        async def fetch(token: str) -> Page[pb.GraphCheckpoint]:
            response = await client._invoke(
                self._stub.ListGraphCheckpoints, page_request(request, token), timeout=timeout
            )
            return Page(tuple(response.checkpoints), response.next_page_token or None)

        return AsyncPager(fetch, page_token)

    async def delete_thread(self, thread_id: str, *, timeout: float | None = None) -> int:
        """Forget a thread (DeleteGraphThread); returns how many checkpoints went."""
        request = pb.DeleteGraphThreadRequest(project_id=self.project_id, thread_id=thread_id)
        response = await self.client._invoke(self._stub.DeleteGraphThread, request, timeout=timeout)
        return int(response.checkpoints_deleted)

    async def delete_runs(self, run_ids: Iterable[str], *, timeout: float | None = None) -> int:
        """Delete the checkpoints of these runs (DeleteGraphRuns)."""
        request = pb.DeleteGraphRunsRequest(project_id=self.project_id, run_ids=list(run_ids))
        response = await self.client._invoke(self._stub.DeleteGraphRuns, request, timeout=timeout)
        return int(response.checkpoints_deleted)

    async def copy_thread(
        self, source_thread_id: str, target_thread_id: str, *, timeout: float | None = None
    ) -> int:
        """Copy a thread into another (CopyGraphThread); returns checkpoints copied."""
        request = pb.CopyGraphThreadRequest(
            project_id=self.project_id,
            source_thread_id=source_thread_id,
            target_thread_id=target_thread_id,
        )
        response = await self.client._invoke(self._stub.CopyGraphThread, request, timeout=timeout)
        return int(response.checkpoints_copied)

    async def prune(
        self,
        thread_ids: Iterable[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        force: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Keep each namespace's latest checkpoint, or delete all (PruneGraphThreads);
        returns how many checkpoints were deleted.

        ``keep_latest`` leaves threads that use a LangGraph DeltaChannel (their
        checkpoints' metadata holds one of DELTA_METADATA_KEYS: pruning would empty
        its value) and raises GraphPruneRefused naming them; when one is found first,
        none of the threads is pruned. ``force=True`` prunes them too.
        """
        keys = () if force else DELTA_METADATA_KEYS
        response = await self.prune_threads(
            thread_ids, strategy=strategy, refuse_metadata_keys=keys, timeout=timeout
        )
        if response.refused_thread_ids:
            raise GraphPruneRefused(
                list(response.refused_thread_ids), int(response.checkpoints_deleted)
            )
        return int(response.checkpoints_deleted)

    async def prune_threads(
        self,
        thread_ids: Iterable[str],
        *,
        strategy: PruneStrategy = "keep_latest",
        refuse_metadata_keys: Iterable[str] = DELTA_METADATA_KEYS,
        timeout: float | None = None,
    ) -> pb.PruneGraphThreadsResponse:
        """As :meth:`prune`, answering the whole response instead of raising: with
        ``keep_latest``, a thread with a checkpoint whose metadata holds one of
        ``refuse_metadata_keys`` (by default DELTA_METADATA_KEYS; ``()`` refuses
        none) is not pruned (when one is found first, none is), and
        ``refused_thread_ids`` names them."""
        request = pb.PruneGraphThreadsRequest(
            project_id=self.project_id,
            thread_ids=list(thread_ids),
            strategy=_STRATEGIES[strategy],
            refuse_metadata_keys=list(refuse_metadata_keys),
        )
        response: pb.PruneGraphThreadsResponse = await self.client._invoke(
            self._stub.PruneGraphThreads, request, timeout=timeout
        )
        return response
