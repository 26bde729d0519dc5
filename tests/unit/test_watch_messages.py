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
    message = servicer._event_response(reused).single.event
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


def test_a_batch_ends_before_the_byte_budget_and_keeps_the_order():
    """A stream that asks for batches gets the events ready together in messages
    that stay within the server's response budget (one event at least, however
    large): events of 64 KiB of metadata, 1,000 at once, would be 64 MiB."""
    servicer = LifecycleServicer(cast(Any, None), cast(Any, None), response_budget_bytes=2_500)
    project = str(uuid.uuid4())
    ready = [stored(sequence, project, metadata={"blob": "x" * 900}) for sequence in range(1, 8)]
    ready.insert(3, stored(100, project, metadata={"blob": "y" * 5_000}))  # alone over budget
    batches = list(servicer._batches(ready))
    sizes = [len(message.batch.events) for message in batches]
    assert sizes == [2, 1, 1, 2, 2]
    assert all(message.ByteSize() <= 5_200 for message in batches)
    assert all(message.ByteSize() <= 2_500 for i, message in enumerate(batches) if i != 2)
    delivered = [event.event_id for message in batches for event in message.batch.events]
    assert delivered == [s.event.event_id for s in ready]
    # One event alone is its batch of one, built once and shared by every watcher.
    alone = list(servicer._batches(ready[:1]))
    assert [event.event_id for event in alone[0].batch.events] == [ready[0].event.event_id]
    assert alone[0] is next(servicer._batches(ready[:1]))


def test_the_messages_kept_count_the_batches_of_one_too():
    """A stream that asks for batches makes each event's batch of one, kept beside
    its message alone: the cache's byte bound counts both."""
    servicer = LifecycleServicer(cast(Any, None), cast(Any, None))
    project = str(uuid.uuid4())
    events = [
        stored(sequence, project, metadata={"blob": "x" * 60_000}) for sequence in range(1, 400)
    ]
    for event in events:
        servicer._event_response(event)
        next(servicer._batches([event]))
    held = sum(
        messages.single.ByteSize() + (messages.alone.ByteSize() if messages.alone else 0)
        for messages in servicer._responses.values()
    )
    assert held <= lifecycle_api._RESPONSE_CACHE_BYTES * 1.01  # framing bytes aside
    assert all(messages.alone is not None for messages in servicer._responses.values())
