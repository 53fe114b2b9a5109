"""Celery's side: the signal handlers, and the part each process plays in a worker.

Every handler hands its signal to this process's *role*, one object built at a named
signal and replaced whole at fork, so no handler asks which pool or process it runs in:

* :class:`Main`, the worker's main process, built at ``worker_init`` (before the pool
  forks, so that it can map the prefork slots). It receives every message and beats it
  from ``task_received`` until Celery settles it, from a sidecar started at
  ``worker_ready`` (or by a message that comes before). In the other pools, where the
  beat process is off or cannot be made, it also runs the tasks: its ``task_prerun`` and
  ``task_postrun`` tell the sidecar directly.
* :class:`Delegating` instead in a threads, solo, gevent or eventlet worker (unless
  ``sqs_heartbeat_beat_process`` is False): the tasks run in this process, so the beats
  come from a beat process it forks at ``worker_ready`` (``_beat``). It hands that
  process every message it receives, and each task writes a slot, as a prefork child
  does.
* :class:`Child`, a prefork pool child, made at ``worker_process_init`` from the
  :class:`Forked` role a fork of the main process starts with. Its ``task_prerun`` and
  ``task_postrun`` write its slot (``_slots``), which the main process reads before each
  beat.
* :class:`Role` itself in every other process, and in a worker whose heartbeat is off
  (:class:`NotSQS` where the broker is not SQS): every handler does nothing.

Either way ``task_postrun`` is final: no beat for the message follows it. A bad setting
stops the worker at ``worker_init`` (``SystemExit``: Celery swallows any ``Exception`` a
handler raises); an error in a handler is logged once and never reaches the task.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Collection
from typing import Any

from celery import signals

from ._beat import BeatProcess, supported, warm_up
from ._client import BrokerInfo, Clients, call_timeout, kombu_loader
from ._control import InChild, InProcess, TaskHeartbeat
from ._heartbeat import Ended, Heartbeat
from ._report import Counters, Reporter
from ._send import Answer, Sender
from ._settings import (
    ConfigurationError,
    HeartbeatOptions,
    beat_process,
    enabled_tasks,
    prefetch_warnings,
    resolve,
    resolve_tasks,
    shortest_interval,
    startup_warnings,
)
from ._sidecar import Sidecar
from ._slots import Slots, available, key_of, platform_report
from ._system import can_die_with_parent

logger = logging.getLogger("celery_sqs_heartbeat")

#: Options used for a task whose options could not be read: no heartbeat.
DISABLED = HeartbeatOptions(enabled=False, interval=30, visibility_timeout=120, max_duration=None)
#: How long worker shutdown waits for the sidecar thread to finish a call.
SHUTDOWN_JOIN_TIMEOUT = 2.0
#: How many of the last tasks to end a worker with a beat process remembers in its slots
#: (32 KB): the beat process knows their messages' tasks ended after their slot moved on,
#: until the worker tells it that Celery settled them (within a fifth of a second).
ENDED_RING = 4096
#: How long the shutdown's drain waits in all for the beat process to hand messages back,
#: and again to end their heartbeats: a few client time-outs.
ASK_TIMEOUT = 15.0
#: The key under which the main process gives a prefork child a message's receipt time,
#: in the copy of the message's properties that Celery's request carries to the child
#: (``task.request.properties[RECEIVED]`` there): SQS's 12-hour limit counts from it,
#: and the child's own extensions must respect it. Properties are not sent on with a
#: retry, a replace or a result, and kombu's own dict is left as it is.
RECEIVED = "sqs_heartbeat_received"

_noted: set[str] = set()


def _note_once(key: str, level: int, message: str, *args: object, exc_info: Any = None) -> None:
    if key not in _noted:
        _noted.add(key)
        logger.log(level, message, *args, exc_info=exc_info)


class _Guard:
    """The one guard of every handler: an error inside is logged once and never reaches
    Celery or the task, which runs on without a heartbeat. (``SystemExit`` is no
    ``Exception``: a bad setting still stops the worker.)"""

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: Any, trace: Any) -> bool:
        if kind is None or not issubclass(kind, Exception):
            return False
        _note_once(
            self._what,
            logging.ERROR,
            "celery-sqs-heartbeat: could not %s; tasks run on.",
            self._what,
            exc_info=(kind, error, trace),
        )
        return True


def _late_options(task: Any) -> HeartbeatOptions:
    """Options of a task registered after the worker started: read, not remembered."""
    try:
        return resolve(task.app.conf, task)
    except ConfigurationError as exc:
        _note_once(
            task.name, logging.ERROR, "%s; task %s runs without a heartbeat.", exc, task.name
        )
        return DISABLED


def _clients(
    app: Any, options: dict[str, HeartbeatOptions], loader: Any = None, *, warm: bool = True
) -> Clients:
    broker = BrokerInfo.from_app(app)
    assert broker is not None  # a Main role is made for an SQS broker only
    clients = Clients(broker, timeout=call_timeout(shortest_interval(app, options)), loader=loader)
    if warm:
        # Made now, before any beat: building a client is ~100 ms of Python that a busy
        # process would slow down many times over.
        clients.warm_up()
    return clients


def _heartbeat(
    request: Any, known: dict[str, HeartbeatOptions], slots: Slots | None, *, settled: bool
) -> Heartbeat | None:
    """The heartbeat of a message just received, or None if it gets none.

    *known* holds the options resolved at the worker's start. With *slots* its task
    writes a slot, and reads the receipt time from the request's properties. With
    *settled* the heartbeat asks Celery's message whether it was settled."""
    # For every message: a few lookups, one small object.
    task = request.task
    options = known.get(task.name) or _late_options(task)
    if not options.enabled:
        return None
    message = request.message
    queue_url = (message.delivery_info or {}).get("sqs_queue")
    if not queue_url or message.acknowledged:
        return None  # not from SQS, or already settled
    now = time.monotonic()
    if slots is not None:
        carried = request.request_dict
        carried["properties"] = {**(carried.get("properties") or {}), RECEIVED: now}
    return Heartbeat(
        message.delivery_tag,
        queue_url,
        options,
        now,
        task.name,
        request.id,
        (lambda: bool(message.acknowledged)) if settled else None,
    )


def _receipt_handle(request: Any) -> str | None:
    """The receipt handle of the message of a running task's *request* (Celery's
    ``task.request``, read once: it is a property); None: eager, or not from SQS."""
    try:
        return request.properties["delivery_tag"]  # type: ignore[no-any-return]
    except (TypeError, KeyError):
        return None


def _margin(options: dict[str, HeartbeatOptions]) -> float:
    """The shortest margin of the tasks' options: how long a heartbeat can go without
    a beat before its message is delivered again (window - interval)."""
    margins = [o.visibility_timeout - o.interval for o in options.values() if o.enabled]
    return min(margins, default=math.inf)


def _say_platform(*, helpers: bool) -> None:
    """Say once, at start, each way this machine watches processes less exactly than it
    could (no pidfd, no /proc; with *helpers*, no ``PR_SET_PDEATHSIG``)."""
    lines = platform_report()
    if helpers and not can_die_with_parent():
        lines.append(
            "no PR_SET_PDEATHSIG (not Linux): the keeper and the beat process notice the "
            "worker's death at their next look (within 0.2 s), not at once"
        )
    for line in lines:
        _note_once(
            line,
            logging.WARNING,
            "celery-sqs-heartbeat: this machine watches processes less exactly: %s.",
            line,
        )


def _say_shared(why: str, *, green: bool, margin: float) -> None:
    """Say, once, that the beats share the tasks' process, and what that costs."""
    logger.warning(
        "celery-sqs-heartbeat: the beats come from a %s of the worker's own process "
        "(%s): a task that %s for %g s or more starves them, and its message is "
        "delivered again.",
        "greenlet" if green else "thread",
        why,
        "never yields (computes without I/O or a sleep)"
        if green
        else "holds the GIL (one long C call)",
        margin,
    )


# -- the roles ------------------------------------------------------------------------------


class Role:
    """A process that serves no heartbeat: every handler does nothing."""

    def __init__(self) -> None:
        #: Effective options by task name, resolved at worker start.
        self.options: dict[str, HeartbeatOptions] = {}
        self.counters = Counters()

    def received(self, request: Any) -> None: ...

    def prerun(self, task: Any, task_id: str) -> None: ...

    def postrun(self, task_id: str) -> None: ...

    def current(self, task: Any) -> TaskHeartbeat | None:
        return None

    def ready(self, consumer: Any) -> None: ...

    # -- at shutdown (``_drain``), from the worker's main thread

    def holds(self, receipt_handle: str) -> bool:
        """Whether this process's heartbeat beats the message."""
        return False

    def hand_back(self, receipt_handles: Collection[str]) -> list[tuple[Heartbeat, Answer]]:
        """End these messages' heartbeats and make them visible now (``Sidecar.hand_back``)."""
        return []

    def stop_all(self, reason: Ended, keep: Collection[str]) -> int:
        """End every heartbeat but those of *keep* (``Sidecar.stop_all``)."""
        return 0

    def shutdown(self) -> None: ...

    def forked(self) -> Role:
        """The role of a process forked from this one."""
        return Role()

    def in_pool_process(self) -> Role:
        """The role once ``worker_process_init`` says this is a pool process."""
        return self


class NotSQS(Role):
    """A worker with the heartbeat on, whose broker is not SQS."""

    def ready(self, consumer: Any) -> None:
        logger.info(
            "celery-sqs-heartbeat: the broker is not SQS, so no heartbeat is sent; "
            "tasks run as usual."
        )


class Main(Role):
    """The worker's main process: it receives every message and beats it."""

    def __init__(
        self,
        app: Any,
        options: dict[str, HeartbeatOptions],
        slots: Slots | None,
        *,
        unfenced: bool = False,
        shared: str = "",
    ) -> None:
        super().__init__()
        self.app = app
        self.options = options
        #: The prefork pool's slots, mapped before the fork; None in the other pools.
        self.slots = slots
        #: A prefork pool without slots (no robust mutexes here).
        self.unfenced = unfenced
        #: In another pool, why the beats share the tasks' process (no beat process).
        self.shared = shared
        if slots is not None:
            self.counters = Counters(*slots.counter_blocks(None))
        self.sidecar: Sidecar | None = None
        #: Receipt handle of each task running here, by (thread, task id): kombu may
        #: change the message's properties after prerun (requeue), and a retried task
        #: keeps its id but runs in another thread (or after this one ends).
        self.running: dict[tuple[int, str], str] = {}
        self._lock = threading.Lock()

    def received(self, request: Any) -> None:
        hb = _heartbeat(request, self.options, self.slots, settled=True)
        if hb is not None:
            (self.sidecar or self.start()).add(hb)

    def prerun(self, task: Any, task_id: str) -> None:
        sidecar = self.sidecar
        if sidecar is None:
            return
        receipt_handle = _receipt_handle(task.request)
        if receipt_handle is not None and sidecar.run(receipt_handle):
            self.running[threading.get_ident(), task_id] = receipt_handle

    def postrun(self, task_id: str) -> None:
        receipt_handle = self.running.pop((threading.get_ident(), task_id), None)
        if receipt_handle is not None and self.sidecar is not None:
            self.sidecar.stop(receipt_handle)

    def current(self, task: Any) -> TaskHeartbeat | None:
        receipt_handle = self.running.get((threading.get_ident(), task.request.id))
        sidecar = self.sidecar
        hb = None if receipt_handle is None or sidecar is None else sidecar.get(receipt_handle)
        return None if hb is None or sidecar is None else TaskHeartbeat(InProcess(sidecar, hb))

    def ready(self, consumer: Any) -> None:
        if self.unfenced:
            logger.info(
                "celery-sqs-heartbeat: this platform has no process-shared robust mutexes, "
                "so the pool children cannot tell the main process when their tasks end; it "
                "beats each message until Celery settles it (a beat may land just after the "
                "delete)."
            )
        if self.slots is not None:
            _say_platform(helpers=False)
        if self.shared:
            green = getattr(getattr(consumer, "pool", None), "is_green", False)
            _say_shared(self.shared, green=green, margin=_margin(self.options))
        self.start(consumer)

    def start(self, consumer: Any = None) -> Sidecar:
        """The running sidecar, started now if it is not yet. Given the worker's
        *consumer*, its SQS client shares kombu's parsed models."""
        with self._lock:
            if self.sidecar is None:
                clients = _clients(self.app, self.options, kombu_loader(consumer))
                self.sidecar = Sidecar(
                    Sender(clients.for_queue),
                    Reporter(self.counters, region=lambda: clients.region),
                    call_timeout=clients.timeout,
                    fence=self.slots,
                )
                self.sidecar.run_in_background()
            return self.sidecar

    def holds(self, receipt_handle: str) -> bool:
        return self.sidecar is not None and self.sidecar.get(receipt_handle) is not None

    def hand_back(self, receipt_handles: Collection[str]) -> list[tuple[Heartbeat, Answer]]:
        return [] if self.sidecar is None else self.sidecar.hand_back(receipt_handles)

    def stop_all(self, reason: Ended, keep: Collection[str]) -> int:
        return 0 if self.sidecar is None else self.sidecar.stop_all(reason, keep=keep)

    def shutdown(self) -> None:
        with self._lock:
            sidecar, self.sidecar = self.sidecar, None
        if sidecar is not None:
            sidecar.shutdown(SHUTDOWN_JOIN_TIMEOUT)

    def forked(self) -> Role:
        return Forked(self)


class Forked(Role):
    """A fork of the worker's main process: a pool child, once it says so."""

    def __init__(self, main: Main) -> None:
        super().__init__()
        self._main = main

    def in_pool_process(self) -> Role:
        slots = self._main.slots
        if slots is None:
            return Role()  # no slots: the main process beats until Celery settles
        from billiard.process import current_process  # type: ignore[import-untyped]

        index = getattr(current_process(), "index", None)
        if isinstance(index, int) and 0 <= index < slots.capacity:
            return Child(self._main, slots, index)
        logger.warning(
            "celery-sqs-heartbeat: pool process %s has no slot (%d mapped); the main process "
            "beats its tasks' messages until Celery settles them.",
            index,
            slots.capacity,
        )
        return Role()


class _Writer(Role):
    """A process whose tasks write a slot (a prefork pool child, or a worker with a beat
    process): what a task's own control needs."""

    def __init__(self, app: Any, options: dict[str, HeartbeatOptions], slots: Slots) -> None:
        super().__init__()
        self.app = app
        self.options = options
        self.slots = slots
        #: A sender for the tasks' own extensions, made on the first one.
        self.sender: Sender | None = None

    def _control(self, task: Any, receipt_handle: str, request: Any, index: int) -> TaskHeartbeat:
        """The manual control of *task*, running in slot *index*."""
        hb = Heartbeat(
            receipt_handle,
            str(request.properties["delivery_info"]["sqs_queue"]),
            self.options.get(task.name) or _late_options(task),
            request.properties.get(RECEIVED) or time.monotonic(),
            task.name,
            request.id,
        )
        reporter = Reporter(Counters(*self.slots.counter_blocks(index)), region=lambda: None)
        return TaskHeartbeat(InChild(self.slots, index, hb, self._sender, reporter))

    def _enabled(self, task: Any) -> bool:
        options = self.options.get(task.name)
        return options is None or options.enabled

    def _sender(self) -> Sender | None:
        """The sender for this process's own extensions, made on the first one; None
        (said once) where no client can be made: the extension then fails."""
        if self.sender is None:
            try:
                self.sender = Sender(_clients(self.app, self.options).for_queue)
            except Exception:
                _note_once(
                    "own-client",
                    logging.ERROR,
                    "celery-sqs-heartbeat: could not make an SQS client in process %d; its "
                    "tasks' own extensions fail (the regular beats go on).",
                    os.getpid(),
                    exc_info=True,
                )
        return self.sender

    def forked(self) -> Role:
        return Role()


class Child(_Writer):
    """A prefork pool child: it tells the main process through its slot when its task
    starts and ends."""

    def __init__(self, main: Main, slots: Slots, index: int) -> None:
        super().__init__(main.app, main.options, slots)
        self.index = index
        slots.attach(index, os.getpid())
        self.counters = Counters(*slots.counter_blocks(index))
        #: The task running here: (task id, receipt handle, Celery's request).
        self.task: tuple[str, str, Any] | None = None
        #: Its manual control, made on the first ``current()`` and kept for the task.
        self.handle: TaskHeartbeat | None = None

    def prerun(self, task: Any, task_id: str) -> None:
        request = task.request
        receipt_handle = _receipt_handle(request)
        if receipt_handle is None or not self._enabled(task):
            return
        self.slots.started(self.index, key_of(receipt_handle))
        self.task, self.handle = (task_id, receipt_handle, request), None

    def postrun(self, task_id: str) -> None:
        if self.task is not None and self.task[0] == task_id:
            self.task = self.handle = None
            self.slots.ended(self.index)

    def current(self, task: Any) -> TaskHeartbeat | None:
        running = self.task
        if running is None or running[0] != task.request.id:
            return None
        if self.handle is None:
            self.handle = self._control(task, running[1], running[2], self.index)
        return self.handle


class _Task:
    """A task running in a worker with a beat process: its slot, and its control."""

    __slots__ = ("handle", "index", "receipt_handle", "request")

    def __init__(self, receipt_handle: str, request: Any, index: int) -> None:
        self.receipt_handle = receipt_handle
        self.request = request
        self.index = index
        self.handle: TaskHeartbeat | None = None


class Delegating(_Writer):
    """The main process of a threads, solo, gevent or eventlet worker whose beats come
    from its beat process (``_beat``): it hands the beat process every message it
    receives, and each task writes a slot, as a prefork child does."""

    def __init__(self, app: Any, options: dict[str, HeartbeatOptions], slots: Slots) -> None:
        super().__init__(app, options, slots)
        self.counters = Counters(*slots.counter_blocks(None))
        broker = BrokerInfo.from_app(app)
        assert broker is not None
        self.reporter = Reporter(self.counters, region=broker.region)
        #: kombu's botocore data loader, which the beat process's client shares.
        self.loader: Any = None
        self.beats = BeatProcess(
            slots,
            self.reporter,
            lambda: _clients(app, options, self.loader, warm=False),
            options,
            margin=_margin(options),
            fallback=self._beat_here,
        )
        for index in range(slots.capacity):
            slots.attach(index, os.getpid())
        #: The slots no task uses. Taken and given back by the tasks' threads: a list's
        #: pop and append are atomic.
        self.free = list(range(slots.capacity - 1, -1, -1))
        #: Each task running here, by (thread, task id), as in :class:`Main`.
        self.running: dict[tuple[int, str], _Task] = {}

    def received(self, request: Any) -> None:
        hb = _heartbeat(request, self.options, self.slots, settled=False)
        if hb is not None:
            self.reporter.started(hb)
            self.beats.add(hb, request.message, known=hb.options is self.options.get(hb.task_name))

    def prerun(self, task: Any, task_id: str) -> None:
        request = task.request
        receipt_handle = _receipt_handle(request)
        if receipt_handle is None or not self._enabled(task):
            return
        try:
            index = self.free.pop()
        except IndexError:
            _note_once(
                "no-slot",
                logging.WARNING,
                "celery-sqs-heartbeat: more tasks run at once than the %d slots mapped at "
                "start; the beat process beats the others' messages until Celery settles "
                "them.",
                self.slots.capacity,
            )
            return
        self.slots.started(index, key_of(receipt_handle))
        self.running[threading.get_ident(), task_id] = _Task(receipt_handle, request, index)

    def postrun(self, task_id: str) -> None:
        running = self.running.pop((threading.get_ident(), task_id), None)
        if running is not None:
            self.slots.ended(running.index)
            self.free.append(running.index)

    def current(self, task: Any) -> TaskHeartbeat | None:
        running = self.running.get((threading.get_ident(), task.request.id))
        if running is None:
            return None
        if running.handle is None:
            running.handle = self._control(
                task, running.receipt_handle, running.request, running.index
            )
        return running.handle

    def ready(self, consumer: Any) -> None:
        # Forked now: the consumer has connected, so kombu's client has parsed the SQS
        # models and the beat process's client shares them (about 20 MB less in all
        # than a fork at worker_init), and the pool has started no thread yet. A
        # message received before is sent to it then.
        _say_platform(helpers=True)
        self.loader = kombu_loader(consumer)
        self.beats.green = getattr(getattr(consumer, "pool", None), "is_green", False)
        try:
            self.beats.spawn(level=logger.getEffectiveLevel())
        except OSError as exc:
            self.beats.fall_back(f"no beat process could be started: {exc}")
        self.beats.start()  # its link thread says which process beats, once it does

    def _beat_here(self, why: str) -> Sidecar:
        """The fallback, where no beat process can be made or kept: a sidecar of this
        process's own, fenced by the slots its tasks write, as the beat process was."""
        clients = _clients(self.app, self.options, self.loader, warm=False)
        warm_up(clients, "the worker")
        sidecar = Sidecar(
            Sender(clients.for_queue),
            self.reporter,
            call_timeout=clients.timeout,
            fence=self.slots,
        )
        sidecar.run_in_background()
        _say_shared(why, green=self.beats.green, margin=_margin(self.options))
        return sidecar

    def holds(self, receipt_handle: str) -> bool:
        return self.beats.holds(receipt_handle)

    def hand_back(self, receipt_handles: Collection[str]) -> list[tuple[Heartbeat, Answer]]:
        return self.beats.hand_back(receipt_handles, ASK_TIMEOUT)

    def stop_all(self, reason: Ended, keep: Collection[str]) -> int:
        return int(self.beats.ask(("stop_all", reason, set(keep)), ASK_TIMEOUT) or 0)

    def shutdown(self) -> None:
        self.beats.close()


def _for_worker(worker: Any) -> Role:
    """The role of a worker's main process, from its settings (at ``worker_init``)."""
    app = worker.app
    try:
        options = resolve_tasks(app)
        separate = beat_process(app.conf)
    except ConfigurationError as exc:
        # SystemExit is not an Exception: it stops the worker with status 1 and the
        # message on stderr (logging is not set up yet at worker_init).
        raise SystemExit(str(exc)) from None
    if not enabled_tasks(options):
        return Role()
    if BrokerInfo.from_app(app) is None:
        return NotSQS()
    if not _is_prefork(worker.pool_cls):
        return (
            _delegating(worker, options)
            if separate
            else Main(app, options, None, shared="sqs_heartbeat_beat_process is False")
        )
    if not available():
        return Main(app, options, None, unfenced=True)
    try:
        slots = Slots(_pool_size(worker))  # before the pool forks: every child inherits it
    except OSError:  # the functions exist, but the kernel has no robust lists (qemu-user)
        return Main(app, options, None, unfenced=True)
    return Main(app, options, slots)


def _delegating(worker: Any, options: dict[str, HeartbeatOptions]) -> Role:
    """A worker that beats from a beat process (forked at ``worker_ready``). Where none
    can be made, its own process beats, as it says at start."""
    app = worker.app
    if not (supported() and available()):
        return Main(app, options, None, shared="this platform cannot run a beat process")
    try:
        return Delegating(app, options, Slots(_pool_size(worker), ended=ENDED_RING))
    except OSError as exc:  # robust mutexes that fail to initialise (qemu-user)
        return Main(app, options, None, shared=f"no slots could be mapped: {exc}")


def _pool_size(worker: Any) -> int:
    """The most pool processes the worker may run: its concurrency, or the maximum of
    ``--autoscale max,min`` (both resolved by Celery only after ``worker_init``)."""
    autoscale = getattr(worker, "options", {}).get("autoscale") or ()
    if isinstance(autoscale, str):
        autoscale = [int(autoscale.partition(",")[0])]
    sizes = [n for n in (worker.concurrency, *autoscale[:1]) if isinstance(n, int)]
    return max(sizes) if sizes else os.cpu_count() or 1


def _is_prefork(pool_cls: Any) -> bool:
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool

    try:
        cls = get_implementation(pool_cls) if isinstance(pool_cls, str) else pool_cls
        return isinstance(cls, type) and issubclass(cls, TaskPool)
    except Exception:
        return False


# -- the handlers -----------------------------------------------------------------------

#: This process's role.
_role = Role()
#: The apps the handlers serve; None: every app (the ``celery`` command's plugin).
_apps: weakref.WeakSet[Any] | None = weakref.WeakSet()


def _serves(app: Any) -> bool:
    return _apps is None or app in _apps


def _after_fork_in_child() -> None:
    global _role
    _role = _role.forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


_PREPARING = _Guard("prepare the worker")
_FINDING_SLOT = _Guard("find this pool process's slot")
_CHECKING = _Guard("check the worker's configuration")
_RECEIVING = _Guard("start a heartbeat for a received message")
_STARTING = _Guard("start a heartbeat")
_STOPPING = _Guard("stop a heartbeat")
_SHUTTING_DOWN = _Guard("stop the heartbeat thread")


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    global _role
    with _PREPARING:
        if _serves(sender.app):
            _role = _for_worker(sender)
            from ._drain import install  # its bootsteps import this module

            install(sender.app)  # before the worker builds its blueprints


def _on_worker_process_init(**_: Any) -> None:
    global _role
    with _FINDING_SLOT:
        _role = _role.in_pool_process()  # the solo pool sends it in the worker's own process


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    with _CHECKING:
        app = sender.app
        if not _serves(app):
            return
        found = _role.options or resolve_tasks(app)
        pool = type(getattr(sender, "pool", None)).__module__.rpartition(".")[2]
        for line in [*startup_warnings(app, found), *prefetch_warnings(app, found, pool)]:
            logger.warning("%s", line)
        _role.ready(sender)


def _on_task_received(request: Any = None, **_: Any) -> None:
    with _RECEIVING:
        _role.received(request)


def _on_task_prerun(task: Any = None, task_id: str = "", **_: Any) -> None:
    with _STARTING:
        _role.prerun(task, task_id)


def _on_task_postrun(task_id: str = "", **_: Any) -> None:
    with _STOPPING:
        _role.postrun(task_id)


def _on_worker_shutdown(**_: Any) -> None:
    with _SHUTTING_DOWN:
        _role.shutdown()


# -- the public API's side -----------------------------------------------------------------


def current(task: Any) -> TaskHeartbeat | None:
    """The heartbeat of *task*, running in this thread (see ``celery_sqs_heartbeat.current``)."""
    return _role.current(task)


def counters() -> Counters:
    return _role.counters


def current_role() -> Role:
    """This process's role (the shutdown's drain asks it)."""
    return _role


def current_sidecar() -> Sidecar | None:
    """This process's sidecar, if it has one (for tests and diagnostics)."""
    return getattr(_role, "sidecar", None)


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
    global _apps, _role
    for signal, handler in _HANDLERS:
        signal.disconnect(handler, dispatch_uid=f"celery_sqs_heartbeat.{handler.__name__}")
    _role.shutdown()
    _role, _apps = Role(), weakref.WeakSet()
    _noted.clear()
