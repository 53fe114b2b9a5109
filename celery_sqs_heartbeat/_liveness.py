"""Whether a process is still the one that attached to a slot: by its PID and an
identity (its start time from /proc), with a pidfd where the kernel has them.

A PID is reused; a process's start time with its PID is not. This module owns how this
machine is probed for both (once), what the worker says when it can tell less, and the
beating process's pidfds of the pool processes (:class:`Watch`), through which it both
looks at and signals them.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

#: The states of /proc/<pid>/stat of a process that has exited: a zombie not yet reaped,
#: and dead ('x' in Linux 2.6.33 to 3.13, 'X' since).
_EXITED = frozenset("ZXx")
#: The field of /proc/<pid>/stat after the command's ")" that holds the state (field 3),
#: and the one that holds the start time (field 22, clock ticks since boot).
_STATE, _STARTTIME = 0, 19


class Stat(NamedTuple):
    """What /proc/<pid>/stat says of a process."""

    state: str
    #: Clock ticks since boot: with the PID, no two processes share it.
    start: int


def read_stat(pid: int | str) -> Stat | None:
    """/proc/<pid>/stat of process *pid* ("self": this one), or None if it has none.
    Any other failure (``EMFILE``: out of file descriptors) raises ``OSError``: not
    being able to look is no proof that a process is gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        text = os.read(fd, 4096)  # one read: the kernel writes the line whole
    except ProcessLookupError:  # ESRCH: it exited in between
        return None
    finally:
        os.close(fd)
    # The command, in parentheses, may hold spaces and ")": the fields follow the last.
    fields = text[text.rfind(b")") + 2 :].split()
    try:
        return Stat(fields[_STATE].decode(), int(fields[_STARTTIME]))
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


@dataclass(frozen=True, slots=True)
class Platform:
    """How this machine lets the main process see that a pool process is alive."""

    #: ``os.pidfd_open`` works (Linux 5.3 and later, unless a seccomp profile refuses it).
    pidfd: bool
    #: /proc/self/stat is this process's: a process's start time can be read.
    proc: bool


@functools.cache
def probe() -> Platform:
    """Probed once: a fact of the machine, the same in every process forked from this."""
    try:
        os.close(os.pidfd_open(os.getpid()))
        pidfd = True
    except (AttributeError, OSError):
        pidfd = False
    try:
        own = read_stat("self")
        # /proc mounted for another PID namespace shows someone else under our PID (or
        # no /proc/self at all): its start times would not be our children's.
        theirs = read_stat(os.getpid())
    except OSError:
        own = theirs = None
    proc = own is not None and theirs is not None and own.start == theirs.start
    return Platform(pidfd=pidfd, proc=proc)


def platform_report() -> list[str]:
    """How this machine tells a pool process's liveness less exactly than it could, one
    line each, for the worker to say once at its start; empty when nothing is amiss."""
    platform = probe()
    lines = []
    if not platform.pidfd:
        lines.append(
            "no pidfd (a kernel before 5.3, or a seccomp profile that refuses pidfd_open): "
            "a pool process's liveness is read at each beat"
            + (" from /proc" if platform.proc else "")
        )
    if not platform.proc:
        lines.append(
            "/proc unreadable (or another PID namespace's): "
            + (
                "a pool process's pidfd is not checked against its start time, so a process "
                "that took a dead child's PID before its first beat looks alive"
                if platform.pidfd
                else "liveness from kill(pid, 0), so a dead pool process not yet reaped, "
                "or a process that took a dead one's PID, looks alive"
            )
        )
    return lines


#: An identity that could not be read: the start time is not checked.
UNKNOWN = 0


def identity(pid: int, proc: bool) -> int:
    """Which process of PID *pid* (the caller) it is, for as long as it lives: with
    /proc (*proc*), its start time, which the main process checks the process at the
    PID against; without, the time it attached (CLOCK_MONOTONIC, ns): no later process
    of the PID attaches at the same instant, but it is only a key, with nothing to
    check against. :data:`UNKNOWN` where /proc could not be read just now."""
    if proc:
        try:
            stat = read_stat(pid)
        except OSError:  # EMFILE: nothing to check against, but no reason to be dead
            return UNKNOWN
        return UNKNOWN if stat is None else stat.start
    return time.monotonic_ns()


#: What :func:`is_still` read when /proc could not be read.
_UNREAD = Stat("", -1)


def is_still(pid: int, identity: int, proc: bool) -> bool:
    """Whether process *pid* has not exited (a zombie has) and is still the one that
    attached as *identity*; without /proc (*proc*), or where it cannot be read just now
    (``EMFILE``), whether some process of ours has that PID."""
    if proc:
        try:
            stat = read_stat(pid)
        except OSError:
            stat = _UNREAD
        if stat is not _UNREAD:
            return (
                stat is not None and stat.state not in _EXITED and identity in (UNKNOWN, stat.start)
            )
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: not our child
        return False
    return True


class Watch:
    """The beating process's pidfds of the pool processes it has seen in a slot, kept by
    (pid, identity): a new child that reuses a dead one's PID is never watched, nor
    signalled, through the dead one's.

    The sidecar's sender threads call it at once. ``_lock`` guards ``_pidfds`` and is
    held across ``poll(0)``, which does not block: a pidfd is closed only once out of the
    dict, so no thread polls a number closed (and perhaps reused) by another. Only the
    beating process takes it: a pool child forked while it was held never does.
    """

    def __init__(self, proc: bool, named: Callable[[], set[tuple[int, int]]], keep: int) -> None:
        #: Whether /proc tells processes apart (:func:`probe`, read before the fork).
        self._proc = proc
        #: The processes the slots name now: the pidfds of the others are pruned...
        self._named = named
        #: ...once more than this many are kept.
        self._keep = keep
        self._pidfds: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def alive(self, pid: int, identity: int) -> bool:
        """Whether pool process *pid*, which attached as *identity*, still runs; a dead
        child that Celery has not yet reaped counts as gone (its pidfd is readable from
        the moment it exits).

        A pidfd opened after the child attached refers to it if /proc still shows its
        start time after the open; that read is made only then, not at each beat.
        Without pidfds, /proc is read at each beat.
        """
        child = (pid, identity)
        poll = _poll()  # not select(): a pidfd may be 1024 or more
        with self._lock:
            fd = self._pidfds.get(child)
            gone = fd is not None and self._gone(child, fd, poll)
        if fd is not None:
            if gone:
                os.close(fd)
            return not gone
        try:
            opened = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except (AttributeError, OSError):  # no pidfd here (ENOSYS; a seccomp's EPERM)
            return is_still(pid, identity, self._proc)
        if not is_still(pid, identity, self._proc):  # a zombie; the PID another's already
            os.close(opened)
            return False
        with self._lock:
            fd = self._pidfds.setdefault(child, opened)  # another thread's may be there
            gone = self._gone(child, fd, poll)
            stale = self._stale() if len(self._pidfds) > self._keep else []
        closing = set(stale)  # out of the dict now: no other thread polls them
        if fd != opened:
            closing.add(opened)
        if gone:
            closing.add(fd)
        for old in closing:
            os.close(old)
        return not gone

    def signal(self, pid: int, identity: int, signum: int) -> bool:
        """Send *signum* to pool process *pid*, if it is still the one that attached as
        *identity*: through its pidfd where the kernel has them (looked up and used
        under one hold of the lock, so no other thread closes it between), so that a
        process that reused the PID gets nothing. False: it is gone."""
        child = (pid, identity)
        for _look in range(2):  # the pidfd is opened by the first look, if not yet
            with self._lock:
                fd = self._pidfds.get(child)
                if fd is not None:
                    try:
                        signal.pidfd_send_signal(fd, signum)
                    except ProcessLookupError:
                        return False
                    return True
            if not self.alive(pid, identity):
                return False
        if probe().pidfd:
            return False  # its pidfd was closed meanwhile: it exited
        try:  # no pidfds here: /proc said it is the same process a moment ago
            os.kill(pid, signum)
        except ProcessLookupError:
            return False
        return True

    def _gone(self, child: tuple[int, int], fd: int, poll: Any) -> bool:
        """Whether *child*'s pidfd *fd* says it exited; if so it leaves ``_pidfds`` (the
        caller closes it). With ``_lock`` held."""
        poll.register(fd, select.POLLIN)
        if not poll.poll(0):
            return False
        del self._pidfds[child]
        return True

    def _stale(self) -> list[int]:
        """The pidfds of processes no slot names any more (long replaced), out of
        ``_pidfds`` for the caller to close. With ``_lock`` held."""
        current = self._named()
        stale = [child for child in self._pidfds if child not in current]
        return [self._pidfds.pop(child) for child in stale]


def _poll() -> Any:
    """A poll object of the operating system's own: eventlet's green ``select`` has none
    (and a pidfd is only looked at, never waited for)."""
    eventlet = sys.modules.get("eventlet.patcher")
    if eventlet is not None and eventlet.is_monkey_patched("select"):
        return eventlet.original("select").poll()
    return select.poll()
