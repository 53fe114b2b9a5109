"""The part each process plays in a worker, and the choice of it at ``worker_init``.

A role is built at a named signal and replaced whole at fork (``_process``), so no
handler asks which pool or process it runs in. Each composes two parts: what beats
(``_beats``: a sidecar of its own, or the heartbeat process) and the task side (``_tasks``).

* :class:`Main` beats from a sidecar of its own: a prefork worker's main process, or
  one whose tasks share its process; its tasks tell that sidecar directly.
* :class:`Delegating` beats from the heartbeat process (``_beat``); its tasks write a
  slot each.
* :class:`Child`, a prefork pool child, beats nothing; its task writes its slot.
* ``Role`` and :class:`NotSQS` do nothing.

A bad setting stops the worker at ``worker_init`` (``SystemExit``: Celery swallows any
``Exception`` a handler raises).
"""

from __future__ import annotations

import logging
import math
import signal
import weakref
from collections.abc import Callable
from typing import Any

from . import _celery, _process
from ._beat import HeartbeatProcess, supported, warm_up
from ._beats import LocalBeats
from ._client import BrokerInfo
from ._guard import Guard, note_once
from ._heartbeat import Heartbeat
from ._interrupt import SIGNAL, MessageLost
from ._liveness import platform_report
from ._loss import Loss, loss_of
from ._process import Role
from ._report import Counters, Reporter, say_interrupted, say_received_again
from ._send import Sender
from ._settings import (
    ConfigurationError,
    HeartbeatOptions,
    enabled_tasks,
    heartbeat_process,
    resolve_tasks,
)
from ._sidecar import Sidecar
from ._slots import Slots, available, key_of
from ._system import can_die_with_parent
from ._tasks import SidecarTasks, SlotTasks, make_clients

logger = logging.getLogger("celery_sqs_heartbeat")

#: How many of the last tasks to end a worker with a heartbeat process remembers in its slots
#: (32 KB): the heartbeat process knows their messages' tasks ended after their slot moved on,
#: until the worker tells it that Celery settled them (within a fifth of a second).
ENDED_RING = 4096


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
            "no PR_SET_PDEATHSIG (not Linux): the keeper and the heartbeat process notice the "
            "worker's death at their next look (within 0.2 s), not at once"
        )
    for line in lines:
        note_once(
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


class _Copies:
    """The messages this worker received and Celery has not settled yet, by SQS message
    id (the consumer's thread's own): a copy received while the first is still here
    means its visibility ran out, and is said. Each first copy is kept by a weak
    reference to Celery's request, so nothing settled stays in memory. So is, by receipt
    handle, the request of each task that asked to be interrupted: to give it up."""

    #: Received messages between two sweeps of the dead references: the map holds at
    #: most this many more than the worker's unsettled messages.
    SWEEP_EVERY = 1024

    def __init__(self) -> None:
        self._by_id: dict[str, Callable[[], Any]] = {}
        self._to_interrupt: dict[str, Callable[[], Any]] = {}
        self._received = 0

    def received(self, hb: Heartbeat, request: Any) -> None:
        if hb.options.interrupt:
            self._to_interrupt[hb.receipt_handle] = _ref(request)
        elif not hb.message_id:
            return
        if hb.message_id:
            first = self._by_id.get(hb.message_id)
            if first is not None and not _settled(first()):
                say_received_again(hb)
            self._by_id[hb.message_id] = _ref(request)
        self._received += 1
        if self._received % self.SWEEP_EVERY == 0:
            self._by_id = {k: r for k, r in self._by_id.items() if not _settled(r())}
            self._to_interrupt = {k: r for k, r in self._to_interrupt.items() if not _settled(r())}

    def request(self, receipt_handle: str) -> Any:
        """Celery's request of a message received to be interrupted, unsettled; else
        None. From any thread: a dict's get, of a dict replaced whole."""
        ref = self._to_interrupt.get(receipt_handle)
        request = None if ref is None else ref()
        return None if _settled(request) else request


def _ref(request: Any) -> Callable[[], Any]:
    """A weak reference to Celery's *request* (a strong one where it takes none)."""
    try:
        return weakref.ref(request)
    except TypeError:
        return lambda: request


def _settled(request: Any) -> bool:
    """Whether Celery settled *request*'s message (or dropped the request: it did)."""
    return request is None or bool(request.acknowledged or request.message.acknowledged)


_INTERRUPTING = Guard("interrupt a task whose message is lost")


def _to_interrupt(hb: Heartbeat, copies: _Copies) -> tuple[Loss, Callable[[], None]] | None:
    """Where *hb*'s message is lost and its task asked to be interrupted: the loss, and
    how to give the message up."""
    loss = loss_of(hb) if hb.options.interrupt else None
    request = None if loss is None else copies.request(hb.receipt_handle)
    if loss is None or request is None:
        return None
    return loss, lambda: _celery.give_up(request)


def _say_interrupted(hb: Heartbeat, loss: Loss) -> None:
    when = loss.visible_at.isoformat() if loss.visible_at else "its queue's timeout"
    say_interrupted(hb, loss.reason.value, when)


def _say_interrupt_limits(app: Any, options: dict[str, HeartbeatOptions]) -> None:
    """At start: each task that asks to be interrupted but would retry itself on
    ``MessageLost`` (its ``autoretry_for`` covers it, Celery reads that at
    registration): its retry is a new message while the lost one comes back."""
    for name, opts in options.items():
        task = app.tasks.get(name)
        if task is None or not (opts.enabled and opts.interrupt):
            continue
        covers = [e for e in getattr(task, "autoretry_for", ()) or () if isinstance(e, type)]
        spared = [e for e in getattr(task, "dont_autoretry_for", ()) or () if isinstance(e, type)]
        if any(issubclass(MessageLost, e) for e in covers) and not any(
            issubclass(MessageLost, e) for e in spared
        ):
            logger.warning(
                "celery-sqs-heartbeat: task %s asks for sqs_heartbeat_interrupt, and its "
                "autoretry_for covers MessageLost: an interrupted run retries as a new "
                "message while the lost one comes back, so it runs twice more. Add "
                "celery_sqs_heartbeat.MessageLost to its dont_autoretry_for.",
                name,
            )


def _on_signal(signum: int, frame: Any) -> None:
    """A prefork pool child's handler of ``SIGNAL``: see ``SlotTasks.signalled``."""
    _process.role().tasks.signalled()


def _handle_signal() -> bool:
    """In a prefork pool child, at its start: raise MessageLost at ``SIGNAL``, unless
    something else (``CELERY_RDBSIG``, the user) handles it; whether it does."""
    if SIGNAL is None:
        return False
    if signal.getsignal(SIGNAL) not in (signal.SIG_DFL, None):
        note_once(
            "signal-taken",
            logging.WARNING,
            "celery-sqs-heartbeat: something else handles SIGUSR2 in the pool processes "
            "(CELERY_RDBSIG?), so sqs_heartbeat_interrupt cannot interrupt their tasks; "
            "they run on when their message is lost (current().lost says so).",
        )
        return False
    signal.signal(SIGNAL, _on_signal)
    return True


class NotSQS(Role):
    """A worker with the heartbeat on, whose broker is not SQS."""

    def ready(self, consumer: Any) -> None:
        logger.info(
            "celery-sqs-heartbeat: the broker is not SQS, so no heartbeat is sent; "
            "tasks run as usual."
        )


class Main(Role):
    """The worker's main process, which receives every message and beats it from a
    sidecar of its own: a prefork worker's (fenced by the slots its children write), or
    one whose tasks share its process (*shared* says why)."""

    def __init__(
        self,
        app: Any,
        options: dict[str, HeartbeatOptions],
        slots: Slots | None,
        *,
        unfenced: bool = False,
        shared: str = "",
        time_limit: float | None = None,
    ) -> None:
        super().__init__()
        self.app = app
        self.options = options
        #: The prefork pool's slots, mapped before the fork; None in the other pools.
        self.slots = slots
        #: A prefork pool without slots (no robust mutexes here).
        self.unfenced = unfenced
        #: In another pool, why the beats share the tasks' process (no heartbeat process).
        self.shared = shared
        #: In a prefork pool, which kills a task at its hard time limit: the worker's
        #: own limit (0: none). A task's hard limit is then its max_duration by default.
        self.time_limit = time_limit
        if slots is not None:
            self.counters = Counters(*slots.counter_blocks(None))
        self.local = LocalBeats(self._sidecar)
        self.beats = self.local
        self.tasks = SidecarTasks(self.local)
        self.copies = _Copies()
        #: Some task asks to be interrupted (``sqs_heartbeat_interrupt``).
        self.interrupting = any(o.enabled and o.interrupt for o in options.values())

    def received(self, request: Any) -> None:
        hb = _celery.heartbeat_of(
            request,
            self.options,
            carry_received=self.slots is not None,
            settled=True,
            time_limit=self.time_limit,
        )
        if hb is not None:
            self.beats.add(hb, request.message)
            self.copies.received(hb, request)

    def ready(self, consumer: Any) -> None:
        if self.unfenced:
            logger.info(
                "celery-sqs-heartbeat: this platform has no process-shared robust mutexes, "
                "so the pool children cannot tell the main process when their tasks end; it "
                "beats each message until Celery settles it (a beat may land just after the "
                "delete)."
            )
        if self.unfenced and self.interrupting:
            logger.warning(
                "celery-sqs-heartbeat: without process-shared robust mutexes the pool "
                "children have no slot, so sqs_heartbeat_interrupt cannot reach their "
                "tasks: they run on when their message is lost."
            )
        if self.interrupting:
            _say_interrupt_limits(self.app, self.options)
        if self.slots is not None:
            _say_platform(helpers=False)
        if self.shared:
            _say_shared(self.shared, green=_celery.is_green(consumer), margin=_margin(self.options))
        self.local.start(consumer)

    def _sidecar(self, consumer: Any) -> Sidecar:
        """The sidecar; given the worker's *consumer*, its SQS client shares kombu's
        parsed models."""
        clients = make_clients(self.app, self.options, _celery.kombu_loader(consumer))
        return Sidecar(
            Sender(clients.for_queue),
            Reporter(self.counters, region=lambda: clients.region),
            call_timeout=clients.timeout,
            fence=self.slots,
            on_lost=self._lost,
        )

    def _lost(self, hb: Heartbeat) -> None:
        """From the sidecar, as *hb*'s message is lost: interrupt its task, if it asked."""
        with _INTERRUPTING:
            found = _to_interrupt(hb, self.copies)
            if found is None:
                return
            loss, give_up = found
            if self.slots is None:
                done = self.tasks.interrupt(hb.receipt_handle, loss, give_up)
            else:
                done = self._signal(hb, give_up)
            if done:
                _say_interrupted(hb, loss)

    def _signal(self, hb: Heartbeat, give_up: Callable[[], None]) -> bool:
        """Interrupt the task of *hb*, in the pool child whose slot it runs in."""
        assert self.slots is not None
        child = self.slots.interrupt(hb.slot, key_of(hb.receipt_handle))
        if child is None or SIGNAL is None:
            return False  # it ended meanwhile, or its process cannot be (it said so)
        give_up()
        return self.slots.signal(*child, SIGNAL)

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
        index = _celery.pool_process_index()
        if index is not None and 0 <= index < slots.capacity:
            # The handler before the slot: the main process signals only a child that
            # said, in its slot, that it handles the signal.
            interruptible = self._main.interrupting and _handle_signal()
            return Child(self._main, slots, index, interruptible=interruptible)
        logger.warning(
            "celery-sqs-heartbeat: pool process %s has no slot (%d mapped); the main process "
            "beats its tasks' messages until Celery settles them.",
            index,
            slots.capacity,
        )
        return Role()


class Child(Role):
    """A prefork pool child: it tells the main process through its slot when its task
    starts and ends."""

    def __init__(
        self, main: Main, slots: Slots, index: int, *, interruptible: bool = False
    ) -> None:
        super().__init__()
        self.options = main.options
        self.index = index
        self.counters = Counters(*slots.counter_blocks(index))
        self.tasks = SlotTasks(main.app, main.options, slots, [index], interruptible=interruptible)


class Delegating(Role):
    """The main process of a threads, solo, gevent or eventlet worker whose beats come
    from its heartbeat process (``_beat``): it hands the heartbeat process every message it
    receives, and each task writes a slot, as a prefork child does."""

    def __init__(self, app: Any, options: dict[str, HeartbeatOptions], slots: Slots) -> None:
        super().__init__()
        self.app = app
        self.options = options
        self.slots = slots
        self.counters = Counters(*slots.counter_blocks(None))
        broker = BrokerInfo.from_app(app)
        assert broker is not None
        self.reporter = Reporter(self.counters, region=broker.region)
        #: kombu's botocore data loader, which the heartbeat process's client shares.
        self.loader: Any = None
        self.heartbeat_process = HeartbeatProcess(
            slots,
            self.reporter,
            lambda: make_clients(app, options, self.loader, warm=False),
            options,
            margin=_margin(options),
            fallback=self._beat_here,
            on_lost=self._lost,
        )
        self.beats = self.heartbeat_process
        self.tasks = SlotTasks(app, options, slots, range(slots.capacity))
        self.copies = _Copies()

    def received(self, request: Any) -> None:
        hb = _celery.heartbeat_of(request, self.options, carry_received=True, settled=False)
        if hb is not None:
            self.beats.add(hb, request.message)
            self.copies.received(hb, request)

    def ready(self, consumer: Any) -> None:
        # Forked now: the consumer has connected, so kombu's client has parsed the SQS
        # models and the heartbeat process's client shares them (about 9 MB less
        # than a fork at worker_init), and the pool has started no thread yet. A
        # message received before is sent to it then.
        _say_platform(helpers=True)
        _say_interrupt_limits(self.app, self.options)
        self.loader = _celery.kombu_loader(consumer)
        beats = self.heartbeat_process
        beats.green = _celery.is_green(consumer)
        try:
            beats.spawn(level=logger.getEffectiveLevel())
        except OSError as exc:
            beats.fall_back(f"no heartbeat process could be started: {exc}")
        beats.start()  # its link thread says which process beats, once it does

    def _beat_here(self, why: str) -> Sidecar:
        """The fallback, where no heartbeat process can be made or kept: a sidecar of this
        process's own, fenced by the slots its tasks write, as the heartbeat process was."""
        clients = make_clients(self.app, self.options, self.loader, warm=False)
        warm_up(clients, "the worker")
        sidecar = Sidecar(
            Sender(clients.for_queue),
            self.reporter,
            call_timeout=clients.timeout,
            fence=self.slots,
            on_lost=self._lost,
        )
        sidecar.run_in_background()
        _say_shared(why, green=self.heartbeat_process.green, margin=_margin(self.options))
        return sidecar

    def _lost(self, hb: Heartbeat) -> None:
        """From the link thread (or the fallback's sidecar), as *hb*'s message is lost:
        interrupt its task, a thread or a greenlet of this process, if it asked."""
        with _INTERRUPTING:
            found = _to_interrupt(hb, self.copies)
            if found is not None and self.tasks.interrupt(hb.receipt_handle, *found):
                _say_interrupted(hb, found[0])


def for_worker(worker: Any) -> Role:
    """The role of a worker's main process, from its settings (at ``worker_init``)."""
    app = worker.app
    try:
        options = resolve_tasks(app)
        separate = heartbeat_process(app.conf)
    except ConfigurationError as exc:
        # SystemExit is not an Exception: it stops the worker with status 1 and the
        # message on stderr (logging is not set up yet at worker_init).
        raise SystemExit(str(exc)) from None
    if not enabled_tasks(options):
        return Role()
    if BrokerInfo.from_app(app) is None:
        return NotSQS()
    _celery.expect(app, MessageLost, [n for n, o in options.items() if o.enabled and o.interrupt])
    if not _celery.is_prefork(worker.pool_cls):
        return (
            _delegating(worker, options)
            if separate
            else Main(app, options, None, shared="sqs_heartbeat_own_process is False")
        )
    limit = _celery.worker_time_limit(worker)  # prefork kills a task at its hard limit
    if not available():
        return Main(app, options, None, unfenced=True, time_limit=limit)
    try:
        slots = Slots(_celery.pool_size(worker))  # before the pool forks: every child inherits it
    except OSError:  # the functions exist, but the kernel has no robust lists (qemu-user)
        return Main(app, options, None, unfenced=True, time_limit=limit)
    return Main(app, options, slots, time_limit=limit)


def _delegating(worker: Any, options: dict[str, HeartbeatOptions]) -> Role:
    """A worker that beats from a heartbeat process (forked at ``worker_ready``). Where none
    can be made, its own process beats, as it says at start."""
    app = worker.app
    if not (supported() and available()):
        return Main(app, options, None, shared="this platform cannot run a heartbeat process")
    try:
        return Delegating(app, options, Slots(_celery.pool_size(worker), ended=ENDED_RING))
    except OSError as exc:  # robust mutexes that fail to initialise (qemu-user)
        return Main(app, options, None, shared=f"no slots could be mapped: {exc}")
