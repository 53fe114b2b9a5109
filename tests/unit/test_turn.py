"""Which beats one turn takes (``_turn``): a pure sort, without a loop, lock or clock."""

from __future__ import annotations

import math

import pytest

from celery_sqs_heartbeat._heartbeat import RIDE_FRACTION, Ended, Heartbeat
from celery_sqs_heartbeat._send import MAX_BATCH
from celery_sqs_heartbeat._turn import earliest, look

from ..support.fake_sidecar import OPTIONS

pytestmark = pytest.mark.timeout(30)

NOW = 1000.0
#: Due within the ride fraction of the interval: a rider, where a request has room.
SOON = NOW + RIDE_FRACTION * OPTIONS.interval / 2


def beat(name: str, due: float, *, queue: str = "q", first: bool = False) -> Heartbeat:
    hb = Heartbeat(name, queue, OPTIONS, 0.0)
    hb.next_due = due
    hb.beats = 0 if first else 1
    return hb


def test_a_rider_takes_a_free_place_in_its_queues_request_only() -> None:
    """Nine due beats leave one place in their request: the sooner of two riders takes it;
    a rider of a queue with no due beat makes no request of its own."""
    due = [beat(f"due{i}", NOW - i) for i in range(MAX_BATCH - 1)]
    sooner, later = beat("sooner", SOON - 1), beat("later", SOON)
    alone = beat("alone", SOON, queue="other")
    turn = look([later, *due, alone, sooner], NOW)
    taken = [hb.receipt_handle for hb, _ in turn.candidates]
    assert taken == [f"due{i}" for i in reversed(range(MAX_BATCH - 1))] + ["sooner"]
    assert dict((hb.receipt_handle, until) for hb, until in turn.candidates)["sooner"] == (
        NOW + RIDE_FRACTION * OPTIONS.interval
    )


def test_a_full_request_takes_no_rider_and_a_first_beat_never_rides() -> None:
    due = [beat(f"due{i}", NOW) for i in range(MAX_BATCH)]
    rider = beat("rider", SOON)
    assert [hb for hb, _ in look([*due, rider], NOW).candidates] == due
    one = beat("due", NOW)
    first = beat("first", SOON, first=True)
    assert [hb for hb, _ in look([one, first], NOW).candidates] == [one]


def test_settled_in_flight_and_ended_beats_are_not_taken() -> None:
    settled = beat("settled", NOW)
    settled.is_settled = lambda: True
    flying, ended = beat("flying", NOW), beat("ended", NOW)
    flying.in_flight, ended.ended = True, Ended.TASK_ENDED
    turn = look([settled, flying, ended], NOW)
    assert turn.settled == [settled] and turn.candidates == []
    assert earliest([flying, ended]) == math.inf
    assert earliest([flying, beat("next", NOW + 5), beat("then", NOW + 9)]) == NOW + 5
