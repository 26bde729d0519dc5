"""Each working-memory store behaves like a plain dict with limits (Hypothesis, stateful).

Random sequences of batch writes, deletes, reads and paginated listings run
against a store and against a dict model; after every step they must agree,
including which writes a session limit refuses (those change nothing).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from memsvc.domain import EntryWrite, SessionLimitExceeded, SessionRef
from memsvc.store.memory import InMemoryWorkingMemoryStore
from memsvc.store.redis import RedisWorkingMemoryStore, session_keys
from tests.conftest import REDIS_URL, need

MAX_KEYS = 6
MAX_BYTES = 120
KEYS = st.sampled_from(["a", "b", "a:b", "{a}", "}", "é", "z" * 10, "k9"])
VALUES = st.binary(min_size=1, max_size=30)


def size(key: str, value: bytes) -> int:
    return len(key.encode()) + len(value)


class StoreMachine(RuleBasedStateMachine):
    backend = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.session = SessionRef(str(uuid.uuid4()), str(uuid.uuid4()), "model")
        self.model: dict[str, bytes] = {}
        self.store: Any
        if self.backend == "redis":
            self.store = RedisWorkingMemoryStore(
                REDIS_URL, max_session_keys=MAX_KEYS, max_session_bytes=MAX_BYTES
            )
        else:
            self.store = InMemoryWorkingMemoryStore(
                max_session_keys=MAX_KEYS, max_session_bytes=MAX_BYTES
            )
        self.run(self.store.open())
        # Working memory needs a spawned session: lifecycle step 1 and 3 of Spawn.
        self.run(self.store.begin_spawn(self.session, "op", "epoch", []))
        self.run(self.store.finish(self.session, "op", "active", swap=False, clear=False))

    def run(self, coroutine: Any) -> Any:
        return self.runner.run(coroutine)

    def teardown(self) -> None:
        if self.backend == "redis":
            client = aioredis.Redis.from_url(REDIS_URL)
            self.run(client.delete(*session_keys(self.session)))
            self.run(client.aclose())
        self.run(self.store.aclose())
        self.runner.close()

    @rule(entries=st.dictionaries(KEYS, VALUES, min_size=1, max_size=4))
    def set_entries(self, entries: dict[str, bytes]) -> None:
        after = {**self.model, **entries}
        over = len(after) > MAX_KEYS or sum(size(k, v) for k, v in after.items()) > MAX_BYTES
        writes = [EntryWrite(k, v, None) for k, v in entries.items()]
        if over:
            with pytest.raises(SessionLimitExceeded):
                self.run(self.store.set_entries(self.session, writes))
            return
        results = self.run(self.store.set_entries(self.session, writes))
        assert [(r.key, r.created) for r in results] == [(k, k not in self.model) for k in entries]
        self.model = after

    @rule(keys=st.lists(KEYS, min_size=1, max_size=4, unique=True))
    def delete_entries(self, keys: list[str]) -> None:
        existed = self.run(self.store.delete_entries(self.session, keys))
        assert existed == [k in self.model for k in keys]
        for key in keys:
            self.model.pop(key, None)

    @rule(keys=st.lists(KEYS, min_size=1, max_size=5, unique=True))
    def get_entries(self, keys: list[str]) -> None:
        read = self.run(self.store.get_entries(self.session, keys, 1 << 20))
        assert {e.key: e.value for e in read.found} == {
            k: self.model[k] for k in keys if k in self.model
        }
        assert read.missing == [k for k in keys if k not in self.model]
        assert read.unprocessed == []

    @rule(page=st.integers(min_value=1, max_value=4))
    def list_all(self, page: int) -> None:
        keys: list[str] = []
        after = None
        while True:
            items, more = self.run(self.store.list_keys(self.session, after, page))
            keys += [item.key for item in items]
            assert all(item.value_size == len(self.model[item.key]) for item in items)
            if not more:
                break
            after = items[-1].key
        assert keys == sorted(self.model, key=str.encode)

    @invariant()
    def entries_match(self) -> None:
        items, more = self.run(self.store.list_entries(self.session, None, 100, 1 << 20))
        assert not more
        assert {e.key: e.value for e in items} == self.model


class RedisStoreMachine(StoreMachine):
    backend = "redis"


MODEL_SETTINGS = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(params=["memory", "redis"])
def machine(request: pytest.FixtureRequest) -> type[StoreMachine]:
    if request.param == "redis":
        need(REDIS_URL)
        return RedisStoreMachine
    return StoreMachine


def test_store_behaves_like_a_dict_with_limits(machine: type[StoreMachine]) -> None:
    machine.TestCase.settings = MODEL_SETTINGS
    machine.TestCase().runTest()
