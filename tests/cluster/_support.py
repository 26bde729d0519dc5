"""Helpers of the cluster tests: reusing contract modules, looking into the nodes."""

from __future__ import annotations

import importlib
from collections.abc import Collection
from typing import Any

import redis
from redis.crc import key_slot

from memsvc.domain import SessionRef
from memsvc.store.redis import session_keys


def reuse(module_name: str, namespace: dict[str, Any], *, leave_out: Collection[str] = ()) -> None:
    """Copy every test, fixture and helper of ``module_name`` into ``namespace``.

    pytest then collects the tests a second time in the reusing module, where
    tests/cluster/conftest.py points the deployment at the cluster; the module's
    own fixtures (its autouse ``_spawned``, its ``config_overrides``) come along,
    so the suite runs exactly as written. Names in ``leave_out`` stay behind.
    """
    module = importlib.import_module(module_name)
    for name, item in vars(module).items():
        if not name.startswith("__") and name not in leave_out:
            namespace.setdefault(name, item)


def slot_of(session: SessionRef) -> int:
    """The Redis Cluster slot of every key of ``session``."""
    return key_slot(session_keys(session)[0].encode())


def held_by(port: int, key: str) -> dict[bytes, bytes] | None:
    """The hash at ``key`` on the node at ``port`` (with ASKING, so also while the
    node imports the slot); None when that node does not hold the key (ASK, MOVED)."""
    with redis.Redis(port=port, socket_timeout=5) as client:
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.execute_command("HGETALL", key)
        _, held = pipe.execute(raise_on_error=False)
    if isinstance(held, redis.exceptions.AskError):  # MovedError too
        return None
    assert isinstance(held, dict), held
    return held
