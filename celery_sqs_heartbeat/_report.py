"""What the heartbeat tells people: log lines, its own signals, and per-process stats.

Kept apart from the sidecar so that every outcome is reported in one place, once: the
log level, the signal and the counter for an event are decided together.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import signals
from ._errors import Failure, describe_denied
from ._schedule import Ended, Heartbeat, Settled

logger = logging.getLogger("celery_sqs_heartbeat")

#: ``reason`` of ``heartbeat_stopped`` when the task ended normally (postrun).
TASK_ENDED = "task ended"


@dataclass(frozen=True)
class Stats:
    """Counters of one worker process since it started (see :func:`stats`)."""

    #: Heartbeats running now.
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


def _common(hb: Heartbeat) -> dict[str, Any]:
    return {
        "task_name": hb.task_name,
        "task_id": hb.task_id,
        "receipt_handle": hb.receipt_handle,
        "queue_url": hb.queue_url,
    }


class Reporter:
    """Logs, signals and counts the heartbeat's events for one process."""

    def __init__(self, *, region: Callable[[], str | None] = lambda: None) -> None:
        self._region = region
        # Written by the heartbeat thread, and by task threads that extend by hand: each
        # increment under this lock (a beat's worth of work, never on a task's hot path).
        self._counting = threading.Lock()
        self._beats_sent = self._late_beats = self._messages_lost = 0
        self._failures: Counter[str] = Counter()
        self._denied_queues: set[str] = set()

    def stats(self, active: int, started: int, stopped: int) -> Stats:
        with self._counting:
            failures = dict(self._failures)
        return Stats(
            active=active,
            started=started,
            stopped=stopped,
            beats_sent=self._beats_sent,
            late_beats=self._late_beats,
            failures=failures,
            messages_lost=self._messages_lost,
        )

    # -- from the task's thread --------------------------------------------------------

    def started(self, hb: Heartbeat) -> None:
        if signals.heartbeat_started.receivers:
            signals.heartbeat_started.send(
                sender=None,
                interval=hb.interval,
                visibility_timeout=hb.visibility_timeout,
                **_common(hb),
            )

    def stopped(self, hb: Heartbeat, reason: str = TASK_ENDED) -> None:
        if signals.heartbeat_stopped.receivers:
            signals.heartbeat_stopped.send(
                sender=None, reason=reason, beats=hb.beats, **_common(hb)
            )

    # -- from the heartbeat's thread ---------------------------------------------------

    def settled(
        self, result: Settled, detail: str, error: BaseException | None, answered: float
    ) -> None:
        """Report one entry of a request SQS answered (or failed to) at *answered*."""
        hb = result.heartbeat
        if hb.stopped and hb.ended is None and result.failure is not None:
            return  # its task ended while the call was in flight: the failure is moot
        if result.failure is None:
            self._beat_sent(result, answered)
            return
        self._failed(hb, result.failure, detail, result.retry_in)
        if hb.ended is not None:
            self.ended(hb, detail)
        elif hb.failures == 1 or result.failure is Failure.UNKNOWN:
            unknown = result.failure is Failure.UNKNOWN
            (logger.error if unknown else logger.warning)(
                "Heartbeat of task %s[%s] failed (%s: %s); retrying in %.2f s while its "
                "message stays hidden.",
                hb.task_name,
                hb.task_id,
                result.failure.value,
                detail,
                result.retry_in or 0.0,
                exc_info=error if unknown and hb.failures == 1 else None,
            )

    def extended(
        self,
        hb: Heartbeat,
        seconds: int,
        failure: Failure | None,
        detail: str,
        error: BaseException | None,
    ) -> None:
        """Report a manual extension asked by the task itself (from the task's thread)."""
        if failure is None:
            self._sent(hb, seconds, lateness=0.0, late=False)
            return
        self._failed(hb, failure, detail, retry_in=None)
        if hb.ended is not None:
            self.ended(hb, detail)
        else:
            logger.warning(
                "Extension of task %s[%s]'s message by %d s failed (%s: %s); its regular "
                "beats go on.",
                hb.task_name,
                hb.task_id,
                seconds,
                failure.value,
                detail,
                exc_info=error if failure is Failure.UNKNOWN else None,
            )

    def _sent(self, hb: Heartbeat, visibility_timeout: int, lateness: float, late: bool) -> None:
        """Count a beat SQS accepted and tell ``beat_sent`` receivers."""
        with self._counting:
            self._beats_sent += 1
            self._late_beats += late
        if signals.beat_sent.receivers:
            signals.beat_sent.send(
                sender=None,
                beats=hb.beats,
                visibility_timeout=visibility_timeout,
                lateness=lateness,
                **_common(hb),
            )

    def _failed(self, hb: Heartbeat, failure: Failure, detail: str, retry_in: float | None) -> None:
        """Count a failed attempt and tell ``beat_failed`` receivers."""
        with self._counting:
            self._failures[failure.value] += 1
        if signals.beat_failed.receivers:
            signals.beat_failed.send(
                sender=None, failure=failure.value, detail=detail, retry_in=retry_in, **_common(hb)
            )

    def _beat_sent(self, result: Settled, answered: float) -> None:
        hb = result.heartbeat
        late = result.lateness > (hb.visibility_timeout - hb.interval) / 2
        self._sent(hb, result.visibility_timeout, max(0.0, answered - result.due), late)
        if late:
            logger.warning(
                "Heartbeat of task %s[%s] was late by %.1f s (after %d failed attempts); its "
                "message on %s stayed hidden, but with less margin than configured.",
                hb.task_name,
                hb.task_id,
                result.lateness,
                hb.failures,
                hb.queue_url,
            )
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "Heartbeat %d of task %s[%s]: message hidden for %d s more on %s "
                "(%.3f s after its due time).",
                hb.beats,
                hb.task_name,
                hb.task_id,
                result.visibility_timeout,
                hb.queue_url,
                result.lateness,
            )

    def ended(self, hb: Heartbeat, detail: str) -> None:
        """A heartbeat ended without its task ending: log why, once, and tell receivers."""
        reason = hb.ended
        assert reason is not None
        if reason is not Ended.MAX_DURATION:
            with self._counting:
                self._messages_lost += 1
            if signals.message_lost.receivers:
                signals.message_lost.send(sender=None, reason=reason.value, **_common(hb))
        self.stopped(hb, reason.value)
        task = f"{hb.task_name}[{hb.task_id}]"
        if reason is Ended.DENIED:
            first = hb.queue_url not in self._denied_queues
            self._denied_queues.add(hb.queue_url)
            if first:
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
        else:
            logger.warning(
                "Heartbeat of task %s stopped after %d beats: sqs_heartbeat_max_duration "
                "reached; its message will be visible again within %d s.",
                task,
                hb.beats,
                hb.visibility_timeout,
            )
