"""The watch builds each event's message once, for all its watchers, and never
serves one event's message for another."""

from __future__ import annotations

import uuid
from typing import Any, cast

from memsvc.api import _lifecycle as lifecycle_api
from memsvc.api._lifecycle import LifecycleServicer
from memsvc.domain import SessionRef
from memsvc.domain._lifecycle_records import EventRecord, EventType
from memsvc.domain._watch import StoredEvent


def stored(
    sequence: int, project_id: str, purged: bool = False, metadata: dict[str, Any] | None = None
) -> StoredEvent:
    event = EventRecord(
        event_id=str(uuid.uuid4()),
        event_type=EventType.SPAWNED,
        ref=SessionRef(project_id, str(uuid.uuid4()), "s"),
        agent_type_id=None,
        time_ms=1_000,
        purged=purged,
        metadata=metadata or {},
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


def test_the_messages_kept_are_bounded_in_bytes_too():
    """Events carry up to 64 KiB of metadata: the messages kept for watchers stay
    within a byte budget, not just a count (4,096 such events would be 256 MiB)."""
    servicer = LifecycleServicer(cast(Any, None), cast(Any, None))
    project = str(uuid.uuid4())
    events = [
        stored(sequence, project, metadata={"blob": "x" * 60_000}) for sequence in range(1, 400)
    ]
    first = servicer._event_response(events[0])
    for event in events[1:]:
        servicer._event_response(event)
    assert servicer._responses_bytes <= lifecycle_api._RESPONSE_CACHE_BYTES
    assert len(servicer._responses) < len(events)
    assert servicer._event_response(events[-1]) is servicer._event_response(events[-1])
    assert servicer._event_response(events[0]) is not first  # evicted, built again
