"""When each running task's message is due for a beat, and what a beat's result means.

Pure bookkeeping with no threads, no clock and no SQS: the sidecar passes ``now`` in,
sends the requests this module plans, and hands the results back. That keeps the
timing rules testable with a fake clock, and leaves all locking to the sidecar.

The rules:

* The first beat of a message comes one interval after its task started, so a task
  shorter than one interval makes no SQS call.
* A beat asks SQS to keep the message hidden for ``visibility_timeout`` seconds from
  now; the next one is due one interval after the beat's due time (see ``_next_due``).
* Beats for one queue that fall due together go in one request of up to
  :data:`MAX_BATCH` entries. Free places in such a request are filled with beats of
  the same queue that are due within half an interval anyway (never a first beat), so
  long-running tasks of a busy worker settle into shared requests.
* A message is never asked to stay hidden past SQS's 12-hour limit from receipt, nor
  beaten past the task's ``max_duration``.
* A transient failure is retried with jittered exponential backoff while the message's
  current visibility lasts. Once that visibility has run out the message may already be
  with another worker, so the heartbeat ends as *lost*.
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
#: Beats for one queue that fall due within this many seconds of the first one wait for
#: each other and share a request. It is the most a beat is delayed on purpose.
BATCH_WINDOW = 0.05
#: A beat that is not yet due may take a free place in a request to its queue when it
#: would be due within this fraction of its interval.
FREE_RIDE_FRACTION = 0.5
#: The time between a message's receipt and its task's start is not known in the
#: process that runs the task; this much of SQS's 12-hour budget is left unused for it.
RECEIPT_ALLOWANCE = 60.0
#: First retry after a transient failure, in seconds; doubled on each further failure.
BACKOFF_INITIAL = 0.25
#: A retry waits at most this fraction of the interval.
BACKOFF_MAX_FRACTION = 0.5
#: A heap holding more than this many stale entries per live heartbeat is rebuilt.
COMPACT_RATIO = 4


class Ended(enum.Enum):
    """Why a heartbeat ended other than by its task ending."""

    GONE = "message gone"
    DENIED = "permission denied"
    LIMIT = "SQS 12-hour limit reached"
    MAX_DURATION = "sqs_heartbeat_max_duration reached"
    LOST = "visibility lapsed before a beat got through"


@dataclass(eq=False, slots=True)
class Heartbeat:
    """The state of one running task's heartbeat, keyed by its message's receipt handle."""

    receipt_handle: str
    queue_url: str
    task_name: str
    task_id: str
    interval: float
    visibility_timeout: int
    started: float
    #: When beating stops for good: the task's max_duration, or SQS's 12-hour limit.
    stop_at: float
    #: SQS's 12-hour limit from receipt, as estimated from the task's start.
    limit_at: float
    next_due: float
    #: Until when the message is known to stay hidden; infinite until the first beat,
    #: since the queue's own timeout is not known here.
    visible_until: float = math.inf
    beats: int = 0
    #: Failed attempts since the last successful beat.
    failures: int = 0
    #: The due time of the beat now being attempted, for lateness.
    scheduled: float = 0.0
    in_flight: bool = False
    stopped: bool = False
    ended: Ended | None = None

    @classmethod
    def create(
        cls,
        receipt_handle: str,
        queue_url: str,
        options: HeartbeatOptions,
        *,
        now: float,
        task_name: str = "",
        task_id: str = "",
    ) -> Heartbeat:
        limit_at = now + MAX_VISIBILITY_SECONDS - RECEIPT_ALLOWANCE
        stop_at = limit_at
        if options.max_duration is not None:
            stop_at = min(stop_at, now + options.max_duration)
        due = now + options.interval
        return cls(
            receipt_handle=receipt_handle,
            queue_url=queue_url,
            task_name=task_name,
            task_id=task_id,
            interval=options.interval,
            visibility_timeout=options.visibility_timeout,
            started=now,
            stop_at=stop_at,
            limit_at=limit_at,
            next_due=due,
            scheduled=due,
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
    #: Seconds between the beat's due time and its request being planned.
    lateness: float
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
        self._heaps: dict[str, list[tuple[float, int, Heartbeat]]] = {}
        self._counter = itertools.count()
        self._jitter = jitter

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
        return True

    def remove(self, receipt_handle: str) -> Heartbeat | None:
        """Forget a heartbeat; its heap entry goes stale and is dropped when reached."""
        heartbeat = self._beats.pop(receipt_handle, None)
        if heartbeat is not None:
            heartbeat.stopped = True
            self._maybe_compact()
        return heartbeat

    def next_due(self) -> float:
        """The earliest due time of any heartbeat, or infinity."""
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
                heap_due, _, heartbeat = heapq.heappop(heap)
                if self._is_current(heartbeat, heap_due):
                    self._take(heartbeat, now, due, plan.ended)
            if due:
                free = -len(due) % MAX_BATCH
                self._take_free_riders(heap, now, free, due, plan.ended)
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
            lateness = max(0.0, request.planned_at - heartbeat.scheduled)
            if heartbeat.stopped:
                # The task ended while the call was in flight: whatever SQS said, it is over.
                results.append(Settled(heartbeat, failure, lateness))
                continue
            if failure is None:
                heartbeat.beats += 1
                heartbeat.failures = 0
                heartbeat.visible_until = request.planned_at + entry.visibility_timeout
                heartbeat.next_due = heartbeat.scheduled = _next_due(heartbeat, request.planned_at)
                self._push(heartbeat)
                results.append(Settled(heartbeat, None, lateness))
                continue
            ended = _ENDED_BY.get(failure)
            retry_in: float | None = None
            if ended is None:
                heartbeat.failures += 1
                retry_in = self._backoff(heartbeat)
                if now + retry_in >= heartbeat.visible_until:
                    ended = Ended.LOST
            if ended is not None:
                self._end(heartbeat, ended)
                results.append(Settled(heartbeat, failure, lateness))
                continue
            assert retry_in is not None
            heartbeat.next_due = now + retry_in
            self._push(heartbeat)
            results.append(Settled(heartbeat, failure, lateness, retry_in))
        return results

    # -- internals --------------------------------------------------------------------

    def _push(self, heartbeat: Heartbeat) -> None:
        heap = self._heaps.setdefault(heartbeat.queue_url, [])
        heapq.heappush(heap, (heartbeat.next_due, next(self._counter), heartbeat))

    @staticmethod
    def _is_current(heartbeat: Heartbeat, heap_due: float) -> bool:
        return not heartbeat.stopped and not heartbeat.in_flight and heartbeat.next_due == heap_due

    def _drop_stale(self, heap: list[tuple[float, int, Heartbeat]]) -> None:
        while heap and not self._is_current(heap[0][2], heap[0][0]):
            heapq.heappop(heap)

    def _take(
        self, heartbeat: Heartbeat, now: float, entries: list[Entry], ended: list[Heartbeat]
    ) -> None:
        """Add a beat sent now to *entries*, or to *ended* when the heartbeat must end."""
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

    def _take_free_riders(
        self,
        heap: list[tuple[float, int, Heartbeat]],
        now: float,
        places: int,
        entries: list[Entry],
        ended: list[Heartbeat],
    ) -> None:
        """Fill *places* free places of a request with beats due soon anyway."""
        wanted = len(entries) + places
        passed_over: list[tuple[float, int, Heartbeat]] = []
        while heap and len(entries) < wanted and len(passed_over) < MAX_BATCH:
            due, _, heartbeat = item = heap[0]
            if not self._is_current(heartbeat, due):
                heapq.heappop(heap)
                continue
            if due > now + FREE_RIDE_FRACTION * heartbeat.interval:
                break
            heapq.heappop(heap)
            if heartbeat.beats == 0:
                # A first beat is never sent early: a short task must cost no call.
                passed_over.append(item)
                continue
            self._take(heartbeat, now, entries, ended)
        for item in passed_over:
            heapq.heappush(heap, item)

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
        stored = sum(len(h) for h in self._heaps.values())
        if stored > COMPACT_RATIO * (len(self._beats) + MAX_BATCH):
            for queue_url, heap in list(self._heaps.items()):
                live = [item for item in heap if self._is_current(item[2], item[0])]
                heapq.heapify(live)
                if live:
                    self._heaps[queue_url] = live
                else:
                    del self._heaps[queue_url]


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
