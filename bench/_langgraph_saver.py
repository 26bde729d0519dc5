"""The durable-storage baseline of the lifecycle benchmark: LangGraph's AsyncPostgresSaver.

The session's whole state (``{key: value}``) is held in ONE channel, ``memory``,
of a LangGraph checkpoint. "pause" is ``aput`` of a new checkpoint whose channel
has a new version (so its blob is written again, serialized by LangGraph's
JsonPlusSerializer, msgpack); "resume" is ``aget_tuple`` of that checkpoint,
which reads and deserializes the blob. Both run in this process, through the
saver's own connection (``AsyncPostgresSaver.from_conn_string``), against
the benchmark's private PostgreSQL database, after ``setup()``.

LangGraph is a bench-only dependency, not one of memsvc's::

    .venv/bin/pip install 'langgraph-checkpoint-postgres==3.2.0'  # the version measured

It is imported at run time (``load()``), so that memsvc's type checks and the
rest of the benchmark do not need it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from collections.abc import AsyncIterator
from typing import Any

CHANNEL = "memory"
DISTRIBUTION = "langgraph-checkpoint-postgres"


class LangGraphMissing(ImportError):
    """langgraph-checkpoint-postgres is not installed."""


def version() -> str:
    """The installed version of langgraph-checkpoint-postgres."""
    return importlib.metadata.version(DISTRIBUTION)


def load() -> None:
    """Raise LangGraphMissing unless the saver can be imported."""
    try:
        importlib.import_module("langgraph.checkpoint.postgres.aio")
    except ImportError as error:
        raise LangGraphMissing(
            f"{DISTRIBUTION} is not installed ({error}); "
            f"`.venv/bin/pip install {DISTRIBUTION}` to include it"
        ) from error


class SaverSession:
    """One thread of checkpoints, each holding the whole state in one channel."""

    def __init__(self, saver: Any, thread_id: str, state: dict[str, Any]) -> None:
        self._saver = saver
        self._state = state
        self._config: dict[str, Any] = {
            "configurable": {"thread_id": thread_id, "checkpoint_ns": ""}
        }
        self._step = 0
        base = importlib.import_module("langgraph.checkpoint.base")
        self._empty_checkpoint: Any = base.empty_checkpoint
        self._uuid6: Any = importlib.import_module("langgraph.checkpoint.base.id").uuid6

    async def pause(self) -> dict[str, Any]:
        """aput a checkpoint of the state; return its config (thread and checkpoint id)."""
        self._step += 1
        version = f"{self._step:032}.0"
        checkpoint = self._empty_checkpoint()
        checkpoint["id"] = str(self._uuid6(clock_seq=self._step))
        checkpoint["channel_values"] = {CHANNEL: self._state}
        checkpoint["channel_versions"] = {CHANNEL: version}
        metadata = {"source": "update", "step": self._step, "parents": {}}
        config: dict[str, Any] = await self._saver.aput(
            self._config, checkpoint, metadata, {CHANNEL: version}
        )
        self._config = config
        return config

    async def resume(self, config: dict[str, Any]) -> dict[str, Any]:
        """aget_tuple of a checkpoint; return the state it holds."""
        found = await self._saver.aget_tuple(config)
        if found is None:
            raise LookupError(f"checkpoint {config} not found")
        state: dict[str, Any] = found.checkpoint["channel_values"][CHANNEL]
        return state


@contextlib.asynccontextmanager
async def saver(database_url: str) -> AsyncIterator[Any]:
    """An AsyncPostgresSaver on its own connection, its tables set up."""
    module = importlib.import_module("langgraph.checkpoint.postgres.aio")
    async with module.AsyncPostgresSaver.from_conn_string(database_url) as instance:
        await instance.setup()
        yield instance
