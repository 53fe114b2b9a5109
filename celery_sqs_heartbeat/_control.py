"""Manual control of the running task's heartbeat: :func:`celery_sqs_heartbeat.current`.

For tasks that know better than a fixed window: one explicit extension now, or another
pace for the rest of the task. The automatic heartbeat stays in charge of everything
else (stopping at the end, retries, the 12-hour limit), so a task that calls nothing
here is still covered.

Where the task runs in the worker's main process, both go to the sidecar. In a prefork
pool child, the child sends its own extension (with an SQS client it makes on first
use, so a child that never extends pays nothing for it) and tells the main process
through its slot, which holds the regular beats meanwhile and paces them afterwards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

from ._heartbeat import Heartbeat, State
from ._report import Reporter
from ._send import Sender
from ._settings import MAX_VISIBILITY_SECONDS, ConfigurationError, resolve_pace
from ._sidecar import Sidecar
from ._slots import Slots


class _Control(Protocol):
    def extend(self, hb: Heartbeat, seconds: int) -> bool: ...

    def reconfigure(self, hb: Heartbeat, interval: float, visibility_timeout: int) -> bool: ...


class InProcess:
    """The task runs in the process of the sidecar (threads, solo, gevent, eventlet)."""

    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar

    def extend(self, hb: Heartbeat, seconds: int) -> bool:
        return self._sidecar.extend(hb.receipt_handle, seconds)

    def reconfigure(self, hb: Heartbeat, interval: float, visibility_timeout: int) -> bool:
        return self._sidecar.reconfigure(hb.receipt_handle, interval, visibility_timeout)


class InChild:
    """The task runs in prefork pool child *index*; *hb* is the child's own copy."""

    def __init__(
        self, slots: Slots, index: int, sender: Callable[[], Sender], reporter: Reporter
    ) -> None:
        self._slots = slots
        self._index = index
        self._sender = sender
        self._report = reporter

    def extend(self, hb: Heartbeat, seconds: int) -> bool:
        asked = min(seconds, math.floor(hb.limit_at - time.monotonic()))
        if asked < 1:
            return False
        sender = self._sender()
        with self._slots.extending(self._index):
            sent = time.monotonic()
            outcome = sender.send(hb.queue_url, [(hb.receipt_handle, asked)])
            failure = outcome.failures[0]
            if failure is None:
                self._slots.extended(self._index, sent, asked)
                hb.extended(sent, asked)
            else:
                hb.extension_failed(failure)
        self._report.extension(hb, asked, outcome)
        return failure is None

    def reconfigure(self, hb: Heartbeat, interval: float, visibility_timeout: int) -> bool:
        self._slots.configure(self._index, interval, visibility_timeout)
        hb.interval, hb.visibility_timeout = interval, visibility_timeout
        return True


class TaskHeartbeat:
    """The heartbeat of the task running in this thread (see :func:`current`).

    Its methods are called from the task's own thread, in any pool. An SQS error is never
    raised: :meth:`extend` returns False, and the failure is logged and counted like a
    failed beat. Only arguments the heartbeat cannot use raise :class:`ValueError`.
    """

    __slots__ = ("_control", "_heartbeat")

    def __init__(self, control: _Control, heartbeat: Heartbeat) -> None:
        self._control = control
        self._heartbeat = heartbeat

    @property
    def receipt_handle(self) -> str:
        """The receipt handle of the task's SQS message."""
        return self._heartbeat.receipt_handle

    @property
    def queue_url(self) -> str:
        return self._heartbeat.queue_url

    @property
    def active(self) -> bool:
        """Whether it still beats: False once it ended (message lost, or
        ``sqs_heartbeat_max_duration`` reached)."""
        return self._heartbeat.state is not State.ENDED

    @property
    def interval(self) -> float:
        """Seconds between beats, as now in force."""
        return self._heartbeat.interval

    @property
    def visibility_timeout(self) -> int:
        """Visibility each regular beat asks for, as now in force."""
        return self._heartbeat.visibility_timeout

    @property
    def beats(self) -> int:
        """Beats and extensions SQS accepted for this message so far (in a prefork pool
        child: the extensions this task sent itself; the worker counts the rest)."""
        return self._heartbeat.beats

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
        if not self.active:
            return False
        return self._control.extend(self._heartbeat, math.ceil(value))

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
        hb = self._heartbeat
        if not self.active:
            return False
        try:
            new_interval, new_visibility = resolve_pace(
                hb.interval if interval is None else interval,
                hb.visibility_timeout if visibility_timeout is None else visibility_timeout,
            )
        except ConfigurationError as exc:
            raise ValueError(f"configure(): {exc.setting}={exc.value!r} {exc.reason}") from None
        return self._control.reconfigure(hb, new_interval, new_visibility)

    def __repr__(self) -> str:
        hb = self._heartbeat
        return (
            f"<TaskHeartbeat {hb.task_name}[{hb.task_id}] interval={hb.interval:g} "
            f"visibility_timeout={hb.visibility_timeout} beats={hb.beats} active={self.active}>"
        )
