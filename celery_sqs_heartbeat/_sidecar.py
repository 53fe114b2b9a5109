"""The one background thread per worker that beats every message the worker holds.

It lives in the worker's main process, which receives every message: a task stuck in a
pool child (even in a C call that never lets go of the GIL) cannot starve it. Celery's
side only touches a dict under a lock (:meth:`Sidecar.add`, :meth:`Sidecar.stop`).

The loop, top to bottom: find the heartbeats that are due (and end those whose message
Celery settled), group their beats per queue into requests of up to ten, hand each
request to an executor thread, then sleep until the next beat is due or someone wakes
it. The executor's threads make the calls and settle the results, so a stalled call
holds up no other heartbeat. SQS errors are classified (``_errors``) and reported
(``_report``); none ever reaches a task.

``stop`` is final: once it returns no beat for that message is sent. A call already in
flight for it is waited for, briefly (:data:`~._heartbeat.STOP_WAIT`), so a beat does not
land after kombu's requeue or delete, and a stalled one cannot hold up the task's
acknowledgement. Stopping never touches the message's visibility itself.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Protocol

from ._heartbeat import RIDE_FRACTION, STOP_WAIT, Ended, Heartbeat, State
from ._report import Reporter, Stats
from ._send import MAX_BATCH, Sender

__all__ = ["STOP_WAIT", "Fence", "Sidecar"]

logger = logging.getLogger("celery_sqs_heartbeat")

#: The loop thread's name, as shown by py-spy, faulthandler and ``threading.enumerate``;
#: the executor's threads are ``celery-sqs-heartbeat-send_0``...
THREAD_NAME = "celery-sqs-heartbeat"
#: Calls in flight at once. A request carries up to ten beats of one queue, so this many
#: stalled calls hold up to 40 heartbeats, each for at most one client time-out.
MAX_CALLS = 4
#: After an unexpected error in the loop, it waits this long before going on, so a bug
#: cannot spin a CPU.
LOOP_ERROR_PAUSE = 1.0
#: A manual extension waits at most this much longer than the client's time-out for a
#: regular beat in flight, so the two never race.
EXTEND_WAIT_MARGIN = 1.0

#: One request: its queue, and (heartbeat, visibility asked) per entry.
_Request = tuple[str, list[tuple[Heartbeat, int]]]


class Fence(Protocol):
    """Where tasks run in other processes (prefork), what they say about a message:
    see ``_slots.Slots``."""

    def begin(self, hb: Heartbeat, until: float) -> bool: ...

    def finish(self, hb: Heartbeat) -> None: ...


class Sidecar:
    """Serves all heartbeats of one worker from one named daemon thread."""

    def __init__(
        self,
        sender: Sender,
        reporter: Reporter,
        *,
        call_timeout: float,
        fence: Fence | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        executor: Executor | None = None,
    ) -> None:
        self._sender = sender
        self._report = reporter
        self._call_timeout = call_timeout
        self._fence = fence
        self._clock = clock
        self._jitter = jitter
        #: Every heartbeat not yet ended, by receipt handle.
        self._beats: dict[str, Heartbeat] = {}
        self._lock = threading.Lock()
        #: Wakes the loop: a heartbeat due sooner than it planned, or shutdown.
        self._wake = threading.Condition(self._lock)
        #: Wakes the callers waiting for a call in flight (stop, extend).
        self._settled = threading.Condition(self._lock)
        #: When the sleeping loop wakes by itself; -inf while it is awake.
        self._wake_at = -math.inf
        #: The shortest interval of any heartbeat so far: the loop wakes at least this
        #: often, even with nothing due, so that a new message (whose first beat is an
        #: interval away) never has to wake it: a wake-up costs Celery's thread a GIL
        #: hand-off.
        self._shortest = math.inf
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._executor = executor or ThreadPoolExecutor(
            MAX_CALLS, thread_name_prefix=f"{THREAD_NAME}-send"
        )

    # -- Celery's side: microseconds, no I/O ----------------------------------------------

    def add(self, hb: Heartbeat) -> bool:
        """Begin beating *hb*'s message; False if it already has a heartbeat."""
        with self._lock:
            if hb.receipt_handle in self._beats:
                return False
            self._beats[hb.receipt_handle] = hb
            self._shortest = min(self._shortest, hb.interval)
            self._note_due(hb)
        self._report.started(hb)
        return True

    def get(self, receipt_handle: str) -> Heartbeat | None:
        with self._lock:
            return self._beats.get(receipt_handle)

    def run(self, receipt_handle: str) -> Heartbeat | None:
        """Its task started in this process; None if the message has no heartbeat."""
        with self._lock:
            hb = self._beats.get(receipt_handle)
            if hb is not None:
                hb.run(self._clock())
            return hb

    def stop(self, receipt_handle: str, reason: Ended = Ended.TASK_ENDED) -> Heartbeat | None:
        """End the heartbeat of a message; once this returns no beat for it is sent."""
        with self._lock:
            hb = self._beats.pop(receipt_handle, None)
            if hb is None:
                return None
            hb.end(reason)
            if hb.in_flight:
                self._wait_in_flight(hb, STOP_WAIT)
        self._report.ended(hb)
        return hb

    # -- manual control, from the task's thread ---------------------------------------------

    def extend(self, receipt_handle: str, seconds: int) -> bool:
        """Ask SQS now, from the caller's thread, to keep a message hidden *seconds* more.

        True when SQS accepted it. Never raises for an SQS error: it is classified and
        reported like a failed beat, and a final one (gone, denied) ends the heartbeat.
        """
        with self._lock:
            hb = self._beats.get(receipt_handle)
            if hb is None:
                return False
            if hb.in_flight:
                self._wait_in_flight(hb, 2 * self._call_timeout + EXTEND_WAIT_MARGIN)
            sent = self._clock()
            asked = min(seconds, math.floor(hb.limit_at - sent))
            if hb.state is State.ENDED or asked < 1:
                return False
            hb.in_flight = True
        outcome = self._sender.send(hb.queue_url, [(receipt_handle, asked)])
        failure = outcome.failures[0]
        with self._lock:
            hb.in_flight = False
            if failure is None:
                hb.extended(sent, asked)
            else:
                hb.extension_failed(failure)
            ended = self._forget_if_ended(hb)
            self._settled.notify_all()
            self._note_due(hb)
        self._report.extension(hb, asked, outcome)
        if ended:
            self._report.ended(hb, outcome.details[0])
        return failure is None

    def reconfigure(self, receipt_handle: str, interval: float, visibility_timeout: int) -> bool:
        """Change a heartbeat's interval and window from its next beat on."""
        with self._lock:
            hb = self._beats.get(receipt_handle)
            if hb is None:
                return False
            hb.reconfigure(interval, visibility_timeout)
            self._note_due(hb)
            return True

    def _wait_in_flight(self, hb: Heartbeat, waited: float) -> None:
        """Wait up to *waited* s for the call in flight for *hb*; holds the lock."""
        deadline = self._clock() + waited
        while hb.in_flight:
            left = deadline - self._clock()
            if left <= 0:
                logger.info(
                    "Heartbeat of task %s[%s]: SQS had not answered its beat after %.2f s; "
                    "going on without it (if it lands, it fails on a deleted message, or "
                    "keeps a requeued one hidden up to %d s).",
                    hb.task_name,
                    hb.task_id,
                    waited,
                    hb.visibility_timeout,
                )
                return
            self._settled.wait(left)

    def _note_due(self, hb: Heartbeat) -> None:
        """Wake the loop if *hb* is due before it planned to wake; holds the lock."""
        if hb.state is not State.ENDED and hb.next_due < self._wake_at:
            self._wake.notify()

    def _forget_if_ended(self, hb: Heartbeat) -> bool:
        """Drop an ended heartbeat from the registry; True if this call dropped it."""
        if hb.state is State.ENDED and self._beats.get(hb.receipt_handle) is hb:
            del self._beats[hb.receipt_handle]
            return True
        return False

    def stats(self) -> Stats:
        return self._report.counters.stats()

    def __len__(self) -> int:
        with self._lock:
            return len(self._beats)

    # -- lifecycle --------------------------------------------------------------------------

    def run_in_background(self) -> None:
        """Start the thread. Calling it again is an error: one thread per sidecar."""
        if self._thread is not None:
            raise RuntimeError("the heartbeat sidecar thread is already running")
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the threads; heartbeats still registered simply stop beating."""
        self._stopping.set()
        with self._lock:
            self._wake.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.turn()
            except Exception:  # pragma: no cover - a bug; keep the heartbeats alive
                logger.exception("celery-sqs-heartbeat: unexpected error in the sidecar loop")
                self._stopping.wait(LOOP_ERROR_PAUSE)

    def turn(self, *, wait: bool = True) -> float:
        """One turn of the loop: end what Celery settled, send what is due, else sleep
        until the next beat is due (*wait*) or someone wakes the loop.

        Returns when the next beat is due (infinity: none), or -infinity when this turn
        sent or ended something (the next turn then looks again at once).
        """
        with self._lock:
            now = self._clock()
            ended: list[Heartbeat] = []
            due: list[Heartbeat] = []
            soon: list[Heartbeat] = []
            wake = math.inf
            for hb in self._beats.values():
                if hb.in_flight:
                    continue
                if hb.is_settled is not None and hb.is_settled():
                    hb.end(Ended.SETTLED)
                    ended.append(hb)
                elif hb.next_due <= now:
                    due.append(hb)
                else:
                    wake = min(wake, hb.next_due)
                    if not hb.first and hb.next_due <= now + RIDE_FRACTION * hb.interval:
                        soon.append(hb)
            requests = self._plan(due, soon, now, ended)
            for hb in ended:
                self._forget_if_ended(hb)
            for hb in due:  # put off by its task (a manual extension, another pace)
                if not hb.in_flight and hb.state is not State.ENDED:
                    wake = min(wake, hb.next_due)
            if not requests and not ended:
                wake = min(wake, now + self._shortest)
                if wait and not self._stopping.is_set():
                    self._wake_at = wake
                    self._wake.wait(None if wake == math.inf else wake - now)
                    self._wake_at = -math.inf
                return wake
        for hb in ended:
            self._report.ended(hb)
        for queue_url, entries in requests:
            self._executor.submit(self._deliver, queue_url, entries, now)
        return -math.inf

    def _plan(
        self, due: list[Heartbeat], soon: list[Heartbeat], now: float, ended: list[Heartbeat]
    ) -> list[_Request]:
        """Group the beats to send now into requests of up to ten, per queue.

        Every due beat goes; a request with free places also takes beats of its queue
        that are due soon. Marks each beat in flight, and adds to *ended* what ended
        instead (limits reached, task ended in its pool process).
        """
        by_queue: dict[str, list[tuple[Heartbeat, int]]] = {}
        for hb in sorted(due, key=lambda h: h.next_due):
            self._take(hb, now, now, by_queue, ended)
        for hb in sorted(soon, key=lambda h: h.next_due):
            entries = by_queue.get(hb.queue_url)
            if entries and len(entries) % MAX_BATCH:
                self._take(hb, now, now + RIDE_FRACTION * hb.interval, by_queue, ended)
        return [
            (queue_url, entries[i : i + MAX_BATCH])
            for queue_url, entries in by_queue.items()
            for i in range(0, len(entries), MAX_BATCH)
        ]

    def _take(
        self,
        hb: Heartbeat,
        now: float,
        until: float,
        by_queue: dict[str, list[tuple[Heartbeat, int]]],
        ended: list[Heartbeat],
    ) -> None:
        fence = self._fence
        if fence is not None and not fence.begin(hb, until):
            if hb.state is State.ENDED:
                ended.append(hb)
            return
        asked = hb.plan(now)
        if asked is None:
            if fence is not None:
                fence.finish(hb)
            ended.append(hb)
            return
        hb.in_flight = True
        by_queue.setdefault(hb.queue_url, []).append((hb, asked))

    def _deliver(self, queue_url: str, entries: list[tuple[Heartbeat, int]], sent: float) -> None:
        """Send one request and settle it; runs on an executor thread."""
        outcome = self._sender.send(
            queue_url, [(hb.receipt_handle, asked) for hb, asked in entries]
        )
        reports = []
        with self._lock:
            answered = self._clock()
            for (hb, asked), failure in zip(entries, outcome.failures, strict=True):
                due, moot = hb.due, hb.state is State.ENDED
                retry_in = hb.settle(sent, asked, failure, answered, self._jitter())
                if self._fence is not None:
                    self._fence.finish(hb)
                reports.append((due, moot, retry_in, self._forget_if_ended(hb)))
                self._note_due(hb)
            self._settled.notify_all()
        for (hb, asked), failure, detail, (due, moot, retry_in, ended) in zip(
            entries, outcome.failures, outcome.details, reports, strict=True
        ):
            self._report.beat(
                hb,
                asked=asked,
                failure=failure,
                detail=detail,
                error=outcome.error,
                lateness=max(0.0, answered - due),
                retry_in=retry_in,
                moot=moot,
            )
            if ended:
                self._report.ended(hb, detail)
