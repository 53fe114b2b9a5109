"""Manual control of the running task's heartbeat: :func:`celery_sqs_heartbeat.current`.

For tasks that know better than a fixed window: one explicit extension now, or another
pace for the rest of the task. The automatic heartbeat stays in charge of everything
else (stopping at the end, retries, the 12-hour limit), so a task that calls nothing
here is still covered.

Where the task runs in the worker's main process (:class:`InProcess`), both go to the
sidecar, and the handle shows the sidecar's own heartbeat. In a prefork pool child
(:class:`InChild`) the task has its own record of its heartbeat, kept for the whole task:
the child sends its own extension (with an SQS client it makes on first use, so a child
that never extends pays nothing for it) and tells the main process through its slot,
which holds the regular beats meanwhile and paces them afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Protocol

from ._heartbeat import RECEIPT_ALLOWANCE, Ended, Heartbeat, allowed
from ._loss import REASONS, Loss, loss_of, wall_clock
from ._report import Reporter
from ._send import Sender
from ._settings import MAX_VISIBILITY_SECONDS, ConfigurationError, resolve_pace
from ._sidecar import Sidecar
from ._slots import Slots, SlotsBroken, key_of


class _Control(Protocol):
    @property
    def heartbeat(self) -> Heartbeat: ...

    def loss(self) -> Loss | None: ...

    def extend(self, seconds: int) -> bool: ...

    def reconfigure(self, interval: float, visibility_timeout: int) -> bool: ...


class InProcess:
    """The task runs in the process of the sidecar (threads, solo, gevent, eventlet)."""

    def __init__(self, sidecar: Sidecar, hb: Heartbeat) -> None:
        self._sidecar = sidecar
        self.heartbeat = hb

    def loss(self) -> Loss | None:
        return loss_of(self.heartbeat)  # the sidecar's own heartbeat

    def extend(self, seconds: int) -> bool:
        return self._sidecar.extend(self.heartbeat, seconds)

    def reconfigure(self, interval: float, visibility_timeout: int) -> bool:
        return self._sidecar.reconfigure(self.heartbeat, interval, visibility_timeout)


class InChild:
    """The task runs in prefork pool child *index*; *hb* is the task's own record, which
    only the task's thread changes (the main process keeps the regular beats')."""

    def __init__(
        self,
        slots: Slots,
        index: int,
        hb: Heartbeat,
        sender: Callable[[], Sender | None],
        reporter: Reporter,
    ) -> None:
        self._slots = slots
        self._index = index
        self._key = key_of(hb.receipt_handle)
        self.heartbeat = hb
        self._sender = sender
        self._report = reporter

    def loss(self) -> Loss | None:
        """As the beating process wrote it in the slot, or as this task's own extension
        found it."""
        try:
            said = self._slots.loss(self._index, self._key)
        except SlotsBroken:  # said once by the beating process; the task sees no loss here
            said = None
        if said is not None:
            return Loss.of(REASONS[said[0]], said[1])
        return loss_of(self.heartbeat)

    def extend(self, seconds: int) -> bool:
        hb = self.heartbeat
        # At least the window: the main process reads the slot only when a regular beat
        # is due, so a shorter extension could lapse before then (in the sidecar's
        # process a short one is topped up at once, to the same effect).
        asked = allowed(max(seconds, hb.options.visibility_timeout), time.monotonic(), hb.received)
        if isinstance(asked, Ended):
            return False
        sender = self._sender()  # built before the main process's beats are held
        if sender is None:
            return False
        with self._slots.extending(self._index, self._key) as running:
            if not running:
                return False  # its task has ended: the slot is another's now
            sent = time.monotonic()
            answer = sender.send(hb.queue_url, [(hb.receipt_handle, asked)])[0]
            if answer.failure is None:
                self._slots.extended(self._index, self._key, sent, asked)
        outcome = hb.answered(sent, asked, answer, time.monotonic(), manual=True)
        # The task's own record may end here (message gone, denied); the main process's
        # heartbeat, which it does not change, finds out and reports it at its next beat.
        self._report.outcome(dataclasses.replace(outcome, ended=False))
        return answer.failure is None

    def reconfigure(self, interval: float, visibility_timeout: int) -> bool:
        if not self._slots.configure(self._index, self._key, interval, visibility_timeout):
            return False
        self.heartbeat.reconfigure(interval, visibility_timeout)
        return True


class TaskHeartbeat:
    """The heartbeat of the task running in this thread (see :func:`current`).

    Its methods are called from the task's own thread, in any pool. An SQS error is never
    raised: :meth:`extend` returns False, and the failure is logged and counted like a
    failed beat. Only arguments the heartbeat cannot use raise :class:`ValueError`.

    With ``sqs_heartbeat_interrupt`` its calls that take a lock or call SQS run in a
    *shield* (``_interrupt.Armed.shield``): a ``MessageLost`` that comes meanwhile is
    raised as the call returns, never in its middle.
    """

    __slots__ = ("_control", "_shield")

    def __init__(
        self,
        control: _Control,
        shield: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self._control = control
        self._shield = shield

    @property
    def receipt_handle(self) -> str:
        """The receipt handle of the task's SQS message."""
        return self._control.heartbeat.receipt_handle

    @property
    def queue_url(self) -> str:
        return self._control.heartbeat.queue_url

    @property
    def active(self) -> bool:
        """Whether it still beats: False once it ended (message lost, or
        ``sqs_heartbeat_max_duration`` reached)."""
        with self._shield():
            return self._control.heartbeat.ended is None and self._control.loss() is None

    @property
    def lost(self) -> Loss | None:
        """None while the message is the task's own. Once it is not: why (a
        :class:`LossReason`), and from when another worker may receive it. The process
        that beats says it, in every pool, within one beat of the loss."""
        with self._shield():
            return self._control.loss()

    @property
    def deadline(self) -> datetime | None:
        """The latest time the heartbeat can keep the message hidden, known in advance:
        SQS's 12-hour limit from the receipt, or ``sqs_heartbeat_max_duration`` from the
        task's start plus one window, whichever comes first. From then on another worker
        may receive the message. None before the task started."""
        hb = self._control.heartbeat
        if hb.started is None:
            return None
        limit = hb.received + MAX_VISIBILITY_SECONDS - RECEIPT_ALLOWANCE
        if hb.options.max_duration is not None:
            limit = min(limit, hb.started + hb.options.max_duration + hb.options.visibility_timeout)
        return wall_clock(limit)

    @property
    def interval(self) -> float:
        """Seconds between beats, as now in force."""
        return self._control.heartbeat.options.interval

    @property
    def visibility_timeout(self) -> int:
        """Visibility each regular beat asks for, as now in force."""
        return self._control.heartbeat.options.visibility_timeout

    @property
    def beats(self) -> int:
        """Beats and extensions SQS accepted for this message so far (in a prefork pool
        child: the extensions this task sent itself; the worker counts the rest)."""
        return self._control.heartbeat.beats

    def extend(self, seconds: float | timedelta) -> bool:
        """Keep the message hidden for *seconds* from now (whole seconds, rounded up).

        Sent at once from the calling thread (one SQS call); True when SQS accepted it.
        The regular beats then resume when the message has as much visibility left as
        before any regular beat, so a long extension saves beats and a short one is
        topped up. Cut to SQS's 12-hour limit from the message's receipt.
        """
        value = seconds.total_seconds() if isinstance(seconds, timedelta) else seconds
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"extend(seconds={seconds!r}): must be a number or timedelta")
        if not 0 < value <= MAX_VISIBILITY_SECONDS:
            raise ValueError(
                f"extend(seconds={seconds!r}): must be > 0 and at most "
                f"{MAX_VISIBILITY_SECONDS} seconds (SQS's limit)"
            )
        with self._shield():
            if not self.active:
                return False
            return self._control.extend(math.ceil(value))

    def configure(
        self,
        *,
        interval: float | timedelta | None = None,
        visibility_timeout: int | timedelta | None = None,
    ) -> bool:
        """Beat at another pace for the rest of this task; None keeps a value as it is.

        Takes effect from the next beat (the one after the last one sent). Validated like
        the settings of the same names; False when the heartbeat has already ended.
        """
        with self._shield():
            if not self.active:
                return False
            try:
                new_interval, new_visibility = resolve_pace(
                    self.interval if interval is None else interval,
                    self.visibility_timeout if visibility_timeout is None else visibility_timeout,
                )
            except ConfigurationError as exc:
                raise ValueError(f"configure(): {exc.setting}={exc.value!r} {exc.reason}") from None
            return self._control.reconfigure(new_interval, new_visibility)

    def __repr__(self) -> str:
        hb = self._control.heartbeat
        return (
            f"<TaskHeartbeat {hb.task_name}[{hb.task_id}] interval={self.interval:g} "
            f"visibility_timeout={self.visibility_timeout} beats={hb.beats} "
            f"active={self.active}>"
        )
