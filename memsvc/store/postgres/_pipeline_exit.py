"""psycopg's pipelines end with their Sync alone, without a Flush after it.

psycopg 3 ends a pipeline by sending Sync and then, while results are still on
their way, a Flush ('H') of its own. A Sync already makes PostgreSQL send
everything, so the Flush asks for nothing; but behind a transaction pooler it
does harm. PgBouncer (1.18 here, in transaction mode) hands the server
connection back to its pool at the Sync's ReadyForQuery, takes the Flush that
follows for the start of a new transaction, links a server connection to the
client for it, and PostgreSQL answers a Flush with nothing: that server
connection stays linked to an idle memsvc connection until it happens to send
something else. With a small pool every replica then waited for minutes (a
review of the pooler deployment). Ending with the Sync alone, as psycopg's own
``Pipeline.sync()`` does, fixes it.

Applied once, when memsvc's PostgreSQL store is imported; tests/pooler proves
that no server connection stays linked after a pipeline.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from psycopg import _pipeline_base
from psycopg.generators import send


def _exit_gen(self: Any) -> Generator[Any, Any, None]:
    """The end of a pipeline: its Sync, and every result before it read."""
    try:
        self._enqueue_sync()
        yield from self._communicate_gen()
    finally:
        # What libpq still holds of the statements and the Sync goes out first:
        # communicating stops once every command was handed over, after one write,
        # and a large statement (a checkpoint of 15 MB) is not written whole by one;
        # PostgreSQL would wait for the rest and this for its answer. psycopg's own
        # exit sends it after a Flush message, the one left out here.
        yield from send(self.pgconn)
        # flush=False: the Sync flushed PostgreSQL's output (as in _sync_gen).
        yield from self._fetch_gen(flush=False)


def end_pipelines_with_their_sync() -> None:
    """Replace psycopg's pipeline exit (idempotent). Fails loudly if psycopg no
    longer has the method this replaces: its behaviour must be checked again."""
    pipeline = _pipeline_base.BasePipeline
    if not callable(getattr(pipeline, "_exit_gen", None)):
        raise RuntimeError("psycopg's BasePipeline has no _exit_gen: check the pooler fix")
    pipeline._exit_gen = _exit_gen  # type: ignore[method-assign]
