"""Session marker states shared by working memory and the lifecycle (ADR 0004)."""

from __future__ import annotations

# No marker: never spawned, terminated (and cleared), or lost by the store.
MISSING = "missing"
# A lifecycle operation is between its step 1 and step 3.
TRANSITIONAL = frozenset({"spawning", "pausing", "resuming", "terminating"})


class NoSession(Exception):
    """A read found no marker: the session was never spawned, ended, or was lost."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no working memory for session {session_id!r}")
        self.session_id = session_id
