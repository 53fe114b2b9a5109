"""What the heartbeat tells people: log lines, its own signals, and the worker's counters.

Kept apart from the sidecar so that every outcome is reported in one place, once: the
log level, the signal and the counter for an event are decided together. The counters
live in memory that a prefork worker shares with its pool children, so ``stats()``
gives the same worker-wide numbers in a task as in the main process.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import signals
from ._errors import Failure, describe_denied
from ._heartbeat import Ended, Heartbeat
from ._send import Outcome

logger = logging.getLogger("celery_sqs_heartbeat")

_FAILURES = tuple(Failure)


@dataclass(frozen=True)
class Stats:
    """Counters of one worker since it started (see :func:`stats`)."""

    #: Heartbeats running now (messages received and not yet settled).
    active: int = 0
    started: int = 0
    stopped: int = 0
    beats_sent: int = 0
    #: Beats that went out later than half the margin between interval and window.
    late_beats: int = 0
    #: Failed attempts by class (``"transient"``, ``"gone"``, ``"denied"``...).
    failures: dict[str, int] = field(default_factory=dict)
    #: Heartbeats that ended without their task ending: the message may run again.
    messages_lost: int = 0


class _Counts(ctypes.Structure):
    """The counters in memory shared with prefork pool children."""

    _fields_ = [
        ("started", ctypes.c_int64),
        ("stopped", ctypes.c_int64),
        ("beats_sent", ctypes.c_int64),
        ("late_beats", ctypes.c_int64),
        ("messages_lost", ctypes.c_int64),
        ("failures", ctypes.c_int64 * len(_FAILURES)),
    ]


class _PrivateCounts:
    """The same counters as plain ints, where nothing is shared: a ctypes field costs
    several times more, and ``started``/``stopped`` are counted for every message."""

    __slots__ = ("beats_sent", "failures", "late_beats", "messages_lost", "started", "stopped")

    def __init__(self) -> None:
        self.started = self.stopped = self.beats_sent = self.late_beats = 0
        self.messages_lost = 0
        self.failures = [0] * len(_FAILURES)


#: Bytes the counters take in a buffer shared with pool children.
COUNTS_SIZE = ctypes.sizeof(_Counts)


class Counters:
    """The worker's counters, in *buffer* (shared with pool children) or private memory.

    *lock* must be process-shared when the buffer is; every change is a few stores under it.
    """

    def __init__(self, buffer: Any = None, lock: Any = None) -> None:
        self._counts: Any = _PrivateCounts() if buffer is None else _Counts.from_buffer(buffer)
        self._lock = lock if lock is not None else threading.Lock()

    def started(self) -> None:
        with self._lock:
            self._counts.started += 1

    def stopped(self, lost: bool) -> None:
        with self._lock:
            self._counts.stopped += 1
            if lost:
                self._counts.messages_lost += 1

    def sent(self, late: bool) -> None:
        with self._lock:
            self._counts.beats_sent += 1
            if late:
                self._counts.late_beats += 1

    def failed(self, failure: Failure) -> None:
        with self._lock:
            self._counts.failures[_FAILURES.index(failure)] += 1

    def stats(self) -> Stats:
        with self._lock:
            c = self._counts
            failures = {f.value: n for f, n in zip(_FAILURES, c.failures, strict=True) if n}
            return Stats(
                active=c.started - c.stopped,
                started=c.started,
                stopped=c.stopped,
                beats_sent=c.beats_sent,
                late_beats=c.late_beats,
                failures=failures,
                messages_lost=c.messages_lost,
            )


def _common(hb: Heartbeat) -> dict[str, Any]:
    return {
        "task_name": hb.task_name,
        "task_id": hb.task_id,
        "receipt_handle": hb.receipt_handle,
        "queue_url": hb.queue_url,
    }


class Reporter:
    """Logs, signals and counts the heartbeat's events."""

    def __init__(self, counters: Counters, *, region: Callable[[], str | None]) -> None:
        self.counters = counters
        self._region = region
        self._denied_queues: set[str] = set()

    def started(self, hb: Heartbeat) -> None:
        self.counters.started()
        if signals.heartbeat_started.receivers:
            signals.heartbeat_started.send(
                sender=None,
                interval=hb.interval,
                visibility_timeout=hb.visibility_timeout,
                **_common(hb),
            )

    def beat(
        self,
        hb: Heartbeat,
        *,
        asked: int,
        failure: Failure | None,
        detail: str,
        error: BaseException | None,
        lateness: float,
        retry_in: float | None,
        manual: bool = False,
        moot: bool = False,
    ) -> None:
        """Report one entry of a request SQS answered, or failed to. *moot*: the
        heartbeat had already ended (its task ended while the call was in flight), so
        only what SQS took counts. A failure that ends the heartbeat is then reported
        by :meth:`ended`."""
        if failure is None:
            self._sent(hb, asked, lateness, manual)
            return
        if moot:
            return
        self.counters.failed(failure)
        if signals.beat_failed.receivers:
            signals.beat_failed.send(
                sender=None, failure=failure.value, detail=detail, retry_in=retry_in, **_common(hb)
            )
        if hb.ended is not None:
            return
        if manual:
            logger.warning(
                "Extension of task %s[%s]'s message by %d s failed (%s: %s); its regular "
                "beats go on.",
                hb.task_name,
                hb.task_id,
                asked,
                failure.value,
                detail,
                exc_info=error if failure is Failure.UNKNOWN else None,
            )
        elif hb.failures == 1 or failure is Failure.UNKNOWN:
            unknown = failure is Failure.UNKNOWN
            (logger.error if unknown else logger.warning)(
                "Heartbeat of task %s[%s] failed (%s: %s); retrying in %.2f s while its "
                "message stays hidden.",
                hb.task_name,
                hb.task_id,
                failure.value,
                detail,
                retry_in or 0.0,
                exc_info=error if unknown and hb.failures == 1 else None,
            )

    def extension(self, hb: Heartbeat, asked: int, outcome: Outcome) -> None:
        """Report a manual extension the task sent (from the task's thread)."""
        self.beat(
            hb,
            asked=asked,
            failure=outcome.failures[0],
            detail=outcome.details[0],
            error=outcome.error,
            lateness=0.0,
            retry_in=None,
            manual=True,
        )

    def _sent(self, hb: Heartbeat, asked: int, lateness: float, manual: bool) -> None:
        late = not manual and lateness > (hb.visibility_timeout - hb.interval) / 2
        self.counters.sent(late)
        if signals.beat_sent.receivers:
            signals.beat_sent.send(
                sender=None,
                beats=hb.beats,
                visibility_timeout=asked,
                lateness=lateness,
                **_common(hb),
            )
        if late:
            logger.warning(
                "Heartbeat of task %s[%s] was late by %.1f s; its message on %s stayed "
                "hidden, but with less margin than configured.",
                hb.task_name,
                hb.task_id,
                lateness,
                hb.queue_url,
            )
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "Heartbeat %d of task %s[%s]: message hidden for %d s more on %s "
                "(%.3f s after its due time).",
                hb.beats,
                hb.task_name,
                hb.task_id,
                asked,
                hb.queue_url,
                lateness,
            )

    def ended(self, hb: Heartbeat, detail: str = "") -> None:
        """A heartbeat ended: count it, tell receivers, and say why once if it is not
        the normal end of its message."""
        reason = hb.ended
        assert reason is not None
        lost = reason.lost
        self.counters.stopped(lost)
        if lost and signals.message_lost.receivers:
            signals.message_lost.send(sender=None, reason=reason.value, **_common(hb))
        if signals.heartbeat_stopped.receivers:
            signals.heartbeat_stopped.send(
                sender=None, reason=reason.value, beats=hb.beats, **_common(hb)
            )
        if not lost and reason is not Ended.MAX_DURATION:
            return  # the normal end of a message
        task = f"{hb.task_name}[{hb.task_id}]"
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
        elif reason is Ended.GONE:
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
