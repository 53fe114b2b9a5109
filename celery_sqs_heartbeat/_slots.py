"""How a prefork pool child tells the worker's main process that its task started and ended.

The main process receives every message and beats it; the task runs in a child. Before
the pool forks, the main process maps one small shared-memory slot per pool process
(billiard's process index), each with a process-shared lock, and the worker's counters.
A child writes its slot at ``task_prerun`` and ``task_postrun``: plain stores, no
system call but the lock, no SQS client, no thread. The message's identity travels as
a 64-bit digest of its receipt handle: the main process already holds the message.

The rules between the two sides, each step under the slot's lock:

* The main process sends a beat for a task it sees running in a slot only after
  counting it ``in_flight`` there, and uncounts it when SQS has answered.
* ``task_postrun`` marks the slot ended, and waits (at most ``STOP_WAIT``) while a beat
  is in flight: once it returns, no beat for the message is sent, and none lands after
  Celery's delete or requeue.
* A slot whose process is gone (killed, hard time limit) ends its heartbeat at once, so
  no beat follows the process's death; Celery then settles the message itself.
* A task's manual extension (sent by the child itself) marks the slot ``extending``, so
  the main process holds its regular beats, then says what it asked and when.

A lock's holder may die between two stores (SIGKILL); every acquire therefore has a
time-out, after which the step goes on without the lock and says so once.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import multiprocessing
import os
import select
import time
from collections.abc import Iterator
from typing import Any

from ._heartbeat import STOP_WAIT, Ended, Heartbeat

logger = logging.getLogger("celery_sqs_heartbeat")

#: How long a step waits for a slot's lock before going on without it. The lock is
#: held for a few stores; only a holder killed in between keeps it longer.
LOCK_TIMEOUT = 0.5
#: How often a waiting child looks at the slot again, in seconds.
POLL = 0.001

_EMPTY, _RUNNING, _ENDED = 0, 1, 2
_KEY_MASK = 2**64 - 1


class _Slot(ctypes.Structure):
    _fields_ = [
        ("key", ctypes.c_uint64),
        #: The key of the task before, ended: a beat planned for it is not sent.
        ("previous", ctypes.c_uint64),
        ("state", ctypes.c_int32),
        ("in_flight", ctypes.c_int32),
        ("extending", ctypes.c_int32),
        ("pid", ctypes.c_int64),
        ("started", ctypes.c_double),
        #: A pace set by the task (0: its options' own).
        ("interval", ctypes.c_double),
        ("visibility_timeout", ctypes.c_int64),
        #: The task's last manual extension: when, and for how long.
        ("extended_at", ctypes.c_double),
        ("extended_for", ctypes.c_int64),
    ]


def key_of(receipt_handle: str) -> int:
    """The 64-bit identity of a message in a slot (0 stands for "none").

    Python's own string hash: the pool children are forks of the main process, so they
    share its hash secret (were they not, they would not share the slots either).
    """
    return hash(receipt_handle) & _KEY_MASK or 1


class Slots:
    """The slots of one prefork worker, mapped by its main process before the fork."""

    def __init__(self, capacity: int, extra: int = 0) -> None:
        """Map *capacity* slots, and *extra* bytes for the caller (see :meth:`extra`)."""
        self.capacity = capacity
        self._extra = extra
        self._map = mmap.mmap(-1, extra + capacity * ctypes.sizeof(_Slot))
        self._table = (_Slot * capacity).from_buffer(self._map, extra)
        # Locks of the fork context are anonymous semaphores, inherited by the children,
        # with no resource-tracker process.
        context = multiprocessing.get_context("fork")
        self._locks = [context.Lock() for _ in range(capacity)]
        self._noted: set[str] = set()
        #: The main process's pidfd of each child it has seen in a slot.
        self._pidfds: dict[int, int] = {}

    def extra(self) -> Any:
        """The *extra* bytes, shared like the slots (the worker's counters)."""
        return memoryview(self._map)[: self._extra]

    @contextlib.contextmanager
    def _locked(self, index: int) -> Iterator[None]:
        lock = self._locks[index]
        got = lock.acquire(timeout=LOCK_TIMEOUT) or self._stuck(index)
        try:
            yield
        finally:
            if got:
                lock.release()

    def _stuck(self, index: int) -> bool:
        """Say once that a slot's lock was held too long; go on without it (False)."""
        if "lock" not in self._noted:
            self._noted.add("lock")
            logger.error(
                "celery-sqs-heartbeat: the lock of pool slot %d was held for over %g s (its "
                "process was probably killed while holding it); going on without it.",
                index,
                LOCK_TIMEOUT,
            )
        return False

    # -- a pool child's side -------------------------------------------------------------

    def started(self, index: int, receipt_handle: str, pid: int) -> None:
        """``task_prerun`` in the child with process *index* and id *pid*."""
        # The per-task path: the lock by hand, not through a generator-based context
        # manager, which would cost more than the stores themselves.
        slot, lock = self._table[index], self._locks[index]
        got = lock.acquire(timeout=LOCK_TIMEOUT) or self._stuck(index)
        try:
            if slot.key:
                slot.previous = slot.key
            slot.key = key_of(receipt_handle)
            slot.state = _RUNNING
            slot.pid = pid
            slot.started = time.monotonic()
            slot.interval = slot.visibility_timeout = slot.extended_for = 0
            slot.extended_at = 0.0
        finally:
            if got:
                lock.release()

    def ended(self, index: int) -> None:
        """``task_postrun``: no beat is sent for the task once this returns."""
        slot, lock = self._table[index], self._locks[index]
        got = lock.acquire(timeout=LOCK_TIMEOUT) or self._stuck(index)
        try:
            slot.state = _ENDED
            busy = slot.in_flight > 0
        finally:
            if got:
                lock.release()
        if busy:
            self._wait_idle(slot)

    def configure(self, index: int, interval: float, visibility_timeout: int) -> None:
        slot = self._table[index]
        with self._locked(index):
            slot.interval, slot.visibility_timeout = interval, visibility_timeout

    @contextlib.contextmanager
    def extending(self, index: int) -> Iterator[None]:
        """Hold the main process's beats while the child sends its own extension."""
        slot = self._table[index]
        with self._locked(index):
            slot.extending = 1
            busy = slot.in_flight > 0
        try:
            if busy:
                self._wait_idle(slot)
            yield
        finally:
            with self._locked(index):
                slot.extending = 0

    def extended(self, index: int, at: float, seconds: int) -> None:
        slot = self._table[index]
        with self._locked(index):
            slot.extended_at, slot.extended_for = at, seconds

    def pace(self, index: int) -> tuple[float, int] | None:
        """The pace the task set, if any (for ``current()`` in the child)."""
        slot = self._table[index]
        return (slot.interval, int(slot.visibility_timeout)) if slot.interval else None

    @staticmethod
    def _wait_idle(slot: _Slot) -> None:
        deadline = time.monotonic() + STOP_WAIT
        while slot.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(POLL)

    # -- the main process's side -----------------------------------------------------------

    def begin(self, hb: Heartbeat, until: float) -> bool:
        """Whether to send a beat for *hb* now; counts it in flight in its task's slot.

        Brings *hb* up to date with its slot first: running, ended (by its task or with
        its process), or paced and extended by its task. False when it ended, or its
        next beat is now due after *until* (its task extended the message itself).
        """
        key = key_of(hb.receipt_handle)
        if hb.slot is None:
            hb.slot = next(
                (i for i, s in enumerate(self._table) if key in (s.key, s.previous)), None
            )
            if hb.slot is None:
                return True  # its task has not started: nothing to fence
        index, slot = hb.slot, self._table[hb.slot]
        with self._locked(index):
            if slot.key != key or slot.state != _RUNNING:
                hb.end(Ended.TASK_ENDED)
                return False
            if not self._alive(int(slot.pid)):
                hb.end(Ended.SETTLED)
                return False
            hb.run(slot.started)
            if slot.interval and (slot.interval, slot.visibility_timeout) != (
                hb.interval,
                hb.visibility_timeout,
            ):
                hb.reconfigure(slot.interval, int(slot.visibility_timeout))
            if slot.extended_at > hb.last_sent:
                hb.extended(slot.extended_at, int(slot.extended_for))
            if slot.extending or hb.next_due > until:
                return False
            slot.in_flight += 1
            return True

    def finish(self, hb: Heartbeat) -> None:
        """The beat counted by :meth:`begin` has been answered (or given up on)."""
        if hb.slot is not None:
            slot = self._table[hb.slot]
            with self._locked(hb.slot):
                slot.in_flight = max(0, slot.in_flight - 1)

    def _alive(self, pid: int) -> bool:
        """Whether pool process *pid* still runs; a dead child that Celery has not yet
        reaped counts as gone (its pidfd is readable from the moment it exits)."""
        fd = self._pidfds.get(pid)
        if fd is None:
            if len(self._pidfds) > 2 * self.capacity:  # forget processes long replaced
                current = {int(s.pid) for s in self._table}
                for old in [p for p in self._pidfds if p not in current]:
                    os.close(self._pidfds.pop(old))
            try:
                fd = self._pidfds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                return False
            except (AttributeError, OSError):  # no pidfd here: the best we can do
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return False
                return True
        if select.select([fd], [], [], 0)[0]:
            os.close(self._pidfds.pop(pid))
            return False
        return True
