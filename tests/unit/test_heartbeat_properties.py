"""Properties of the timing rules for any interleaving of messages, stops, time and answers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_sqs_heartbeat._errors import Failure
from celery_sqs_heartbeat._heartbeat import RECEIPT_ALLOWANCE, Heartbeat
from celery_sqs_heartbeat._send import Answer
from celery_sqs_heartbeat._settings import MAX_VISIBILITY_SECONDS, HeartbeatOptions

from ..support.fake_sidecar import World

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Receive:
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
            Receive,
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


def limit_at(hb: Heartbeat) -> float:
    """SQS's 12-hour limit for *hb*'s message, less the receipt allowance."""
    return hb.received + MAX_VISIBILITY_SECONDS - RECEIPT_ALLOWANCE


class Checked(World):
    """Keeps, per message, until when SQS hides it, and every handle ever stopped."""

    def __init__(self, replies: list[Failure | None], answer_all: bool) -> None:
        super().__init__()
        self.replies = replies
        self.answer_all = answer_all
        self.hidden: dict[str, float] = {}
        self.stopped: set[str] = set()
        self.live: dict[str, Heartbeat] = {}

    def send(self, queue_url: str, entries: Sequence[tuple[str, int]]) -> list[Answer]:
        failures: list[Failure | None] = []
        for rh, seconds in entries:
            assert rh not in self.stopped, "a beat was sent for a stopped heartbeat"
            assert self.now + seconds <= limit_at(self.live[rh]), "asked past 12 hours"
            reply = None if self.answer_all or not self.replies else self.replies.pop()
            failures.append(reply)
            if reply is None:
                self.hidden[rh] = max(self.hidden.get(rh, 0.0), self.now + seconds)
        return [Answer(f) for f in failures]

    def check(self) -> None:
        if not self.answer_all:
            return
        for rh, hb in self.live.items():
            # In its last second before SQS's 12-hour limit a message may become visible:
            # SQS takes whole seconds, and asking past the limit is an error.
            if hb.ended is None and self.now < limit_at(hb) - 1:
                assert self.now <= self.hidden[rh], f"{rh} visible at {self.now}"


def _run(operations: list[object], replies: list[Failure | None], *, answer_all: bool) -> None:
    w = Checked(list(replies), answer_all)
    counter = 0
    for op in operations:
        if isinstance(op, Receive):
            counter += 1
            rh = f"rh{counter}"
            visibility = math.ceil(op.interval) + op.window_margin
            options = HeartbeatOptions(True, op.interval, visibility, None)
            hb = Heartbeat(rh, f"q{op.queue}", options, w.now - op.age)
            assert w.sidecar.add(hb)
            w.live[rh] = hb
            # The queue's own timeout must outlast the first beat.
            w.hidden[rh] = max(w.now, hb.next_due)
        elif isinstance(op, Stop) and w.live:
            rh = sorted(w.live)[op.pick % len(w.live)]
            w.sidecar.stop(rh)
            del w.live[rh]
            w.stopped.add(rh)
        elif isinstance(op, Wait):
            w.advance(w.now + op.seconds)
    for hb in list(w.live.values()):
        if limit_at(hb) <= w.now + 200:
            # It ends at its first due beat past the limit.
            w.advance(limit_at(hb) + hb.options.interval + 1)
            assert hb.ended is not None, "a heartbeat outlived SQS's 12-hour limit"
    w.advance(w.now + 200)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_beats_keep_every_running_message_hidden_while_sqs_answers(
    operations: list[object],
) -> None:
    _run(operations, [], answer_all=True)


@settings(max_examples=150, deadline=None)
@given(ops, answers)
def test_stopped_heartbeats_never_beat_whatever_sqs_answers(
    operations: list[object], replies: list[Failure | None]
) -> None:
    _run(operations, replies, answer_all=False)
