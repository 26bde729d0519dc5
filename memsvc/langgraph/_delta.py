"""LangGraph's DeltaChannel history, read with only the channels it needs.

``BaseCheckpointSaver.get_delta_channel_history`` reads each ancestor of a
checkpoint whole, one call per ancestor (LangGraph's default), until every channel
asked for has met a stored value. Over memsvc that moved every channel of every
ancestor, and an ancestor too large for one response (an input checkpoint holds
its input twice: as a value and as a pending write) made the thread unreadable
though the channels asked for were small. :class:`DeltaWalk` keeps the default's
walk and contract, and its caller reads each ancestor with GetGraphCheckpoint's
``channels``: only those channels' values and writes travel.

One read per ancestor, as the default: a listing of the namespace would take fewer
calls on a straight thread, but it holds every other fork's checkpoints too (time
travel leaves thousands between a checkpoint and its parent), and one of them too
large for a response would fail a walk that never needed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    CheckpointTuple,
    DeltaChannelHistory,
    PendingWrite,
    get_checkpoint_id,
)


class DeltaWalk:
    """The parent-chain walk of ``get_delta_channel_history`` for ``channels``.

    The caller reads the target (``begin``), then, while ``wanting``, the checkpoint
    at ``next_config`` (``take``); a missing ancestor (pruned, deleted) ends the
    walk, as it ends LangGraph's.
    """

    def __init__(self, config: RunnableConfig, channels: Sequence[str]) -> None:
        configurable = config["configurable"]
        self._thread_id = configurable["thread_id"]
        self._ns = configurable.get("checkpoint_ns", "")
        self._channels = channels
        self._remaining = set(channels)
        self._writes: dict[str, list[PendingWrite]] = {c: [] for c in channels}
        self._seeds: dict[str, Any] = {}
        self._wanted: str | None = None  # the next ancestor's checkpoint id
        self._seen: set[str] = set()  # ids a parent chain that loops would repeat

    @property
    def wanting(self) -> bool:
        return self._wanted is not None and bool(self._remaining)

    @property
    def next_config(self) -> RunnableConfig:
        """Where the next ancestor is."""
        return {
            "configurable": {
                "thread_id": self._thread_id,
                "checkpoint_ns": self._ns,
                "checkpoint_id": self._wanted,
            }
        }

    def begin(self, target: CheckpointTuple | None) -> None:
        """Start from the target (its own writes are not part of its history)."""
        if target is not None:
            self._follow(target)

    def take(self, ancestor: CheckpointTuple | None) -> None:
        """Fold in the wanted ancestor (None: it is gone, and the walk ends)."""
        if ancestor is None:
            self._wanted = None
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
        self._seen.add(str(get_checkpoint_id(checkpoint.config)))
        parent = checkpoint.parent_config
        wanted = get_checkpoint_id(parent) if parent else None
        # A chain that comes back to a checkpoint it passed would never end.
        self._wanted = None if wanted in self._seen else wanted

    def history(self) -> dict[str, DeltaChannelHistory]:
        """Per channel asked for: its writes oldest first, and its seed if found."""
        result: dict[str, DeltaChannelHistory] = {}
        for channel in self._channels:
            entry: DeltaChannelHistory = {"writes": list(reversed(self._writes[channel]))}
            if channel in self._seeds:
                entry["seed"] = self._seeds[channel]
            result[channel] = entry
        return result
