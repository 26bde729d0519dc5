"""The durable store's SQL, assembled from the per-feature modules."""

from __future__ import annotations

from memsvc.store._episodes_sql import SqlEpisodeReads, SqlEpisodeWrites
from memsvc.store._graph_sql import SqlGraphReads, SqlGraphWrites
from memsvc.store._lifecycle_sql import SqlLifecycleTransaction, SqlReads
from memsvc.store._purge_sql import SqlPurgeWrites


class SqlTransaction(SqlLifecycleTransaction, SqlEpisodeWrites, SqlPurgeWrites, SqlGraphWrites):
    """Every write a durable-store transaction offers, on one connection."""


class SqlDurableReads(SqlReads, SqlEpisodeReads, SqlGraphReads):
    """Every read of the durable store; a store provides ``_query``."""
