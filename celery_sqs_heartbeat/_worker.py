"""Celery's side: the signal handlers that start and stop heartbeats, and the worker checks.

* ``task_received`` (in the worker's main process) starts a *waiting* heartbeat for a
  message that the worker holds before its task runs: prefetched, or held for its ETA.
  It ends once the task started and the task's own heartbeat has it covered.
* ``task_prerun`` starts a heartbeat for the running task's own SQS message (taking
  over the waiting one when the task runs in the same process) and ``task_postrun``
  (fired from a ``finally``) stops it, so every way a task ends in its process stops
  the beat. Both are a dict lookup and a lock: no I/O.
* ``worker_init`` validates every heartbeat setting and task option and stops the worker
  on a bad one (``SystemExit``: Celery swallows any ``Exception`` a handler raises).
* ``worker_ready`` logs, once, what would make the heartbeat useless (no ``acks_late``,
  a broker that is not SQS).
* The sidecar thread and its SQS client are made in each process that beats, before
  its first message where Celery tells us (``worker_process_init`` in a prefork child,
  ``worker_ready`` in a prefork worker's main process, ``worker_init`` for the other
  pools), and forgotten in a forked child.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Iterable
from threading import get_ident
from typing import Any

from celery import signals

from ._client import BrokerInfo, Clients, call_timeout
from ._schedule import Heartbeat, Watch
from ._settings import SETTINGS, ConfigurationError, HeartbeatOptions, raw_value, resolve
from ._sidecar import Sidecar

logger = logging.getLogger("celery_sqs_heartbeat")

#: Options used for a task whose options could not be read: no heartbeat.
DISABLED = HeartbeatOptions(enabled=False, interval=30, visibility_timeout=120, max_duration=None)
#: How long worker shutdown waits for the sidecar thread to finish a call.
SHUTDOWN_JOIN_TIMEOUT = 2.0

_lock = threading.Lock()
_sidecar: Sidecar | None = None
#: Effective options by task name, resolved once per process (inherited by forks).
_options: dict[str, HeartbeatOptions] = {}
#: Apps the handlers serve; None: every app (the ``celery`` command's plugin).
_apps: weakref.WeakSet[Any] | None = weakref.WeakSet()
_noted: set[str] = set()
#: Receipt handle of each running task's message, by (thread, task id): postrun finds it
#: here, since kombu may change the message's properties after prerun (requeue). A
#: retried task keeps its id but runs in another thread (or after this one ends).
_running: dict[tuple[int, str], str] = {}
#: Whether an app's broker is SQS, looked up once per process.
_broker_kind: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


# -- per-process state ---------------------------------------------------------------


def _forget_in_child() -> None:
    """A forked child has no sidecar thread: it must make its own, with its own client."""
    global _sidecar, _lock
    if _sidecar is not None:
        _sidecar.forget_after_fork()
    _sidecar = None
    _lock = threading.Lock()
    _noted.clear()
    _running.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _note_once(key: str, level: int, message: str, *args: object, exc_info: bool = False) -> None:
    if key not in _noted:
        _noted.add(key)
        logger.log(level, message, *args, exc_info=exc_info)


def current_sidecar() -> Sidecar | None:
    """This process's sidecar, if it has one (for tests and diagnostics)."""
    return _sidecar


def ensure_sidecar(app: Any) -> Sidecar | None:
    """This process's running sidecar, made on first use; None when the broker is not SQS."""
    global _sidecar
    sidecar = _sidecar
    if sidecar is not None:
        return sidecar
    with _lock:
        if _sidecar is not None:
            return _sidecar
        broker = BrokerInfo.from_app(app)
        if broker is None:
            return None
        clients = Clients(broker, timeout=call_timeout(shortest_interval(app)))
        # Made now, before any task runs: building a client is ~100 ms of Python that a
        # CPU-bound task would slow down many times over.
        clients.warm_up()
        sidecar = Sidecar(
            clients.for_queue, call_timeout=clients.timeout, region=lambda: clients.region
        )
        sidecar.run_in_background()
        _sidecar = sidecar
        return sidecar


def shutdown_sidecar() -> None:
    global _sidecar
    with _lock:
        sidecar, _sidecar = _sidecar, None
    if sidecar is not None:
        sidecar.shutdown(SHUTDOWN_JOIN_TIMEOUT)


# -- options ---------------------------------------------------------------------------


def check_app(app: Any) -> dict[str, HeartbeatOptions]:
    """Resolve and validate the global settings and every registered task's options."""
    resolve(app.conf)
    found = {name: resolve(app.conf, task) for name, task in sorted(app.tasks.items())}
    _options.update(found)
    return found


def task_rows(app: Any, options: dict[str, HeartbeatOptions]) -> list[dict[str, Any]]:
    """Each of the app's own tasks with its effective options, queue and overrides."""
    rows = []
    for name, o in options.items():
        if name.startswith("celery."):
            continue
        task = app.tasks[name]
        rows.append(
            {
                "task": name,
                "enabled": o.enabled,
                "interval": o.interval,
                "visibility_timeout": o.visibility_timeout,
                "max_duration": o.max_duration,
                "acks_late": bool(task.acks_late),
                "queue": app.amqp.router.route({}, name)["queue"].name,
                "overrides": sorted(
                    s.name for s in SETTINGS if raw_value(app.conf, task, s.name)[1]
                ),
            }
        )
    return rows


def shortest_interval(app: Any) -> float:
    """The shortest interval of the heartbeat-enabled tasks resolved so far, else the
    app's own: the heartbeat's SQS calls time out well within it."""
    enabled = [o.interval for o in _options.values() if o.enabled]
    return min(enabled) if enabled else resolve(app.conf).interval


def _enabled_tasks(found: dict[str, HeartbeatOptions]) -> list[str]:
    return [name for name, o in found.items() if o.enabled and not name.startswith("celery.")]


def _serves(app: Any) -> bool:
    return _apps is None or app in _apps


# -- signal handlers -----------------------------------------------------------------


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    app = sender.app
    if not _serves(app):
        return
    try:
        found = check_app(app)
    except ConfigurationError as exc:
        # Celery logs and swallows an Exception raised by a handler; SystemExit is not
        # one, so this stops the worker with status 1 and the message on stderr
        # (logging is not set up yet at worker_init).
        raise SystemExit(str(exc)) from None
    if _enabled_tasks(found) and not _is_prefork(sender.pool_cls):
        # The tasks run in this process: make the sidecar before the first one.
        ensure_sidecar(app)


def _on_worker_process_init(**_: Any) -> None:
    from celery import current_app

    app = current_app._get_current_object()
    if _serves(app) and any(o.enabled for o in _options.values()):
        ensure_sidecar(app)


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    app = sender.app
    if not _serves(app):
        return
    try:
        found = check_app(app)
    except ConfigurationError:  # already reported by worker_init
        return
    for line in startup_warnings(app, found):
        logger.warning("%s", line)
    if not _enabled_tasks(found):
        return
    pool = getattr(sender, "pool", None)
    if getattr(pool, "is_green", False):
        margin = min(o.visibility_timeout - o.interval for o in found.values() if o.enabled)
        logger.warning(
            "celery-sqs-heartbeat: in the %s pool the heartbeat is a greenlet like the "
            "tasks: a task that never yields (computes for %g s or more without I/O or a "
            "sleep) starves it, and its message is delivered again. Run CPU-bound tasks in "
            "a prefork or threads worker.",
            type(pool).__module__.rpartition(".")[2],
            margin,
        )
    if not _broker_is_sqs(app):
        logger.info(
            "celery-sqs-heartbeat: the broker is not SQS, so no heartbeat is sent; "
            "tasks run as usual."
        )
    elif _is_prefork(type(getattr(sender, "pool", None))):
        # Messages waiting in this (main) process are beaten from here; the pool's
        # children exist by now, so none is forked with this thread running.
        ensure_sidecar(app)


def startup_warnings(app: Any, found: dict[str, HeartbeatOptions]) -> Iterable[str]:
    """What in the configuration leaves heartbeat-enabled tasks unprotected."""
    enabled = _enabled_tasks(found)
    if not enabled:
        return
    early = [n for n in enabled if not app.tasks[n].acks_late]
    if early:
        yield (
            "celery-sqs-heartbeat: these heartbeat-enabled tasks do not use acks_late, so "
            "their message is deleted before they run and nothing can be extended: "
            + ", ".join(early)
            + ". Set task_acks_late = True or acks_late=True on the task."
        )


def _task_options(task: Any) -> HeartbeatOptions:
    """The task's options, resolved once per process; DISABLED for apps not served."""
    options = _options.get(task.name)
    if options is None:
        options = DISABLED
        if _serves(task.app):
            options = resolve(task.app.conf, task)
        _options[task.name] = options
    return options


def _on_task_received(request: Any = None, **_: Any) -> None:
    # In the worker's main process, for every message received: a few dict lookups and
    # one lock when the heartbeat is on, as at prerun.
    task: Any = None
    try:
        task = request.task
        options = _task_options(task)
        if not options.enabled:
            return
        message = request.message
        queue_url = (message.delivery_info or {}).get("sqs_queue")
        if not queue_url or message.acknowledged:
            return  # not from SQS (said once at worker start), or already settled
        sidecar = _sidecar if _sidecar is not None else ensure_sidecar(task.app)
        if sidecar is not None:
            sidecar.wait(
                message.delivery_tag,
                queue_url,
                options,
                _watch(request, message),
                task.name,
                request.id,
            )
    except ConfigurationError as exc:
        _options[task.name] = DISABLED
        logger.error("%s; task %s runs without a heartbeat.", exc, task.name)
    except Exception:
        _note_once(
            "received-error",
            logging.ERROR,
            "celery-sqs-heartbeat: could not cover a message waiting in the worker; it "
            "may be delivered again if it waits longer than the queue's timeout.",
            exc_info=True,
        )


def _watch(request: Any, message: Any) -> Watch:
    """Whether a waiting message's task started: read from Celery's request by the
    heartbeat thread when a beat falls due (``time_start`` is set when the pool accepts
    the task, from the child in a prefork pool)."""

    def watch() -> float | None:
        if message.acknowledged:
            return -math.inf
        started = request.time_start
        if started is None:
            return None
        return float(time.monotonic() - (time.time() - started))

    return watch


def _on_task_prerun(task: Any = None, task_id: str = "", **_: Any) -> None:
    # The hot path: a task whose options are cached pays for a few dict lookups, one
    # lock and one small object.
    try:
        options = _task_options(task)
        if not options.enabled:
            return
        request = task.request
        if request.is_eager:
            return
        try:
            properties = request.properties
            receipt_handle = properties["delivery_tag"]
            queue_url = properties["delivery_info"]["sqs_queue"]
        except (TypeError, KeyError):
            if _broker_is_sqs(task.app):  # else the worker already said so, once
                _note_once(
                    "not-sqs",
                    logging.INFO,
                    "celery-sqs-heartbeat: task %s came without SQS message properties; "
                    "it runs without a heartbeat.",
                    task.name,
                )
            return
        if not task.acks_late:
            return  # its message is already deleted; warned at worker start
        sidecar = _sidecar if _sidecar is not None else ensure_sidecar(task.app)
        if sidecar is not None and sidecar.start(
            receipt_handle, queue_url, options, task.name, task_id
        ):
            _running[get_ident(), task_id] = receipt_handle
    except ConfigurationError as exc:
        _options[task.name] = DISABLED
        logger.error("%s; task %s runs without a heartbeat.", exc, task.name)
    except Exception:
        _note_once(
            "prerun-error",
            logging.ERROR,
            "celery-sqs-heartbeat: could not start a heartbeat; tasks run without one.",
            exc_info=True,
        )


def running_heartbeat(task_id: str) -> tuple[Sidecar, Heartbeat] | None:
    """The sidecar and heartbeat of the task *task_id* running in this thread."""
    receipt_handle = _running.get((get_ident(), task_id))
    sidecar = _sidecar
    if receipt_handle is None or sidecar is None:
        return None
    heartbeat = sidecar.get(receipt_handle)
    return None if heartbeat is None else (sidecar, heartbeat)


def _on_task_postrun(task_id: str = "", **_: Any) -> None:
    try:
        receipt_handle = _running.pop((get_ident(), task_id), None)
        if receipt_handle is not None and _sidecar is not None:
            _sidecar.stop(receipt_handle)
    except Exception:
        _note_once(
            "postrun-error",
            logging.ERROR,
            "celery-sqs-heartbeat: could not stop a heartbeat.",
            exc_info=True,
        )


def _broker_is_sqs(app: Any) -> bool:
    known = _broker_kind.get(app)
    if known is None:
        known = _broker_kind[app] = BrokerInfo.from_app(app) is not None
    return known


def _on_shutdown(**_: Any) -> None:
    shutdown_sidecar()


def _is_prefork(pool_cls: Any) -> bool:
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool

    try:
        cls = get_implementation(pool_cls) if isinstance(pool_cls, str) else pool_cls
        return isinstance(cls, type) and issubclass(cls, TaskPool)
    except Exception:
        return False


_HANDLERS = (
    (signals.worker_init, _on_worker_init),
    (signals.worker_process_init, _on_worker_process_init),
    (signals.worker_ready, _on_worker_ready),
    (signals.task_received, _on_task_received),
    (signals.task_prerun, _on_task_prerun),
    (signals.task_postrun, _on_task_postrun),
    (signals.worker_process_shutdown, _on_shutdown),
    (signals.worker_shutdown, _on_shutdown),
)


def connect(app: Any | None) -> None:
    """Serve *app* (None: every app); connecting twice is harmless."""
    global _apps
    if app is None:
        _apps = None
    elif _apps is not None:
        _apps.add(app)
    _options.clear()  # options cache which apps are served
    for signal, handler in _HANDLERS:
        signal.connect(handler, weak=False, dispatch_uid=f"celery_sqs_heartbeat.{handler.__name__}")


def disconnect() -> None:
    """Stop serving every app and stop this process's sidecar."""
    global _apps
    for signal, handler in _HANDLERS:
        signal.disconnect(handler, dispatch_uid=f"celery_sqs_heartbeat.{handler.__name__}")
    _apps = weakref.WeakSet()
    _options.clear()
    shutdown_sidecar()
