"""The keeper: the worker's child that forks the heartbeat process, watches it, and keeps
the set of messages it beats, so that it can replace it without the worker.

It owns three things, each written by it alone:

* the heartbeat process: forked from the keeper (itself a fork of the quiet worker), and
  forked again when it dies or stops ticking;
* the held set: every message the worker handed over and has not said settled, minus
  those the heartbeat process said it ended. A replacement is handed all of them at once,
  so it beats on even while every thread of the worker is starved (a task holding the
  GIL, a green task that never yields);
* the commands on their way from the worker to the heartbeat process: read at once, and
  kept in a backlog (bounded by the held set) while the heartbeat process does not read.

The keeper runs nothing of the worker's and only calls the system, so it stays
responsive whatever the worker does. It ticks to the worker, which kills and replaces
a keeper that stops ticking.
"""

from __future__ import annotations

import _socket
import collections
import contextlib
import ctypes
import errno
import gc
import mmap
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from .. import _system
from . import wire
from .wire import MAX_PACKET, nonblocking, raw, send

__all__ = ["GAVE_UP", "Setup", "hang_limit", "keep"]

#: How often the keeper and the heartbeat process tick, and how often the keeper looks at
#: the heartbeat process, in seconds.
TICK = 0.2
#: The bounds of how long a heartbeat process may go without a tick before the keeper kills
#: it: never faster than a busy machine can be slow, never slower than a sixth of the
#: default margin (120 - 30 s).
HANG_MIN, HANG_MAX = 1.0, 15.0
#: A heartbeat process (or a fork of one) that dies sooner than this after its start is
#: forked again only after as long, so one that dies at once does not fork in a loop.
RESPAWN_PAUSE = 1.0
#: Heartbeat processes in a row that die within :data:`QUICK_DEATH` of their start (or
#: cannot be forked) before the keeper gives up, and the worker beats in its own process.
MAX_QUICK_DEATHS = 5
QUICK_DEATH = 10.0
#: The keeper's exit status when it gave up (its last report says why).
GAVE_UP = 3
#: How long a keeper that gave up tries to tell the worker why before it exits.
LAST_WORD_WAIT = 1.0
#: How long the keeper waits for the heartbeat process to exit when the worker closes.
EXIT_WAIT = 2.0
_DONTWAIT = _socket.MSG_DONTWAIT


def hang_limit(margin: float) -> float:
    """How long a heartbeat process may go without a tick: a quarter of the *margin*
    (window - interval), within :data:`HANG_MIN` and :data:`HANG_MAX`. Detection, a
    fork and the first beats then fit in the margin many times over."""
    return min(HANG_MAX, max(HANG_MIN, margin / 4))


class _WatchFields(ctypes.Structure):
    _fields_ = [
        #: When the keeper last turned (CLOCK_MONOTONIC, the same in every process).
        ("tick", ctypes.c_double),
        #: The heartbeat process it forked last (0: none now), and its start time.
        ("beat", ctypes.c_int64),
        ("beat_start", ctypes.c_int64),
    ]


class Watch:
    """What the keeper shows the worker without a packet, so that nothing is lost or
    late however long the worker does not read: shared memory mapped by the worker
    before it forks any keeper, written by the keeper (and by the worker only while no
    keeper lives, just before it forks one)."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, ctypes.sizeof(_WatchFields))
        self.fields = _WatchFields.from_buffer(self._map)

    def silent_for(self, now: float) -> float:
        """How long the keeper has not turned (0 before its first turn)."""
        tick = self.fields.tick
        return now - tick if tick else 0.0

    @property
    def beat(self) -> int:
        return int(self.fields.beat)

    @property
    def beat_start(self) -> int:
        return int(self.fields.beat_start)


class Setup(NamedTuple):
    """What the worker hands its keeper: its ends of the two socket pairs (commands in,
    reports out), the shared watch, how long a heartbeat process may go without a tick, and
    the heartbeat process's own life (``serve.serve``), given its end of the keeper's link
    and the reports."""

    commands: Any
    reports: Any
    watch: Watch
    hang: float
    serve: Callable[[int, Any], int]


class _Keeper:
    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.commands = raw(setup.commands)
        self.reports = raw(setup.reports)
        self.watch = setup.watch.fields
        self.worker = os.getppid()
        #: Every message the heartbeat process beats: receipt handle -> its add.
        self.held: dict[str, wire.Add] = {}
        #: Commands the heartbeat process has not read yet: (an add?, packet). Not bounded:
        #: its adds are the held set's, and a heartbeat process that does not read is killed.
        self.backlog: collections.deque[tuple[bool, bytes]] = collections.deque()
        #: Reports to the worker that did not fit yet (a starved worker): sent in order.
        self.outgoing: collections.deque[bytes] = collections.deque()
        self.pid = 0
        self.link: Any = None
        self.started = self.last_tick = self.respawn_at = 0.0
        #: The heartbeat process before, how it ended, and when.
        self.old, self.how, self.died = 0, "", 0.0
        #: Heartbeat processes in a row that died young (or could not be forked), and why the
        #: last one did.
        self.quick, self.why = 0, ""
        self.fork = _system.original("os", "fork")
        self.waitpid = _system.original("os", "waitpid")
        self.poll = _system.original("select", "poll")
        self.sleep = _system.original("time", "sleep")

    # -- its life -------------------------------------------------------------------

    def run(self) -> int:
        while True:
            now = self.watch.tick = time.monotonic()
            if not self.pid and now >= self.respawn_at:
                if self.quick >= MAX_QUICK_DEATHS:
                    return self._give_up()
                self._start(now)
            if not self._wait():
                return self._close()
            if os.getppid() != self.worker:
                return 0  # the worker is gone
            now = time.monotonic()
            if self.pid and now - self.last_tick > self.setup.hang:
                self._kill(now)
            self._tell()

    def _tell(self, report: wire.Started | wire.GaveUp | None = None) -> bool:
        """Send the worker *report*, after those that did not fit before; True when
        nothing waits any more."""
        if report is not None:
            self.outgoing.append(wire.encode(report))
        while self.outgoing and send(self.reports, self.outgoing[0]):
            self.outgoing.popleft()
        return not self.outgoing

    def _give_up(self) -> int:
        """Say why to the worker (it may be too busy to read for a while), and exit."""
        deadline = time.monotonic() + LAST_WORD_WAIT
        while not self._tell(wire.GaveUp(self.why)) and time.monotonic() < deadline:
            self.sleep(TICK / 4)
        return GAVE_UP

    def _wait(self) -> bool:
        """Wait up to a tick for a packet from the worker or the heartbeat process, take it,
        and hand on what waits; False when the worker closed its end."""
        poll = self.poll()
        poll.register(self.commands.fileno(), _READABLE)
        if self.link is not None:
            poll.register(self.link.fileno(), _READABLE)
        for fd, _ in poll.poll(TICK * 1000):
            if fd == self.commands.fileno():
                while (packet := _recv(self.commands)) is not None:
                    if packet == b"":
                        return False
                    self._command(packet)
            elif self.link is not None and fd == self.link.fileno():
                self._from_beat()
        self._flush()
        return True

    def _command(self, packet: bytes) -> None:
        command = wire.decode(packet)
        if isinstance(command, wire.Add):
            self.held[command.receipt_handle] = command
        elif isinstance(command, wire.Acked):
            self.held.pop(command.receipt_handle, None)
        self.backlog.append((isinstance(command, wire.Add), packet))

    def _flush(self) -> None:
        """Hand the heartbeat process what it has not read yet, as much as fits now."""
        while self.backlog and self.link is not None:
            if not send(self.link, self.backlog[0][1]):
                return
            self.backlog.popleft()

    def _from_beat(self) -> None:
        while (packet := _recv(self.link)) is not None:
            if packet == b"":  # it died: every end of its link is closed
                self._ended(_system.status(self.waitpid(self.pid, 0)[1]))
                return
            report = wire.decode(packet)
            if isinstance(report, wire.Tick):  # only its main loop's: it turns and reads
                self.last_tick = time.monotonic()
            elif isinstance(report, wire.Done):
                self.held.pop(report.receipt_handle, None)

    # -- a heartbeat process --------------------------------------------------------------

    def _start(self, now: float) -> None:
        """Fork a heartbeat process and hand it every held message."""
        mine, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        nonblocking(mine)
        try:
            pid = self.fork()
        except OSError as exc:  # EAGAIN (pids.max, RLIMIT_NPROC), ENOMEM
            mine.close()
            theirs.close()
            self._died_young(now, f"no heartbeat process could be forked ({exc})")
            return
        if pid == 0:
            code = 1  # what an exception leaves: not "the worker closed its end"
            try:
                mine.close()
                self.commands.close()
                code = _system.clean(lambda: self.setup.serve(theirs.detach(), self.reports))
            finally:
                os._exit(code)
        theirs.close()
        self.pid, self.link, self.started, self.last_tick = pid, mine, now, now
        self.watch.beat, self.watch.beat_start = pid, _system.started_at(pid)
        paused = now - self.died if self.old else 0.0
        self._tell(wire.Started(pid, self.old, self.how, paused, len(self.held)))
        # Every held message first, then what waited but adds (which the held set
        # holds): a new one beats each at once, since its last beat may be an interval old.
        handed: collections.deque[tuple[bool, bytes]] = collections.deque()
        handed.extend((True, wire.encode(add)) for add in self.held.values())
        handed.extend(entry for entry in self.backlog if not entry[0])
        self.backlog = handed
        self._flush()

    def _died_young(self, now: float, why: str) -> None:
        """One more heartbeat process in a row lost at its start; the next waits a little."""
        self.quick += 1
        self.why = why
        self.respawn_at = now + RESPAWN_PAUSE

    def _ended(self, how: str) -> None:
        """The heartbeat process is gone (reaped): another is forked at once, or after a
        pause if it died within :data:`RESPAWN_PAUSE` of its start. Deaths and hangs
        within :data:`QUICK_DEATH` of the start count towards giving up."""
        now = time.monotonic()
        if self.link is not None:
            self.link.close()
        self.old, self.how, self.died = self.pid, how, now
        self.pid, self.link = 0, None
        self.watch.beat = self.watch.beat_start = 0
        lived = now - self.started
        if lived < QUICK_DEATH:
            self._died_young(now, f"the heartbeat process {how} {lived:.1f} s after its start")
            if lived >= RESPAWN_PAUSE:
                self.respawn_at = now
        else:
            self.quick, self.respawn_at = 0, now

    def _kill(self, now: float) -> None:
        """The heartbeat process stopped ticking (stopped, deadlocked, starved of its CPU):
        kill it, and fork another at once."""
        silent = now - self.last_tick
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.waitpid(self.pid, 0)
        self._ended(f"stopped ticking for {silent:.1f} s and was killed")

    def _close(self) -> int:
        """The worker closed its end (its shutdown): the heartbeat process's end-of-file."""
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.pid:
            deadline = time.monotonic() + EXIT_WAIT
            while not self.waitpid(self.pid, os.WNOHANG)[0]:
                if time.monotonic() >= deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                    self.waitpid(self.pid, 0)
                    break
                self.sleep(0.01)
        self.watch.beat = self.watch.beat_start = 0
        return 0


_READABLE = select.POLLIN | select.POLLHUP


def _recv(sock: Any) -> bytes | None:
    """One packet if one is there (b"": the other end is gone), else None."""
    try:
        return bytes(sock.recv(MAX_PACKET, _DONTWAIT))
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            return b""
        raise


def fork(watch: Watch, hang: float, serve: Callable[[int, Any], int]) -> tuple[int, Any, Any]:
    """Fork a keeper that forks heartbeat processes living *serve*; its PID and the
    worker's ends of its two socket pairs, commands and reports (raises ``OSError``
    where a socket pair or the fork cannot be made: nothing is left open)."""
    # The worker's own socket module: under gevent or eventlet its reads of the reports
    # wait on the hub (its commands are sent on the C library's socket: ``wire.raw``).
    made: list[socket.socket] = []
    try:
        for _ in range(2):
            made += socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        commands, theirs_commands, reports, theirs_reports = made
        setup = Setup(theirs_commands, theirs_reports, watch, hang, serve)
        pid = os.fork()
    except OSError:
        for sock in made:
            sock.close()
        raise
    if pid == 0:  # the keeper: it never returns to Celery
        try:
            commands.close()
            reports.close()
            keep(setup)
        finally:
            os._exit(1)
    theirs_commands.close()
    theirs_reports.close()
    return pid, commands, reports


def keep(setup: Setup) -> None:
    """The keeper's life, in the worker's child: it never returns."""
    for signum in _system.IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    worker = os.getppid()
    _system.die_with_parent()
    if os.getppid() != worker:
        os._exit(0)
    _system.set_title("keeper", worker)
    gc.freeze()  # the worker's objects stay shared: the collector no longer writes them
    os._exit(_system.clean(lambda: _Keeper(setup).run()))
