"""Signals the heartbeat sends, in the style of :mod:`celery.signals`.

Connect metrics to them::

    from celery_sqs_heartbeat import signals

    @signals.beat_sent.connect
    def on_beat(lateness, **kwargs):
        BEAT_LATENESS.observe(lateness)

Every signal is sent with ``sender=None``, from the worker's main process (but a prefork
task's own ``extend()``, below), and carries ``task_name``, ``task_id``,
``receipt_handle`` and ``queue_url``. Where each one comes from:

* ``heartbeat_started``: ``task_received``, in the thread that receives the message, for
  every message (keep receivers quick: they add to every message); and
  ``message_redelivered`` there, for a message SQS had handed out before.
* ``heartbeat_stopped``: when the heartbeat next looks at the message after the task
  ended, usually once Celery has settled it (``"message settled"``), up to an interval
  after the end: in a prefork worker from its loop thread, in the other pools from the
  thread that hands on the heartbeat process's reports. With the heartbeat process off,
  ``task_postrun`` in the task's thread (reason ``"task ended"``). Either way, when the
  heartbeat ends early (message gone, limits).
* ``beat_sent``, ``beat_failed``, ``message_lost``: the heartbeat's threads (with a heartbeat
  process, the worker's thread that hands on its reports); for a task's own
  ``extend()``, the task's thread (in a prefork pool child, in that child).

A receiver that raises is logged by Celery and does not affect the beat.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = [
    "beat_failed",
    "beat_sent",
    "heartbeat_started",
    "heartbeat_stopped",
    "message_lost",
    "message_redelivered",
]

_COMMON = {"task_name", "task_id", "receipt_handle", "queue_url"}

#: A message's heartbeat began (at ``task_received``). Also: ``interval``,
#: ``visibility_timeout``.
heartbeat_started = Signal(
    name="sqs_heartbeat_started", providing_args=_COMMON | {"interval", "visibility_timeout"}
)
#: SQS accepted a beat. Also: ``beats`` (count so far), ``visibility_timeout`` (asked),
#: ``lateness`` (seconds from the beat's due time to SQS's answer).
beat_sent = Signal(
    name="sqs_heartbeat_beat_sent",
    providing_args=_COMMON | {"beats", "visibility_timeout", "lateness"},
)
#: A beat failed. Also: ``failure`` (``"transient"``, ``"gone"``, ``"denied"``,
#: ``"limit"`` or ``"unknown"``), ``detail``, ``retry_in`` (seconds, or None when the
#: heartbeat ends).
beat_failed = Signal(
    name="sqs_heartbeat_beat_failed",
    providing_args=_COMMON | {"failure", "detail", "retry_in"},
)
#: The heartbeat can no longer keep the message (gone, denied, lost, limits): it may run
#: again elsewhere. Also: ``reason``.
message_lost = Signal(name="sqs_heartbeat_message_lost", providing_args=_COMMON | {"reason"})
#: A message was received that SQS had handed out before (``ApproximateReceiveCount``
#: above 1), at ``task_received``. Also: ``message_id``, ``receive_count``.
message_redelivered = Signal(
    name="sqs_heartbeat_message_redelivered",
    providing_args=_COMMON | {"message_id", "receive_count"},
)
#: A heartbeat ended. Also: ``reason`` (``"task ended"`` or why it stopped early) and
#: ``beats``.
heartbeat_stopped = Signal(
    name="sqs_heartbeat_stopped", providing_args=_COMMON | {"reason", "beats"}
)
