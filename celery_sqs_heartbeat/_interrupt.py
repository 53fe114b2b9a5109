"""Raising :class:`MessageLost` in a running task whose message is lost
(``sqs_heartbeat_interrupt``): how it reaches the task in each pool, and the shield that
keeps it out of this package's own code.

Each task that asked for it is *armed* at ``task_prerun`` in its own thread, and
disarmed there first thing at ``task_postrun``. Whoever learns of the loss decides once
(:meth:`Armed.decide`), gives the message up, and then delivers (:meth:`Armed.deliver`):

* a thread (the threads pool; the solo pool's main thread) gets it through
  ``PyThreadState_SetAsyncExc``, as Temporal raises into a synchronous activity: at its
  next bytecode, so a task in one long C call gets it when the call returns;
* a greenlet (gevent, eventlet) gets it thrown by its hub, at its next switch;
* a prefork pool child gets :data:`SIGNAL` from the main process, as Celery's soft time
  limit reaches it, and raises it from the handler (:meth:`Armed.signalled`).

It never lands inside this package (a slot's mutex held, a call to SQS half made): the
task's own calls into it are *shielded* (:meth:`Armed.shield`), and an interrupt that
comes meanwhile is raised as the call returns. None outlives the task: one still on its
way at ``task_postrun`` lands there. Whether it stopped the task is read from the
task's outcome there (``MessageLost``); where it did not (it came as the task returned,
or the task caught it), the worker says so, as the message was given up.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ._loss import Loss

#: The signal a prefork pool child gets when its task's message is lost (billiard uses
#: SIGUSR1 for the soft time limit; Celery's children leave SIGUSR2 alone).
SIGNAL: int | None = getattr(signal, "SIGUSR2", None)

#: What :class:`MessageLost` says where the loss itself is not known.
LOST_TEXT = "the task's SQS message is no longer its own"


class MessageLost(Exception):
    """Raised in a task whose SQS message is no longer its own, where
    ``sqs_heartbeat_interrupt`` is on: another worker may run the task from
    ``loss.visible_at``.

    Celery records the task as failed with it. This worker neither deletes the message
    nor changes its visibility: its receipt handle may be stale, and the message must
    come back for the task to run again."""

    def __init__(self, loss: Loss | str | None = None) -> None:
        if loss is None:
            loss = _claim()  # made by SetAsyncExc, in the task's thread
        #: Why, and from when another worker may receive it (None: not known here).
        self.loss = loss if isinstance(loss, Loss) else None
        if isinstance(loss, Loss):
            when = loss.visible_at.isoformat() if loss.visible_at else "its queue's timeout"
            loss = f"{LOST_TEXT} ({loss.reason.value}); another worker may receive it from {when}"
        super().__init__(loss or LOST_TEXT)

    def __reduce__(self) -> tuple[Any, ...]:
        # Across the prefork pool's pipe, with its loss.
        return (MessageLost, (self.loss or str(self),))


def _current_greenlet() -> Any:
    """The running greenlet of a gevent or eventlet worker's task, else None."""
    monkey = sys.modules.get("gevent.monkey")
    patcher = sys.modules.get("eventlet.patcher")
    green = (monkey is not None and monkey.is_module_patched("threading")) or (
        patcher is not None and bool(patcher.is_monkey_patched("thread"))
    )
    if not green:
        return None
    current = sys.modules["greenlet"].getcurrent()
    return None if current.parent is None else current  # the main one runs no task


#: The armed task of each thread that runs one (a thread runs one task at a time), for
#: a MessageLost made by SetAsyncExc: a dict's get and set are atomic.
_BY_THREAD: dict[int, Armed] = {}


def _claim() -> Loss | None:
    """The loss of the armed task of the calling thread, which the exception being made
    now is delivered to."""
    armed = _BY_THREAD.get(threading.get_ident())
    if armed is None or not armed.decided:
        return None
    armed.delivered = True
    return armed.loss


def _set_async_exc(thread: int, error: type[BaseException]) -> int:
    """Raise *error* in *thread* as it next checks (a call, a loop's jump back); the
    number of threads it was set for."""
    exc = ctypes.py_object(error)
    return int(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), exc))


class Armed:
    """One running task that asked to be interrupted.

    The task's thread writes ``depth`` and ``disarmed``; whoever decides writes
    ``decided`` and ``loss``; ``sent`` and ``delivered`` say whether the exception left
    and arrived. ``decided`` is written before ``depth`` is read, and ``depth`` before
    ``decided``, so that no exception is sent into a shield: see :meth:`shield`."""

    __slots__ = (
        "_lock",
        "decided",
        "delivered",
        "depth",
        "disarmed",
        "greenlet",
        "loss",
        "sent",
        "thread",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.thread = threading.get_ident()
        self.greenlet = _current_greenlet()
        self.depth = 0
        self.disarmed = self.decided = self.sent = self.delivered = False
        self.loss: Loss | None = None
        if self.greenlet is None:
            _BY_THREAD[self.thread] = self

    # -- the side that learns of the loss ------------------------------------------------

    def decide(self, loss: Loss) -> bool:
        """Interrupt the task, once; False if it ended (or was decided) already. The
        caller gives the message up, then calls :meth:`deliver`."""
        with self._lock:
            if self.disarmed or self.decided:
                return False
            self.loss = loss
            self.decided = True
            return True

    def deliver(self) -> None:
        """Raise it in the task now, unless the task is inside this package (it is
        raised as the call returns) or ended."""
        if self.greenlet is not None:
            _schedule_throw(self)
            return
        with self._lock:
            if self.disarmed or self.sent or self.depth:
                return
            self.sent = True
            _set_async_exc(self.thread, MessageLost)

    def signalled(self, loss: Loss) -> None:
        """A prefork pool child's handler of :data:`SIGNAL`, in the task's thread: raise
        now, unless inside the shield (then as it returns). It takes no lock: it may run
        while the task's thread holds one."""
        if self.disarmed or self.decided:
            return
        self.loss, self.decided = loss, True
        if not self.depth:
            self.sent = self.delivered = True
            raise MessageLost(loss)

    # -- the task's side -----------------------------------------------------------------

    def _owner(self) -> bool:
        """Whether the caller is the task's own thread (or greenlet)."""
        if self.greenlet is not None:
            return bool(sys.modules["greenlet"].getcurrent() is self.greenlet)
        return threading.get_ident() == self.thread

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        """The task's thread is inside this package: no interrupt lands here. One sent
        just as it came in lands at once, before the package's work; one owed is raised
        as it leaves. Another thread (a helper of the task's) passes through: it is
        never the one interrupted."""
        if not self._owner():
            yield
            return
        self.depth += 1
        try:
            self._land_pending()
        except BaseException:
            self.depth -= 1
            raise
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.decided and not self.delivered:
                self._raise_owed()

    def _land_pending(self) -> None:
        """If an exception is on its way to this thread (sent by a :meth:`deliver` that
        read depth 0 before it rose), have it land here and now."""
        if self.decided and self.greenlet is None:
            with self._lock:  # waits for that deliver() to finish
                pending = self.sent and not self.delivered
            if pending:
                _land()

    def _raise_owed(self) -> None:
        with self._lock:
            owed = not self.sent and not self.disarmed
            if owed:
                self.sent = self.delivered = True
        if owed:
            raise MessageLost(self.loss)

    def disarm(self) -> bool:
        """``task_postrun``, first thing: nothing is sent to this thread from now on;
        one on its way lands here, in the package's own end of the task, not after it
        (the caller tells the end again). Whether an interrupt was decided."""
        self.depth += 1
        self.disarmed = True
        self._land_pending()
        if self.greenlet is None and _BY_THREAD.get(self.thread) is self:
            del _BY_THREAD[self.thread]
        return self.decided


def _land() -> None:
    """A call of a Python function: a pending asynchronous exception of this thread
    lands as it begins (clearing one with ``SetAsyncExc(NULL)`` from this thread cannot
    work: it lands as that call begins)."""


def _schedule_throw(armed: Armed) -> None:
    """Have the hub throw it into the task's greenlet at its next switch, never from
    here: a switch into it now would leave this greenlet to no one (gevent's and
    eventlet's own ``kill`` do the same)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        sys.modules["gevent"].get_hub().loop.run_callback(_throw_into, armed)
    else:
        sys.modules["eventlet.hubs"].get_hub().schedule_call_global(0, _throw_into, armed)


def _throw_into(armed: Armed) -> None:
    """In the hub, the task's greenlet switched out (its own code: no preemption)."""
    if armed.disarmed or armed.sent or armed.depth or armed.greenlet.dead:
        return  # ended, or inside the shield: raised as it leaves
    armed.sent = armed.delivered = True
    armed.greenlet.throw(MessageLost(armed.loss))


class Armings:
    """The armed tasks of one process, by receipt handle: each task's thread adds and
    removes its own; the side that learns of a loss looks one up (a dict's get, set and
    pop are atomic)."""

    def __init__(self) -> None:
        self._by_handle: dict[str, Armed] = {}

    def arm(self, receipt_handle: str) -> Armed:
        """``task_prerun``, in the task's thread, last."""
        armed = self._by_handle[receipt_handle] = Armed()
        return armed

    def disarm(self, receipt_handle: str) -> bool:
        """``task_postrun``, in the task's thread, first (see :meth:`Armed.disarm`): it
        may be called again, if an exception sent just before lands in it. Whether an
        interrupt was decided."""
        armed = self._by_handle.get(receipt_handle)
        if armed is None:
            return False
        decided = armed.disarm()
        self._by_handle.pop(receipt_handle, None)
        return decided

    def shield(self, receipt_handle: str) -> Callable[[], contextlib.AbstractContextManager[None]]:
        armed = self._by_handle.get(receipt_handle)
        return contextlib.nullcontext if armed is None else armed.shield

    def interrupt(self, receipt_handle: str, loss: Loss, give_up: Callable[[], None]) -> bool:
        """Raise ``MessageLost`` in the task of that message, if it runs here armed: the
        message given up first (*give_up*), so that Celery's failure handling finds it
        settled. False: no such task (it ended, or did not ask)."""
        armed = self._by_handle.get(receipt_handle)
        if armed is None or not armed.decide(loss):
            return False
        give_up()
        armed.deliver()
        return True
