"""A serving process freezes what start-up built, so full collections skip it."""

from __future__ import annotations

import gc
import weakref

from memsvc.server import settle_heap


def test_settle_heap_freezes_the_objects_alive_now_and_collects_garbage_first():
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    gc.unfreeze()
    garbage = Cycle()
    collected = weakref.ref(garbage)
    del garbage  # unreachable, kept alive only by its own cycle
    try:
        settle_heap()
        frozen = gc.get_freeze_count()
        assert frozen > 1000, "start-up objects are frozen"
        assert collected() is None, "garbage was collected before the freeze, not frozen"
        assert len(gc.get_objects()) < frozen, "what is frozen no longer counts as tracked"
    finally:
        gc.unfreeze()
