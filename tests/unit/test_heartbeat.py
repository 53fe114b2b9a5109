"""The timing rules (``_heartbeat``) as the sidecar applies them, on a fake clock."""

from __future__ import annotations

import itertools
import math
import threading

import pytest

from celery_sqs_heartbeat._errors import Failure
from celery_sqs_heartbeat._heartbeat import RECEIPT_ALLOWANCE, Ended, Heartbeat, allowed, grid
from celery_sqs_heartbeat._settings import MAX_VISIBILITY_SECONDS
from celery_sqs_heartbeat.testing import wait_for

from ..support.fake_sidecar import OPTIONS, World

pytestmark = pytest.mark.timeout(30)

#: When a message received at 0 gets its first beat: one interval (on the grid of 2 s).
FIRST = 30.0


def test_no_beat_before_one_interval() -> None:
    """A task shorter than one interval costs no SQS call."""
    w = World()
    w.add()
    w.advance(29.9)
    w.sidecar.stop("rh")
    w.advance(1000)
    assert w.calls == []
    assert len(w.sidecar) == 0


def test_beats_fall_on_a_grid_of_a_power_of_two_seconds() -> None:
    """Received at odd moments, heartbeats of one interval beat at the same instants."""
    assert grid(30) == 2 and grid(1) == 0.125 and grid(10) == 1
    w = World()
    for i, at in enumerate((0.3, 1.1, 1.9)):
        w.now = at
        w.add(f"rh{i}")
    w.advance(65)
    # First beats at the first grid point an interval after each receipt; then together.
    assert [(c.at, len(c.entries)) for c in w.calls] == [(32, 3), (62, 3)]


def test_beats_every_interval_with_the_configured_visibility() -> None:
    w = World()
    w.add()
    w.advance(100)
    assert w.beats_of("rh") == pytest.approx([FIRST, FIRST + 30, FIRST + 60], abs=1e-6)
    assert {c.entries[0][1] for c in w.calls} == {120}


def test_beats_due_together_share_requests_of_at_most_ten() -> None:
    """Messages of one receive are seen milliseconds apart: their beats share requests."""
    w = World()
    for i in range(23):
        w.now = 0.001 + i * 0.0005  # all due at the same grid point, 32 s
        w.add(f"rh{i}")
    w.add("other", queue="q2")
    w.advance(33)
    assert sorted(len(c.entries) for c in w.calls) == [1, 3, 10, 10]
    assert {c.queue_url for c in w.calls if len(c.entries) == 1} == {"q2"}


def test_free_places_carry_beats_due_soon_but_never_a_first_beat() -> None:
    w = World()
    w.add("a")  # beats at FIRST, then due every 30 s from 30
    w.advance(5.0)
    w.add("b")  # first beat due at 35
    w.advance(55.0)
    w.add("fresh")  # first beat due at 85: never sent early
    w.advance(90)
    assert [(c.at, sorted(c.handles)) for c in w.calls] == [
        (30, ["a"]),
        (36, ["b"]),  # the first grid point (2 s) one interval after its receipt
        (60, ["a", "b"]),  # b was due 6 s later: it takes the free place
        (86, ["a", "b", "fresh"]),
    ]


def test_never_asks_past_twelve_hours_from_receipt() -> None:
    w = World()
    w.now = 100.0
    hb = w.add()
    limit = 100.0 + MAX_VISIBILITY_SECONDS - RECEIPT_ALLOWANCE
    w.advance(limit + 100)
    for call in w.calls:
        assert call.at + call.entries[0][1] <= limit
    assert hb.ended is Ended.LIMIT and len(w.sidecar) == 0
    assert w.calls[-1].entries[0][1] < 120  # the last beat asked for what was left


def test_max_duration_counts_from_the_task_start() -> None:
    w = World()
    hb = w.add(max_duration=100)
    w.advance(50)  # waiting: max_duration does not run yet
    assert w.sidecar.run("rh")
    w.advance(149)
    assert hb.started == 50 and hb.ended is None
    w.advance(200)
    assert hb.ended is Ended.MAX_DURATION and len(w.sidecar) == 0
    assert max(w.beats_of("rh")) < 150


@pytest.mark.parametrize(
    ("failure", "ended"),
    [(Failure.GONE, Ended.GONE), (Failure.DENIED, Ended.DENIED), (Failure.LIMIT, Ended.LIMIT)],
)
def test_final_failures_end_the_heartbeat(failure: Failure, ended: Ended) -> None:
    w = World()
    w.answer = lambda handle: failure
    hb = w.add()
    w.advance(1000)
    assert hb.ended is ended and len(w.calls) == 1 and len(w.sidecar) == 0
    assert w.sidecar.stats().messages_lost == 1


def test_transient_failures_retry_with_backoff_until_the_visibility_runs_out() -> None:
    w = World(jitter=1.0)
    hb = w.add(interval=10, visibility_timeout=30)
    w.advance(10)  # hidden until 40
    w.answer = lambda handle: Failure.TRANSIENT
    w.advance(100)
    attempts = w.beats_of("rh")[1:]
    delays = [b - a for a, b in itertools.pairwise(attempts)]
    assert delays[:3] == pytest.approx([0.25, 0.5, 1.0])
    assert max(delays) == pytest.approx(5.0)  # half the interval
    assert hb.ended is Ended.LOST
    assert attempts[-1] < 40


def test_a_retry_that_succeeds_resumes_the_schedule() -> None:
    w = World(jitter=0.0)
    replies = [Failure.TRANSIENT]
    w.answer = lambda handle: replies.pop() if replies else None
    w.add(interval=10, visibility_timeout=30)
    w.advance(35)
    first, retry, *rest = w.beats_of("rh")
    assert retry - first == pytest.approx(0.125)
    assert rest[0] - first == pytest.approx(10)  # the cadence of the first beat


def test_stop_is_final_and_a_call_in_flight_counts_but_schedules_nothing() -> None:
    w = World()
    hb = w.add()

    stoppers: list[threading.Thread] = []

    def stop_while_in_flight(handle: str) -> None:
        assert hb.in_flight
        # What a task's postrun does from its own thread while the call is out.
        stoppers.append(threading.Thread(target=w.sidecar.stop, args=("rh",)))
        stoppers[0].start()
        wait_for(lambda: hb.ended is not None, timeout=5, what="the stop")
        return None

    w.answer = stop_while_in_flight
    w.advance(FIRST)
    stoppers[0].join(5)
    assert not stoppers[0].is_alive(), "stop did not return once the call was answered"
    assert hb.beats == 1
    w.advance(1000)
    assert len(w.calls) == 1


def test_duplicate_receipt_handle_is_refused() -> None:
    w = World()
    w.add()
    assert not w.sidecar.add(Heartbeat("rh", "q", OPTIONS, 0.0))
    assert len(w.sidecar) == 1


def test_ten_thousand_short_tasks_leave_nothing_behind() -> None:
    w = World()
    for i in range(10_000):
        w.now = i * 0.001
        w.add(f"rh{i}")
        w.sidecar.stop(f"rh{i}")
    w.advance(100)
    assert len(w.sidecar) == 0 and w.calls == []
    stats = w.sidecar.stats()
    assert (stats.started, stats.stopped, stats.active) == (10_000, 10_000, 0)


def test_a_settled_message_ends_without_a_beat() -> None:
    """Celery acknowledged it (a task in a pool child ended, or kombu requeued it)."""
    w = World()
    settled = False
    hb = w.add(is_settled=lambda: settled)
    w.advance(20)
    settled = True
    w.advance(1000)
    assert w.calls == [] and hb.ended is Ended.SETTLED and len(w.sidecar) == 0


def test_a_waiting_message_is_beaten_from_its_receipt() -> None:
    """Prefetched or held for its ETA: beaten before its task starts, and on after."""
    w = World()
    hb = w.add()
    w.advance(100)
    assert hb.started is None and len(w.calls) == 3
    w.sidecar.run("rh")
    w.advance(130)
    assert hb.started == 100 and len(w.calls) == 4


def test_a_long_extension_postpones_the_regular_beats() -> None:
    w = World()
    hb = w.add()
    w.now = 10.0
    assert w.sidecar.extend(hb, 600)
    # Regular beats resume when 90 s (window - interval) of the 600 s are left.
    w.advance(519)
    assert w.beats_of("rh") == [10.0]
    w.advance(521)
    assert w.beats_of("rh") == [10.0, 520.0]


def test_a_short_extension_is_topped_up_at_once() -> None:
    w = World()
    hb = w.add()
    w.now = 10.0
    assert w.sidecar.extend(hb, 60)
    w.advance(11)
    assert w.beats_of("rh") == [10.0, 10.0]


def test_a_failed_extension_keeps_the_schedule_and_a_final_one_ends_it() -> None:
    w = World()
    hb = w.add()
    w.answer = lambda handle: Failure.TRANSIENT
    w.now = 10.0
    assert not w.sidecar.extend(hb, 600)
    assert hb.ended is None and hb.next_due == 30
    w.answer = lambda handle: Failure.GONE
    assert not w.sidecar.extend(hb, 600)
    assert hb.ended is Ended.GONE and len(w.sidecar) == 0


def test_extensions_stop_at_the_12_hour_limit() -> None:
    w = World()
    hb = w.add()
    limit = MAX_VISIBILITY_SECONDS - RECEIPT_ALLOWANCE
    w.now = limit - 100.4
    assert w.sidecar.extend(hb, 3600)
    assert w.calls[-1].entries == [("rh", 100)]
    w.now = limit - 0.5
    assert not w.sidecar.extend(hb, 3600)
    assert allowed(3600, w.now, hb.received) is Ended.LIMIT


def test_a_new_pace_counts_from_the_last_beat() -> None:
    w = World()
    hb = w.add()
    w.advance(FIRST)
    assert w.sidecar.reconfigure(hb, 10, 40)
    w.advance(FIRST + 10.5)
    assert w.beats_of("rh") == [FIRST, FIRST + 10]
    assert w.calls[-1].entries == [("rh", 40)]
    assert math.isinf(w.sidecar.turn(wait=False)) is False


def test_a_message_gone_because_celery_settled_it_is_no_loss() -> None:
    """The beat was out when Celery acknowledged the message: SQS answers "gone", and
    that is the normal end of the message, not a message that may run again."""
    w = World()
    settled = False

    def acknowledged_meanwhile(handle: str) -> Failure:
        nonlocal settled
        settled = True
        return Failure.GONE

    w.answer = acknowledged_meanwhile
    hb = w.add(is_settled=lambda: settled)
    w.advance(FIRST)
    assert hb.ended is Ended.SETTLED and w.sidecar.stats().messages_lost == 0


def test_following_a_slot_applies_what_its_task_wrote() -> None:
    """``Heartbeat.follow``: the start, the pace and the task's own extension it wrote;
    no beat while it extends, and an end once its task ended or its process died."""
    from celery_sqs_heartbeat._slots import SlotView

    hb = Heartbeat("rh", "q", OPTIONS, 0.0)
    assert hb.follow(SlotView(3, running=True, started=5.0, pace=(10, 60)), now=6.0)
    assert (hb.slot, hb.started) == (3, 5.0)
    assert (hb.options.interval, hb.options.visibility_timeout) == (10, 60)
    assert hb.follow(SlotView(3, running=True, started=5.0, extended=(7.0, 300)), now=7.5)
    assert hb.last_sent == 7.0
    assert not hb.follow(SlotView(3, running=True, extending=True), now=8.0)
    assert hb.ended is None
    assert not hb.follow(SlotView(3, running=False), now=9.0)
    assert hb.ended is Ended.TASK_ENDED
    dead = Heartbeat("rh-dead", "q", OPTIONS, 0.0)
    assert not dead.follow(SlotView(1, running=True, alive=False), now=1.0)
    assert dead.ended is Ended.SETTLED
