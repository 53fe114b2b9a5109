"""What the heartbeat tells people: log lines, its own signals, and the worker's counters.

Every outcome is reported here, once: the counter, the signal and the log line of an
event are decided together, and the end of a heartbeat by one table (:data:`ENDINGS`).
The sidecar reports what it applied under its lock after releasing it, from the values
taken there (``_heartbeat.Outcome``), since receivers of the signals are user code.

The counters are blocks of 64-bit integers, one per writing process: in a prefork worker
the main process writes one and each pool slot's child another (its task's own
extensions), all in memory shared before the fork, and :meth:`Counters.stats` adds them
up. No lock crosses a process; within one, a thread lock guards the block it writes.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from . import signals
from ._errors import Failure, describe_denied
from ._heartbeat import Ended, Heartbeat, Outcome

logger = logging.getLogger("celery_sqs_heartbeat")


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
    #: Messages received that SQS had handed out before (``ApproximateReceiveCount``
    #: above 1): a retry's requeue, or a task that ran (or began) twice.
    messages_redelivered: int = 0


#: The counters of a block, in order, each a field of :class:`Stats`; the failures by
#: class follow them.
FIELDS = ("started", "stopped", "beats_sent", "late_beats", "messages_lost", "messages_redelivered")
STARTED, STOPPED, BEATS_SENT, LATE_BEATS, MESSAGES_LOST, MESSAGES_REDELIVERED = range(len(FIELDS))
_FAILURE_INDEX = {f: len(FIELDS) + i for i, f in enumerate(Failure)}
_BLOCK = ctypes.c_int64 * (len(FIELDS) + len(Failure))
#: Bytes of one block, in memory shared with pool children.
BLOCK_SIZE = ctypes.sizeof(_BLOCK)


def shared_block(buffer: Any) -> Any:
    """A block of counters in *buffer* (``BLOCK_SIZE`` bytes of a shared mapping)."""
    return _BLOCK.from_buffer(buffer)


class Counters:
    """The block this process writes, and the blocks of other processes it reads.

    ``started`` and ``stopped`` are counted by the sidecar, under its own lock, as it adds
    heartbeats to its registry and drops them (once per message: no second lock on the
    per-task path); the others by :class:`Reporter`, under the lock here. A worker with a
    heartbeat process counts ``started`` itself, under the lock here, as it receives each
    message: whichever process beats it then, the count is one.
    """

    def __init__(self, own: Any = None, others: Sequence[Any] = ()) -> None:
        #: This process's block; a plain list where nothing is shared (cheaper than a
        #: ctypes field).
        self.own = own if own is not None else [0] * len(_BLOCK())
        self._others = others
        self._lock = threading.Lock()

    def add(self, index: int) -> None:
        with self._lock:
            self.own[index] += 1

    def failed(self, failure: Failure) -> None:
        self.add(_FAILURE_INDEX[failure])

    def stats(self) -> Stats:
        totals = [sum(column) for column in zip(self.own, *self._others, strict=True)]
        failures = {f.value: totals[i] for f, i in _FAILURE_INDEX.items() if totals[i]}
        counts = dict(zip(FIELDS, totals, strict=False))
        # Read without a lock while others count: never show a negative number at work.
        active = max(0, counts["started"] - counts["stopped"])
        return Stats(active=active, failures=failures, **counts)


class Ending(NamedTuple):
    """What the end of a heartbeat for one reason means to people."""

    #: Whether the message may now run again elsewhere (counted as lost).
    lost: bool
    #: Logged at this level, once per heartbeat (None: the normal end of a message).
    level: int | None = None
    message: str = ""


#: Every reason a heartbeat ends, with what it counts and logs. The messages are
#: formatted with ``task``, ``queue``, ``detail``, ``beats`` and ``window``.
ENDINGS: dict[Ended, Ending] = {
    Ended.TASK_ENDED: Ending(lost=False),
    Ended.SETTLED: Ending(lost=False),
    Ended.HANDED_BACK: Ending(lost=False),
    Ended.GONE: Ending(
        True,
        logging.WARNING,
        "Heartbeat of task %(task)s stopped: its message is no longer in flight on "
        "%(queue)s (%(detail)s); it was deleted or delivered again, so the task may run "
        "twice.",
    ),
    # Logged once per queue, with the IAM statement to grant (see Reporter.ended).
    Ended.DENIED: Ending(
        True,
        logging.ERROR,
        "Heartbeat of task %(task)s stopped: %(denied)s (%(detail)s). Its message will be "
        "visible again when its current visibility runs out.",
    ),
    Ended.LOST: Ending(
        True,
        logging.WARNING,
        "Heartbeat of task %(task)s stopped: SQS did not answer (%(detail)s) before the "
        "message's visibility ran out; it may be delivered to another worker.",
    ),
    Ended.LIMIT: Ending(
        True,
        logging.WARNING,
        "Heartbeat of task %(task)s stopped after %(beats)d beats: SQS keeps a message "
        "hidden at most 12 hours from receipt; it will be delivered again.",
    ),
    Ended.MAX_DURATION: Ending(
        False,
        logging.WARNING,
        "Heartbeat of task %(task)s stopped after %(beats)d beats: "
        "sqs_heartbeat_max_duration reached; its message will be visible again within "
        "%(window)d s.",
    ),
}


_NORMAL = ENDINGS[Ended.TASK_ENDED]


def _common(hb: Heartbeat) -> dict[str, Any]:
    return {
        "task_name": hb.task_name,
        "task_id": hb.task_id,
        "receipt_handle": hb.receipt_handle,
        "queue_url": hb.queue_url,
    }


class Reports(Protocol):
    """Where a sidecar reports its heartbeats' events: a :class:`Reporter`, or the heartbeat
    process's forwarder to the worker's (``_beat.serve``)."""

    counters: Counters

    def started(self, hb: Heartbeat) -> None: ...

    def outcome(self, s: Outcome) -> None: ...

    def ended(self, hb: Heartbeat, beats: int, detail: str = "") -> None: ...


class Reporter:
    """Counts, signals and logs the heartbeat's events."""

    def __init__(self, counters: Counters, *, region: Callable[[], str | None]) -> None:
        self.counters = counters
        self._region = region
        self._denied_queues: set[str] = set()

    def started(self, hb: Heartbeat) -> None:
        if hb.receive_count > 1:
            self.counters.add(MESSAGES_REDELIVERED)
            if signals.message_redelivered.receivers:
                signals.message_redelivered.send(
                    sender=None,
                    message_id=hb.message_id,
                    receive_count=hb.receive_count,
                    **_common(hb),
                )
        if signals.heartbeat_started.receivers:
            signals.heartbeat_started.send(
                sender=None,
                interval=hb.options.interval,
                visibility_timeout=hb.options.visibility_timeout,
                **_common(hb),
            )

    def outcome(self, s: Outcome) -> None:
        """Report one entry of a call SQS answered, or failed to."""
        failure = s.answer.failure
        if failure is None:
            self._sent(s)
            return
        if s.moot:
            return
        self.counters.failed(failure)
        hb = s.hb
        if signals.beat_failed.receivers:
            signals.beat_failed.send(
                sender=None,
                failure=failure.value,
                detail=s.answer.detail,
                retry_in=s.retry_in,
                **_common(hb),
            )
        unknown = failure is Failure.UNKNOWN
        if s.ended:
            return  # said by ended()
        if s.manual:
            logger.warning(
                "Extension of task %s[%s]'s message by %d s failed (%s: %s); its regular "
                "beats go on.",
                hb.task_name,
                hb.task_id,
                s.asked,
                failure.value,
                s.answer.detail,
                exc_info=s.answer.error if unknown else None,
            )
        elif s.failures == 1 or unknown:
            (logger.error if unknown else logger.warning)(
                "Heartbeat of task %s[%s] failed (%s: %s); retrying in %.2f s while its "
                "message stays hidden.",
                hb.task_name,
                hb.task_id,
                failure.value,
                s.answer.detail,
                s.retry_in or 0.0,
                exc_info=s.answer.error if unknown and s.failures == 1 else None,
            )

    def _sent(self, s: Outcome) -> None:
        hb, options = s.hb, s.hb.options
        late = not s.manual and s.lateness > (options.visibility_timeout - options.interval) / 2
        self.counters.add(BEATS_SENT)
        if late:
            self.counters.add(LATE_BEATS)
        if signals.beat_sent.receivers:
            signals.beat_sent.send(
                sender=None,
                beats=s.beats,
                visibility_timeout=s.asked,
                lateness=s.lateness,
                **_common(hb),
            )
        if late:
            logger.warning(
                "Heartbeat of task %s[%s] was late by %.1f s; its message on %s stayed "
                "hidden, but with less margin than configured.",
                hb.task_name,
                hb.task_id,
                s.lateness,
                hb.queue_url,
            )
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "Heartbeat %d of task %s[%s]: message hidden for %d s more on %s "
                "(%.3f s after its due time).",
                s.beats,
                hb.task_name,
                hb.task_id,
                s.asked,
                hb.queue_url,
                s.lateness,
            )

    def ended(self, hb: Heartbeat, beats: int, detail: str = "") -> None:
        """A heartbeat ended (``hb.ended`` says why; the sidecar counted it): tell
        receivers, and say why once if that is not the normal end of its message."""
        reason = hb.ended
        assert reason is not None
        # The normal end of a message, first: the per-task path (no enum hashing).
        normal = reason is Ended.TASK_ENDED or reason is Ended.SETTLED
        ending = ENDINGS[reason] if not normal else _NORMAL
        if ending.lost:
            self.counters.add(MESSAGES_LOST)
            if signals.message_lost.receivers:
                signals.message_lost.send(sender=None, reason=reason.value, **_common(hb))
        if signals.heartbeat_stopped.receivers:
            signals.heartbeat_stopped.send(
                sender=None, reason=reason.value, beats=beats, **_common(hb)
            )
        if ending.level is None:
            return
        if reason is Ended.DENIED:
            if hb.queue_url in self._denied_queues:
                return
            self._denied_queues.add(hb.queue_url)
        logger.log(
            ending.level,
            ending.message,
            {
                "task": f"{hb.task_name}[{hb.task_id}]",
                "queue": hb.queue_url,
                "detail": detail,
                "beats": beats,
                "window": hb.options.visibility_timeout,
                "denied": describe_denied(hb.queue_url, self._region())
                if reason is Ended.DENIED
                else "",
            },
        )


def say_stalled(hb: Heartbeat, waited: float) -> None:
    """A call in flight for *hb* was not answered within *waited* s: going on without it."""
    logger.info(
        "Heartbeat of task %s[%s]: SQS had not answered its beat after %.2f s; going on "
        "without it (if it lands, it fails on a deleted message, or keeps a requeued one "
        "hidden up to %d s).",
        hb.task_name,
        hb.task_id,
        waited,
        hb.options.visibility_timeout,
    )


def say_received_again(hb: Heartbeat) -> None:
    """*hb*'s message was received again while its first copy is still in this worker."""
    logger.warning(
        "celery-sqs-heartbeat: task %s[%s] was received again (message %s, received %d "
        "times) while its first copy still runs in this worker: its visibility ran out "
        "(the window is too short, or beats failed), and the task runs twice.",
        hb.task_name,
        hb.task_id,
        hb.message_id,
        hb.receive_count,
    )


def say_interrupted(hb: Heartbeat, reason: str, visible_at: str) -> None:
    """*hb*'s task is interrupted (``sqs_heartbeat_interrupt``): its message is lost."""
    logger.warning(
        "celery-sqs-heartbeat: task %s[%s] is interrupted with MessageLost: its message is "
        "no longer its own (%s). This worker neither deletes it nor changes its "
        "visibility: another worker may receive it from %s.",
        hb.task_name,
        hb.task_id,
        reason,
        visible_at,
    )


def say_unreached(task_name: str, task_id: str) -> None:
    """A task to interrupt ended otherwise than with ``MessageLost``."""
    logger.warning(
        "celery-sqs-heartbeat: task %s[%s] ended without MessageLost (it came as the task "
        "returned, or the task caught it); its message was given up all the same, so it "
        "may be received again and the task run again.",
        task_name,
        task_id,
    )
