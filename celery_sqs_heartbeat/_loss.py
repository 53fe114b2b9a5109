"""What a task learns when its message is no longer its own: why, and from when another
worker may receive it.

A task whose heartbeat ended this way is a duplicate in the making: SQS may hand its
message to another worker, which runs the task again. The reasons are a small closed
set, so a task can act on each (stop, or finish and make its side effects idempotent).
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from ._heartbeat import Ended, Heartbeat


class LossReason(enum.Enum):
    """Why a running task's message is no longer its own."""

    #: SQS says the receipt handle is no longer valid: the message was deleted, or
    #: received again (by another worker) after its visibility ran out.
    RECEIPT_INVALID = "receipt handle no longer valid"
    #: ``sqs_heartbeat_max_duration`` from the task's start was reached: no beat follows.
    MAX_DURATION = "sqs_heartbeat_max_duration reached"
    #: SQS's 12-hour limit from the message's receipt was reached.
    SQS_LIMIT = "SQS 12-hour limit reached"
    #: Beats failed (errors, or a permission SQS denied) until the window ran out, or
    #: would have: no beat can keep the message any more.
    BEATS_FAILED = "beats failed"


#: The heartbeat's ends that lose the message, and why.
_REASONS = {
    Ended.GONE: LossReason.RECEIPT_INVALID,
    Ended.MAX_DURATION: LossReason.MAX_DURATION,
    Ended.LIMIT: LossReason.SQS_LIMIT,
    Ended.LOST: LossReason.BEATS_FAILED,
    Ended.DENIED: LossReason.BEATS_FAILED,
}
#: Each reason's number in a slot (0: none), for the processes that share the slots.
CODES = {reason: code for code, reason in enumerate(LossReason, start=1)}
REASONS = {code: reason for reason, code in CODES.items()}


@dataclass(frozen=True, slots=True)
class Loss:
    """A running task's message is no longer its own (``TaskHeartbeat.lost``)."""

    reason: LossReason
    #: From when another worker may receive the message (UTC); None where that is not
    #: known (no beat was accepted yet: the queue's own timeout from the receipt rules).
    visible_at: datetime | None

    @classmethod
    def of(cls, reason: LossReason, visible_until: float) -> Loss:
        """The loss for *reason*, the message hidden until *visible_until*
        (``time.monotonic()``, the same clock in every process of the machine)."""
        if reason is LossReason.RECEIPT_INVALID:
            visible_until = min(visible_until, time.monotonic())  # it may be another's now
        return cls(reason, wall_clock(visible_until))


def loss_of(hb: Heartbeat) -> Loss | None:
    """The loss *hb*'s end means; None while it beats, or when it ended otherwise."""
    reason = reason_of(hb.ended)
    return None if reason is None else Loss.of(reason, hb.visible_until)


def reason_of(ended: Ended | None) -> LossReason | None:
    """Why the message was lost, for a heartbeat that ended *ended*; None: not lost."""
    if ended is None or ended is Ended.TASK_ENDED or ended is Ended.SETTLED:
        return None  # the usual ends, without hashing an Enum
    return _REASONS.get(ended)


def wall_clock(monotonic: float) -> datetime | None:
    """*monotonic* (``time.monotonic()``) as a UTC time; None for infinity (unknown)."""
    if math.isinf(monotonic):
        return None
    return datetime.fromtimestamp(time.time() + monotonic - time.monotonic(), timezone.utc)
