"""The task side: what a process that runs tasks tells the beats when a task starts and
ends, and the manual control (``current()``) of the task running in a thread.

Two shapes, one interface (:class:`Tasks`), composed into a role (``_roles``):

* :class:`SidecarTasks`, where the tasks share the process of the sidecar that beats
  them (``sqs_heartbeat_own_process = False``, or no heartbeat process can be made);
* :class:`SlotTasks`, where the tasks run apart from what beats them (a prefork pool
  child, or a worker whose beats come from its heartbeat process): each task writes a slot
  (``_slots``), which the beating process reads before each beat.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ._beats import LocalBeats
from ._celery import late_options, receipt_handle, running_heartbeat
from ._client import BrokerInfo, Clients, call_timeout
from ._control import InChild, InProcess, TaskHeartbeat
from ._guard import note_once
from ._heartbeat import Heartbeat
from ._interrupt import Armed, Armings
from ._loss import REASONS, Loss
from ._report import Counters, Reporter, say_unreached
from ._send import Sender
from ._settings import HeartbeatOptions, shortest_interval
from ._slots import Slots, key_of


def acks_late(task: Any) -> bool:
    """Whether Celery acknowledges *task*'s message only after it ran. Without that it
    deletes the message as the task starts: nothing is left to beat or extend, so the
    task gets no slot and no handle (``current()`` is None)."""
    return bool(getattr(task, "acks_late", False))


class Tasks(Protocol):
    """What the tasks running in a process tell the beats."""

    def started(self, task: Any, task_id: str) -> None:
        """``task_prerun``, in the task's own thread."""

    def ended(self, task_id: str, stopped: bool = False) -> None:
        """``task_postrun``, in the task's own thread: final, no beat follows it.
        *stopped*: the task failed with ``MessageLost``."""

    def current(self, task: Any) -> TaskHeartbeat | None:
        """The manual control of *task*, running in this thread; None: no heartbeat."""

    def interrupt(self, receipt_handle: str, loss: Loss, give_up: Callable[[], None]) -> bool:
        """Raise ``MessageLost`` in the task of that message, if it runs in this process
        and asked for it, its message given up first; whether it will be."""

    def signalled(self) -> None:
        """A prefork pool child's handler of ``_interrupt.SIGNAL``: the beating process
        found the message of the task running here lost, and gave it up."""


class _NoTasks:
    """No task of this process has a heartbeat."""

    def started(self, task: Any, task_id: str) -> None:
        pass

    def ended(self, task_id: str, stopped: bool = False) -> None:
        pass

    def current(self, task: Any) -> TaskHeartbeat | None:
        return None

    def interrupt(self, receipt_handle: str, loss: Loss, give_up: Callable[[], None]) -> bool:
        return False

    def signalled(self) -> None:
        pass


NO_TASKS: Tasks = _NoTasks()


def make_clients(
    app: Any, options: dict[str, HeartbeatOptions], loader: Any = None, *, warm: bool = True
) -> Clients:
    """This process's SQS clients for *app*'s broker, their time-out from the shortest
    interval. *warm*: made now, before any beat (building a client is ~100 ms of Python
    that a busy process would slow down many times over)."""
    broker = BrokerInfo.from_app(app)
    assert broker is not None  # made for an SQS broker only
    clients = Clients(broker, timeout=call_timeout(shortest_interval(app, options)), loader=loader)
    if warm:
        clients.warm_up()
    return clients


class SidecarTasks:
    """Tasks that run in the process of the sidecar that beats them: each tells it
    directly. *beats* holds it once it runs (``running``: None before)."""

    def __init__(self, beats: LocalBeats) -> None:
        self._beats = beats
        #: The sidecar's heartbeat of each task running here, by (thread, task id): kombu
        #: may change the message's properties after prerun (requeue), and a retried
        #: task keeps its id but runs in another thread (or after this one ends). Kept
        #: for the whole task, after it ended too: it says why (``lost``).
        self.running: dict[tuple[int, str], Heartbeat] = {}
        #: The manual control of each, made on the first ``current()``.
        self.handles: dict[tuple[int, str], TaskHeartbeat] = {}
        #: Those that asked to be interrupted (``sqs_heartbeat_interrupt``).
        self.armings = Armings()

    def started(self, task: Any, task_id: str) -> None:
        sidecar = self._beats.running
        if sidecar is None or not acks_late(task):
            return
        handle = receipt_handle(task.request)
        hb = None if handle is None else sidecar.run(handle)
        if hb is not None:
            self.running[threading.get_ident(), task_id] = hb
            if hb.options.interrupt:
                self.armings.arm(hb.receipt_handle)

    def ended(self, task_id: str, stopped: bool = False) -> None:
        key = (threading.get_ident(), task_id)
        hb = self.running.get(key)
        if hb is None:
            return
        if hb.options.interrupt and self.armings.disarm(hb.receipt_handle) and not stopped:
            say_unreached(hb.task_name, hb.task_id)
        self.running.pop(key, None)
        if self.handles:
            self.handles.pop(key, None)
        sidecar = self._beats.running
        if sidecar is not None:
            sidecar.stop(hb.receipt_handle)

    def current(self, task: Any) -> TaskHeartbeat | None:
        key = (threading.get_ident(), task.request.id)
        handle = self.handles.get(key)
        hb = self.running.get(key)
        sidecar = self._beats.running
        if handle is None and hb is not None and sidecar is not None:
            shield = self.armings.shield(hb.receipt_handle)
            handle = self.handles[key] = TaskHeartbeat(InProcess(sidecar, hb), shield)
        return handle

    def interrupt(self, receipt_handle: str, loss: Loss, give_up: Callable[[], None]) -> bool:
        return self.armings.interrupt(receipt_handle, loss, give_up)

    def signalled(self) -> None:
        pass


class _Running:
    """A task that writes a slot: the slot, and its manual control once asked for."""

    __slots__ = ("armed", "handle", "index", "key", "receipt_handle", "request", "started")

    def __init__(self, receipt_handle: str, key: int, request: Any, index: int) -> None:
        self.receipt_handle = receipt_handle
        self.key = key
        self.request = request
        self.index = index
        self.started = time.monotonic()
        self.handle: TaskHeartbeat | None = None
        #: Set last, where the task asked to be interrupted.
        self.armed: Armed | None = None


class SlotTasks:
    """Tasks that run apart from what beats them: each writes one of *indexes*, the
    slots of this process, when it starts and ends."""

    def __init__(
        self,
        app: Any,
        options: dict[str, HeartbeatOptions],
        slots: Slots,
        indexes: Iterable[int],
        *,
        interruptible: bool = False,
    ) -> None:
        self.app = app
        self.options = options
        self.slots = slots
        free = list(indexes)
        for index in free:
            slots.attach(index, os.getpid(), interruptible=interruptible)
        #: A process of one slot, and that slot.
        self.single, self.index = len(free) == 1, free[0] if free else 0
        #: The slots no task uses. Taken and given back by the tasks' threads: a list's
        #: pop and append are atomic.
        self.free = free[::-1]
        #: Each task running here, by (thread, task id), as in :class:`SidecarTasks`.
        self.running: dict[tuple[int, str], _Running] = {}
        #: A sender for the tasks' own extensions, made on the first one.
        self.sender: Sender | None = None
        #: Those that asked to be interrupted, where they run in this process.
        self.armings = Armings()

    def started(self, task: Any, task_id: str) -> None:
        request = task.request
        handle = receipt_handle(request)
        if handle is None or not self._enabled(task) or not acks_late(task):
            return
        index = self._take()
        if index is None:
            note_once(
                "no-slot",
                logging.WARNING,
                "celery-sqs-heartbeat: more tasks run at once than the %d slots mapped at "
                "start; the heartbeat process beats the others' messages until Celery settles "
                "them.",
                self.slots.capacity,
            )
            return
        key = key_of(handle)
        try:
            self.slots.started(index, key)
        except BaseException:
            self.free.append(index)  # a slot that failed once is not lost for good
            raise
        running = self.running[threading.get_ident(), task_id] = _Running(
            handle, key, request, index
        )
        if (self.options.get(task.name) or late_options(task)).interrupt:
            running.armed = self.armings.arm(handle)

    def ended(self, task_id: str, stopped: bool = False) -> None:
        key = (threading.get_ident(), task_id)
        running = self.running.get(key)
        if running is None:
            return
        decided = running.armed is not None and self.armings.disarm(running.receipt_handle)
        self.running.pop(key, None)
        try:
            given_up = self.slots.ended(running.index)  # by the main process, in prefork
        finally:
            self.free.append(running.index)
        if (decided or given_up) and not stopped:
            say_unreached(running.request.task, running.request.id)

    def _take(self) -> int | None:
        """A free slot; None if every one is taken. A process of one slot (a prefork
        pool child, which runs one task at a time) takes it back from a task whose end
        it never heard of, as the task starting now is the one that runs there."""
        try:
            return self.free.pop()
        except IndexError:
            if not self.single:
                return None
        self.running.clear()
        return self.index

    def current(self, task: Any) -> TaskHeartbeat | None:
        running = self.running.get((threading.get_ident(), task.request.id))
        if running is None:
            return None
        if running.handle is None:
            hb = running_heartbeat(task, running.receipt_handle, running.request, self.options)
            hb.started = running.started
            counters = Counters(*self.slots.counter_blocks(running.index))
            reporter = Reporter(counters, region=lambda: None)
            control = InChild(self.slots, running.index, hb, self._sender, reporter)
            running.handle = TaskHeartbeat(control, self.armings.shield(running.receipt_handle))
        return running.handle

    def interrupt(self, receipt_handle: str, loss: Loss, give_up: Callable[[], None]) -> bool:
        return self.armings.interrupt(receipt_handle, loss, give_up)

    def signalled(self) -> None:
        # In the task's thread, between two of its bytecodes: no lock is taken, and the
        # slot is read without its mutex (this thread may hold it).
        for running in list(self.running.values()):
            said = self.slots.loss_said(running.index, running.key)
            if running.armed is None or said is None:
                continue  # a signal for a task that ended: spent
            reason = REASONS.get(said[0])
            if reason is not None:
                running.armed.signalled(Loss.of(reason, said[1]))

    def _enabled(self, task: Any) -> bool:
        options = self.options.get(task.name)
        return options is None or options.enabled

    def _sender(self) -> Sender | None:
        """The sender for this process's own extensions, made on the first one; None
        (said once) where no client can be made: the extension then fails."""
        if self.sender is None:
            try:
                self.sender = Sender(make_clients(self.app, self.options).for_queue)
            except Exception:
                note_once(
                    "own-client",
                    logging.ERROR,
                    "celery-sqs-heartbeat: could not make an SQS client in process %d; its "
                    "tasks' own extensions fail (the regular beats go on).",
                    os.getpid(),
                    exc_info=True,
                )
        return self.sender
