"""Celery's signal handlers: each hands its signal to this process's role, under the
guard that keeps every error away from Celery and the task.

``task_postrun`` is final: no beat for the message follows it.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from celery import signals

from . import _celery, _drain, _process
from ._beats import LocalBeats
from ._control import TaskHeartbeat
from ._guard import Guard
from ._interrupt import MessageLost
from ._report import Counters
from ._roles import for_worker
from ._settings import prefetch_warnings, resolve_tasks, startup_warnings
from ._sidecar import Sidecar

logger = logging.getLogger("celery_sqs_heartbeat")

#: The apps the handlers serve; None: every app (the ``celery`` command's plugin).
_apps: weakref.WeakSet[Any] | None = weakref.WeakSet()


def _serves(app: Any) -> bool:
    return _apps is None or app in _apps


_PREPARING = Guard("prepare the worker")
_FINDING_SLOT = Guard("find this pool process's slot")
_CHECKING = Guard("check the worker's configuration")
_RECEIVING = Guard("start a heartbeat for a received message")
_STARTING = Guard("start a heartbeat")
_STOPPING = Guard("stop a heartbeat")
_SHUTTING_DOWN = Guard("stop the heartbeat thread")


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    with _PREPARING:
        if _serves(sender.app):
            _process.become(for_worker(sender))
            _drain.install(sender.app)  # before the worker builds its blueprints


def _on_worker_process_init(**_: Any) -> None:
    with _FINDING_SLOT:
        # The solo pool sends it in the worker's own process.
        _process.become(_process.role().in_pool_process())


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    with _CHECKING:
        app = sender.app
        if not _serves(app):
            return
        role = _process.role()
        found = role.options or resolve_tasks(app)
        pool = _celery.pool_name(sender)
        for line in [*startup_warnings(app, found), *prefetch_warnings(app, found, pool)]:
            logger.warning("%s", line)
        role.ready(sender)


# The three handlers of every message guard with try/except: see Guard.failed.


def _on_task_received(request: Any = None, **_: Any) -> None:
    try:
        _process.role().received(request)
    except Exception as exc:
        _RECEIVING.failed(exc)


def _on_task_prerun(task: Any = None, task_id: str = "", **_: Any) -> None:
    try:
        _process.role().tasks.started(task, task_id)
    except Exception as exc:
        _STARTING.failed(exc)


#: How many times a task's end is told, where a MessageLost sent as the task returned
#: lands in the telling (it is spent then: the end's first step stops any other).
_ENDED_TRIES = 3


def _on_task_postrun(task_id: str = "", retval: Any = None, **_: Any) -> None:
    stopped = isinstance(retval, MessageLost)  # Celery's retval of a failure: its error
    for _try in range(_ENDED_TRIES):
        try:
            _process.role().tasks.ended(task_id, stopped)
            return
        except MessageLost:
            continue
        except Exception as exc:
            _STOPPING.failed(exc)
            return


def _on_worker_shutdown(**_: Any) -> None:
    with _SHUTTING_DOWN:
        _process.role().shutdown()


# -- the public API's side -----------------------------------------------------------------


def current(task: Any) -> TaskHeartbeat | None:
    """The heartbeat of *task*, running in this thread (see ``celery_sqs_heartbeat.current``)."""
    return _process.role().tasks.current(task)


def counters() -> Counters:
    return _process.role().counters


def current_sidecar() -> Sidecar | None:
    """This process's own sidecar, if it has one (for tests and diagnostics)."""
    beats = _process.role().beats
    return beats.running if isinstance(beats, LocalBeats) else None


_HANDLERS = (
    (signals.worker_init, _on_worker_init),
    (signals.worker_process_init, _on_worker_process_init),
    (signals.worker_ready, _on_worker_ready),
    (signals.task_received, _on_task_received),
    (signals.task_prerun, _on_task_prerun),
    (signals.task_postrun, _on_task_postrun),
    (signals.worker_shutdown, _on_worker_shutdown),
)


def connect(app: Any | None) -> None:
    """Serve *app* (None: every app); connecting twice is harmless."""
    global _apps
    if app is None:
        _apps = None
    elif _apps is not None:
        _apps.add(app)
    for signal, handler in _HANDLERS:
        signal.connect(handler, weak=False, dispatch_uid=f"celery_sqs_heartbeat.{handler.__name__}")


def disconnect() -> None:
    """Stop serving every app and stop this process's sidecar."""
    global _apps
    for signal, handler in _HANDLERS:
        signal.disconnect(handler, dispatch_uid=f"celery_sqs_heartbeat.{handler.__name__}")
    _process.reset()
    _apps = weakref.WeakSet()
