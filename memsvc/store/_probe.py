"""What the readiness probe needs to know of a store over the network."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Reconnects(Protocol):
    """A store whose probe connects again before it asks (its connection lost or
    never made): that alone may take up to ``connect_timeout_seconds``."""

    @property
    def connect_timeout_seconds(self) -> float:
        """How long one connection attempt of the probe may take."""
