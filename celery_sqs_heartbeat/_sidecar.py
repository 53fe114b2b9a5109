"""The one background thread per process that sends every heartbeat's beats.

Tasks only touch a dict under a lock (:meth:`Sidecar.start` / :meth:`Sidecar.stop`);
the thread sleeps until the next beat is due, sends the requests the schedule plans,
and settles their results. SQS errors are classified and logged here, once, and never
reach a task.

``stop`` is final: once it returns, no beat for that message will be sent. A call
already in flight for it is waited for (bounded by the client's time-out), so a beat
never lands after kombu's requeue or delete, and stopping never touches the message's
visibility itself.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import Failure, classify_batch_entry, classify_exception, describe_denied
from ._schedule import BATCH_WINDOW, Ended, Heartbeat, Request, Schedule, Settled
from ._settings import HeartbeatOptions

logger = logging.getLogger("celery_sqs_heartbeat")

#: The sidecar thread's name, as shown by py-spy, faulthandler and ``threading.enumerate``.
THREAD_NAME = "celery-sqs-heartbeat"
#: After an unexpected error in its own loop, the thread waits this long before going on,
#: so a bug cannot spin a CPU.
LOOP_ERROR_PAUSE = 1.0
#: ``stop`` waits at most this much longer than the client's time-out for a call in flight.
STOP_WAIT_MARGIN = 1.0

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
        self._region = region
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
        self._thread: threading.Thread | None = None
        self._denied_queues: set[str] = set()

    # -- the task's side: microseconds, no I/O ------------------------------------------

    def start(
        self,
        receipt_handle: str,
        queue_url: str,
        options: HeartbeatOptions,
        *,
        task_name: str = "",
        task_id: str = "",
    ) -> bool:
        """Begin beating for a message; False if it already has a heartbeat."""
        with self._lock:
            heartbeat = Heartbeat.create(
                receipt_handle,
                queue_url,
                options,
                now=self._clock(),
                task_name=task_name,
                task_id=task_id,
            )
            if not self._schedule.add(heartbeat):
                return False
            if heartbeat.next_due < self._wake_at:
                self._wake.notify()
        return True

    def stop(self, receipt_handle: str) -> Heartbeat | None:
        """End the heartbeat of a message; once this returns no beat for it is sent."""
        with self._lock:
            heartbeat = self._schedule.remove(receipt_handle)
            if heartbeat is None or not heartbeat.in_flight:
                return heartbeat
            waited = 2 * self._call_timeout + STOP_WAIT_MARGIN
            deadline = self._clock() + waited
            while heartbeat.in_flight:
                left = deadline - self._clock()
                if left <= 0:
                    logger.warning(
                        "Stopped the heartbeat of task %s[%s] while its beat was still in "
                        "flight after %.1f s; that beat may still land.",
                        heartbeat.task_name,
                        heartbeat.task_id,
                        waited,
                    )
                    break
                self._settled.wait(left)
        return heartbeat

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
        """Stop the thread; heartbeats still registered simply stop beating."""
        self._stopping.set()
        with self._lock:
            self._wake.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

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
                due = self._schedule.next_due()
                # Waiting a little past the first due beat lets beats that fall due
                # together share one request.
                self._wake_at = due + BATCH_WINDOW
                if not self._stopping.is_set():
                    self._wake.wait(None if due == math.inf else self._wake_at - now)
                self._wake_at = -math.inf
                return
        for heartbeat in plan.ended:
            self._log_ended(heartbeat, "")
        for request in plan.requests:
            outcome = self._send(request)
            with self._lock:
                settled = self._schedule.settle(request, outcome.failures, self._clock())
                self._settled.notify_all()
            for result, detail in zip(settled, outcome.details, strict=True):
                self._log(result, request, detail, outcome.error)

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

    # -- logging ---------------------------------------------------------------------------

    def _log(
        self, result: Settled, request: Request, detail: str, error: BaseException | None
    ) -> None:
        hb = result.heartbeat
        if hb.stopped and hb.ended is None:
            return  # the task ended while this beat was in flight: nothing to report
        if result.failure is None:
            margin = (hb.visibility_timeout - hb.interval) / 2
            if result.lateness > margin:
                logger.warning(
                    "Heartbeat of task %s[%s] was late by %.1f s; its message on %s stayed "
                    "hidden, but with less margin than configured.",
                    hb.task_name,
                    hb.task_id,
                    result.lateness,
                    request.queue_url,
                )
            elif logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "Heartbeat %d of task %s[%s]: message hidden for %d s more on %s "
                    "(%.3f s after its due time).",
                    hb.beats,
                    hb.task_name,
                    hb.task_id,
                    next(e.visibility_timeout for e in request.entries if e.heartbeat is hb),
                    request.queue_url,
                    result.lateness,
                )
            return
        if hb.ended is not None:
            self._log_ended(hb, detail)
            return
        log = logger.error if result.failure is Failure.UNKNOWN else logger.warning
        if hb.failures == 1 or result.failure is Failure.UNKNOWN:
            log(
                "Heartbeat of task %s[%s] failed (%s: %s); retrying in %.2f s while its "
                "message stays hidden.",
                hb.task_name,
                hb.task_id,
                result.failure.value,
                detail,
                result.retry_in or 0.0,
                exc_info=error if result.failure is Failure.UNKNOWN and hb.failures == 1 else None,
            )

    def _log_ended(self, hb: Heartbeat, detail: str) -> None:
        task = f"{hb.task_name}[{hb.task_id}]"
        reason = hb.ended
        if reason is Ended.DENIED:
            if hb.queue_url not in self._denied_queues:
                self._denied_queues.add(hb.queue_url)
                logger.error(
                    "Heartbeat of task %s stopped: %s (%s). Its message will be visible "
                    "again when its current visibility runs out.",
                    task,
                    describe_denied(hb.queue_url, self._region()),
                    detail,
                )
            return
        if reason is Ended.GONE:
            logger.warning(
                "Heartbeat of task %s stopped: its message is no longer in flight on %s "
                "(%s); it was deleted or delivered again, so the task may run twice.",
                task,
                hb.queue_url,
                detail,
            )
        elif reason is Ended.LOST:
            logger.warning(
                "Heartbeat of task %s stopped: SQS did not answer (%s) before the message's "
                "visibility ran out; it may be delivered to another worker.",
                task,
                detail,
            )
        elif reason is Ended.LIMIT:
            logger.warning(
                "Heartbeat of task %s stopped after %d beats: SQS keeps a message hidden "
                "at most 12 hours from receipt; it will be delivered again.",
                task,
                hb.beats,
            )
        elif reason is Ended.MAX_DURATION:
            logger.warning(
                "Heartbeat of task %s stopped after %d beats: sqs_heartbeat_max_duration "
                "reached; its message will be visible again within %d s.",
                task,
                hb.beats,
                hb.visibility_timeout,
            )


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
