"""The watch builds each event's message once, for all its watchers, and never
serves one event's message for another."""

from __future__ import annotations

import uuid
from typing import Any, cast

from memsvc.api._lifecycle import LifecycleServicer
from memsvc.domain import SessionRef
from memsvc.domain._lifecycle_records import EventRecord, EventType
from memsvc.domain._watch import StoredEvent


def stored(sequence: int, project_id: str, purged: bool = False) -> StoredEvent:
    event = EventRecord(
        event_id=str(uuid.uuid4()),
        event_type=EventType.SPAWNED,
        ref=SessionRef(project_id, str(uuid.uuid4()), "s"),
        agent_type_id=None,
        time_ms=1_000,
        purged=purged,
    )
    return StoredEvent(sequence, event)


def test_a_sequence_given_to_another_event_gets_that_events_message():
    """A database failed over to a standby that lost its last commits gives their
    sequences to new events: a cached message of the lost one (maybe of another
    project) must not go out for the new one."""
    servicer = LifecycleServicer(cast(Any, None), cast(Any, None))
    lost = stored(7, str(uuid.uuid4()))
    first = servicer._event_response(lost)
    assert servicer._event_response(lost) is first  # built once for every watcher
    reused = stored(7, str(uuid.uuid4()))
    message = servicer._event_response(reused).event
    assert (message.event_id, message.project_id) == (
        reused.event.event_id,
        reused.event.ref.project_id,
    )
