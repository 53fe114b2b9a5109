"""One message's heartbeat: what the worker knows of it, and when its next beat is due.

Pure bookkeeping, with no threads, no clock and no SQS. The sidecar owns every
:class:`Heartbeat` and changes it only under its own lock: it passes ``now`` in, sends
what is due, and hands each answer back to :meth:`Heartbeat.answered`. The timing rules,
all in one place:

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
  worker fall into full requests.
* Nothing is asked past SQS's 12-hour limit from receipt, and no regular beat is sent
  past ``max_duration`` from the task's start: both in :func:`allowed`.
* A transient failure is retried with jittered exponential backoff while the message's
  visibility lasts; once it has run out the message may be with another worker, and the
  heartbeat ends as lost.
* After a manual extension the regular beats resume when the message has as much
  visibility left as before any regular beat (window minus interval).

A heartbeat is *waiting* until its task starts (``started`` is None), then *running*,
and *ended* once ``ended`` holds a reason: that is final, no beat is planned for it
again. ``in_flight`` says a call for it is out.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ._errors import Failure
from ._send import Answer
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


class Ended(enum.Enum):
    """Why a heartbeat ended (``_report`` says what each one logs and counts)."""

    TASK_ENDED = "task ended"
    #: Celery acknowledged, rejected or requeued the message, or its pool process died
    #: (Celery settles it next): the heartbeat is no longer wanted.
    SETTLED = "message settled"
    GONE = "message gone"
    DENIED = "permission denied"
    LIMIT = "SQS 12-hour limit reached"
    MAX_DURATION = "sqs_heartbeat_max_duration reached"
    LOST = "visibility lapsed before a beat got through"
    #: The worker is shutting down and will not run the message's task: the drain made
    #: it visible again at once, or kombu releases it as the worker exits (``_drain``).
    HANDED_BACK = "handed back at shutdown"


#: The failures that end a heartbeat at once, and how.
_FINAL = {Failure.GONE: Ended.GONE, Failure.DENIED: Ended.DENIED, Failure.LIMIT: Ended.LIMIT}


class TaskReading(Protocol):
    """What the beating process read of a message's task in its slot (``_slots.SlotView``)."""

    @property
    def index(self) -> int: ...
    @property
    def running(self) -> bool: ...
    @property
    def alive(self) -> bool: ...
    @property
    def started(self) -> float: ...
    @property
    def pace(self) -> tuple[float, int] | None: ...
    @property
    def extended(self) -> tuple[float, int] | None: ...
    @property
    def extending(self) -> bool: ...


def allowed(
    seconds: int,
    now: float,
    received: float,
    started: float | None = None,
    max_duration: float | None = None,
) -> int | Ended:
    """The visibility a call sent *now* may ask for, at most *seconds*; or why none may.

    The two limits of every call, a regular beat's or a task's own extension: SQS's
    12-hour limit from the receipt (asking past it is an error, so the last calls ask
    for what is left), and ``max_duration`` from the task's start.
    """
    if max_duration is not None and started is not None and now >= started + max_duration:
        return Ended.MAX_DURATION
    left = math.floor(received + MAX_VISIBILITY_SECONDS - RECEIPT_ALLOWANCE - now)
    return Ended.LIMIT if left < 1 else min(seconds, left)


class Heartbeat:
    """The heartbeat of one received message, keyed by its receipt handle.

    One is made for every message a worker receives, most of which end before their
    first beat: the constructor only stores.
    """

    __slots__ = (
        "beats",
        "due",
        "ended",
        "failures",
        "in_flight",
        "is_settled",
        "last_sent",
        "message_id",
        "next_due",
        "options",
        "queue_url",
        "receipt_handle",
        "receive_count",
        "received",
        "slot",
        "started",
        "task_id",
        "task_name",
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
        *,
        message_id: str = "",
        receive_count: int = 0,
    ) -> None:
        self.receipt_handle = receipt_handle
        #: SQS's id of the message, the same in every copy of it (receipt handles differ).
        self.message_id = message_id
        #: How many times SQS had handed the message out, this time included
        #: (``ApproximateReceiveCount``; 0: unknown).
        self.receive_count = receive_count
        self.queue_url = queue_url
        self.task_name = task_name
        self.task_id = task_id
        #: The pace in force: the task's options, or what the task set since.
        self.options = options
        #: Whether Celery has settled the message (kombu's ``Message.acknowledged``).
        self.is_settled = is_settled
        self.received = now
        self.started: float | None = None
        self.ended: Ended | None = None
        step = grid(options.interval)
        #: When the next regular beat is due: for cadence and lateness.
        self.due = math.ceil((now + options.interval) / step) * step
        #: When the next attempt is due: ``due``, or a retry's time after a failure.
        self.next_due = self.due
        #: When the last accepted call was sent (the receipt, before the first).
        self.last_sent = now
        #: Until when the message is known to stay hidden; unknown (infinite) until the
        #: first beat, since the queue's own timeout is not known here.
        self.visible_until = math.inf
        self.beats = 0
        #: Failed attempts since the last accepted call.
        self.failures = 0
        self.in_flight = False
        #: The prefork pool slot its task runs in, once the sidecar has found it there.
        self.slot: int | None = None

    # -- transitions (the sidecar's, under its lock) ----------------------------------

    def end(self, reason: Ended) -> bool:
        """End it for good; False if it had already ended."""
        if self.ended is not None:
            return False
        self.ended = reason
        return True

    def plan(self, now: float) -> int | None:
        """The visibility to ask for in a beat sent now; None when it has ended instead
        (a limit of :func:`allowed` reached)."""
        options = self.options
        asked = allowed(
            options.visibility_timeout, now, self.received, self.started, options.max_duration
        )
        if isinstance(asked, Ended):
            self.end(asked)
            return None
        return asked

    def answered(
        self,
        sent: float,
        asked: int,
        answer: Answer,
        now: float,
        jitter: float = 0.5,
        *,
        manual: bool = False,
    ) -> Outcome:
        """Apply SQS's *answer* to a call sent at *sent* asking for *asked* seconds: a
        regular beat, or the task's own extension (*manual*). A transient failure of a
        regular beat is retried while the message stays hidden; *jitter* (0..1) spreads
        the retries of many workers."""
        self.in_flight = False
        moot, due, failure = self.ended is not None, self.due, answer.failure
        retry_in = None
        if moot:
            self.beats += failure is None  # what SQS took while it was stopping
        elif failure is None:
            self.accepted(sent, asked, manual=manual)
        elif failure in _FINAL:
            # Gone because Celery settled it meanwhile (acknowledged while the call was
            # out): the normal end of the message, not a loss.
            settled = failure is Failure.GONE and self.is_settled is not None and self.is_settled()
            self.end(Ended.SETTLED if settled else _FINAL[failure])
        elif not manual:  # a failed extension: the regular beats simply go on
            self.failures += 1
            retry_in = self.backoff(jitter)
            if now + retry_in < self.visible_until:
                self.next_due = now + retry_in
            else:
                retry_in = None
                self.end(Ended.LOST)
        return Outcome(
            self,
            asked,
            answer,
            lateness=0.0 if manual else max(0.0, now - due),
            retry_in=retry_in,
            beats=self.beats,
            failures=self.failures,
            manual=manual,
            moot=moot,
            ended=not moot and self.ended is not None,
        )

    def accepted(self, sent: float, seconds: int, *, manual: bool = False) -> None:
        """SQS took a call sent at *sent* to keep the message hidden *seconds* more."""
        self.beats += 1
        self.failures = 0
        self.visible_until = sent + seconds
        self.last_sent = sent
        if manual:
            margin = self.options.visibility_timeout - self.options.interval
            self._schedule(max(sent, self._on_grid(sent + seconds - margin)))
        else:
            self._schedule(self._on_grid(sent + self.options.interval))

    def follow(self, view: TaskReading, now: float) -> bool:
        """Apply what the task wrote in its slot; False when no beat may be sent now
        (the task ended, its process died, or it is extending the message itself)."""
        self.slot = view.index
        if not view.running:
            self.end(Ended.TASK_ENDED)
            return False
        if not view.alive:
            self.end(Ended.SETTLED)  # Celery settles the message of a dead pool process
            return False
        if self.started is None:
            self.started = view.started
        options, pace = self.options, view.pace
        if (
            pace is not None
            and pace[0] > 0
            and pace != (options.interval, options.visibility_timeout)
        ):
            self.reconfigure(*pace)
        if view.extended is not None and view.extended[0] > self.last_sent:
            self.accepted(*view.extended, manual=True)
        if view.extending:
            self.put_off(now)
            return False
        return True

    def reconfigure(self, interval: float, visibility_timeout: int) -> None:
        """Another pace from the next beat on (due one new interval after the last)."""
        self.options = dataclasses.replace(
            self.options, interval=interval, visibility_timeout=visibility_timeout
        )
        if not self.failures:
            self._schedule(self._on_grid(self.last_sent + interval))

    def put_off(self, now: float) -> None:
        """Look again one grid step from now (its task is extending the message itself)."""
        self.next_due = max(self.next_due, now + grid(self.options.interval))

    def _schedule(self, due: float) -> None:
        self.due = self.next_due = due

    def _on_grid(self, time: float) -> float:
        """The last grid point at or before *time*."""
        step = grid(self.options.interval)
        return math.floor(time / step) * step

    # -- facts -------------------------------------------------------------------------

    @property
    def first(self) -> bool:
        """Whether its next beat is its first (never sent early: see the rules)."""
        return self.beats == 0 and self.failures == 0

    def backoff(self, jitter: float) -> float:
        """The wait before retry number ``failures``: half fixed, half *jitter* (0..1)."""
        ceiling = min(
            BACKOFF_INITIAL * 2 ** (self.failures - 1),
            BACKOFF_MAX_FRACTION * self.options.interval,
        )
        return float(ceiling * (0.5 + 0.5 * jitter))

    def __repr__(self) -> str:
        state = "waiting" if self.started is None else "running"
        return (
            f"<Heartbeat {self.task_name}[{self.task_id}] {self.ended or state} "
            f"beats={self.beats} next_due={self.next_due:.3f}>"
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """One answer, as :meth:`Heartbeat.answered` applied it: what ``_report`` tells people."""

    hb: Heartbeat
    asked: int
    answer: Answer
    #: From the beat's due time to the answer (0 for a task's own extension).
    lateness: float
    #: The delay of the retry a transient failure gets; None: no retry.
    retry_in: float | None
    #: Calls SQS accepted for the message so far, and failures in a row.
    beats: int
    failures: int
    #: The task's own extension rather than a regular beat.
    manual: bool
    #: The heartbeat had ended before the answer came: only what SQS took counts.
    moot: bool
    #: This answer ended the heartbeat.
    ended: bool
