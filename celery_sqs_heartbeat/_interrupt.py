"""Raising :class:`~._loss.MessageLost` in a running task, from another thread of its
process, in every pool: where each task runs, and how an exception reaches it there.

A thread (the threads pool; the solo pool's main thread) gets it through
``PyThreadState_SetAsyncExc``, as Temporal raises into a synchronous activity: at its
next bytecode, so a task in one long C call gets it when the call returns. A greenlet
(gevent, eventlet) gets it thrown by its hub at its next switch: one that never yields
never gets it. A prefork pool child gets a signal (:data:`SIGNAL`) from the main
process, as Celery's soft time limit reaches it, and raises it from the handler.
"""

from __future__ import annotations

import ctypes
import signal
import sys
import threading
from typing import Any, NamedTuple

#: The signal the main process sends a prefork pool child whose task's message is lost
#: (billiard uses SIGUSR1 for the soft time limit; Celery's children use no SIGUSR2).
SIGNAL = getattr(signal, "SIGUSR2", None)


class Where(NamedTuple):
    """Where a task runs: its thread, and its greenlet in a green pool (else None)."""

    thread: int
    greenlet: Any


def here() -> Where:
    """Where the calling task runs (its ``task_prerun``)."""
    return Where(threading.get_ident(), _current_greenlet())


def _current_greenlet() -> Any:
    """The running greenlet of a gevent or eventlet worker, else None."""
    if not _green():
        return None
    current = sys.modules["greenlet"].getcurrent()
    return None if current.parent is None else current  # the main one runs no task


def _green() -> bool:
    """Whether this is a gevent or eventlet worker (its threads monkey-patched)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        return True
    patcher = sys.modules.get("eventlet.patcher")
    return patcher is not None and bool(patcher.is_monkey_patched("thread"))


def throw(where: Where, error: BaseException) -> bool:
    """Raise *error* in the task running at *where*; False where it cannot be. A thread
    gets a new one of its class (``SetAsyncExc`` takes a class, made in the thread)."""
    try:
        if where.greenlet is not None:
            return _throw_green(where.greenlet, error)
        done = ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(where.thread), ctypes.py_object(type(error))
        )
        return bool(done == 1)
    except Exception:  # the heartbeat's end is said already: the task runs on
        return False


def _throw_green(glet: Any, error: BaseException) -> bool:
    """Have the hub throw *error* into *glet* at its next switch, never from here: a
    switch into it now would leave this greenlet to no one."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        sys.modules["gevent"].get_hub().loop.run_callback(_throw_into, glet, error)
        return True
    hubs = sys.modules["eventlet.hubs"]
    hubs.get_hub().schedule_call_global(0, _throw_into, glet, error)
    return True


def _throw_into(glet: Any, error: BaseException) -> None:
    if not glet.dead:
        glet.throw(error)
