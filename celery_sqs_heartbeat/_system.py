"""The operating system's own calls for the worker's helper processes (the keeper and
the heartbeat process): fork, wait, poll and sleep past gevent's and eventlet's patches,
dying with the parent, and reaping.

A helper process must never wait on the worker's hub (gevent) or poll through it
(eventlet), and never run one of the worker's greenlets: it calls the system directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The signals the keeper and the heartbeat process ignore: the stops of the whole group
#: (systemd's default), and the ones Celery handles in the worker (SIGHUP restarts it).
IGNORED_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)
#: ``prctl(PR_SET_PDEATHSIG, ...)`` and ``PR_GET_PDEATHSIG``: Linux's numbers for them.
_PR_SET_PDEATHSIG, _PR_GET_PDEATHSIG = 1, 2
#: How often a bounded wait for a child looks again, in seconds.
_REAP_POLL = 0.01


def original(module: str, name: str) -> Any:
    """The system's own *module.name*, not gevent's (which waits on the worker's hub) or
    eventlet's (which polls)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched(module):
        return monkey.get_original(module, name)
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is not None and patcher.is_monkey_patched(module):
        return getattr(patcher.original(module), name)
    return getattr(sys.modules.get(module) or __import__(module), name)


def gevent() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def clean(run: Callable[[], int]) -> int:
    """Run *run* where no greenlet of the worker can run on, and return its status.

    A fork keeps the worker's hub and every greenlet waiting on it. Under eventlet a new
    hub for this thread leaves them behind. Under gevent *run* goes to a real thread,
    whose hub is its own, and this thread (with the worker's hub) waits for it with a
    lock of the system's own: the worker's greenlets never run here.
    """
    _new_green_hub()
    if not gevent():
        return run()
    start = original("_thread", "start_new_thread")
    done = original("_thread", "allocate_lock")()
    done.acquire()
    status = [1]  # an exception in *run* is no clean exit

    def main() -> None:
        try:
            status[0] = run()
        finally:
            done.release()

    start(main, ())
    done.acquire()
    return status[0]


def _new_green_hub() -> None:
    """Under eventlet the fork shares the worker's hub (its epoll set): make our own.
    (gevent's fork makes a new hub itself.)"""
    if "eventlet" not in sys.modules:
        return
    from eventlet import hubs, patcher  # type: ignore[import-untyped]

    if patcher.is_monkey_patched("socket"):
        hubs.use_hub()


def die_with_parent() -> bool:
    """On Linux, have the kernel SIGKILL this process the moment its parent dies; False
    where it cannot (then the end-of-file and the parent checks end it, a little later)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def can_die_with_parent() -> bool:
    """Whether this kernel has ``PR_SET_PDEATHSIG`` (asked with ``PR_GET_PDEATHSIG``,
    which changes nothing)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        signum = ctypes.c_int()
        return int(libc.prctl(_PR_GET_PDEATHSIG, ctypes.byref(signum), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def status(code: int) -> str:
    """A child's wait status, as a person reads it."""
    if os.WIFSIGNALED(code):
        number = os.WTERMSIG(code)
        try:
            name = signal.Signals(number).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {number}"
        return f"was killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(code)}"


def reaped(pid: int, timeout: float) -> bool:
    """Wait at most *timeout* s for child *pid* to exit, and reap it; True once it has
    (or it is not this process's child)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_REAP_POLL)


def reap(pid: int) -> int | None:
    """The wait status of child *pid*, reaped now (None: reaped already)."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None


def _parent_and_start(pid: int) -> tuple[int, int]:
    """The parent of process *pid* and its start time (clock ticks since boot); (0, 0):
    gone, or not to be read here."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0, 0
    fields = stat.rpartition(")")[2].split()
    try:
        return int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return 0, 0


def started_at(pid: int) -> int:
    """Process *pid*'s start time, which no later process of that PID shares (0: not
    to be read)."""
    return _parent_and_start(pid)[1]


def reap_orphan(pid: int, start: int, timeout: float) -> None:
    """Reap process *pid*, started at *start*, a grandchild whose parent just died, if
    it came to this process: a worker that is PID 1 in a container (or a child
    subreaper) inherits it, and nothing else would ever reap it. The start time keeps
    a child of this process's own that got the PID since from being reaped."""
    if not pid or not start:
        return
    parent, started = _parent_and_start(pid)
    if parent == os.getpid() and started == start:
        with contextlib.suppress(OSError):
            reaped(pid, timeout)


def set_title(what: str, worker: int) -> None:
    """Name this helper process of *worker* in ``ps`` as Celery names its own processes:
    through ``setproctitle``, where it is installed (else nothing changes)."""
    from celery.platforms import set_process_title

    with contextlib.suppress(Exception):
        set_process_title(f"celery-sqs-heartbeat {what}", info=f"of worker {worker}")
