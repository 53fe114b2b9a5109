"""Waiting messages, hand-over, manual extension and a change of pace, on a fake clock."""

from __future__ import annotations

import math

import pytest

from celery_sqs_heartbeat._errors import Failure
from celery_sqs_heartbeat._schedule import (
    FIRST_BEAT_WINDOW,
    START_ALLOWANCE,
    Ended,
    Heartbeat,
    Schedule,
)

from .test_schedule import OPTIONS, handles, settle_all

pytestmark = pytest.mark.timeout(30)


class Task:
    """What the watch reads: None until the task starts, then its start time."""

    def __init__(self) -> None:
        self.started: float | None = None

    def __call__(self) -> float | None:
        return self.started


def waiting(task: Task, rh: str = "rh", now: float = 0.0) -> Heartbeat:
    return Heartbeat(rh, "q", OPTIONS, now, "t", "id", watch=task)


def beat_times(s: Schedule, until: float, step: float = 1.0) -> list[float]:
    sent = []
    now = 0.0
    while now <= until:
        plan = s.plan(now)
        if plan.requests:
            sent.append(now)
        settle_all(s, plan, now)
        now += step
    return sent


def test_a_waiting_message_is_beaten_from_its_receipt_until_its_task_starts() -> None:
    task = Task()
    s = Schedule()
    s.add(waiting(task))
    assert beat_times(s, 100) == [31, 60, 90]  # 30 + the first-beat window, then cadence
    task.started = 100.0
    # The last beat (90) keeps it hidden until 210, well past the task's first beat (130).
    assert s.plan(120.0).requests == []
    assert "rh" not in s
    ended = s.plan(121.0)
    assert not ended.requests


def test_a_task_started_at_once_costs_the_waiting_heartbeat_nothing() -> None:
    """No beat: the queue's own timeout covers the task's first beat, as for any task."""
    task = Task()
    s = Schedule()
    s.add(waiting(task))
    task.started = START_ALLOWANCE  # received, then started within the allowance
    plan = s.plan(30 + FIRST_BEAT_WINDOW)
    assert plan.requests == []
    assert [hb.ended for hb in plan.ended] == [Ended.HANDED_OVER]


def test_a_task_that_waited_before_its_first_beat_gets_one_bridging_beat() -> None:
    """Started 20 s after receipt: its own first beat (50 s) would come after what the
    queue's timeout is relied on for (31 s + allowance), so the waiting heartbeat beats
    once more, then hands over."""
    task = Task()
    s = Schedule()
    s.add(waiting(task))
    task.started = 20.0
    assert beat_times(s, 100) == [31]
    assert "rh" not in s


def test_a_settled_message_ends_its_waiting_heartbeat_without_a_beat() -> None:
    task = Task()
    s = Schedule()
    s.add(waiting(task))
    task.started = -math.inf  # acknowledged or rejected without running
    plan = s.plan(40.0)
    assert plan.requests == [] and [hb.ended for hb in plan.ended] == [Ended.HANDED_OVER]


def test_adopting_keeps_the_cadence() -> None:
    """The same process runs the task: its heartbeat goes on, no gap and no extra beat."""
    task = Task()
    s = Schedule()
    s.add(waiting(task))
    settle_all(s, s.plan(31.0), 31.0)
    adopted = s.adopt("rh", OPTIONS, "task", "id-1")
    assert adopted is not None and adopted.watch is None and adopted.task_id == "id-1"
    task.started = 45.0  # the watch no longer matters
    assert handles(s.plan(60.0)) == [["rh"]]
    assert s.adopt("rh", OPTIONS, "task", "id-1") is None  # a running heartbeat is not adopted


def test_a_long_extension_postpones_the_regular_beats() -> None:
    s = Schedule()
    hb = Heartbeat("rh", "q", OPTIONS, 0.0)
    s.add(hb)
    assert s.begin_extension(hb, 600, 10.0) == 600
    assert s.plan(40.0).requests == []  # in flight: the sidecar leaves it alone
    s.settle_extension(hb, 600, 10.0, None)
    # Regular beats resume when 90 s (window 120 - interval 30) are left: at 520.
    assert hb.next_due == 520.0 and hb.visible_until == 610.0 and hb.beats == 1
    assert s.plan(519.0).requests == []
    assert handles(s.plan(520.0)) == [["rh"]]


def test_a_short_extension_is_topped_up_at_once() -> None:
    s = Schedule()
    hb = Heartbeat("rh", "q", OPTIONS, 0.0)
    s.add(hb)
    s.settle_extension(hb, s.begin_extension(hb, 5, 10.0), 10.0, None)
    assert hb.next_due == 10.0
    assert handles(s.plan(10.0)) == [["rh"]]


def test_a_failed_extension_keeps_the_schedule_and_a_final_one_ends_it() -> None:
    s = Schedule()
    hb = Heartbeat("rh", "q", OPTIONS, 0.0)
    s.add(hb)
    s.settle_extension(hb, s.begin_extension(hb, 600, 10.0), 10.0, Failure.TRANSIENT)
    assert handles(s.plan(30 + FIRST_BEAT_WINDOW)) == [["rh"]]
    settle_all(s, s.plan(0), 0)
    s.settle_extension(hb, s.begin_extension(hb, 600, 40.0), 40.0, Failure.GONE)
    assert hb.ended is Ended.GONE and "rh" not in s


def test_extensions_stop_at_the_12_hour_limit() -> None:
    s = Schedule()
    hb = Heartbeat("rh", "q", OPTIONS, 0.0)
    s.add(hb)
    assert s.begin_extension(hb, 43200, 100.0) == math.floor(hb.limit_at - 100.0)


def test_a_new_pace_counts_from_the_last_beat() -> None:
    s = Schedule()
    hb = Heartbeat("rh", "q", OPTIONS, 0.0)
    s.add(hb)
    s.reconfigure(hb, 10.0, 40)
    assert hb.next_due == 10.0
    plan = s.plan(10.0 + FIRST_BEAT_WINDOW)
    assert [e.visibility_timeout for r in plan.requests for e in r.entries] == [40]
    settle_all(s, plan, 10.0)
    assert hb.next_due == 20.0
