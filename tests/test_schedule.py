"""The timing rules, with a fake clock: no thread, no SQS."""

from __future__ import annotations

import dataclasses
import math

import pytest

from celery_sqs_heartbeat._errors import Failure
from celery_sqs_heartbeat._schedule import (
    COMPACT_MIN_STALE,
    FIRST_BEAT_WINDOW,
    RECEIPT_ALLOWANCE,
    Ended,
    Heartbeat,
    Plan,
    Schedule,
)
from celery_sqs_heartbeat._settings import MAX_VISIBILITY_SECONDS, HeartbeatOptions

pytestmark = pytest.mark.timeout(30)

OPTIONS = HeartbeatOptions(enabled=True, interval=30, visibility_timeout=120, max_duration=None)
#: When a task started at 0 sends its first beat, alone: one interval, plus the window in
#: which first beats wait for company.
FIRST = 30 + FIRST_BEAT_WINDOW


def make(rh: str = "rh", queue: str = "q", *, now: float = 0.0, **changes: object) -> Heartbeat:
    options = dataclasses.replace(OPTIONS, **changes)  # type: ignore[arg-type]
    return Heartbeat(rh, queue, options, now)


def settle_all(schedule: Schedule, plan: Plan, now: float, failure: Failure | None = None) -> None:
    for request in plan.requests:
        schedule.settle(request, [failure] * len(request.entries), now)


def handles(plan: Plan) -> list[list[str]]:
    return [[e.heartbeat.receipt_handle for e in r.entries] for r in plan.requests]


def test_no_beat_before_one_interval() -> None:
    """A task shorter than one interval costs no SQS call."""
    s = Schedule()
    s.add(make())
    assert s.plan(29.999).requests == []
    assert s.next_due() == FIRST
    assert s.remove("rh") is not None
    assert s.plan(1000).requests == []


def test_beats_every_interval_with_the_configured_visibility() -> None:
    s = Schedule()
    s.add(make())
    sent = []
    for now in (30.0, FIRST, 45.0, 60.0, 89.0, 90.0):
        plan = s.plan(now)
        sent += [(now, e.visibility_timeout) for r in plan.requests for e in r.entries]
        settle_all(s, plan, now)
    assert sent == [(FIRST, 120), (60.0, 120), (90.0, 120)]
    assert s.next_due() == 120.0


def test_a_late_beat_keeps_the_cadence() -> None:
    """Sending a first beat late (its window, the batch window) does not push later
    beats back."""
    s = Schedule()
    s.add(make())
    settle_all(s, s.plan(FIRST + 0.05), FIRST + 0.05)
    assert s.next_due() == 60.0


def test_first_beats_due_together_wait_for_each_other() -> None:
    """First beats of tasks started within the window share one request."""
    s = Schedule()
    for i in range(10):
        s.add(make(f"t{i}", now=i * 0.01))
    assert s.plan(30.05).requests == []  # the first is due, but waits for company
    plan = s.plan(FIRST)
    assert [len(r.entries) for r in plan.requests] == [10]


def test_a_request_to_the_queue_takes_due_first_beats_along() -> None:
    s = Schedule()
    s.add(make("old"))
    settle_all(s, s.plan(FIRST), FIRST)  # old: next due at 60
    s.add(make("young", now=30.0))  # first beat due at 60 too
    plan = s.plan(60.0)
    assert handles(plan) == [["old", "young"]]


def test_beats_due_together_share_requests_of_at_most_ten() -> None:
    s = Schedule()
    for i in range(25):
        s.add(make(f"a{i}", "qa"))
    for i in range(3):
        s.add(make(f"b{i}", "qb"))
    plan = s.plan(FIRST)
    sizes = sorted((r.queue_url, len(r.entries)) for r in plan.requests)
    assert sizes == [("qa", 5), ("qa", 10), ("qa", 10), ("qb", 3)]
    assert all(
        len({e.heartbeat.receipt_handle for e in r.entries}) == len(r.entries)
        for r in plan.requests
    )


def test_free_places_carry_beats_due_soon_but_never_a_first_beat() -> None:
    s = Schedule()
    s.add(make("old", now=0.0))
    settle_all(s, s.plan(FIRST), FIRST)  # old: next due at 60
    s.add(make("new", now=35.0))  # first beat due at 65
    s.add(make("due", now=20.0))  # first beat due at 50
    plan = s.plan(50.0 + FIRST_BEAT_WINDOW)
    # "old" is due within half an interval and rides along; "new" is a first beat.
    assert handles(plan) == [["due", "old"]]


def test_never_asks_past_twelve_hours_from_receipt() -> None:
    s = Schedule()
    s.add(make(interval=30, visibility_timeout=600))
    limit = MAX_VISIBILITY_SECONDS - RECEIPT_ALLOWANCE
    now, asked = 0.0, []
    while True:
        now = s.next_due()
        if now == math.inf:
            break
        plan = s.plan(now)
        for r in plan.requests:
            asked += [(now, e.visibility_timeout) for e in r.entries]
        if plan.ended:
            assert plan.ended[0].ended is Ended.LIMIT
            break
        settle_all(s, plan, now)
    assert asked, "no beat at all"
    assert all(at + timeout <= limit for at, timeout in asked)
    assert asked[-1][1] < 600  # the last ones were shortened to fit
    assert len(s) == 0


def test_max_duration_ends_the_heartbeat() -> None:
    s = Schedule()
    s.add(make(max_duration=100))
    for now in (FIRST, 60.0, 90.0):
        settle_all(s, s.plan(now), now)
    plan = s.plan(120.0)
    assert plan.requests == []
    assert [h.ended for h in plan.ended] == [Ended.MAX_DURATION]
    assert len(s) == 0


@pytest.mark.parametrize(
    ("failure", "ended"),
    [(Failure.GONE, Ended.GONE), (Failure.DENIED, Ended.DENIED), (Failure.LIMIT, Ended.LIMIT)],
)
def test_final_failures_end_the_heartbeat(failure: Failure, ended: Ended) -> None:
    s = Schedule()
    s.add(make())
    plan = s.plan(FIRST)
    [result] = s.settle(plan.requests[0], [failure], FIRST)
    assert result.heartbeat.ended is ended
    assert len(s) == 0 and s.next_due() == math.inf


def test_transient_failures_retry_with_backoff_until_the_visibility_runs_out() -> None:
    s = Schedule(jitter=lambda: 1.0)
    s.add(make(interval=10, visibility_timeout=30))
    first = 10 + FIRST_BEAT_WINDOW
    settle_all(s, s.plan(first), first)  # hidden until 40.15
    now, delays = 20.0, []
    while True:
        plan = s.plan(now)
        [result] = s.settle(plan.requests[0], [Failure.TRANSIENT], now)
        if result.heartbeat.ended is not None:
            assert result.heartbeat.ended is Ended.LOST
            break
        assert result.retry_in is not None
        delays.append(result.retry_in)
        now += result.retry_in
    assert delays[:3] == [0.25, 0.5, 1.0]
    assert max(delays) == 5.0  # half the interval
    assert now < 40.0 + FIRST_BEAT_WINDOW


def test_a_retry_that_succeeds_resumes_the_schedule() -> None:
    s = Schedule(jitter=lambda: 0.0)
    s.add(make(interval=10, visibility_timeout=30))
    first = 10 + FIRST_BEAT_WINDOW
    plan = s.plan(first)
    [result] = s.settle(plan.requests[0], [Failure.TRANSIENT], first)
    assert result.retry_in == 0.125
    assert s.next_due() == first + 0.125  # a retried first beat waits for no one
    settle_all(s, s.plan(first + 0.125), first + 0.125)
    assert s.next_due() == 20.0


def test_stop_while_in_flight_drops_the_result() -> None:
    """A heartbeat removed while its call is in flight is never scheduled again."""
    s = Schedule()
    s.add(make())
    plan = s.plan(FIRST)
    assert plan.requests[0].entries[0].heartbeat.in_flight
    stopped = s.remove("rh")
    assert stopped is not None and stopped.stopped
    s.settle(plan.requests[0], [None], 30.2)
    assert s.next_due() == math.inf
    assert s.plan(1e9).requests == []


def test_duplicate_receipt_handle_is_refused() -> None:
    s = Schedule()
    assert s.add(make())
    assert not s.add(make())
    assert len(s) == 1


def test_many_short_tasks_leave_nothing_behind() -> None:
    """Stale heap entries of stopped heartbeats are compacted away."""
    s = Schedule()
    for i in range(10_000):
        s.add(make(f"rh{i}", now=i * 0.001))
        s.remove(f"rh{i}")
        if i % 100 == 0:
            s.plan(i * 0.001)
    s.plan(10.0)
    assert len(s) == 0
    assert sum(len(h) for h in s._heaps.values()) <= COMPACT_MIN_STALE
    assert s.next_due() == math.inf
