"""When each running task's message is due for a beat, and what a beat's result means.

Pure bookkeeping with no threads, no clock and no SQS: the sidecar passes ``now`` in,
sends the requests this module plans, and hands the results back. That keeps the
timing rules testable with a fake clock, and leaves all locking to the sidecar.

The rules:

* The first beat of a message comes one interval after its task started (never earlier,
  so a task shorter than one interval makes no SQS call; up to
  :data:`FIRST_BEAT_WINDOW` later, to share a request with other first beats).
* A beat asks SQS to keep the message hidden for ``visibility_timeout`` seconds from
  now; the next one is due one interval after the beat's due time (see ``_next_due``).
* Beats for one queue that fall due together go in one request of up to
  :data:`MAX_BATCH` entries. Free places in such a request are filled with beats of
  the same queue that are due within half an interval anyway (never a first beat that is
  not yet due), so long-running tasks of a busy worker settle into shared requests.
* A message is never asked to stay hidden past SQS's 12-hour limit from receipt, nor
  beaten past the task's ``max_duration``.
* A transient failure is retried with jittered exponential backoff while the message's
  current visibility lasts. Once that visibility has run out the message may already be
  with another worker, so the heartbeat ends as *lost*.
* A message waiting in the worker (prefetched, or held for its ETA) is beaten by the
  process that received it, from its receipt, with a *watch* that tells when its task
  started. Then the waiting heartbeat ends, once the task's own heartbeat (first beat
  one interval after the start) is sure to find the message still hidden; until then
  it beats on (see ``_handed_over``). In the process that runs the task, the task's
  heartbeat takes the waiting one over instead, keeping its cadence.
* A task may extend its message by hand (``extend``); the regular beats then resume
  when the message has as much visibility left as before a regular beat.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ._errors import Failure
from ._settings import MAX_VISIBILITY_SECONDS, HeartbeatOptions

#: SQS takes at most ten entries in one ChangeMessageVisibilityBatch.
MAX_BATCH = 10
#: A beat that is not yet due may take a free place in a request to its queue when it
#: would be due within this fraction of its interval.
FREE_RIDE_FRACTION = 0.5
#: A task's first beat may wait this many seconds past its due time for the first beats
#: of tasks that started just after it (a worker receives up to ten messages at a time,
#: and they start a few milliseconds apart), so that they share one request. Any request
#: to the queue planned meanwhile takes it along.
FIRST_BEAT_WINDOW = 0.1
#: The time between a message's receipt and its task's start is not known in the
#: process that runs the task; this much of SQS's 12-hour budget is left unused for it.
RECEIPT_ALLOWANCE = 60.0
#: The queue's own visibility timeout must cover a message from its receipt until one
#: interval after its task started, plus the first-beat window. The preflight check asks
#: the queue for this much more, for the moment between a message's receipt and its
#: task's start; a message that waits longer is covered by the waiting heartbeat.
START_ALLOWANCE = 1.0
#: First retry after a transient failure, in seconds; doubled on each further failure.
BACKOFF_INITIAL = 0.25
#: A retry waits at most this fraction of the interval.
BACKOFF_MAX_FRACTION = 0.5
#: The heaps are rebuilt without the entries of stopped heartbeats once there are more
#: of those than this, and more than live ones. Rarely enough that the rebuild, which
#: lands on the task that stops a heartbeat, stays out of the 99th percentile.
COMPACT_MIN_STALE = 1024


class Ended(enum.Enum):
    """Why a heartbeat ended other than by its task ending."""

    GONE = "message gone"
    DENIED = "permission denied"
    LIMIT = "SQS 12-hour limit reached"
    MAX_DURATION = "sqs_heartbeat_max_duration reached"
    LOST = "visibility lapsed before a beat got through"
    #: A waiting message's task started (its own heartbeat goes on) or it was settled.
    HANDED_OVER = "handed over to the task"


#: Tells a waiting message's heartbeat whether its task started: None while it still
#: waits, else the time (on the schedule's clock) it started; ``-inf`` once the message
#: was acknowledged, rejected or requeued without running.
Watch = Callable[[], float | None]


#: A heap entry: (due time, sequence number, receipt handle).
_Item = tuple[float, int, str]


class Heartbeat:
    """The state of one running task's heartbeat, keyed by its message's receipt handle.

    A plain slotted class: one is made at every task's prerun, so it is kept cheap.
    """

    __slots__ = (
        "beats",
        "ended",
        "failures",
        "in_flight",
        "interval",
        "max_duration",
        "next_due",
        "queue_url",
        "receipt_handle",
        "scheduled",
        "seq",
        "started",
        "stopped",
        "task_id",
        "task_name",
        "visibility_timeout",
        "visible_until",
        "watch",
    )

    def __init__(
        self,
        receipt_handle: str,
        queue_url: str,
        options: HeartbeatOptions,
        now: float,
        task_name: str = "",
        task_id: str = "",
        watch: Watch | None = None,
    ) -> None:
        self.receipt_handle = receipt_handle
        self.queue_url = queue_url
        self.task_name = task_name
        self.task_id = task_id
        self.interval = options.interval
        self.visibility_timeout = options.visibility_timeout
        self.max_duration = options.max_duration
        self.started = now
        #: When the next beat is due; the heap's order.
        self.next_due = now + options.interval
        #: The due time of the beat now being attempted, for lateness.
        self.scheduled = self.next_due
        #: Until when the message is known to stay hidden; infinite until the first beat,
        #: since the queue's own timeout is not known here.
        self.visible_until = math.inf
        self.beats = 0
        #: Failed attempts since the last successful beat.
        self.failures = 0
        self.in_flight = False
        self.stopped = False
        self.ended: Ended | None = None
        #: Sequence number of its current heap entry; older entries are stale.
        self.seq = -1
        #: Set while the message waits in the worker for its task to start.
        self.watch = watch

    @property
    def limit_at(self) -> float:
        """SQS's 12-hour limit from receipt, as estimated from the task's start."""
        return self.started + MAX_VISIBILITY_SECONDS - RECEIPT_ALLOWANCE

    @property
    def stop_at(self) -> float:
        """When beating stops for good: the task's max_duration, or the 12-hour limit."""
        if self.max_duration is None:
            return self.limit_at
        return min(self.limit_at, self.started + self.max_duration)

    def __repr__(self) -> str:
        return (
            f"<Heartbeat {self.task_name}[{self.task_id}] beats={self.beats} "
            f"next_due={self.next_due:.3f} stopped={self.stopped} ended={self.ended}>"
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """One message in a request: its heartbeat and the visibility to ask for."""

    heartbeat: Heartbeat
    visibility_timeout: int


@dataclass(slots=True)
class Request:
    """One ChangeMessageVisibility(Batch) call to plan, send and settle."""

    queue_url: str
    entries: list[Entry]
    planned_at: float


@dataclass(frozen=True, slots=True)
class Settled:
    """What became of one entry of a settled request, for logging and stats."""

    heartbeat: Heartbeat
    failure: Failure | None
    #: When the beat was due (the first attempt's due time, for a retried beat).
    due: float
    #: Seconds between the beat's due time and its request being planned.
    lateness: float
    #: The visibility the request asked for.
    visibility_timeout: int
    retry_in: float | None = None


@dataclass(slots=True)
class Plan:
    """What the sidecar must do now."""

    requests: list[Request] = field(default_factory=list)
    ended: list[Heartbeat] = field(default_factory=list)


class Schedule:
    """All heartbeats of one process, ordered by due time, one heap per queue."""

    def __init__(self, *, jitter: Callable[[], float] = random.random) -> None:
        self._beats: dict[str, Heartbeat] = {}
        #: Per queue, (due, sequence, receipt handle): an entry holds no heartbeat, so a
        #: stopped one is freed at once; its entry goes stale and is skipped or compacted.
        self._heaps: dict[str, list[_Item]] = {}
        self._counter = itertools.count()
        self._jitter = jitter
        #: Heartbeats ever added and removed, for stats.
        self.added = 0
        self.removed = 0
        #: Entries in all heaps, live or stale.
        self._stored = 0

    def __len__(self) -> int:
        return len(self._beats)

    def __contains__(self, receipt_handle: object) -> bool:
        return receipt_handle in self._beats

    def heartbeats(self) -> list[Heartbeat]:
        return list(self._beats.values())

    def add(self, heartbeat: Heartbeat) -> bool:
        """Register *heartbeat*; False when its message already has one."""
        if heartbeat.receipt_handle in self._beats:
            return False
        self._beats[heartbeat.receipt_handle] = heartbeat
        self._push(heartbeat)
        self.added += 1
        return True

    def remove(self, receipt_handle: str) -> Heartbeat | None:
        """Forget a heartbeat; its heap entry goes stale and is dropped when reached."""
        heartbeat = self._beats.pop(receipt_handle, None)
        if heartbeat is not None:
            heartbeat.stopped = True
            self.removed += 1
            heap = self._heaps.get(heartbeat.queue_url)
            if heap and heap[-1][1] == heartbeat.seq:
                # Its entry is the heap's last element, as when a task stops before any
                # other starts (prefork, solo): dropping the last element keeps a heap.
                heap.pop()
                self._stored -= 1
            else:
                self._maybe_compact()
        return heartbeat

    def get(self, receipt_handle: str) -> Heartbeat | None:
        return self._beats.get(receipt_handle)

    def adopt(
        self, receipt_handle: str, options: HeartbeatOptions, task_name: str, task_id: str
    ) -> Heartbeat | None:
        """Turn the waiting heartbeat of a message into its task's heartbeat, if it has
        one: the beats go on at their cadence, with no gap and no extra beat."""
        heartbeat = self._beats.get(receipt_handle)
        if heartbeat is None or heartbeat.watch is None:
            return None
        heartbeat.watch = None
        heartbeat.task_name, heartbeat.task_id = task_name, task_id
        heartbeat.max_duration = options.max_duration
        self.reconfigure(heartbeat, options.interval, options.visibility_timeout)
        return heartbeat

    def reconfigure(self, heartbeat: Heartbeat, interval: float, visibility_timeout: int) -> None:
        """Change a running heartbeat's interval and window from its next beat on."""
        if (interval, visibility_timeout) == (heartbeat.interval, heartbeat.visibility_timeout):
            return
        last = heartbeat.scheduled - heartbeat.interval
        heartbeat.interval, heartbeat.visibility_timeout = interval, visibility_timeout
        if heartbeat.failures or heartbeat.in_flight:
            return  # a retry or a call in flight: the cadence is set when it settles
        heartbeat.next_due = heartbeat.scheduled = last + interval
        self._push(heartbeat)

    def begin_extension(self, heartbeat: Heartbeat, seconds: int, now: float) -> int:
        """Take *heartbeat* off the schedule for a manual extension sent now by its task.

        Returns the visibility to ask for: *seconds*, cut to SQS's 12-hour limit; 0 when
        nothing can be asked (the caller sends nothing and calls nothing else).
        """
        left = math.floor(heartbeat.limit_at - now)
        if heartbeat.stopped or left < 1:
            return 0
        heartbeat.in_flight = True  # its heap entry goes stale; settling pushes a new one
        return min(seconds, left)

    def settle_extension(
        self, heartbeat: Heartbeat, seconds: int, sent: float, failure: Failure | None
    ) -> None:
        """Apply the result of a manual extension of *seconds* sent at *sent*.

        The next regular beat comes when the message has as much visibility left as it
        has before any regular beat (window minus interval): later than planned for a
        long extension, at once for one shorter than that margin.
        """
        heartbeat.in_flight = False
        if heartbeat.stopped:
            return
        ended = None if failure is None else _ENDED_BY.get(failure)
        if ended is not None:
            self._end(heartbeat, ended)
            return
        if failure is None:
            heartbeat.beats += 1
            heartbeat.visible_until = sent + seconds
            margin = heartbeat.visibility_timeout - heartbeat.interval
            heartbeat.next_due = heartbeat.scheduled = max(sent, sent + seconds - margin)
            heartbeat.failures = 0
        self._push(heartbeat)

    def next_due(self) -> float:
        """When :meth:`plan` must next run (the earliest due beat), or infinity."""
        earliest = math.inf
        for queue_url in list(self._heaps):
            heap = self._heaps[queue_url]
            self._drop_stale(heap)
            if heap:
                earliest = min(earliest, heap[0][0])
            else:
                del self._heaps[queue_url]
        return earliest

    def plan(self, now: float) -> Plan:
        """Take every beat due by *now* off the schedule and group it into requests."""
        plan = Plan()
        for queue_url in list(self._heaps):
            heap = self._heaps[queue_url]
            due: list[Entry] = []
            while heap and heap[0][0] <= now:
                heartbeat = self._current(self._pop(heap))
                if heartbeat is not None:
                    self._take(heartbeat, now, due, plan.ended)
            if due:
                self._take_riders(heap, now, due, plan.ended)
                for start in range(0, len(due), MAX_BATCH):
                    plan.requests.append(Request(queue_url, due[start : start + MAX_BATCH], now))
            if not heap:
                del self._heaps[queue_url]
        self._maybe_compact()
        return plan

    def settle(
        self,
        request: Request,
        failures: Iterable[Failure | None],
        now: float,
    ) -> list[Settled]:
        """Apply the results of a sent *request* (one failure or None per entry)."""
        results: list[Settled] = []
        for entry, failure in zip(request.entries, failures, strict=True):
            heartbeat = entry.heartbeat
            heartbeat.in_flight = False
            due = heartbeat.scheduled
            retry_in: float | None = None
            if heartbeat.stopped:
                # The task ended while the call was in flight: count what SQS took, no more.
                heartbeat.beats += failure is None
            elif failure is None:
                heartbeat.beats += 1
                heartbeat.failures = 0
                heartbeat.visible_until = request.planned_at + entry.visibility_timeout
                heartbeat.next_due = heartbeat.scheduled = _next_due(heartbeat, request.planned_at)
                self._push(heartbeat)
            else:
                ended = _ENDED_BY.get(failure)
                if ended is None:
                    heartbeat.failures += 1
                    retry_in = self._backoff(heartbeat)
                    if now + retry_in >= heartbeat.visible_until:
                        ended, retry_in = Ended.LOST, None
                if ended is None:
                    assert retry_in is not None
                    heartbeat.next_due = now + retry_in
                    self._push(heartbeat)
                else:
                    self._end(heartbeat, ended)
            lateness = max(0.0, request.planned_at - due)
            results.append(
                Settled(heartbeat, failure, due, lateness, entry.visibility_timeout, retry_in)
            )
        return results

    # -- internals --------------------------------------------------------------------

    def _push(self, heartbeat: Heartbeat) -> None:
        heap = self._heaps.setdefault(heartbeat.queue_url, [])
        heartbeat.seq = next(self._counter)
        key = heartbeat.next_due
        if _waits_for_company(heartbeat):
            key += FIRST_BEAT_WINDOW
        heapq.heappush(heap, (key, heartbeat.seq, heartbeat.receipt_handle))
        self._stored += 1

    def _pop(self, heap: list[_Item]) -> _Item:
        self._stored -= 1
        return heapq.heappop(heap)

    def _current(self, item: _Item) -> Heartbeat | None:
        """The heartbeat a heap entry stands for, or None when the entry is stale."""
        heartbeat = self._beats.get(item[2])
        if heartbeat is None or heartbeat.seq != item[1] or heartbeat.in_flight:
            return None
        return heartbeat

    def _drop_stale(self, heap: list[_Item]) -> None:
        while heap and self._current(heap[0]) is None:
            self._pop(heap)

    def _take(
        self, heartbeat: Heartbeat, now: float, entries: list[Entry], ended: list[Heartbeat]
    ) -> None:
        """Add a beat sent now to *entries*, or to *ended* when the heartbeat must end."""
        if heartbeat.watch is not None and _handed_over(heartbeat, now):
            self._end(heartbeat, Ended.HANDED_OVER)
            ended.append(heartbeat)
            return
        if now >= heartbeat.stop_at:
            self._end(
                heartbeat,
                Ended.LIMIT if heartbeat.stop_at >= heartbeat.limit_at else Ended.MAX_DURATION,
            )
            ended.append(heartbeat)
            return
        # Never ask past SQS's 12-hour limit: SQS rejects such a request outright.
        left = math.floor(heartbeat.limit_at - now)
        if left < 1:
            self._end(heartbeat, Ended.LIMIT)
            ended.append(heartbeat)
            return
        heartbeat.in_flight = True
        entries.append(Entry(heartbeat, min(heartbeat.visibility_timeout, left)))

    def _take_riders(
        self, heap: list[_Item], now: float, entries: list[Entry], ended: list[Heartbeat]
    ) -> None:
        """Add the beats that can share the requests already going to this queue.

        First beats that are due but still waiting out their window all go. Other beats
        due within half an interval take the free places of the last request.
        """
        passed_over: list[_Item] = []
        while heap and len(passed_over) < MAX_BATCH:
            item = heap[0]
            heartbeat = self._current(item)
            if heartbeat is None:
                self._pop(heap)
                continue
            if _waits_for_company(heartbeat):
                if item[0] > now + FIRST_BEAT_WINDOW:
                    break
                self._pop(heap)
                if heartbeat.next_due <= now:
                    self._take(heartbeat, now, entries, ended)
                else:
                    # A first beat is never sent early: a short task must cost no call.
                    passed_over.append(item)
                continue
            if not -len(entries) % MAX_BATCH or (
                item[0] > now + FREE_RIDE_FRACTION * heartbeat.interval
            ):
                break
            self._pop(heap)
            self._take(heartbeat, now, entries, ended)
        for item in passed_over:
            heapq.heappush(heap, item)
            self._stored += 1

    def _end(self, heartbeat: Heartbeat, reason: Ended) -> None:
        heartbeat.ended = reason
        heartbeat.in_flight = False
        self.remove(heartbeat.receipt_handle)

    def _backoff(self, heartbeat: Heartbeat) -> float:
        ceiling = min(
            BACKOFF_INITIAL * 2 ** (heartbeat.failures - 1),
            BACKOFF_MAX_FRACTION * heartbeat.interval,
        )
        # Half fixed, half random: spreads retries of many workers without ever
        # retrying at once.
        return float(ceiling * (0.5 + 0.5 * self._jitter()))

    def _maybe_compact(self) -> None:
        stale = self._stored - len(self._beats)
        if stale > COMPACT_MIN_STALE and stale > len(self._beats):
            self._stored = 0
            for queue_url, heap in list(self._heaps.items()):
                live = [item for item in heap if self._current(item) is not None]
                heapq.heapify(live)
                self._stored += len(live)
                if live:
                    self._heaps[queue_url] = live
                else:
                    del self._heaps[queue_url]


def _waits_for_company(heartbeat: Heartbeat) -> bool:
    """Whether the heartbeat's next beat is a first beat (not a retry): see FIRST_BEAT_WINDOW."""
    return heartbeat.beats == 0 and heartbeat.failures == 0


def _handed_over(heartbeat: Heartbeat, now: float) -> bool:
    """Whether a waiting message's heartbeat can end now: its task started (or the
    message was settled) and the task's own first beat will find it still hidden.

    Before the waiting heartbeat's first beat, the queue's own timeout is relied on as
    for any task (see :data:`START_ALLOWANCE`); after it, what the last beat asked for.
    """
    assert heartbeat.watch is not None
    started = heartbeat.watch()
    if started is None:
        return False
    first_beat = started + heartbeat.interval + FIRST_BEAT_WINDOW
    if heartbeat.beats:
        return heartbeat.visible_until >= first_beat + START_ALLOWANCE
    # The queue's own timeout covers the task's first beat if the task started within
    # START_ALLOWANCE of the receipt (what the preflight check asks of the queue).
    return started <= heartbeat.started + START_ALLOWANCE


def _next_due(heartbeat: Heartbeat, sent: float) -> float:
    """When the beat after one sent at *sent* is due.

    A beat sent a little late keeps the cadence (no drift by the batch window); one
    sent early, as a free rider, moves to its request's phase; one sent very late, after
    retries, waits at least half an interval so the schedule never bunches up.
    """
    interval = heartbeat.interval
    return max(min(heartbeat.scheduled, sent) + interval, sent + interval / 2)


_ENDED_BY = {
    Failure.GONE: Ended.GONE,
    Failure.DENIED: Ended.DENIED,
    Failure.LIMIT: Ended.LIMIT,
}
