"""Keep long Celery tasks from running twice on Amazon SQS.

While a task runs, a heartbeat extends the visibility of the task's own SQS message by
a short window (``sqs_heartbeat_visibility_timeout``) every ``sqs_heartbeat_interval``
seconds, and stops when the task ends. Long tasks are never delivered twice, and the
message of a crashed worker is visible again within one short window instead of the
queue's long timeout. Task code never touches SQS.

Switch it on with one Celery setting::

    app.conf.sqs_heartbeat_enabled = True
    app.conf.task_acks_late = True          # the message must exist while the task runs

Workers started with the ``celery`` command load the package by themselves (it is a
``celery`` command plugin). Workers started from Python call :func:`install` first.
Every setting but the worker-wide ``sqs_heartbeat_own_process`` can be overridden
per task, under the same name, with ``@app.task(sqs_heartbeat_interval=10)`` or
``task_annotations``.
"""

from __future__ import annotations

from typing import Any

from . import signals
from ._control import TaskHeartbeat
from ._interrupt import MessageLost
from ._loss import Loss, LossReason
from ._report import Stats
from ._settings import SETTINGS, ConfigurationError, HeartbeatOptions, Setting

__all__ = [
    "SETTINGS",
    "ConfigurationError",
    "HeartbeatOptions",
    "Loss",
    "LossReason",
    "MessageLost",
    "Setting",
    "Stats",
    "TaskHeartbeat",
    "__version__",
    "current",
    "install",
    "options_for",
    "signals",
    "stats",
    "uninstall",
]

__version__ = "0.1.0"


def install(app: Any) -> None:
    """Heartbeat the tasks of *app* in workers started from Python.

    Needed only for ``app.Worker(...)``, ``app.worker_main(...)`` or
    ``celery.contrib.testing``; the ``celery`` command installs the heartbeat for every
    app by itself. Call it before the worker starts. Calling it again does nothing.
    """
    from . import _handlers

    _handlers.connect(app)


def uninstall() -> None:
    """Disconnect the heartbeat from Celery and stop this process's sidecar thread.

    For test suites that install and remove it around a test; harmless when not installed.
    """
    from . import _handlers

    _handlers.disconnect()


def options_for(task: Any) -> HeartbeatOptions:
    """The effective heartbeat options of *task*: its task options over the app's settings.

    Raises :class:`ConfigurationError` naming the setting or task option that is invalid.
    """
    from ._settings import resolve

    return resolve(task.app.conf, task)


def current() -> TaskHeartbeat | None:
    """The heartbeat of the task running in this thread, for manual control.

    None outside a task, and for a task without a heartbeat (not from SQS, heartbeat
    off, eager, no ``acks_late``). Call it from the task's own thread::

        hb = celery_sqs_heartbeat.current()
        if hb is not None:
            hb.extend(timedelta(minutes=20))     # once, now: the next step is slow
            hb.configure(interval=60)            # and beat less often from now on
    """
    from celery import current_task

    from . import _handlers

    task = current_task._get_current_object() if current_task else None
    return None if task is None else _handlers.current(task)


def stats() -> Stats:
    """Counters of the worker's heartbeats: active, beats sent, late, failed, lost.

    Worker-wide: in a prefork worker the pool children and the main process share them,
    so a task sees the same numbers as a ``worker_ready`` or ``celeryd_init`` receiver.
    """
    from . import _handlers

    return _handlers.counters().stats()
