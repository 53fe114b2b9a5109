"""Manual control of the running task's heartbeat: :func:`celery_sqs_heartbeat.current`.

For tasks that know better than a fixed window, as users of decorator-based extenders
are used to: one explicit extension now, or another pace for the rest of the task. The
automatic heartbeat stays in charge of everything else (stopping at the end, retries,
the 12-hour limit), so a task that calls nothing here is still covered.
"""

from __future__ import annotations

import math
from datetime import timedelta

from ._schedule import Heartbeat
from ._settings import MAX_VISIBILITY_SECONDS, ConfigurationError, resolve_pace
from ._sidecar import Sidecar


class TaskHeartbeat:
    """The heartbeat of the task running in this thread (see :func:`current`).

    Its methods are called from the task's own thread, in any pool. An SQS error is never
    raised: :meth:`extend` returns False, and the failure is logged and counted like a
    failed beat. Only arguments the heartbeat cannot use raise :class:`ValueError`.
    """

    __slots__ = ("_heartbeat", "_sidecar")

    def __init__(self, sidecar: Sidecar, heartbeat: Heartbeat) -> None:
        self._sidecar = sidecar
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
        return not self._heartbeat.stopped

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
        """Beats (and extensions) SQS accepted for this message so far."""
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
        return self._sidecar.extend(self.receipt_handle, math.ceil(value))

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
        heartbeat = self._heartbeat
        if heartbeat.stopped:
            return False
        try:
            new_interval, new_visibility = resolve_pace(
                heartbeat.interval if interval is None else interval,
                heartbeat.visibility_timeout if visibility_timeout is None else visibility_timeout,
            )
        except ConfigurationError as exc:
            raise ValueError(f"configure(): {exc.setting}={exc.value!r} {exc.reason}") from None
        return self._sidecar.reconfigure(self.receipt_handle, new_interval, new_visibility)

    def __repr__(self) -> str:
        hb = self._heartbeat
        return (
            f"<TaskHeartbeat {hb.task_name}[{hb.task_id}] interval={hb.interval:g} "
            f"visibility_timeout={hb.visibility_timeout} beats={hb.beats} active={self.active}>"
        )
