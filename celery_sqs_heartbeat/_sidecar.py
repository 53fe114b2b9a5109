"""The one background thread per process that schedules every heartbeat's beats.

Tasks only touch a dict under a lock (:meth:`Sidecar.start` / :meth:`Sidecar.stop`);
the thread sleeps until the next beat is due and hands the requests the schedule plans
to its senders (``_senders``), which make the calls and settle their results, so a call
that stalls holds up nobody else. SQS errors are classified here and reported (logs,
signals, stats) by ``_report``; none ever reaches a task.

``stop`` is final: once it returns, no beat for that message will be sent. A call
already in flight for it is waited for, briefly (:data:`STOP_WAIT`): an answered call
takes milliseconds, so a beat does not land after kombu's requeue or delete, and a
stalled one cannot hold up the task's acknowledgement. Stopping never touches the
message's visibility itself.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import Failure, classify_batch_entry, classify_exception
from ._report import Reporter, Stats
from ._schedule import FIRST_BEAT_WINDOW, Ended, Entry, Heartbeat, Request, Schedule, Watch
from ._senders import Senders
from ._settings import HeartbeatOptions

logger = logging.getLogger("celery_sqs_heartbeat")

#: The sidecar thread's name, as shown by py-spy, faulthandler and ``threading.enumerate``.
THREAD_NAME = "celery-sqs-heartbeat"
#: After an unexpected error in its own loop, the thread waits this long before going on,
#: so a bug cannot spin a CPU.
LOOP_ERROR_PAUSE = 1.0
#: The senders' threads are named after the sidecar's: ``celery-sqs-heartbeat-send-1``...
SENDER_THREAD_NAME = "celery-sqs-heartbeat-send"
#: How long ``stop`` waits for a call in flight for the stopped heartbeat. SQS answers in
#: milliseconds; a call still unanswered after this has stalled, and the task's
#: acknowledgement must not wait for it (it fails harmlessly on a deleted message).
STOP_WAIT = 0.25
#: A manual extension waits at most this much longer than the client's time-out for a
#: regular beat in flight, so the two never race.
EXTEND_WAIT_MARGIN = 1.0
#: While calls are in flight the thread wakes at least this often, to put the switch
#: interval back as soon as the last one is answered.
BUSY_RECHECK = 0.05
#: The interpreter's switch interval around a beat, in seconds (see ``_SwitchInterval``).
PROMPT_SWITCH_INTERVAL = 0.0005
#: How long before a beat is due the thread wakes to shorten the switch interval.
PROMPT_LEAD = 0.1

ClientSource = Callable[[str], Any]


class Sidecar:
    """Serves all heartbeats of one process from one named daemon thread."""

    def __init__(
        self,
        clients: ClientSource,
        *,
        call_timeout: float,
        region: Callable[[], str | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clients = clients
        self._call_timeout = call_timeout
        self._clock = clock
        self._lock = threading.Lock()
        #: Wakes the thread: a heartbeat due sooner than it planned, or shutdown.
        self._wake = threading.Condition(self._lock)
        #: Wakes ``stop`` callers waiting for a call in flight.
        self._settled = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._schedule = Schedule()
        #: When the sleeping thread will wake by itself; -inf while it is awake.
        self._wake_at = -math.inf
        #: The shortest interval of any heartbeat so far: even with nothing due the thread
        #: wakes this often, so that a task's start never has to wake it (a wake-up costs
        #: the task a GIL hand-off).
        self._shortest = math.inf
        self._thread: threading.Thread | None = None
        self._senders = Senders(SENDER_THREAD_NAME)
        self._report = Reporter(region=region)
        self._gil = _SwitchInterval()

    # -- the task's side: microseconds, no I/O ------------------------------------------

    def start(
        self,
        receipt_handle: str,
        queue_url: str,
        options: HeartbeatOptions,
        task_name: str = "",
        task_id: str = "",
    ) -> bool:
        """Begin beating for a running task's message; False if it already has a
        heartbeat. A heartbeat this process began for the message while it waited is
        taken over, cadence and all."""
        heartbeat = Heartbeat(receipt_handle, queue_url, options, self._clock(), task_name, task_id)
        with self._lock:
            adopted = self._schedule.adopt(receipt_handle, options, task_name, task_id)
            if adopted is not None:
                heartbeat = adopted
            elif not self._schedule.add(heartbeat):
                return False
            self._note_due(heartbeat)
        self._report.started(heartbeat)
        return True

    def wait(
        self,
        receipt_handle: str,
        queue_url: str,
        options: HeartbeatOptions,
        watch: Watch,
        task_name: str = "",
        task_id: str = "",
    ) -> bool:
        """Begin beating for a message that waits in the worker (prefetched, or held for
        its ETA) until *watch* says its task started; False if it already has one."""
        heartbeat = Heartbeat(
            receipt_handle, queue_url, options, self._clock(), task_name, task_id, watch
        )
        with self._lock:
            if not self._schedule.add(heartbeat):
                return False
            self._note_due(heartbeat)
        return True

    def _note_due(self, heartbeat: Heartbeat) -> None:
        """Wake the thread if *heartbeat* is due before it planned to wake; holds the lock."""
        if heartbeat.interval < self._shortest:
            self._shortest = heartbeat.interval
        if heartbeat.next_due + FIRST_BEAT_WINDOW < self._wake_at:
            self._wake.notify()

    # -- manual control, from the task's thread --------------------------------------------

    def extend(self, receipt_handle: str, seconds: int) -> bool:
        """Ask SQS now, from the caller's thread, to keep a message hidden *seconds* more.

        True when SQS accepted it. Never raises for an SQS error: it is classified and
        reported like a failed beat, and a final one (gone, denied) ends the heartbeat.
        """
        with self._lock:
            heartbeat = self._schedule.get(receipt_handle)
            if heartbeat is None:
                return False
            if heartbeat.in_flight:
                self._wait_in_flight(heartbeat, 2 * self._call_timeout + EXTEND_WAIT_MARGIN)
            sent = self._clock()
            asked = self._schedule.begin_extension(heartbeat, seconds, sent)
            if not asked:
                return False
        outcome = self._send(Request(heartbeat.queue_url, [Entry(heartbeat, asked)], sent))
        failure = outcome.failures[0]
        with self._lock:
            self._schedule.settle_extension(heartbeat, asked, sent, failure)
            self._settled.notify_all()
            self._note_due(heartbeat)
        self._report.extended(heartbeat, asked, failure, outcome.details[0], outcome.error)
        return failure is None

    def reconfigure(self, receipt_handle: str, interval: float, visibility_timeout: int) -> bool:
        """Change a running heartbeat's interval and window; False if it has ended."""
        with self._lock:
            heartbeat = self._schedule.get(receipt_handle)
            if heartbeat is None:
                return False
            self._schedule.reconfigure(heartbeat, interval, visibility_timeout)
            self._note_due(heartbeat)
            return True

    def get(self, receipt_handle: str) -> Heartbeat | None:
        with self._lock:
            return self._schedule.get(receipt_handle)

    def stop(self, receipt_handle: str) -> Heartbeat | None:
        """End the heartbeat of a message; once this returns no beat for it is sent."""
        with self._lock:
            heartbeat = self._schedule.remove(receipt_handle)
            if heartbeat is None:
                return None
            if heartbeat.in_flight:
                self._wait_in_flight(heartbeat, STOP_WAIT)
        if heartbeat.ended is None:
            self._report.stopped(heartbeat)
        return heartbeat

    def _wait_in_flight(self, heartbeat: Heartbeat, waited: float) -> None:
        """Wait up to *waited* s for the call in flight for *heartbeat*; holds the lock."""
        deadline = self._clock() + waited
        while heartbeat.in_flight:
            left = deadline - self._clock()
            if left <= 0:
                logger.info(
                    "Heartbeat of task %s[%s]: SQS had not answered its beat after %.2f s; "
                    "going on without it (if it lands, it fails on a deleted message, or "
                    "keeps a requeued one hidden up to %d s).",
                    heartbeat.task_name,
                    heartbeat.task_id,
                    waited,
                    heartbeat.visibility_timeout,
                )
                return
            self._settled.wait(left)

    def stats(self) -> Stats:
        """This process's counters, with the number of heartbeats running now."""
        with self._lock:
            schedule = self._schedule
            return self._report.stats(len(schedule), schedule.added, schedule.removed)

    def __len__(self) -> int:
        with self._lock:
            return len(self._schedule)

    # -- lifecycle -----------------------------------------------------------------------

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
            self._wake.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._senders.shutdown(timeout)
        self._gil.prompt(False)

    def forget_after_fork(self) -> None:
        """In a forked child, where this thread does not exist: put back the switch
        interval the parent's thread may have shortened at the moment of the fork."""
        self._gil.prompt(False)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._step()
            except Exception:  # pragma: no cover - a bug; keep the heartbeats alive
                logger.exception("celery-sqs-heartbeat: unexpected error in the sidecar loop")
                self._stopping.wait(LOOP_ERROR_PAUSE)

    def _step(self) -> None:
        with self._lock:
            now = self._clock()
            plan = self._schedule.plan(now)
            if not plan.requests and not plan.ended:
                due = min(self._schedule.next_due(), now + self._shortest)
                # Wake PROMPT_LEAD early and wait out the rest with prompt GIL hand-offs,
                # so that even the wake-up does not queue behind busy task threads; keep
                # them prompt while calls are in flight, for the same reason.
                busy = self._senders.busy
                prompt = busy or due - now <= PROMPT_LEAD
                self._gil.prompt(prompt)
                wake = due if prompt else due - PROMPT_LEAD
                if busy:
                    wake = min(wake, now + BUSY_RECHECK)
                self._wake_at = wake
                if not self._stopping.is_set():
                    self._wake.wait(None if wake == math.inf else wake - now)
                self._wake_at = -math.inf
                return
        self._gil.prompt(True)
        for heartbeat in plan.ended:
            if heartbeat.ended is not Ended.HANDED_OVER:
                self._report.ended(heartbeat, "")
        for request in plan.requests:
            self._senders.submit(functools.partial(self._deliver, request))

    def _deliver(self, request: Request) -> None:
        """Send *request* and settle it; runs on a sender thread."""
        outcome = self._send(request)
        with self._lock:
            answered = self._clock()
            settled = self._schedule.settle(request, outcome.failures, answered)
            self._settled.notify_all()
            for result in settled:
                if result.heartbeat.ended is None and not result.heartbeat.stopped:
                    self._note_due(result.heartbeat)
        for result, detail in zip(settled, outcome.details, strict=True):
            self._report.settled(result, detail, outcome.error, answered)

    def _send(self, request: Request) -> _Outcome:
        """Send one request; never raises. Gives one failure (or None) per entry."""
        entries = request.entries
        try:
            client = self._clients(request.queue_url)
            if len(entries) == 1:
                client.change_message_visibility(
                    QueueUrl=request.queue_url,
                    ReceiptHandle=entries[0].heartbeat.receipt_handle,
                    VisibilityTimeout=entries[0].visibility_timeout,
                )
                return _Outcome([None], [""])
            response = client.change_message_visibility_batch(
                QueueUrl=request.queue_url,
                Entries=[
                    {
                        "Id": str(i),
                        "ReceiptHandle": e.heartbeat.receipt_handle,
                        "VisibilityTimeout": e.visibility_timeout,
                    }
                    for i, e in enumerate(entries)
                ],
            )
            failed = {f.get("Id"): f for f in response.get("Failed", ())}
            found = [failed.get(str(i)) for i in range(len(entries))]
            return _Outcome(
                [None if f is None else classify_batch_entry(f) for f in found],
                ["" if f is None else f"{f.get('Code')}: {f.get('Message', '')}" for f in found],
            )
        except Exception as exc:
            return _Outcome(
                [classify_exception(exc)] * len(entries), [_describe(exc)] * len(entries), exc
            )


class _SwitchInterval:
    """Shortens the interpreter's switch interval around beats, and puts it back.

    A beat's HTTP call gives up the GIL at every socket operation, and the thread must
    win it back from the task threads, as it must on waking up. A thread spinning in pure
    Python keeps the GIL for a whole switch interval (5 ms by default) each time, so with
    several such threads a beat would wait hundreds of milliseconds. From
    :data:`PROMPT_LEAD` before a beat is due until its request is answered, the interval
    is :data:`PROMPT_SWITCH_INTERVAL`; the rest of the time it is whatever it was.
    """

    def __init__(self) -> None:
        self._saved: float | None = None

    def prompt(self, on: bool) -> None:
        if on and self._saved is None:
            current = sys.getswitchinterval()
            if current > PROMPT_SWITCH_INTERVAL:
                self._saved = current
                sys.setswitchinterval(PROMPT_SWITCH_INTERVAL)
        elif not on and self._saved is not None:
            if sys.getswitchinterval() == PROMPT_SWITCH_INTERVAL:  # unless changed since
                sys.setswitchinterval(self._saved)
            self._saved = None


@dataclass(frozen=True, slots=True)
class _Outcome:
    """The result of sending one request: per entry a failure class and its detail."""

    failures: list[Failure | None]
    details: list[str]
    error: BaseException | None = None


def _describe(error: BaseException) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        return f"{err.get('Code', type(error).__name__)}: {err.get('Message', '')}".strip(": ")
    return f"{type(error).__name__}: {error}"
