"""Properties of the scheduler for any interleaving of starts, stops, time and answers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_sqs_heartbeat._errors import Failure
from celery_sqs_heartbeat._schedule import FIRST_BEAT_WINDOW, RECEIPT_ALLOWANCE, Heartbeat, Schedule
from celery_sqs_heartbeat._settings import MAX_VISIBILITY_SECONDS, HeartbeatOptions

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Start:
    interval: float
    window_margin: int
    queue: int
    #: Seconds the message has been in flight already: near 12 hours, the limit is hit.
    age: float


@dataclass(frozen=True)
class Stop:
    pick: int


@dataclass(frozen=True)
class Wait:
    seconds: float


ops = st.lists(
    st.one_of(
        st.builds(
            Start,
            st.sampled_from([0.5, 1.0, 7.0, 30.0]),
            st.integers(1, 90),
            st.integers(0, 2),
            st.sampled_from([0.0, 0.0, 43000.0, 43130.0]),
        ),
        st.builds(Stop, st.integers(0, 1000)),
        st.builds(Wait, st.floats(0.0, 120.0)),
    ),
    max_size=60,
)
answers = st.lists(
    st.sampled_from([None, None, None, Failure.TRANSIENT, Failure.GONE]), max_size=200
)


def _run(operations: list[object], replies: list[Failure | None], *, answer_all: bool) -> None:
    s = Schedule(jitter=lambda: 0.5)
    now = 0.0
    live: dict[str, Heartbeat] = {}
    stopped: set[str] = set()
    #: Until when each live message is hidden: the queue's own timeout covers the time up
    #: to the first beat, then each accepted beat extends it.
    hidden: dict[str, float] = {}
    counter = 0
    replies = list(replies)

    def advance(to: float) -> None:
        nonlocal now
        # Like the sidecar: never sleep past the next due beat.
        while True:
            due = s.next_due()
            if due > to:
                break
            now = max(now, due)
            check_hidden()
            run_plan()
        now = max(now, to)
        check_hidden()

    def check_hidden() -> None:
        if not answer_all:
            return
        for rh, hb in live.items():
            # In its last second before SQS's 12-hour limit a message may become visible:
            # SQS takes whole seconds, and asking past the limit is an error.
            if now < hb.limit_at - 1:
                assert now <= hidden[rh], f"{rh} visible at {now}, hidden until {hidden[rh]}"

    def run_plan() -> None:
        plan = s.plan(now)
        for hb in plan.ended:
            live.pop(hb.receipt_handle, None)
        for request in plan.requests:
            failures: list[Failure | None] = []
            for entry in request.entries:
                rh = entry.heartbeat.receipt_handle
                assert rh not in stopped, "a beat was planned for a stopped heartbeat"
                hb = entry.heartbeat
                limit = hb.started + MAX_VISIBILITY_SECONDS - RECEIPT_ALLOWANCE
                assert now + entry.visibility_timeout <= limit, "asked past 12 hours"
                reply = None if answer_all or not replies else replies.pop()
                failures.append(reply)
                if reply is None:
                    hidden[rh] = max(hidden.get(rh, 0.0), now + entry.visibility_timeout)
            for result in s.settle(request, failures, now):
                if result.heartbeat.ended is not None:
                    live.pop(result.heartbeat.receipt_handle, None)

    for op in operations:
        if isinstance(op, Start):
            counter += 1
            rh = f"rh{counter}"
            visibility = math.ceil(op.interval) + op.window_margin
            options = HeartbeatOptions(True, op.interval, visibility, None)
            hb = Heartbeat(rh, f"q{op.queue}", options, now - op.age)
            assert s.add(hb)
            live[rh] = hb
            # The queue's own timeout must outlast the first beat (and its window).
            hidden[rh] = max(now, hb.next_due) + FIRST_BEAT_WINDOW
        elif isinstance(op, Stop) and live:
            rh = sorted(live)[op.pick % len(live)]
            s.remove(rh)
            del live[rh]
            stopped.add(rh)
        elif isinstance(op, Wait):
            advance(now + op.seconds)
    for hb in list(live.values()):
        if hb.limit_at <= now + 200:
            # It ends at its first due beat past the limit.
            advance(hb.limit_at + hb.interval + 1)
            assert hb.receipt_handle not in live, "a heartbeat outlived SQS's 12-hour limit"
    advance(now + 200)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_beats_keep_every_running_message_hidden_while_sqs_answers(
    operations: list[object],
) -> None:
    """No stopped heartbeat beats, nothing asks past 12 h, no visibility lapses."""
    _run(operations, [], answer_all=True)


@settings(max_examples=150, deadline=None)
@given(ops, answers)
def test_stopped_heartbeats_never_beat_whatever_sqs_answers(
    operations: list[object], replies: list[Failure | None]
) -> None:
    _run(operations, replies, answer_all=False)
