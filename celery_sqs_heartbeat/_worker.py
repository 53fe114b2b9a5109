"""Celery's side: the signal handlers that start and stop heartbeats, and the worker checks.

* ``task_received`` (the worker's main process, for every message) starts the message's
  heartbeat: it beats from the receipt until the message is settled, through any wait in
  the prefetch buffer or for an ETA.
* ``task_prerun`` and ``task_postrun`` (fired from a ``finally``) run where the task runs.
  In the worker's main process (threads, solo, gevent, eventlet) they tell the sidecar
  directly; in a prefork pool child they write the child's slot (``_slots``), which the
  main process reads before each beat. Either way ``task_postrun`` is final: no beat for
  the message follows it. Both are a dict lookup and a lock: no I/O.
* ``worker_init`` validates every heartbeat setting and task option and stops the worker
  on a bad one (``SystemExit``: Celery swallows any ``Exception`` a handler raises), and
  maps the prefork slots before the pool forks.
* ``worker_ready`` logs, once, what would make the heartbeat useless, and starts the
  sidecar thread, with an SQS client that shares kombu's parsed models: after the pool
  has forked, so the children share none of its memory. (A message that comes before
  makes it at once.)

Everything a process keeps is in one :class:`_Process`, replaced whole in a forked child.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from celery import signals

from ._client import BrokerInfo, Clients, call_timeout, kombu_loader
from ._control import InChild, InProcess, TaskHeartbeat
from ._heartbeat import Heartbeat
from ._report import COUNTS_SIZE, Counters, Reporter
from ._send import Sender
from ._settings import (
    ConfigurationError,
    HeartbeatOptions,
    enabled_tasks,
    resolve,
    resolve_tasks,
    shortest_interval,
    startup_warnings,
)
from ._sidecar import Sidecar
from ._slots import Slots

logger = logging.getLogger("celery_sqs_heartbeat")

#: Options used for a task whose options could not be read: no heartbeat.
DISABLED = HeartbeatOptions(enabled=False, interval=30, visibility_timeout=120, max_duration=None)
#: How long worker shutdown waits for the sidecar thread to finish a call.
SHUTDOWN_JOIN_TIMEOUT = 2.0

F = TypeVar("F", bound=Callable[..., None])


class _Process:
    """What the heartbeat keeps in one process.

    The worker's main process has the sidecar; a prefork pool child has its slot and
    shares the worker's counters; any other process has neither until it needs one.
    """

    def __init__(
        self,
        apps: weakref.WeakSet[Any] | None,
        options: dict[str, HeartbeatOptions] | None = None,
        slots: Slots | None = None,
        counters: Counters | None = None,
    ) -> None:
        #: Apps the handlers serve; None: every app (the ``celery`` command's plugin).
        self.apps = apps
        #: Effective options by task name, resolved at worker start (or on first use).
        self.options = options if options is not None else {}
        self.slots = slots
        self.counters = counters if counters is not None else Counters()
        #: Whether this is a prefork pool child, and its slot there.
        self.pool_child = False
        self.pid = os.getpid()
        self.slot: int | None = None
        self.sidecar: Sidecar | None = None
        #: A pool child's own sender, made on its task's first manual extension.
        self.sender: Sender | None = None
        self.lock = threading.Lock()
        #: Receipt handle of each running task's message, by (thread, task id): kombu may
        #: change the message's properties after prerun (requeue), and a retried task
        #: keeps its id but runs in another thread (or after this one ends).
        self.running: dict[tuple[int, str], str] = {}
        self.noted: set[str] = set()
        #: Whether an app's broker is SQS, looked up once.
        self.sqs: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()

    def for_child(self) -> _Process:
        """The state of a forked child: the same apps, options, slots and counters."""
        return _Process(self.apps, dict(self.options), self.slots, self.counters)

    def serves(self, app: Any) -> bool:
        return self.apps is None or app in self.apps

    def note_once(self, key: str, level: int, message: str, *args: object) -> None:
        if key not in self.noted:
            self.noted.add(key)
            logger.log(level, message, *args, exc_info=level >= logging.ERROR)

    def options_for(self, task: Any) -> HeartbeatOptions:
        """The task's options; DISABLED for apps not served or options that are wrong."""
        options = self.options.get(task.name)
        if options is None:
            options = DISABLED
            if self.serves(task.app):
                try:
                    options = resolve(task.app.conf, task)
                except ConfigurationError as exc:
                    logger.error("%s; task %s runs without a heartbeat.", exc, task.name)
            self.options[task.name] = options
        return options

    def is_sqs(self, app: Any) -> bool:
        known = self.sqs.get(app)
        if known is None:
            known = self.sqs[app] = BrokerInfo.from_app(app) is not None
        return known


_state = _Process(weakref.WeakSet())


def _forget_in_child() -> None:
    global _state
    _state = _state.for_child()


os.register_at_fork(after_in_child=_forget_in_child)


def _never_raises(what: str) -> Callable[[F], F]:
    """The one guard of every handler: an error here is logged once and never reaches
    Celery or the task; the task runs without a heartbeat."""

    def decorate(handler: F) -> F:
        @functools.wraps(handler)
        def guarded(*args: Any, **kwargs: Any) -> None:
            try:
                handler(*args, **kwargs)
            except Exception:
                _state.note_once(
                    what, logging.ERROR, "celery-sqs-heartbeat: could not %s; tasks run on.", what
                )

        return guarded  # type: ignore[return-value]

    return decorate


# -- the sidecar ---------------------------------------------------------------------------


def current_sidecar() -> Sidecar | None:
    """This process's sidecar, if it has one (for tests and diagnostics)."""
    return _state.sidecar


def ensure_sidecar(app: Any, consumer: Any = None) -> Sidecar | None:
    """This process's running sidecar, made on first use; None when the broker is not SQS.

    Given the worker's *consumer*, its SQS client shares kombu's parsed models."""
    state = _state
    if state.sidecar is not None:
        return state.sidecar
    with state.lock:
        if state.sidecar is None:
            broker = BrokerInfo.from_app(app)
            if broker is None:
                return None
            clients = _clients(app, broker, state, kombu_loader(consumer))
            state.sidecar = Sidecar(
                Sender(clients.for_queue),
                Reporter(state.counters, region=lambda: clients.region),
                call_timeout=clients.timeout,
                fence=state.slots,
            )
            state.sidecar.run_in_background()
        return state.sidecar


def _clients(app: Any, broker: BrokerInfo, state: _Process, loader: Any = None) -> Clients:
    timeout = call_timeout(shortest_interval(app, state.options))
    clients = Clients(broker, timeout=timeout, loader=loader)
    # Made now, before any beat: building a client is ~100 ms of Python that a busy
    # process would slow down many times over.
    clients.warm_up()
    return clients


def shutdown_sidecar() -> None:
    state = _state
    with state.lock:
        sidecar, state.sidecar = state.sidecar, None
    if sidecar is not None:
        sidecar.shutdown(SHUTDOWN_JOIN_TIMEOUT)


def _child_sender(app: Any) -> Sender:
    """A pool child's sender, for its task's manual extension; made on first use."""
    state = _state
    with state.lock:
        if state.sender is None:
            broker = BrokerInfo.from_app(app)
            assert broker is not None  # the task came from SQS
            state.sender = Sender(_clients(app, broker, state).for_queue)
        return state.sender


# -- worker start ---------------------------------------------------------------------------


@_never_raises("prepare the worker")
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    app = sender.app
    if not _state.serves(app):
        return
    try:
        _state.options = resolve_tasks(app)
    except ConfigurationError as exc:
        # SystemExit is not an Exception: it stops the worker with status 1 and the
        # message on stderr (logging is not set up yet at worker_init).
        raise SystemExit(str(exc)) from None
    if not enabled_tasks(_state.options) or not _state.is_sqs(app):
        return
    if _is_prefork(sender.pool_cls):
        # Before the pool forks: every child inherits the mapping.
        slots = Slots(_pool_size(sender), COUNTS_SIZE)
        _state.slots = slots
        _state.counters = Counters(slots.extra(), lock=_fork_lock())


def _pool_size(worker: Any) -> int:
    """The most pool processes the worker may run: its concurrency, or the maximum of
    ``--autoscale max,min`` (both resolved by Celery only after ``worker_init``)."""
    autoscale = getattr(worker, "options", {}).get("autoscale") or ()
    if isinstance(autoscale, str):
        autoscale = [int(autoscale.partition(",")[0])]
    sizes = [n for n in (worker.concurrency, *autoscale[:1]) if isinstance(n, int)]
    return max(sizes) if sizes else os.cpu_count() or 1


def _fork_lock() -> Any:
    import multiprocessing

    return multiprocessing.get_context("fork").Lock()


@_never_raises("find this pool process's slot")
def _on_worker_process_init(**_: Any) -> None:
    from billiard.process import current_process  # type: ignore[import-untyped]

    slots = _state.slots
    if slots is None:
        return  # not a prefork pool child: the solo pool sends this signal too
    _state.pool_child = True
    index = getattr(current_process(), "index", None)
    if isinstance(index, int) and 0 <= index < slots.capacity:
        _state.slot = index
    else:
        _state.note_once(
            "no-slot",
            logging.WARNING,
            "celery-sqs-heartbeat: pool process %s has no slot (%d mapped); the main process "
            "beats its tasks' messages until Celery settles them.",
            index,
            slots.capacity,
        )


@_never_raises("check the worker's configuration")
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    app = sender.app
    if not _state.serves(app):
        return
    found = _state.options or resolve_tasks(app)
    for line in startup_warnings(app, found):
        logger.warning("%s", line)
    if not enabled_tasks(found):
        return
    pool = getattr(sender, "pool", None)
    if getattr(pool, "is_green", False):
        margin = min(o.visibility_timeout - o.interval for o in found.values() if o.enabled)
        logger.warning(
            "celery-sqs-heartbeat: in the %s pool the heartbeat is a greenlet like the "
            "tasks: a task that never yields (computes for %g s or more without I/O or a "
            "sleep) starves it, and its message is delivered again. Run CPU-bound tasks in "
            "a prefork worker.",
            type(pool).__module__.rpartition(".")[2],
            margin,
        )
    if not _state.is_sqs(app):
        logger.info(
            "celery-sqs-heartbeat: the broker is not SQS, so no heartbeat is sent; "
            "tasks run as usual."
        )
    else:
        ensure_sidecar(app, sender)


# -- messages and tasks -------------------------------------------------------------------


@_never_raises("start a heartbeat for a received message")
def _on_task_received(request: Any = None, **_: Any) -> None:
    # The worker's main process, for every message: a few dict lookups and one lock.
    task = request.task
    options = _state.options_for(task)
    if not options.enabled:
        return
    message = request.message
    queue_url = (message.delivery_info or {}).get("sqs_queue")
    if not queue_url or message.acknowledged:
        return  # not from SQS (said once at worker start), or already settled
    sidecar = _state.sidecar or ensure_sidecar(task.app)
    if sidecar is not None:
        hb = Heartbeat(
            message.delivery_tag,
            queue_url,
            options,
            time.monotonic(),
            task.name,
            request.id,
            is_settled=lambda: bool(message.acknowledged),
        )
        sidecar.add(hb)


@_never_raises("start a heartbeat")
def _on_task_prerun(task: Any = None, task_id: str = "", **_: Any) -> None:
    # The hot path: a few dict lookups and one lock.
    state = _state
    if not state.options_for(task).enabled:
        return
    request = task.request
    if request.is_eager:
        return
    try:
        properties = request.properties
        receipt_handle = str(properties["delivery_tag"])
        queue_url = str(properties["delivery_info"]["sqs_queue"])
    except (TypeError, KeyError):
        if state.is_sqs(task.app):  # else the worker already said so, once
            state.note_once(
                "not-sqs",
                logging.INFO,
                "celery-sqs-heartbeat: task %s came without SQS message properties; "
                "it runs without a heartbeat.",
                task.name,
            )
        return
    if state.pool_child:
        # The main process beats the message; a child never makes a sidecar of its own.
        if state.slot is None or state.slots is None:
            return
        state.slots.started(state.slot, receipt_handle, state.pid)
    else:
        sidecar = state.sidecar or ensure_sidecar(task.app)
        if sidecar is None:
            return
        if sidecar.run(receipt_handle) is None:
            # Not seen at its receipt (a worker started from Python without the
            # heartbeat installed yet): beat it from now on.
            options = state.options_for(task)
            hb = Heartbeat(receipt_handle, queue_url, options, time.monotonic(), task.name, task_id)
            hb.run(hb.received)
            if not task.acks_late or not sidecar.add(hb):
                return
    state.running[threading.get_ident(), task_id] = receipt_handle


@_never_raises("stop a heartbeat")
def _on_task_postrun(task_id: str = "", **_: Any) -> None:
    state = _state
    receipt_handle = state.running.pop((threading.get_ident(), task_id), None)
    if receipt_handle is None:
        return
    if state.slot is not None:
        assert state.slots is not None
        state.slots.ended(state.slot)
    elif state.sidecar is not None:
        state.sidecar.stop(receipt_handle)


@_never_raises("stop the heartbeat thread")
def _on_worker_shutdown(**_: Any) -> None:
    shutdown_sidecar()


def _is_prefork(pool_cls: Any) -> bool:
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool

    try:
        cls = get_implementation(pool_cls) if isinstance(pool_cls, str) else pool_cls
        return isinstance(cls, type) and issubclass(cls, TaskPool)
    except Exception:
        return False


# -- the public API's side -----------------------------------------------------------------


def current(task: Any) -> TaskHeartbeat | None:
    """The heartbeat of *task*, running in this thread (see ``celery_sqs_heartbeat.current``)."""
    state = _state
    request = getattr(task, "request", None)
    task_id = getattr(request, "id", None)
    receipt_handle = state.running.get((threading.get_ident(), task_id or ""))
    if receipt_handle is None:
        return None
    if state.slot is not None and state.slots is not None:
        options = state.options_for(task)
        queue_url = str(request.properties["delivery_info"]["sqs_queue"])  # type: ignore[union-attr]
        hb = Heartbeat(
            receipt_handle, queue_url, options, time.monotonic(), task.name, task_id or ""
        )
        hb.run(hb.received)
        pace = state.slots.pace(state.slot)
        if pace is not None:
            hb.interval, hb.visibility_timeout = pace
        reporter = Reporter(state.counters, region=lambda: None)
        control = InChild(state.slots, state.slot, lambda: _child_sender(task.app), reporter)
        return TaskHeartbeat(control, hb)
    sidecar = state.sidecar
    found = None if sidecar is None else sidecar.get(receipt_handle)
    if sidecar is None or found is None:
        return None
    return TaskHeartbeat(InProcess(sidecar), found)


def counters() -> Counters:
    return _state.counters


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
    state = _state
    if app is None:
        state.apps = None
    elif state.apps is not None:
        state.apps.add(app)
    state.options.clear()  # options depend on which apps are served
    for signal, handler in _HANDLERS:
        signal.connect(handler, weak=False, dispatch_uid=f"celery_sqs_heartbeat.{handler.__name__}")


def disconnect() -> None:
    """Stop serving every app and stop this process's sidecar."""
    for signal, handler in _HANDLERS:
        signal.disconnect(handler, dispatch_uid=f"celery_sqs_heartbeat.{handler.__name__}")
    shutdown_sidecar()
    global _state
    _state = _Process(weakref.WeakSet())
