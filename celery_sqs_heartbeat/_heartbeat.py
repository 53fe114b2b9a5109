"""One message's heartbeat: its state, its transitions, and when its next beat is due.

Pure bookkeeping, with no threads, no clock and no SQS: the sidecar passes ``now`` in,
sends what is due, and hands each result back. The timing rules, all in one place:

* Beats fall on a grid: multiples of a step, the largest power of two (in seconds) not
  above an eighth of the interval (:func:`grid`). Beats of many messages then fall due
  at the same moments and share requests, and the sidecar wakes a few times per
  interval however many messages it holds.
* A message's first beat is due at the first grid point one interval or more after its
  receipt: a task that ends sooner costs no SQS call.
* A beat asks SQS to keep the message hidden ``visibility_timeout`` seconds from now.
  The next beat is due at the last grid point at most one interval after it was sent.
* A request with free places also takes the queue's beats due within
  :data:`RIDE_FRACTION` of their interval (never a first beat), so the beats of a busy
  worker settle into full requests.
* Nothing is asked past SQS's 12-hour limit from receipt, nor beaten past
  ``max_duration`` from the task's start.
* A transient failure is retried with jittered exponential backoff while the message's
  visibility lasts; once it has run out the message may be with another worker, and the
  heartbeat ends as lost.
* After a manual extension the regular beats resume when the message has as much
  visibility left as before any regular beat (window minus interval).

States: ``WAITING`` (received, its task not started) → ``RUNNING`` (its task started)
→ ``ENDED``; a waiting message may also end without running. ``ENDED`` is final: no
beat is planned for it again. ``in_flight`` says a call for it is out, in any state.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable

from ._errors import Failure
from ._settings import MAX_VISIBILITY_SECONDS, HeartbeatOptions

#: The grid's step is at most this fraction of the interval: the first beat comes at
#: most this much of an interval late, and a beat at most this much early.
GRID_FRACTION = 1 / 8
#: How long stopping a heartbeat waits for a call in flight for it. SQS answers in
#: milliseconds; a call unanswered after this has stalled, and the task's
#: acknowledgement must not wait for it (it fails harmlessly on a deleted message).
STOP_WAIT = 0.25
#: A beat due within this fraction of its interval may take a free place in a request
#: going to its queue anyway.
RIDE_FRACTION = 0.25
#: The process that sees a message first (``task_received``) may do so a little after
#: SQS handed it out; this much of SQS's 12-hour budget is left unused for that.
RECEIPT_ALLOWANCE = 60.0
#: The queue's own visibility timeout must cover a message until its first beat; the
#: preflight check asks for this much more, for the moment between SQS handing the
#: message out and the worker seeing it.
START_ALLOWANCE = 1.0
#: First retry after a transient failure, in seconds; doubled on each further failure.
BACKOFF_INITIAL = 0.25
#: A retry waits at most this fraction of the interval.
BACKOFF_MAX_FRACTION = 0.5


@functools.lru_cache(maxsize=256)
def grid(interval: float) -> float:
    """The step of the grid the beats of a heartbeat with this interval fall on.

    A power of two, so that the grids of different intervals share their points.
    """
    return float(2.0 ** math.floor(math.log2(interval * GRID_FRACTION)))


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    ENDED = "ended"


class Ended(enum.Enum):
    """Why a heartbeat ended. Only the first two are the normal end of a message."""

    TASK_ENDED = "task ended"
    #: Celery acknowledged, rejected or requeued the message, or its pool process died
    #: (Celery settles it next): the heartbeat is no longer wanted.
    SETTLED = "message settled"
    GONE = "message gone"
    DENIED = "permission denied"
    LIMIT = "SQS 12-hour limit reached"
    MAX_DURATION = "sqs_heartbeat_max_duration reached"
    LOST = "visibility lapsed before a beat got through"

    @property
    def normal(self) -> bool:
        """Whether this is the normal end of a message (a per-task path: no hashing)."""
        return self is Ended.TASK_ENDED or self is Ended.SETTLED

    @property
    def lost(self) -> bool:
        """Whether the message may now run again elsewhere because of this end."""
        return not self.normal and self is not Ended.MAX_DURATION


_ENDED_BY = {Failure.GONE: Ended.GONE, Failure.DENIED: Ended.DENIED, Failure.LIMIT: Ended.LIMIT}


class Heartbeat:
    """The heartbeat of one received message, keyed by its receipt handle.

    A plain slotted class: one is made for every message a worker receives.
    """

    __slots__ = (
        "beats",
        "due",
        "ended",
        "failures",
        "in_flight",
        "interval",
        "is_settled",
        "last_sent",
        "max_duration",
        "next_due",
        "queue_url",
        "receipt_handle",
        "received",
        "slot",
        "started",
        "state",
        "step",
        "task_id",
        "task_name",
        "visibility_timeout",
        "visible_until",
    )

    def __init__(
        self,
        receipt_handle: str,
        queue_url: str,
        options: HeartbeatOptions,
        now: float,
        task_name: str = "",
        task_id: str = "",
        is_settled: Callable[[], bool] | None = None,
    ) -> None:
        self.receipt_handle = receipt_handle
        self.queue_url = queue_url
        self.task_name = task_name
        self.task_id = task_id
        self.interval = options.interval
        self.visibility_timeout = options.visibility_timeout
        self.max_duration = options.max_duration
        #: Whether Celery has settled the message (kombu's ``Message.acknowledged``).
        self.is_settled = is_settled
        self.state = State.WAITING
        self.ended: Ended | None = None
        self.received = now
        self.started: float | None = None
        #: When the last accepted beat was sent (the receipt, before the first).
        self.last_sent = now
        self.step = grid(options.interval)
        #: When the next regular beat is due: for cadence and lateness.
        self.due = math.ceil((now + options.interval) / self.step) * self.step
        #: When the next attempt is due: ``due``, or a retry's time after a failure.
        self.next_due = self.due
        #: Until when the message is known to stay hidden; unknown (infinite) until the
        #: first beat, since the queue's own timeout is not known here.
        self.visible_until = math.inf
        self.beats = 0
        #: Failed attempts since the last accepted beat.
        self.failures = 0
        self.in_flight = False
        #: The prefork pool slot its task runs in, once the sidecar has seen it there.
        self.slot: int | None = None

    # -- transitions -------------------------------------------------------------------

    def run(self, now: float) -> None:
        """Its task started (in this process, or in a pool child)."""
        if self.state is State.WAITING:
            self.state, self.started = State.RUNNING, now

    def end(self, reason: Ended) -> bool:
        """End it for good; False if it had already ended."""
        if self.state is State.ENDED:
            return False
        self.state, self.ended = State.ENDED, reason
        return True

    def plan(self, now: float) -> int | None:
        """The visibility to ask for in a beat sent now, or None when it must end instead
        (it is then ended: SQS's 12-hour limit or ``max_duration`` reached)."""
        limit = self.max_duration
        if self.started is not None and limit is not None and now >= self.started + limit:
            self.end(Ended.MAX_DURATION)
            return None
        # Never ask past SQS's 12-hour limit: SQS rejects such a request outright.
        left = math.floor(self.limit_at - now)
        if left < 1:
            self.end(Ended.LIMIT)
            return None
        return min(self.visibility_timeout, left)

    def settle(
        self, sent: float, asked: int, failure: Failure | None, now: float, jitter: float = 0.5
    ) -> float | None:
        """Apply the result of a beat sent at *sent*; returns the retry delay of a
        transient failure that is retried (the heartbeat stays on), else None. *jitter*
        (0..1) spreads the retries of many workers."""
        self.in_flight = False
        if self.state is State.ENDED:
            self.beats += failure is None  # what SQS took while it was stopping
            return None
        if failure is None:
            self.beats += 1
            self.failures = 0
            self.visible_until = sent + asked
            self.last_sent = sent
            self._schedule(self._on_grid(sent + self.interval))
            return None
        ended = _ENDED_BY.get(failure)
        if ended is None:
            self.failures += 1
            retry_in = self.backoff(jitter)
            if now + retry_in < self.visible_until:
                self.next_due = now + retry_in
                return retry_in
            ended = Ended.LOST
        self.end(ended)
        return None

    def extended(self, sent: float, seconds: int) -> None:
        """A manual extension of *seconds* sent at *sent* was accepted."""
        self.beats += 1
        self.failures = 0
        self.visible_until = sent + seconds
        self.last_sent = sent
        margin = self.visibility_timeout - self.interval
        self._schedule(max(sent, self._on_grid(sent + seconds - margin)))

    def extension_failed(self, failure: Failure) -> None:
        """A manual extension failed: the message is gone or out of reach, or the
        regular beats simply go on."""
        ended = _ENDED_BY.get(failure)
        if ended is not None:
            self.end(ended)

    def reconfigure(self, interval: float, visibility_timeout: int) -> None:
        """Another pace from the next beat on (due one new interval after the last)."""
        self.interval, self.visibility_timeout = interval, visibility_timeout
        self.step = grid(interval)
        if not self.failures:
            self._schedule(self._on_grid(self.last_sent + interval))

    def _schedule(self, due: float) -> None:
        self.due = self.next_due = due

    def _on_grid(self, time: float) -> float:
        """The last grid point at or before *time*."""
        return math.floor(time / self.step) * self.step

    # -- facts -------------------------------------------------------------------------

    @property
    def limit_at(self) -> float:
        """SQS's 12-hour limit from receipt, less :data:`RECEIPT_ALLOWANCE`."""
        return self.received + MAX_VISIBILITY_SECONDS - RECEIPT_ALLOWANCE

    @property
    def first(self) -> bool:
        """Whether its next beat is its first (never sent early: see the rules)."""
        return self.beats == 0 and self.failures == 0

    def backoff(self, jitter: float) -> float:
        """The wait before retry number ``failures``: half fixed, half *jitter* (0..1)."""
        ceiling = min(
            BACKOFF_INITIAL * 2 ** (self.failures - 1), BACKOFF_MAX_FRACTION * self.interval
        )
        return float(ceiling * (0.5 + 0.5 * jitter))

    def __repr__(self) -> str:
        return (
            f"<Heartbeat {self.task_name}[{self.task_id}] {self.state.value} beats={self.beats}"
            f" next_due={self.next_due:.3f} ended={self.ended}>"
        )
