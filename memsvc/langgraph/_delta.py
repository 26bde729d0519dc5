"""LangGraph's DeltaChannel history, walked over memsvc's listings.

``BaseCheckpointSaver.get_delta_channel_history`` reads each ancestor of a
checkpoint whole, one call per ancestor (LangGraph's default), until every channel
asked for has met a stored value. Over memsvc that moved every channel of every
ancestor, and an ancestor too large for one response (an input checkpoint holds
its input twice: as a value and as a pending write) made the thread unreadable
though the channels asked for were small. :class:`DeltaWalk` keeps the default's
contract and is fed instead from ListGraphCheckpoints with only those channels:
a page of ancestors per call, newest first, the other channels left on the server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    CheckpointTuple,
    DeltaChannelHistory,
    PendingWrite,
    get_checkpoint_id,
)

# Ancestors per listing page: DeltaChannel snapshots its value every 100 updates
# by default, so most walks end within one page.
PAGE_SIZE = 100


class DeltaWalk:
    """The parent-chain walk of ``get_delta_channel_history`` for ``channels``.

    The caller reads the target (``begin``), then lists the namespace's
    checkpoints below ``below``, newest first, and ``offer``s each one. A listing
    holds every older checkpoint of the namespace: those of other forks are passed
    over. When an ancestor is not where the listing would have it (an id that
    does not sort below its child's), ``offer`` says stop and the caller reads
    ``wanted`` itself and passes it to ``take``; a missing ancestor (pruned,
    deleted) ends the walk, as it ends LangGraph's.
    """

    def __init__(self, channels: Sequence[str]) -> None:
        self._channels = channels
        self._remaining = set(channels)
        self._writes: dict[str, list[PendingWrite]] = {c: [] for c in channels}
        self._seeds: dict[str, Any] = {}
        self.wanted: str | None = None  # the next ancestor's checkpoint id
        self.below = ""  # the last checkpoint read: the next listing starts below it

    @property
    def wanting(self) -> bool:
        return self.wanted is not None and bool(self._remaining)

    def listing(self, config: RunnableConfig) -> dict[str, Any]:
        """The arguments of the graph client's ``checkpoints`` for the next listing:
        the thread and namespace of ``config``, below ``below``, these channels."""
        configurable = config["configurable"]
        return {
            "thread_id": str(configurable["thread_id"]),
            "checkpoint_ns": str(configurable.get("checkpoint_ns", "")),
            "before": self.below,
            "page_size": PAGE_SIZE,
            "channels": self._channels,
        }

    def begin(self, target: CheckpointTuple | None) -> None:
        """Start from the target (its own writes are not part of its history)."""
        if target is not None:
            self._follow(target)

    def offer(self, checkpoint_id: str, read: Callable[[], CheckpointTuple]) -> bool:
        """Take the next listed checkpoint if it is the wanted ancestor (``read``
        decodes it); whether to go on with the listing."""
        if self.wanted is None or checkpoint_id < self.wanted:
            return False
        if checkpoint_id == self.wanted:
            self.take(read())
        return self.wanting

    def take(self, ancestor: CheckpointTuple | None) -> None:
        """Fold in the wanted ancestor (None: it is gone, and the walk ends)."""
        if ancestor is None:
            self.wanted = None
            return
        for write in reversed(ancestor.pending_writes or ()):
            if write[1] in self._remaining:
                self._writes[write[1]].append(write)
        values = ancestor.checkpoint["channel_values"]
        for channel in [c for c in self._remaining if c in values]:
            self._seeds[channel] = values[channel]
            self._remaining.discard(channel)
        self._follow(ancestor)

    def _follow(self, checkpoint: CheckpointTuple) -> None:
        self.below = str(get_checkpoint_id(checkpoint.config))
        parent = checkpoint.parent_config
        self.wanted = get_checkpoint_id(parent) if parent else None

    def history(self) -> dict[str, DeltaChannelHistory]:
        """Per channel asked for: its writes oldest first, and its seed if found."""
        result: dict[str, DeltaChannelHistory] = {}
        for channel in self._channels:
            entry: DeltaChannelHistory = {"writes": list(reversed(self._writes[channel]))}
            if channel in self._seeds:
                entry["seed"] = self._seeds[channel]
            result[channel] = entry
        return result
