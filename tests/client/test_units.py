"""Unit tests of the SDK's pieces: values, enums, errors, the retry loop, pagers."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2, struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from memsvc.client import (
    AsyncClient,
    AsyncPager,
    AsyncSessionClient,
    Cancelled,
    DeadlineExceeded,
    ErrorReason,
    InvalidArgument,
    KeyNotFound,
    MemsvcError,
    NotFound,
    Page,
    RetryPolicy,
    Unavailable,
    WatchPositionCompacted,
    WithTTL,
)
from memsvc.client._convert import event_types_wire, outcome_wire, state_wire
from memsvc.client._errors import error_class, from_rpc_error
from memsvc.client._retry import READ_ONLY_REQUESTS, Invoker, retryable
from memsvc.client._values import (
    fill_duration,
    fill_timestamp,
    from_struct,
    from_timestamp,
    from_value,
    to_struct,
    to_value,
)
from memsvc.testing import free_port
from memsvc.v1 import (
    episodic_pb2,
    errors_pb2,
    graph_checkpoint_pb2,
    lifecycle_pb2,
    working_memory_pb2,
)


@pytest.mark.parametrize(
    "python",
    [
        None,
        True,
        False,
        0,
        -3,
        2**53,
        1.5,
        "",
        "text",
        [],
        {},
        [1, "a", None, [2]],
        {"a": {"b": []}},
    ],
)
def test_json_like_values_round_trip(python: Any):
    back = from_value(to_value(python))
    assert back == python
    assert type(back) is type(python)


def test_numbers_are_doubles():
    assert from_value(to_value(2.0)) == 2 and isinstance(from_value(to_value(2.0)), int)
    assert from_value(to_value((1, 2))) == [1, 2]
    assert from_value(struct_pb2.Value(number_value=2.0**60)) == 2.0**60  # beyond 2**53: float
    with pytest.raises(ValueError, match="2\\*\\*53"):
        to_value(2**53 + 1)
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ValueError, match="not a JSON number"):
            to_value(bad)
    assert from_value(struct_pb2.Value()) is None  # an empty Value reads as None
    negative_zero = from_value(to_value(-0.0))
    assert isinstance(negative_zero, float) and math.copysign(1, negative_zero) == -1
    assert from_value(to_value(0.0)) == 0 and isinstance(from_value(to_value(0.0)), int)


def test_structs_and_type_errors():
    message = struct_pb2.Struct()
    to_struct({"a": [1, {"b": None}]}, message)
    assert from_struct(message) == {"a": [1, {"b": None}]}
    with pytest.raises(TypeError, match=r"value\.a\[0\]"):
        to_value({"a": [object()]})
    with pytest.raises(TypeError, match="expected a mapping"):
        to_struct(["x"], struct_pb2.Struct())  # type: ignore[arg-type]


def test_durations_and_timestamps():
    duration = duration_pb2.Duration()
    fill_duration(1.5, duration, "ttl")
    assert (duration.seconds, duration.nanos) == (1, 500_000_000)
    fill_duration(timedelta(milliseconds=3), duration, "ttl")
    assert (duration.seconds, duration.nanos) == (0, 3_000_000)
    # Zero means "no TTL": a tiny duration keeps its sign instead of rounding to it.
    fill_duration(1e-10, duration, "ttl")
    assert (duration.seconds, duration.nanos) == (0, 1)
    fill_duration(-1e-10, duration, "ttl")
    assert (duration.seconds, duration.nanos) == (0, -1)
    fill_duration(0.0, duration, "ttl")
    assert (duration.seconds, duration.nanos) == (0, 0)
    with pytest.raises(TypeError):
        fill_duration("5", duration, "ttl")  # type: ignore[arg-type]
    # Past what a Duration holds: a ValueError that says so, never an OverflowError.
    for too_long, shown in (
        (10**400, "an integer of 1329 bits"), (10**20, "100000000000000000000"),
        (1e300, "1e+300"), (-315_576_000_000.4, "-315576000000.4"),
        (315_576_000_001, "315576000001"), (float("inf"), "inf"), (float("nan"), "nan"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=f"ttl: {re.escape(shown)} is not a duration"):
            fill_duration(too_long, duration, "ttl")
    fill_duration(-315_576_000_000, duration, "ttl")
    assert duration.seconds == -315_576_000_000
    stamp = timestamp_pb2.Timestamp()
    moment = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone(timedelta(hours=2)))
    fill_timestamp(moment, stamp, "start_time")
    back = from_timestamp(stamp)
    assert back == moment and back.tzinfo is UTC
    with pytest.raises(ValueError, match="naive"):
        fill_timestamp(datetime(2026, 1, 1), stamp, "start_time")


@pytest.mark.parametrize("zero", [0, 0.0, -0.0, timedelta(0)])
async def test_a_ttl_of_zero_is_refused(zero: float | timedelta):
    """The wire reads a zero TTL as none (never expires), while any positive TTL,
    however small, expires: 0 is refused before any call instead of kept for ever."""
    # Nothing listens there: a call that got through would fail with Unavailable.
    async with AsyncClient("127.0.0.1:1", timeout=0.1, retry=RetryPolicy.disabled()) as client:
        s = client.session("p", "a", "s")
        calls = (
            lambda: s.set("k", 1, ttl=zero),
            lambda: s.set_many({"k": 1}, ttl=zero),
            lambda: s.set_many({"k": WithTTL(1, zero)}),
            lambda: s.spawn(initial={"k": WithTTL(1, zero)}),
        )
        for call in calls:
            with pytest.raises(ValueError, match="ttl must be positive; use None for no expiry"):
                await call()


def test_enums_accept_members_and_strings():
    assert outcome_wire("partial") == lifecycle_pb2.OUTCOME_PARTIAL
    assert state_wire("paused") == lifecycle_pb2.SESSION_STATE_PAUSED
    assert event_types_wire(["session_spawned"]) == [lifecycle_pb2.EVENT_TYPE_SESSION_SPAWNED]
    with pytest.raises(ValueError, match="one of"):
        outcome_wire("great")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one of"):
        state_wire("unknown")  # type: ignore[arg-type]


def test_error_reasons_match_the_contract():
    contract = set(errors_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}
    assert {reason.value for reason in ErrorReason} == contract


def rpc_error(
    code: grpc.StatusCode,
    message: str = "failed",
    *details: Any,
) -> grpc.aio.AioRpcError:
    """An AioRpcError carrying ``details`` the way memsvc sends them."""
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=packed)
    )
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        details=message,
    )


def test_rich_details_are_decoded():
    error = from_rpc_error(
        rpc_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad",
            error_details_pb2.ErrorInfo(
                reason="ERROR_REASON_INVALID_ARGUMENT", domain="memsvc.dev"
            ),
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field="key", description="empty")
                ]
            ),
        ),
        request_id="r",
        attempts=2,
    )
    assert type(error) is InvalidArgument
    assert error.violations == {"key": "empty"}
    assert (error.request_id, error.attempts) == ("r", 2)
    retry = from_rpc_error(
        rpc_error(
            grpc.StatusCode.UNAVAILABLE,
            "down",
            error_details_pb2.ErrorInfo(reason="ERROR_REASON_BACKEND_UNAVAILABLE"),
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2)),
        )
    )
    assert isinstance(retry, Unavailable) and retry.retry_delay == 2.0
    compacted = from_rpc_error(
        rpc_error(
            grpc.StatusCode.OUT_OF_RANGE,
            "old",
            error_details_pb2.ErrorInfo(
                reason="ERROR_REASON_WATCH_POSITION_COMPACTED",
                metadata={"oldest_sequence": "7", "after_sequence": "3"},
            ),
        )
    )
    assert isinstance(compacted, WatchPositionCompacted)
    assert (compacted.oldest_sequence, compacted.after_sequence) == (7, 3)
    plain = from_rpc_error(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "late"))
    assert type(plain) is DeadlineExceeded and plain.reason == ""


def test_a_reason_refines_only_its_own_code():
    assert error_class(grpc.StatusCode.NOT_FOUND, ErrorReason.KEY_NOT_FOUND) is KeyNotFound
    assert error_class(grpc.StatusCode.UNAVAILABLE, ErrorReason.KEY_NOT_FOUND) is Unavailable
    assert error_class(grpc.StatusCode.NOT_FOUND, "ERROR_REASON_FROM_THE_FUTURE") is NotFound
    assert error_class(grpc.StatusCode.OK, "") is MemsvcError


def failure(code: grpc.StatusCode, reason: str = "") -> MemsvcError:
    details = [error_details_pb2.ErrorInfo(reason=reason, domain="memsvc.dev")] if reason else []
    return from_rpc_error(rpc_error(code, "failed", *details))


def test_what_is_retried():
    for code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    ):
        # A write without a request id may have run: never retried on these.
        assert not retryable(failure(code), has_request_id=False)
        assert retryable(failure(code), has_request_id=True)
        assert retryable(failure(code), has_request_id=False, read_only=True)
    backend = failure(grpc.StatusCode.UNAVAILABLE, "ERROR_REASON_BACKEND_UNAVAILABLE")
    assert not retryable(backend, has_request_id=False)  # it may have committed
    assert retryable(backend, has_request_id=True)
    shutting_down = failure(grpc.StatusCode.UNAVAILABLE, "ERROR_REASON_SERVER_SHUTTING_DOWN")
    assert not retryable(shutting_down, has_request_id=False)  # sent for streams only
    assert not retryable(failure(grpc.StatusCode.INTERNAL), has_request_id=True, read_only=True)
    exhausted = failure(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert not retryable(exhausted, has_request_id=True, read_only=True)
    # Refused past the server's call limit: nothing was done, whatever the call.
    too_many = failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_TOO_MANY_CALLS")
    assert retryable(too_many, has_request_id=False)
    watchers = failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_TOO_MANY_WATCHERS")
    assert not retryable(watchers, has_request_id=True, read_only=True)
    # The server's own deadline cut the read: it would run as long again.
    served_late = failure(grpc.StatusCode.DEADLINE_EXCEEDED, "ERROR_REASON_DEADLINE_EXCEEDED")
    assert not retryable(served_late, has_request_id=False, read_only=True)
    assert retryable(served_late, has_request_id=True)


def test_the_read_only_requests_are_the_reads_of_the_contract():
    """Every Get, List, Search and BatchGet request of memsvc.v1, and nothing else."""
    reads = {
        name
        for module in (working_memory_pb2, lifecycle_pb2, episodic_pb2, graph_checkpoint_pb2)
        for name in module.DESCRIPTOR.message_types_by_name
        if name.endswith("Request") and name.startswith(("Get", "List", "Search", "BatchGet"))
    }
    assert {f"memsvc.v1.{name}" for name in reads} == READ_ONLY_REQUESTS


def test_backoff_never_overflows():
    policy = RetryPolicy()
    assert policy.backoff(100_000, rand=lambda: 0.0) == policy.max_backoff


def test_backoff_grows_is_capped_jittered_and_honours_the_server():
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2, jitter=0.5)
    assert [policy.backoff(n, rand=lambda: 0.0) for n in (1, 2, 3, 4, 5, 9)] == [
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
        1.0,
    ]
    assert policy.backoff(1, rand=lambda: 1.0) == pytest.approx(0.05)
    assert policy.backoff(1, server_delay=3.0) == 3.0
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=2)


@pytest.mark.parametrize("initial_backoff", [0, 0.0, -0.1])
def test_an_initial_backoff_of_zero_is_refused(initial_backoff: float):
    """0 stays 0 at every growth: each retry and watch reconnection would follow its
    failure at once, in a hot loop."""
    with pytest.raises(ValueError, match=r"initial_backoff must be > 0"):
        RetryPolicy(initial_backoff=initial_backoff)


@pytest.mark.parametrize(
    "field",
    ["max_attempts", "initial_backoff", "max_backoff", "multiplier", "jitter", "attempt_timeout"],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_retry_policy_refuses_values_that_are_not_finite(field: str, value: float):
    """NaN passes every range check (each comparison is False) and would make
    backoff() return nan; an infinity, inf or nan waits."""
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        RetryPolicy(**{field: value})  # type: ignore[arg-type]


def test_max_backoff_may_not_be_below_initial_backoff():
    with pytest.raises(ValueError, match="initial_backoff <= max_backoff"):
        RetryPolicy(initial_backoff=2, max_backoff=1)
    assert RetryPolicy(initial_backoff=0.001, max_backoff=0.001).backoff(3, rand=lambda: 0) == 0.001


@pytest.mark.parametrize("empty", [list, tuple, set, lambda: iter(())])
def test_an_empty_event_types_is_refused(empty: Any):
    """The server reads no type as every type: an empty filter would watch them all."""
    client = AsyncClient()
    with pytest.raises(ValueError, match="pass None to watch every type"):
        client.watch("p", event_types=empty())
    with pytest.raises(ValueError, match="pass None to watch every type"):
        client.session("p", "a", "s").watch(event_types=empty())
    assert list(client.watch("p", event_types=["session_spawned"])._request.event_types) == [
        lifecycle_pb2.EVENT_TYPE_SESSION_SPAWNED
    ]


@pytest.mark.parametrize("reconnect_timeout", [0, -1.0, math.nan])
def test_a_reconnect_timeout_that_leaves_no_time_is_refused(reconnect_timeout: float):
    """It bounds the first connection too: 0 s would fail every watch at its start."""
    with pytest.raises(ValueError, match="reconnect_timeout must be > 0"):
        AsyncClient().watch("p", reconnect_timeout=reconnect_timeout)


class FakeRpc:
    """Fails with the given errors in turn, then answers; records each attempt's
    timeout and whether it waited for a connection."""

    def __init__(self, *errors: grpc.aio.AioRpcError) -> None:
        self.errors = list(errors)
        self.timeouts: list[float | None] = []
        self.waits: list[bool | None] = []

    async def __call__(
        self, request: Any, *, timeout: float | None, metadata: Any, wait_for_ready: bool | None
    ) -> str:
        self.timeouts.append(timeout)
        self.waits.append(wait_for_ready)
        if self.errors:
            raise self.errors.pop(0)
        return f"answer to {request}"


QUICK = RetryPolicy(initial_backoff=0.001, max_backoff=0.002)


async def test_invoker_retries_within_one_budget():
    rpc = FakeRpc(rpc_error(grpc.StatusCode.UNAVAILABLE), rpc_error(grpc.StatusCode.UNAVAILABLE))
    invoke = Invoker(QUICK, 30.0, [("x-test", "1")])
    assert await invoke(rpc, "q", request_id="r") == "answer to q"
    assert len(rpc.timeouts) == 3
    budgets = [t for t in rpc.timeouts if t is not None]
    assert len(budgets) == 3 and all(0 < t <= 30.0 for t in budgets)
    assert budgets == sorted(budgets, reverse=True)  # what is left of one deadline


async def test_invoker_gives_up_when_the_server_delay_exceeds_the_budget():
    slow = rpc_error(
        grpc.StatusCode.UNAVAILABLE,
        "down",
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=60)),
    )
    rpc = FakeRpc(slow)
    with pytest.raises(Unavailable) as raised:
        await Invoker(QUICK, 5.0, ())(rpc, "q", request_id="r")
    assert raised.value.attempts == 1 and raised.value.retry_delay == 60
    assert len(rpc.timeouts) == 1


async def test_invoker_attempt_timeout_and_request_ids():
    policy = RetryPolicy(initial_backoff=0.001, max_backoff=0.002, attempt_timeout=0.5)
    late = rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)
    with_id = FakeRpc(late)
    assert await Invoker(policy, None, ())(with_id, "q", request_id="r") == "answer to q"
    assert with_id.timeouts == [0.5, 0.5]
    # A write without a request id is never cut short by attempt_timeout (cut, it
    # could still take effect after the error): the call's whole budget, once.
    without_id = FakeRpc(late)
    with pytest.raises(DeadlineExceeded):
        await Invoker(policy, 10.0, ())(without_id, "q")
    assert len(without_id.timeouts) == 1 and 9 < (without_id.timeouts[0] or 0) <= 10
    no_deadline = FakeRpc()
    await Invoker(RetryPolicy(), None, ())(no_deadline, "q")
    assert no_deadline.timeouts == [None]


class FakeChannel:
    """A channel whose connectivity the test sets (only get_state is used)."""

    def __init__(self, state: grpc.ChannelConnectivity) -> None:
        self.state = state

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.state


def invoker_on(
    state: grpc.ChannelConnectivity, timeout: float | None, policy: RetryPolicy = QUICK
) -> Invoker:
    invoke = Invoker(policy, timeout, ())
    invoke.channel = cast(grpc.aio.Channel, FakeChannel(state))
    return invoke


async def test_an_attempt_waits_for_a_connection_after_unavailable_or_with_a_deadline():
    """gRPC fails a call at once while its channel waits out a reconnection backoff,
    and READY lags a connection that just went away (a server restarting): an
    attempt after an UNAVAILABLE, and any attempt of a call with a deadline whatever
    the channel's state, waits for the connection instead (a review: Sets failed at
    once, unsent, during graceful restarts, on a channel that still read READY)."""
    unavailable = rpc_error(grpc.StatusCode.UNAVAILABLE)
    for state in (
        grpc.ChannelConnectivity.READY,
        grpc.ChannelConnectivity.IDLE,
        grpc.ChannelConnectivity.CONNECTING,
        grpc.ChannelConnectivity.TRANSIENT_FAILURE,
    ):
        down = FakeRpc()
        await invoker_on(state, 10.0)(down, "q")
        assert down.waits == [True], state
    # Without a deadline nothing would bound the wait: the first attempt fails fast.
    unbounded = FakeRpc(unavailable)
    await invoker_on(grpc.ChannelConnectivity.TRANSIENT_FAILURE, None)(
        unbounded, "q", request_id="r"
    )
    assert unbounded.waits == [None, True]


async def test_a_cancelled_status_is_retried_only_for_calls_that_may_run_twice():
    """CANCELLED as a status comes from the server (gRPC cancels the calls that
    reached a stopping server before they reached memsvc): a read and a call with
    a request id are tried again; a write without one may have run, and is not."""
    for request_id in ("r", None):
        rpc = FakeRpc(rpc_error(grpc.StatusCode.CANCELLED))
        invoke = Invoker(QUICK, 10.0, ())
        if request_id:
            assert await invoke(rpc, "q", request_id=request_id) == "answer to q"
            assert len(rpc.waits) == 2
        else:
            with pytest.raises(Cancelled) as raised:
                await invoke(rpc, "q")
            assert raised.value.attempts == 1 and len(rpc.waits) == 1


async def test_a_deadline_that_passes_while_waiting_for_a_connection_is_unavailable():
    """Nothing was sent: Unavailable naming the last failure, not DeadlineExceeded,
    for calls that may run twice (a request id, a read). A write that may not keeps
    DeadlineExceeded: the channel may have been up between, and the write sent."""
    refused = rpc_error(grpc.StatusCode.UNAVAILABLE, "Connection refused")
    late = rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    twice = RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.002)
    invoke = invoker_on(grpc.ChannelConnectivity.TRANSIENT_FAILURE, 10.0, twice)
    with pytest.raises(
        Unavailable, match="last failure: UNAVAILABLE: Connection refused"
    ) as raised:
        await invoke(FakeRpc(refused, late), "q", request_id="r")
    assert raised.value.attempts == 2 and raised.value.request_id == "r"
    assert raised.value.__cause__ is late
    once = invoker_on(grpc.ChannelConnectivity.TRANSIENT_FAILURE, 10.0, RetryPolicy.disabled())
    with pytest.raises(Unavailable, match="the channel stayed TRANSIENT_FAILURE"):
        await once(FakeRpc(late), working_memory_pb2.GetRequest())
    with pytest.raises(Unavailable, match="could not be reached before the deadline"):
        await invoke(FakeRpc(late, late), working_memory_pb2.GetRequest())  # retried, a read
    with pytest.raises(DeadlineExceeded):
        await invoke(FakeRpc(late), working_memory_pb2.SetRequest())
    # Connected, the call was sent and the server was slow: DeadlineExceeded.
    with pytest.raises(DeadlineExceeded):
        await invoker_on(grpc.ChannelConnectivity.READY, 10.0)(FakeRpc(late), "q")


async def test_pagers_follow_tokens_and_can_restart():
    pages = {"": Page((1, 2), "t1"), "t1": Page((3,), "t2"), "t2": Page((), None)}
    asked: list[str] = []

    async def fetch(token: str) -> Page[int]:
        asked.append(token)
        await asyncio.sleep(0)
        return pages[token]

    pager = AsyncPager(fetch)
    assert [i async for i in pager] == [1, 2, 3]
    assert await pager.collect() == [1, 2, 3]
    assert await pager.collect(limit=2) == [1, 2]
    assert asked[-1:] == [""]  # the limit was reached on the first page
    assert await AsyncPager(fetch, "t1").collect() == [3]
    assert (await pager.fetch_page("t1")).next_page_token == "t2"


async def test_get_many_spends_one_budget_across_its_calls():
    """Keys left unprocessed are read by further BatchGets, each with what is left
    of the one ``timeout``, not a new one."""
    timeouts: list[float | None] = []

    async def batch_get(
        request: Any, *, timeout: float | None, metadata: Any, wait_for_ready: bool | None
    ) -> Any:
        timeouts.append(timeout)
        await asyncio.sleep(0.05)
        first, *rest = request.keys  # one value per call, the rest unprocessed
        return working_memory_pb2.BatchGetResponse(
            entries=[working_memory_pb2.Entry(key=first, value=struct_pb2.Value(number_value=1))],
            unprocessed_keys=rest,
        )

    client = SimpleNamespace(
        _invoke=Invoker(RetryPolicy(), timeout=None, grpc_metadata=()),
        _wm=SimpleNamespace(BatchGet=batch_get),
    )
    session = AsyncSessionClient(cast(AsyncClient, client), "p", "a", "s")
    assert await session.get_many(["a", "b", "c"], timeout=2.0) == {"a": 1, "b": 1, "c": 1}
    budgets = [t for t in timeouts if t is not None]
    assert len(budgets) == 3
    assert budgets[0] <= 2.0 and budgets[2] < budgets[1] < budgets[0]
    assert budgets[0] - budgets[2] >= 0.1  # what the first two calls spent


@pytest.mark.parametrize("first_use", ["call", "wait_ready"])
def test_a_client_used_in_another_event_loop_says_so(first_use: str):
    """gRPC's channel serves the loop it was made in: a client used again from
    another asyncio.run() got gRPC's bare "Event loop is closed" (an SDK review),
    whether its first use was a call or wait_ready()."""
    client = AsyncClient(f"127.0.0.1:{free_port()}", timeout=0.2, retry=RetryPolicy.disabled())

    async def call() -> None:
        with contextlib.suppress(MemsvcError):  # nothing listens there
            await client.session(str(uuid.uuid4()), str(uuid.uuid4()), "s").get("k")

    async def wait_ready() -> None:
        with contextlib.suppress(TimeoutError):
            await client.wait_ready(timeout=0.05)

    first = asyncio.new_event_loop()
    try:
        first.run_until_complete(call() if first_use == "call" else wait_ready())
        for use in (call, wait_ready):
            with pytest.raises(RuntimeError, match="event loop it was first used in"):
                asyncio.run(use())
        first.run_until_complete(call())  # its own loop still works
        first.run_until_complete(client.close())
        with pytest.raises(RuntimeError, match="is closed"):
            asyncio.run(call())
    finally:
        first.run_until_complete(client.close())
        first.close()
