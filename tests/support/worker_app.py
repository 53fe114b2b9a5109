"""The Celery app that the integration tests and the demo run in real worker processes.

It does not import celery_sqs_heartbeat (only the bodies of the tasks that use its
manual API and stats do, when they run): the ``celery`` command's plugin installs the
heartbeat, as it would in a user's project. Everything that varies between tests comes
from the environment:

* ``SQSHB_BROKER_URL``: the loopback SQS server.
* ``SQSHB_CONFIG``: JSON object of Celery settings (heartbeat settings, annotations...).
* ``SQSHB_EVENTS``: file each task appends one JSON line to when it starts and ends.
* ``SQSHB_PAUSE_AFTER_RESTORE``: seconds the worker waits at exit just after kombu
  released its unacknowledged messages, so a test can see whether a beat follows it.
* ``SQSHB_DJANGO_STYLE``: when set, every setting is read as a Django project gives it,
  upper case with the ``CELERY_`` prefix through ``config_from_object(...,
  namespace="CELERY")`` (``CELERY_SQS_HEARTBEAT_ENABLED = True``), and none directly.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import time

from celery import Celery
from celery.exceptions import Ignore, Reject

BASE_SETTINGS = {
    "task_acks_late": True,
    "worker_prefetch_multiplier": 1,
    "broker_connection_retry_on_startup": True,
    "worker_hijack_root_logger": True,
    # The broker's polling must not hide the behaviour under test: poll often.
    "broker_transport_options": {"wait_time_seconds": 1, "polling_interval": 0.1},
}
BROKER_URL = os.environ.get("SQSHB_BROKER_URL", "memory://")
CONFIG = json.loads(os.environ.get("SQSHB_CONFIG", "{}"))
# JSON's object keys are strings; kombu looks a backoff policy up by receive count (int).
for _queue in CONFIG.get("broker_transport_options", {}).get("predefined_queues", {}).values():
    if "backoff_policy" in _queue:
        _queue["backoff_policy"] = {int(k): v for k, v in _queue["backoff_policy"].items()}


class DjangoSettings:
    """What ``django.conf.settings`` holds for Celery in a Django project."""

    def __init__(self, settings: dict[str, object]) -> None:
        for name, value in settings.items():
            setattr(self, f"CELERY_{name.upper()}", value)


if os.environ.get("SQSHB_DJANGO_STYLE"):
    app = Celery("worker_app")
    settings = {**BASE_SETTINGS, "broker_url": BROKER_URL, **CONFIG}
    app.config_from_object(DjangoSettings(settings), namespace="CELERY")
else:
    app = Celery("worker_app", broker=BROKER_URL)
    app.conf.update(BASE_SETTINGS)
    app.conf.update(CONFIG)


if os.environ.get("SQSHB_PAUSE_AFTER_RESTORE"):
    from kombu.transport.virtual.base import QoS

    _restore = QoS.restore_unacked_once

    def _restore_then_pause(self: QoS, *args: object, **kwargs: object) -> object:
        result = _restore(self, *args, **kwargs)
        time.sleep(float(os.environ["SQSHB_PAUSE_AFTER_RESTORE"]))
        return result

    QoS.restore_unacked_once = _restore_then_pause


def record(event: str, task_id: str, **extra: object) -> None:
    """Append one event line; O_APPEND writes of one short line do not interleave."""
    path = os.environ.get("SQSHB_EVENTS")
    if not path:
        return
    line = json.dumps(
        {
            "event": event,
            "task_id": task_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "worker": os.environ.get("SQSHB_WORKER", ""),
            "at": time.time(),
            **extra,
        }
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _run(task: object, seconds: float, spin: bool) -> str:
    request = task.request  # type: ignore[attr-defined]
    receipt_handle = (request.properties or {}).get("delivery_tag")
    record("start", request.id, retries=request.retries, receipt_handle=receipt_handle)
    deadline = time.monotonic() + seconds
    if spin:
        n = 0
        while time.monotonic() < deadline:  # pure Python: holds the GIL between checks
            n += 1
    else:
        time.sleep(seconds)
    record("end", request.id, retries=request.retries, receipt_handle=receipt_handle)
    return request.id


@app.task(bind=True)
def sleep(self, seconds: float) -> str:
    """Sleep, like a task waiting on I/O."""
    return _run(self, seconds, spin=False)


@app.task(bind=True)
def spin(self, seconds: float) -> str:
    """Spin on the CPU in pure Python, like a CPU-bound task."""
    return _run(self, seconds, spin=True)


@app.task(bind=True)
def hold_gil(self, seconds: int) -> str:
    """Spend *seconds* in one C call that never lets go of the GIL, as a backtracking
    regular expression, a huge sort or many C extensions do: libc's sleep(3) called
    through ctypes.PyDLL, which keeps the GIL, unlike ctypes.CDLL."""
    request = self.request
    receipt_handle = (request.properties or {}).get("delivery_tag")
    record("start", request.id, retries=request.retries, receipt_handle=receipt_handle)
    ctypes.PyDLL(None).sleep(int(seconds))
    record("end", request.id, retries=request.retries, receipt_handle=receipt_handle)
    return str(request.id)


@app.task(bind=True)
def plain(self, seconds: float) -> str:
    """Like sleep; the tests set its options through task_annotations only."""
    return _run(self, seconds, spin=False)


@app.task(bind=True, sqs_heartbeat_enabled=False)
def opted_out(self, seconds: float) -> str:
    """Never heartbeated: the task option turns it off."""
    return _run(self, seconds, spin=False)


@app.task(bind=True, sqs_heartbeat_enabled=True)
def opted_in(self, seconds: float) -> str:
    """Heartbeated even when the setting is off: the task option turns it on."""
    return _run(self, seconds, spin=False)


@app.task(bind=True)
def fail(self, seconds: float) -> None:
    """Fails after a while."""
    _run(self, seconds, spin=False)
    raise RuntimeError("task failed on purpose")


@app.task(bind=True, max_retries=1, default_retry_delay=0)
def retry_once(self, seconds: float) -> str:
    """Retries once (a new message, same task id), then succeeds."""
    result = _run(self, seconds, spin=False)
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return result


@app.task(bind=True)
def reject_once(self, seconds: float) -> str:
    """Rejects its message with requeue the first time, then succeeds."""
    result = _run(self, seconds, spin=False)
    receive_count = int(
        self.request.properties["delivery_info"]["sqs_message"]
        .get("Attributes", {})
        .get("ApproximateReceiveCount", "1")
    )
    if receive_count == 1:
        raise Reject("requeue on purpose", requeue=True)
    return result


@app.task(bind=True)
def ignore(self, seconds: float) -> None:
    """Ends with Ignore: no result stored, the message acknowledged."""
    _run(self, seconds, spin=False)
    raise Ignore()


@app.task(bind=True)
def manual(
    self, seconds: float, extend: float | None = None, pace: list[float] | None = None
) -> None:
    """Takes the heartbeat in hand: one extension and/or another pace, then sleeps.

    Imports the package inside the task, as a user's task would.
    """
    import celery_sqs_heartbeat

    hb = celery_sqs_heartbeat.current()
    info: dict[str, object] = {"found": hb is not None, "retries": self.request.retries}
    if hb is not None:
        info["receipt_handle"] = hb.receipt_handle
        if extend is not None:
            info["extended"] = hb.extend(extend)
        if pace is not None:
            info["configured"] = hb.configure(interval=pace[0], visibility_timeout=int(pace[1]))
        info["interval"], info["visibility_timeout"] = hb.interval, hb.visibility_timeout
    record("manual", self.request.id, **info)
    _run(self, seconds, spin=False)


@app.task(bind=True)
def stats_after(self, seconds: float) -> None:
    """Sleeps, then records this process's heartbeat stats while still running."""
    import dataclasses

    import celery_sqs_heartbeat

    _run(self, seconds, spin=False)
    stats = dataclasses.asdict(celery_sqs_heartbeat.stats())
    record("stats", self.request.id, retries=self.request.retries, stats=stats)


@app.task(bind=True)
def until_file(self, path: str, max_seconds: float) -> str:
    """Runs until *path* exists (the test decides the moment), at most *max_seconds*."""
    request = self.request
    receipt_handle = (request.properties or {}).get("delivery_tag")
    record("start", request.id, retries=request.retries, receipt_handle=receipt_handle)
    deadline = time.monotonic() + max_seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    record("end", request.id, retries=request.retries, receipt_handle=receipt_handle)
    return str(request.id)


if os.environ.get("SQSHB_SUBREAPER"):
    # As a worker that is PID 1 in a container: every orphan below it comes to it.
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER

if os.environ.get("SQSHB_FAIL_FORK"):
    # As a worker in a cgroup whose pids.max is reached: every fork fails.
    import errno

    def _no_fork() -> int:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    os.fork = _no_fork


@app.task(bind=True)
def until_lost(self, max_seconds: float) -> None:
    """Runs until ``current()`` says its message is lost (at most *max_seconds*), records
    what it said, and ends at once: a task that learnt in time runs once."""
    import celery_sqs_heartbeat

    request = self.request
    record("start", request.id, retries=request.retries)
    hb = celery_sqs_heartbeat.current()
    deadline = time.monotonic() + max_seconds
    lost = None
    while hb is not None and time.monotonic() < deadline:
        lost = hb.lost
        if lost is not None:
            break
        time.sleep(0.05)
    record(
        "lost",
        request.id,
        retries=request.retries,
        found=hb is not None,
        reason=lost.reason.name if lost else None,
        visible_at=lost.visible_at.timestamp() if lost and lost.visible_at else None,
        deadline=hb.deadline.timestamp() if hb is not None and hb.deadline else None,
        active=hb.active if hb is not None else None,
    )
    record("end", request.id, retries=request.retries)


@app.task(bind=True)
def until_interrupted(self, max_seconds: float) -> None:
    """Runs (sleeping in short steps, as a task that does I/O) until ``MessageLost`` is
    raised in it, at most *max_seconds*; records it and lets it go on to Celery. Its
    message's next copy ends at once."""
    from celery_sqs_heartbeat import MessageLost

    request = self.request
    receipt_handle = (request.properties or {}).get("delivery_tag")
    attributes = request.properties["delivery_info"]["sqs_message"].get("Attributes", {})
    copy = int(attributes.get("ApproximateReceiveCount", "1"))
    record("start", request.id, retries=request.retries, receipt_handle=receipt_handle)
    try:
        deadline = time.monotonic() + (0 if copy > 1 else max_seconds)
        while time.monotonic() < deadline:
            time.sleep(0.05)
    except MessageLost as exc:
        record(
            "interrupted",
            request.id,
            retries=request.retries,
            receipt_handle=receipt_handle,
            reason=exc.loss.reason.name if exc.loss else None,
        )
        raise
    record("end", request.id, retries=request.retries, receipt_handle=receipt_handle)
