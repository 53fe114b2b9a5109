"""How a prefork pool child tells the worker's main process that its task started and ended.

The main process receives every message and beats it; the task runs in a child. Before
the pool forks, the main process maps one small shared-memory slot per pool process
(billiard's process index). A child writes its slot at ``task_prerun`` and
``task_postrun``: a few stores, no SQS client, no thread. The message's identity
travels as a 64-bit digest of its receipt handle: the main process already holds the
message. The channel knows nothing of heartbeats: :meth:`Slots.begin` hands the main
process what a child wrote as a :class:`SlotView`, and the sidecar applies it.

Each field has one writing process (the child: its task; the main process:
``in_flight``), and each slot a process-shared *robust* mutex, so the two sides see each
other's stores in order. The kernel hands a robust mutex on when its holder dies: a
child SIGKILLed in the middle of a write (an OOM kill, a hard time limit) jams nothing,
and the next process to take the lock simply goes on. The rules between the sides:

* The main process sends a beat for a task it sees running in a slot only after
  counting it ``in_flight`` there, and uncounts it when SQS has answered.
* ``task_postrun`` marks the slot ended, and waits (at most ``STOP_WAIT``) while a beat
  is in flight: once it returns, no beat for the message is sent, and none lands after
  Celery's delete or requeue.
* A slot whose process is gone ends its heartbeat at once, so no beat follows the
  process's death; Celery then settles the message itself. The process billiard starts
  in its place ends, as it attaches, whatever the dead one left running or held.
* A process is known by its PID *and* its identity, written as it attaches: its start
  time where /proc can be read. A new child that reuses a dead one's PID is another
  process to the main process, never the dead one still (see :class:`_liveness.Watch`).
* A task's manual extension (sent by the child itself) marks the slot ``extending``, so
  the main process holds its regular beats, then says what it asked and when.

Robust mutexes are POSIX (Linux, with glibc or musl, and FreeBSD). Where there are none
(macOS), :func:`available` is False and the worker maps no slots: its main process then
beats each message until Celery settles it, without a fence. Where the libc has them but
cannot make one (musl's ``pthread_mutexattr_setrobust``, qemu-user), :class:`Slots` raises
``OSError`` naming the call, and the worker maps none either. Where liveness is read less
exactly (no pidfd, no /proc), :func:`platform_report` says how, once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import mmap
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import _liveness
from ._heartbeat import STOP_WAIT
from ._report import BLOCK_SIZE, shared_block

#: How often a waiting child looks at the slot again, in seconds.
POLL = 0.001
#: Bytes kept for one pthread mutex: more than any libc's ``pthread_mutex_t`` (40 bytes
#: with glibc on x86-64, 48 on arm64).
MUTEX_SIZE = 64
#: ``PTHREAD_PROCESS_SHARED`` and ``PTHREAD_MUTEX_ROBUST``: 1 in glibc, musl and FreeBSD.
_PROCESS_SHARED = 1
_ROBUST = 1

_EMPTY, _RUNNING, _ENDED = 0, 1, 2
_KEY_MASK = 2**64 - 1
#: Tests set this to pause a child inside its slot's write, with the lock held (the worst
#: instant for a SIGKILL); None in use.
pause_in_write: Callable[[], None] | None = None


class _Slot(ctypes.Structure):
    _fields_ = [
        ("mutex", ctypes.c_uint64 * (MUTEX_SIZE // 8)),
        ("key", ctypes.c_uint64),
        #: The key of the task before, ended: a beat planned for it is not sent.
        ("previous", ctypes.c_uint64),
        ("state", ctypes.c_int32),
        #: The key of the message the task is extending itself right now (0: none).
        ("extending", ctypes.c_uint64),
        #: The pool process that uses the slot, written when it starts.
        ("pid", ctypes.c_int64),
        #: Which process of that PID (:func:`_liveness.identity`), written with it: a later process
        #: that reuses the PID cannot have the same.
        ("identity", ctypes.c_uint64),
        ("started", ctypes.c_double),
        #: A pace set by the task of message ``pace_key``.
        ("pace_key", ctypes.c_uint64),
        ("interval", ctypes.c_double),
        ("visibility_timeout", ctypes.c_int64),
        #: The last own extension of the task of message ``extended_key``: when, and
        #: for how long.
        ("extended_key", ctypes.c_uint64),
        ("extended_at", ctypes.c_double),
        ("extended_for", ctypes.c_int64),
        #: The main process's field: its beats in flight for this slot's task.
        ("in_flight", ctypes.c_int64),
        #: The beating process's: the heartbeat of the task of message ``lost_key``
        #: ended with its message lost, why (``_loss.CODES``), and until when it stays
        #: hidden (CLOCK_MONOTONIC).
        ("lost_key", ctypes.c_uint64),
        ("lost_reason", ctypes.c_int64),
        ("lost_until", ctypes.c_double),
        #: The beating process's: it gave up the message of the task of this key, to
        #: interrupt it (``sqs_heartbeat_interrupt``); the task reads it at its end.
        ("given_up", ctypes.c_uint64),
        #: The pool process's, as it attached: it raises MessageLost at ``SIGUSR2``.
        ("interruptible", ctypes.c_int32),
    ]


@dataclass(frozen=True, slots=True)
class SlotView:
    """What a slot said of one message's task, as the main process read it."""

    index: int
    #: Its task runs in the slot now (False: it ended there).
    running: bool
    #: Its pool process is alive.
    alive: bool = True
    started: float = 0.0
    #: The pace its task set: (interval, visibility timeout), or None.
    pace: tuple[float, int] | None = None
    #: Its task's last own extension: (sent at, seconds), or None.
    extended: tuple[float, int] | None = None
    #: Its task is sending an extension right now: hold the regular beat.
    extending: bool = False
    #: This read counted a beat in flight: the sidecar must :meth:`Slots.finish` it.
    fenced: bool = False


def key_of(receipt_handle: str) -> int:
    """The 64-bit identity of a message in a slot (0 stands for "none").

    Python's own string hash: the pool children are forks of the main process, so they
    share its hash secret (were they not, they would not share the slots either).
    """
    return hash(receipt_handle) & _KEY_MASK or 1


class SlotsBroken(OSError):
    """A slot's mutex can no longer be taken: ``pthread_mutex_lock`` returned an error
    other than ``EOWNERDEAD`` (``ENOTRECOVERABLE``: a holder that died was followed by one
    that could not make the mutex consistent), or ``pthread_mutex_consistent`` failed.

    Raised rather than carrying on: without the lock the ordering the slots promise (no
    beat after ``task_postrun``) silently goes, and initialising the mutex again is no
    way out, as another process may hold it or be about to take it. The slot stays
    broken for every process that maps it; its ``errno`` is the libc's.
    """


def _check(result: int, call: str, error: type[OSError] = OSError) -> None:
    """A pthread function returns its error number (0: done), which *error* carries."""
    if result:
        raise error(result, f"{call} failed: {os.strerror(result)}")


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("pthread_mutex_lock", "pthread_mutex_unlock", "pthread_mutex_consistent"):
        getattr(libc, name).argtypes = [ctypes.c_void_p]
    return libc


def available() -> bool:
    """Whether this platform has process-shared robust mutexes (so slots can be mapped)."""
    try:
        libc = _libc()
        return all(
            hasattr(libc, name)
            for name in ("pthread_mutexattr_setrobust", "pthread_mutex_consistent")
        )
    except OSError:
        return False


class Slots:
    """The slots of one worker, mapped by its main process before the fork, after the
    blocks of counters: one for the main process, one per slot, and one for the heartbeat
    process (``_beat``) of a worker that has one."""

    def __init__(self, capacity: int, *, ended: int = 0) -> None:
        self.capacity = capacity
        counters = (capacity + 2) * BLOCK_SIZE
        table = capacity * ctypes.sizeof(_Slot)
        self._map = mmap.mmap(-1, counters + table + ended * 8)
        self._table = (_Slot * capacity).from_buffer(self._map, counters)
        #: With *ended*, the keys of the last *ended* tasks that ended, in any slot (a
        #: ring): where the beating process cannot ask Celery whether it settled a
        #: message (a worker with a heartbeat process), a task that ended is known as such
        #: after its slot has moved on. Written by the worker's task threads only.
        self._ended = (
            (ctypes.c_uint64 * ended).from_buffer(self._map, counters + table) if ended else None
        )
        self._ended_at = itertools.count()  # next() is atomic: no lock between threads
        self._blocks = [
            shared_block(memoryview(self._map)[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
            for i in range(capacity + 2)
        ]
        self._libc = libc = _libc()
        self._mutexes = [ctypes.addressof(s) + _Slot.mutex.offset for s in self._table]
        # Each call checked: a mutex made from an attribute that did not take (musl's
        # setrobust can fail while pthread_mutex_init succeeds) is one that a killed
        # child leaves locked for good.
        attr = ctypes.create_string_buffer(MUTEX_SIZE)
        _check(libc.pthread_mutexattr_init(attr), "pthread_mutexattr_init")
        try:
            _check(
                libc.pthread_mutexattr_setpshared(attr, _PROCESS_SHARED),
                "pthread_mutexattr_setpshared",
            )
            _check(libc.pthread_mutexattr_setrobust(attr, _ROBUST), "pthread_mutexattr_setrobust")
            for address in self._mutexes:
                result = libc.pthread_mutex_init(ctypes.c_void_p(address), attr)
                _check(result, "pthread_mutex_init")
        finally:
            libc.pthread_mutexattr_destroy(attr)
        self._lock_fn, self._unlock_fn = libc.pthread_mutex_lock, libc.pthread_mutex_unlock
        #: Whether /proc tells processes apart: probed here, before the fork, so that
        #: the children inherit the answer.
        self._proc = _liveness.probe().proc
        #: The beating process's pidfds of the pool processes it has seen in a slot.
        self._watch = _liveness.Watch(self._proc, self._named, keep=2 * capacity)

    def counter_blocks(self, slot: int | None, *, beat: bool = False) -> tuple[Any, list[Any]]:
        """The block of counters that the main process (*slot* None), the task in *slot*
        or the heartbeat process (*beat*) writes, and the blocks it only reads."""
        own = self.capacity + 1 if beat else 0 if slot is None else slot + 1
        return self._blocks[own], [b for i, b in enumerate(self._blocks) if i != own]

    def _lock(self, index: int) -> None:
        result = self._lock_fn(self._mutexes[index])
        if result:  # the per-task path: one test when all is well
            self._recover(index, result)

    def _recover(self, index: int, result: int) -> None:
        """The lock of slot *index* returned *result*: taken from a holder that died, or
        :class:`SlotsBroken`."""
        if result != errno.EOWNERDEAD:
            _check(result, f"pthread_mutex_lock of slot {index}", SlotsBroken)
        # Its holder died in the middle of a write: what it left is the slot's state
        # now, and the next write (or the dead process's check) sets it right.
        result = self._libc.pthread_mutex_consistent(self._mutexes[index])
        if result:
            # Unlocked inconsistent, the mutex is not recoverable: every later lock fails
            # at once (SlotsBroken), where one kept locked would make them all wait.
            self._unlock(index)
            _check(result, f"pthread_mutex_consistent of slot {index}", SlotsBroken)

    def _unlock(self, index: int) -> None:
        # Not checked: it fails only for a mutex this thread does not hold (EPERM), and
        # every caller holds it.
        self._unlock_fn(self._mutexes[index])

    @contextlib.contextmanager
    def _locked(self, index: int) -> Iterator[_Slot]:
        self._lock(index)
        try:
            yield self._table[index]
        finally:
            self._unlock(index)

    # -- a pool child's side -------------------------------------------------------------

    def attach(self, index: int, pid: int, *, interruptible: bool = False) -> None:
        """A pool process with id *pid* (the caller itself) starts using slot *index*:
        whatever the process before it left there (killed in the middle of a task) has
        ended. It writes its identity too, read now: once per process, not per task;
        and whether it handles the interrupt's signal (:meth:`interrupt`)."""
        identity = _liveness.identity(pid, self._proc)
        with self._locked(index) as slot:
            if slot.state == _RUNNING:
                slot.previous, slot.state = slot.key, _ENDED
            slot.extending = 0
            slot.interruptible = interruptible
            slot.pid, slot.identity = pid, identity

    def started(self, index: int, key: int) -> None:
        """``task_prerun`` of message *key*'s task in the child using slot *index*."""
        # The per-task path: the lock by hand, not through a generator-based context
        # manager, which would cost more than the stores themselves.
        slot = self._table[index]
        self._lock(index)
        try:
            slot.previous = slot.key
            slot.key = key
            if pause_in_write is not None:
                pause_in_write()
            slot.state = _RUNNING
            slot.started = time.monotonic()
        finally:
            self._unlock(index)

    def ended(self, index: int) -> bool:
        """``task_postrun``: no beat is sent for the task once this returns. Whether the
        beating process gave its message up to interrupt it (:meth:`interrupt`)."""
        slot = self._table[index]
        self._lock(index)
        try:
            slot.state = _ENDED
            busy = slot.in_flight > 0
            given_up = bool(slot.given_up == slot.key)
        finally:
            self._unlock(index)
        ring = self._ended
        if ring is not None:
            ring[next(self._ended_at) % len(ring)] = slot.key  # the key is this task's own
        if busy:
            _wait_idle(slot)
        return given_up

    def configure(self, index: int, key: int, interval: float, visibility_timeout: int) -> bool:
        """The task of message *key* sets its pace; False if it no longer runs there (a
        handle kept past its task must not pace the next one)."""
        with self._locked(index) as slot:
            if slot.key != key or slot.state != _RUNNING:
                return False
            slot.interval, slot.visibility_timeout = interval, visibility_timeout
            slot.pace_key = key  # last: a write cut short is never read
            return True

    def _running_in(self, key: int) -> int | None:
        """The slot the task of message *key* runs in, as a read without the locks says
        (the caller checks under the slot's)."""
        return next(
            (i for i, s in enumerate(self._table) if s.key == key and s.state == _RUNNING), None
        )

    def lose(self, index: int | None, key: int, reason: int, until: float) -> None:
        """The beating process: the heartbeat of the task of message *key* ended with
        its message lost (*reason*), hidden until *until*. Said only to that task.
        *index*: where a beat last found it (None: looked for)."""
        index = self._running_in(key) if index is None else index
        if index is None:
            return
        with self._locked(index) as slot:
            if slot.key == key:
                slot.lost_reason, slot.lost_until = reason, until
                slot.lost_key = key  # last: a write cut short is never read

    def interrupt(self, index: int | None, key: int) -> tuple[int, int] | None:
        """The beating process: interrupt the task of message *key*. If it still runs in
        slot *index* (None: looked for), its message is given up from now on (its task
        hears so at its end), and this returns its process to signal, as (pid,
        identity). None: it ended, or its process handles no such signal."""
        index = self._running_in(key) if index is None else index
        if index is None:
            return None
        with self._locked(index) as slot:
            if slot.key != key or slot.state != _RUNNING or not slot.interruptible:
                return None
            slot.given_up = key
            return int(slot.pid), int(slot.identity)

    def signal(self, pid: int, identity: int, signum: int) -> bool:
        """Send *signum* to pool process *pid*, if it is still the one that attached as
        *identity* (:meth:`_liveness.Watch.signal`). False: it is gone."""
        return self._watch.signal(pid, identity, signum)

    def loss_said(self, index: int, key: int) -> tuple[int, float] | None:
        """:meth:`loss` without the lock, for a signal handler, which may run while its
        thread holds it: ``lost_key`` is one aligned word, written last."""
        slot = self._table[index]
        if slot.lost_key != key:
            return None
        return int(slot.lost_reason), float(slot.lost_until)

    def loss(self, index: int, key: int) -> tuple[int, float] | None:
        """The task of message *key*: its message's loss, as :meth:`lose` said it."""
        with self._locked(index) as slot:
            if slot.lost_key != key:
                return None
            return int(slot.lost_reason), float(slot.lost_until)

    @contextlib.contextmanager
    def extending(self, index: int, key: int) -> Iterator[bool]:
        """Hold the beating process's beats while the task of message *key* sends its own
        extension; yields False (and holds nothing) if that task no longer runs there."""
        with self._locked(index) as slot:
            running = slot.key == key and slot.state == _RUNNING
            if running:
                slot.extending = key
            busy = running and slot.in_flight > 0
        try:
            if busy:
                _wait_idle(slot)
            yield running
        finally:
            if running:
                with self._locked(index) as slot:
                    slot.extending = 0

    def extended(self, index: int, key: int, at: float, seconds: int) -> None:
        with self._locked(index) as slot:
            if slot.key != key:
                return
            slot.extended_at, slot.extended_for = at, seconds
            slot.extended_key = key  # last: a write cut short is never read

    # -- the main process's side -----------------------------------------------------------

    def begin(self, key: int, index: int | None) -> SlotView | None:
        """What the slot of message *key*'s task says, read just before a beat; counts
        the beat in flight there when the task runs. *index*: the slot it was last seen
        in. None when its task has not started in any slot."""
        if index is None:
            index = next((i for i, s in enumerate(self._table) if key in (s.key, s.previous)), None)
            if index is None:
                ring = self._ended
                return SlotView(0, running=False) if ring is not None and key in ring[:] else None
        with self._locked(index) as slot:
            if slot.key != key or slot.state != _RUNNING:
                return SlotView(index, running=False)
            extending = slot.extending == key
            if not extending:
                slot.in_flight += 1
            pid, identity, started = int(slot.pid), int(slot.identity), float(slot.started)
            paced, extended = slot.pace_key == key, slot.extended_key == key
            interval, visibility = float(slot.interval), int(slot.visibility_timeout)
            at, seconds = float(slot.extended_at), int(slot.extended_for)
        alive = False
        try:
            alive = self._watch.alive(pid, identity)
        finally:
            # Dead, or the check raised: no beat goes, so none is left in flight (a
            # task_postrun would wait for it).
            if not alive and not extending:
                self.finish(index)
        if not alive:
            return SlotView(index, running=True, alive=False)
        return SlotView(
            index,
            running=True,
            started=started,
            pace=(interval, visibility) if paced else None,
            extended=(at, seconds) if extended else None,
            extending=extending,
            fenced=not extending,
        )

    def forget_in_flight(self) -> None:
        """A new heartbeat process takes over: no beat of the one before is in flight any
        more (it died with them), so no ``task_postrun`` waits for them."""
        for index in range(self.capacity):
            with contextlib.suppress(SlotsBroken), self._locked(index) as slot:
                slot.in_flight = 0  # a broken slot is said at its first beat

    def finish(self, index: int) -> None:
        """A beat counted by :meth:`begin` has been answered (or was not sent)."""
        with self._locked(index) as slot:
            slot.in_flight = max(0, slot.in_flight - 1)

    def _named(self) -> set[tuple[int, int]]:
        """The pool processes the slots name now, as (pid, identity)."""
        return {(int(s.pid), int(s.identity)) for s in self._table}


def _wait_idle(slot: _Slot) -> None:
    deadline = time.monotonic() + STOP_WAIT
    while slot.in_flight > 0 and time.monotonic() < deadline:
        time.sleep(POLL)
