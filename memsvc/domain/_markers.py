"""Session marker states shared by working memory and the lifecycle (ADR 0004)."""

from __future__ import annotations

# No marker: never spawned, terminated (and cleared), or lost by the store.
MISSING = "missing"
# A lifecycle operation is between its step 1 and step 3.
TRANSITIONAL = frozenset({"spawning", "pausing", "resuming", "terminating"})
# Where operations leave the marker (terminated: a Terminate that kept the memory).
SETTLED = frozenset({"active", "paused", "terminated"})
# Not a marker state: what a step reports for a marker of another epoch than the
# database's (a store restored from a copy older than the last Resume).
STALE = "stale"


# States in which a read is not served: the memory's contents depend on whether
# the operation committed (spawn seeds it, resume replaces it, terminate deletes
# it), so the marker is settled by the database's truth first. A pause changes
# no contents: reads go on while it runs.
READ_BLOCKING = frozenset({"spawning", "resuming", "terminating"})


class NoSession(Exception):
    """A read found no marker (``state`` MISSING: never spawned, ended, or lost by
    the store), or one in a READ_BLOCKING state."""

    def __init__(self, session_id: str, state: str = MISSING) -> None:
        super().__init__(f"no working memory for session {session_id!r} ({state})")
        self.session_id = session_id
        self.state = state
