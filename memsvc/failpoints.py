"""Failpoints: named places where a test can make memsvc fail on purpose.

Off unless ``MEMSVC_FAILPOINTS`` names some, as ``name=action`` pairs separated
by commas, for example ``pause.after_prepare=crash``. Actions:

- ``crash``: the process exits at once (``os._exit``), as a SIGKILL would stop it;
- ``error``: the operation raises :class:`FailpointError` at that point.

The lifecycle has two points per operation (ADR 0004), where ``op`` is one of
``spawn``, ``pause``, ``resume``, ``terminate``:

- ``op.after_prepare``: working-memory step 1 done, database not yet committed;
- ``op.before_finish``: database committed, working-memory step 3 not yet run.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

ACTIONS = ("crash", "error")
OPERATIONS = ("spawn", "pause", "resume", "terminate")
POINTS = tuple(f"{op}.{when}" for op in OPERATIONS for when in ("after_prepare", "before_finish"))
CRASH_EXIT_STATUS = 86


class FailpointError(RuntimeError):
    """Raised at a failpoint whose action is ``error``."""


class Failpoints:
    """The failpoints switched on for this process (none by default)."""

    def __init__(self, spec: str = "") -> None:
        self._actions: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, action = item.partition("=")
            if name not in POINTS:
                raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(POINTS)}")
            if action not in ACTIONS:
                raise ValueError(
                    f"failpoint {name}: action must be one of {ACTIONS}, got {action!r}"
                )
            self._actions[name] = action
        if self._actions:
            log.warning("failpoints enabled: %s", self._actions)

    def hit(self, name: str) -> None:
        """Fail here if the failpoint ``name`` is on."""
        action = self._actions.get(name)
        if action == "crash":
            log.critical("failpoint %s: crashing", name)
            sys.stderr.flush()
            os._exit(CRASH_EXIT_STATUS)
        if action == "error":
            raise FailpointError(f"failpoint {name}")
