"""The prefork channel: what a pool child writes in its slot, and what the main process
makes of it before each beat. The child's side runs in a real forked process."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from celery_sqs_heartbeat import _slots
from celery_sqs_heartbeat._heartbeat import STOP_WAIT, Ended
from celery_sqs_heartbeat._slots import Slots, key_of
from celery_sqs_heartbeat.testing import wait_for

from ..support.fake_sidecar import World

pytestmark = pytest.mark.timeout(30)

RH = key_of("rh")
#: What a step that waits for nothing takes at most, on a busy machine.
NO_WAIT = 0.05


def slots_of(capacity: int) -> Slots:
    """Slots whose pool processes are all this one (each test plays both sides)."""
    slots = Slots(capacity)
    for index in range(capacity):
        slots.attach(index, os.getpid())
    return slots


def in_child(*steps: Callable[[], object]) -> None:
    """Run *steps* in a forked child, and wait for it to exit."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            for step in steps:
                step()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def test_a_task_not_yet_started_is_beaten_unfenced() -> None:
    assert slots_of(2).begin(RH, None) is None


def test_a_running_task_is_fenced_and_its_end_is_final() -> None:
    """Postrun waits for the beat in flight; after it, no beat begins."""
    slots = slots_of(2)
    slots.started(1, RH)  # as the child with index 1 would, at prerun
    view = slots.begin(RH, None)
    assert view is not None and view.index == 1 and view.running and view.fenced

    ended = threading.Event()
    postrun = threading.Thread(target=lambda: (slots.ended(1), ended.set()))
    postrun.start()
    assert not ended.wait(STOP_WAIT / 3), "postrun returned while a beat was in flight"
    slots.finish(1)
    assert ended.wait(5)
    postrun.join()

    view = slots.begin(RH, 1)
    assert view is not None and not view.running and not view.fenced


def test_postrun_does_not_wait_for_ever_on_a_stalled_beat() -> None:
    slots = slots_of(1)
    slots.started(0, RH)
    assert slots.begin(RH, None) is not None
    began = time.monotonic()
    slots.ended(0)
    assert STOP_WAIT <= time.monotonic() - began < STOP_WAIT + 0.2


def test_the_next_task_in_the_slot_ends_the_previous_ones_heartbeat() -> None:
    slots = slots_of(1)
    first, second = key_of("first"), key_of("second")
    slots.started(0, first)
    slots.ended(0)
    slots.started(0, second)
    old, new = slots.begin(first, None), slots.begin(second, None)
    assert old is not None and not old.running
    assert new is not None and new.running


def test_a_child_written_slot_is_read_by_the_parent() -> None:
    """The mapping and the lock really are shared across the fork."""
    slots = slots_of(2)
    in_child(lambda: slots.attach(0, os.getpid()), lambda: slots.started(0, RH))
    # The child that wrote the slot has exited: its process is gone.
    view = slots.begin(RH, None)
    assert view is not None and view.running and not view.alive and not view.fenced


def test_a_dead_pool_process_ends_the_heartbeat_before_it_is_reaped() -> None:
    slots = slots_of(1)
    go = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        slots.attach(0, os.getpid())
        slots.started(0, RH)
        os.write(go[1], b"x")
        time.sleep(0.3)
        os._exit(0)
    os.read(go[0], 1)
    w = World(fence=slots)
    hb = w.add(interval=0.5, visibility_timeout=2)
    # Dead but not reaped yet (a zombie): the main process must see it gone at once.
    wait_for(lambda: (w.advance(w.now + 0.5), hb.ended)[1] is not None, timeout=5, what="the death")
    assert hb.ended is Ended.SETTLED
    os.waitpid(pid, 0)


def test_a_task_sets_its_own_pace_and_extension_through_its_slot() -> None:
    slots = slots_of(1)
    w = World(fence=slots)
    hb = w.add(interval=1.0, visibility_timeout=10)
    slots.started(0, RH)
    assert slots.configure(0, RH, 5.0, 60)
    w.advance(1.0)  # the first beat is due at 1: the new pace puts it off to 5
    assert (hb.options.interval, hb.options.visibility_timeout) == (5.0, 60)
    w.advance(5.0)
    assert [(c.at, c.entries) for c in w.calls] == [(5.0, [("rh", 60)])]

    with slots.extending(0, RH):
        w.advance(12.0)  # its next beat is due at 10: held while the task extends
        assert len(w.calls) == 1, "a regular beat during the task's extension"
    slots.extended(0, RH, 12.0, 600)
    w.advance(550)
    # The next regular beat comes when 55 s (window - interval) of the 600 s are left.
    assert len(w.calls) == 1
    w.advance(560)
    assert [c.at for c in w.calls] == [5.0, 557.0]


def test_a_beat_held_for_the_tasks_own_extension_does_not_spin_the_loop() -> None:
    """While the task sends its own extension, the due beat waits a grid step at a time:
    the loop sleeps in between instead of turning again at once."""
    slots = slots_of(1)
    w = World(fence=slots)
    w.add("rh", interval=1.0, visibility_timeout=4)
    slots.started(0, RH)
    with slots.extending(0, RH):
        w.advance(3.0)  # due at 1, held for two seconds of the task's slow call
    # A turn per grid step (1/8 s) held, and a few around the due time; not thousands.
    assert w.turns < 40, w.turns
    assert w.calls == []
    w.advance(3.2)
    assert [c.entries for c in w.calls] == [[("rh", 4)]]


def test_a_beat_put_off_by_its_task_is_still_sent_later() -> None:
    """The loop wakes for a beat whose task, through its slot, set a slower pace."""
    slots = slots_of(1)
    w = World(fence=slots)
    w.add("rh", interval=0.5, visibility_timeout=2)
    slots.started(0, RH)
    slots.configure(0, RH, 1.5, 4)
    w.advance(5)
    assert [c.entries for c in w.calls][:2] == [[("rh", 4)], [("rh", 4)]]
    assert w.calls[0].at == pytest.approx(1.5, abs=0.05)


def _killed_inside_a_write(lock_holder: Callable[[], None]) -> None:
    """Fork a child that pauses inside its slot's write (the lock held) and SIGKILL it
    there, at the worst instant."""
    paused = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        _slots.pause_in_write = lambda: (os.write(paused[1], b"x"), time.sleep(60))
        lock_holder()
        os._exit(0)
    os.read(paused[0], 1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_a_child_killed_inside_its_slots_write_jams_nothing() -> None:
    """SIGKILL in the middle of prerun's stores: the slot's next task starts and stops
    with no wait, and its beats are on time."""
    slots = slots_of(1)
    _killed_inside_a_write(lambda: slots.started(0, key_of("killed")))

    began = time.monotonic()
    slots.attach(0, os.getpid())  # the replacement child starts
    slots.started(0, RH)  # and runs its first task
    assert time.monotonic() - began < NO_WAIT

    w = World(fence=slots)
    w.add("rh", interval=1.0, visibility_timeout=4)
    began = time.monotonic()
    w.advance(3.0)
    assert time.monotonic() - began < NO_WAIT
    assert [c.at for c in w.calls] == [1.0, 2.0, 3.0]  # every beat on time

    began = time.monotonic()
    slots.ended(0)
    assert time.monotonic() - began < NO_WAIT


def test_twin_a_plain_process_shared_lock_stays_held_by_a_killed_child() -> None:
    """The twin: the lock the channel used before (a semaphore of multiprocessing) is kept
    for good by a holder killed at the same instant, so every later step waited."""
    lock = multiprocessing.get_context("fork").Lock()

    def hold() -> None:
        with lock:
            assert _slots.pause_in_write is not None
            _slots.pause_in_write()

    _killed_inside_a_write(hold)
    began = time.monotonic()
    assert not lock.acquire(timeout=0.5), "the killed child's lock was released"
    assert time.monotonic() - began >= 0.5


def test_a_child_killed_while_extending_leaves_no_hold_on_the_next_task() -> None:
    """SIGKILL (a hard time limit) while the task sends its own extension: the flag that
    holds the main process's beats dies with that task, and the next task in the slot is
    beaten as usual."""
    slots = slots_of(1)
    slots.started(0, key_of("killed"))

    def extend_and_die() -> None:
        with slots.extending(0, key_of("killed")):
            os._exit(0)  # no finally: what a SIGKILL leaves

    in_child(extend_and_die)
    slots.attach(0, os.getpid())  # billiard's replacement child
    slots.started(0, RH)
    view = slots.begin(RH, None)
    assert view is not None and view.running and not view.extending and view.fenced


def test_a_replaced_childs_unfinished_task_has_ended() -> None:
    """Billiard replaces a killed child at the same index before Celery settles its task:
    the new process's start must not make the dead task look alive again."""
    slots = slots_of(1)
    in_child(lambda: slots.attach(0, os.getpid()), lambda: slots.started(0, RH))
    slots.attach(0, os.getpid())  # the replacement, alive
    view = slots.begin(RH, 0)
    assert view is not None and not view.running and not view.fenced


def test_a_pidfd_above_1023_is_still_watched() -> None:
    """A worker with many open files: the dead-process check must not depend on
    select()'s 1024-descriptor limit."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1100
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    opened: list[int] = []
    try:
        while not opened or opened[-1] < 1030:
            opened.append(os.open(os.devnull, os.O_RDONLY))
        slots = slots_of(1)
        slots.started(0, RH)
        view = slots.begin(RH, None)
        assert view is not None and view.running and view.alive
        slots.finish(0)
    finally:
        for fd in opened:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_pace_cut_short_is_never_applied() -> None:
    """A child killed in the middle of configure() leaves no half-written pace that the
    main process would apply (a zero interval would break every turn)."""
    slots = slots_of(1)
    w = World(fence=slots)
    hb = w.add("rh", interval=1.0, visibility_timeout=4)
    slots.started(0, RH)
    slots._table[0].pace_key = RH  # as if killed after the key, before the values
    w.advance(2.0)
    assert (hb.options.interval, hb.options.visibility_timeout) == (1.0, 4)
    assert [c.at for c in w.calls] == [1.0, 2.0]


def test_a_handle_kept_past_its_task_writes_nothing_into_the_next_tasks_slot() -> None:
    """A task hands ``current()`` to a thread that outlives it: once the slot runs the
    next task, that handle's pace, hold and extension must not land on the next task's
    message (which would put its beats off, and the task would run twice)."""
    slots = slots_of(1)
    slots.started(0, key_of("first"))
    slots.ended(0)
    slots.started(0, RH)
    assert not slots.configure(0, key_of("first"), 60.0, 600)
    with slots.extending(0, key_of("first")) as running:
        assert not running
    slots.extended(0, key_of("first"), 1.0, 600)
    view = slots.begin(RH, 0)
    assert view is not None and view.running
    assert (view.pace, view.extended, view.extending) == (None, None, False)


class FakeLibc:
    """A libc whose pthread functions return the error number a test gives them (0:
    done), and that records which it was asked for."""

    def __init__(self, **errors: int) -> None:
        self.errors = errors
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., int]:
        def call(*_: Any) -> int:
            self.calls.append(name)
            return self.errors.get(name, 0)

        return call


@pytest.mark.parametrize(
    "call",
    [
        "pthread_mutexattr_init",
        "pthread_mutexattr_setpshared",
        "pthread_mutexattr_setrobust",  # musl's can fail while pthread_mutex_init succeeds
        "pthread_mutex_init",
    ],
)
def test_a_mutex_that_cannot_be_made_robust_maps_no_slots(
    monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """Every call that makes the slots' mutexes is checked: an OSError naming it sends
    the worker to its fallback (no slots, said at start), where a mutex made without it
    would stay locked for good by a killed child."""
    libc = FakeLibc(**{call: errno.ENOTSUP})
    monkeypatch.setattr(_slots, "_libc", lambda: libc)
    with pytest.raises(OSError, match=call) as raised:
        Slots(2)
    assert raised.value.errno == errno.ENOTSUP
    if call != "pthread_mutexattr_init":
        assert "pthread_mutexattr_destroy" in libc.calls


@pytest.mark.parametrize("error", [errno.ENOTRECOVERABLE, errno.EINVAL])
def test_a_slot_whose_mutex_cannot_be_taken_is_broken(
    monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    """A mutex that is not recoverable is not taken, and nothing goes on as if it were:
    SlotsBroken, an OSError, and no unlock of a mutex the caller does not hold."""
    libc = FakeLibc()
    monkeypatch.setattr(_slots, "_libc", lambda: libc)
    slots = Slots(1)
    libc.errors["pthread_mutex_lock"] = error
    steps: list[Callable[[], object]] = [lambda: slots.started(0, RH), lambda: slots.begin(RH, 0)]
    for step in steps:
        with pytest.raises(_slots.SlotsBroken, match="pthread_mutex_lock") as raised:
            step()
        assert isinstance(raised.value, OSError) and raised.value.errno == error
    assert "pthread_mutex_unlock" not in libc.calls


def test_a_mutex_that_cannot_be_made_consistent_is_broken_for_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its holder died, and pthread_mutex_consistent fails: the mutex is unlocked
    inconsistent (so every later lock fails at once, none waits for ever) and the
    caller gets SlotsBroken."""
    libc = FakeLibc(pthread_mutex_consistent=errno.EINVAL)
    monkeypatch.setattr(_slots, "_libc", lambda: libc)
    slots = Slots(1)
    libc.errors["pthread_mutex_lock"] = errno.EOWNERDEAD
    with pytest.raises(_slots.SlotsBroken, match="pthread_mutex_consistent") as raised:
        slots.started(0, RH)
    assert raised.value.errno == errno.EINVAL
    assert libc.calls[-2:] == ["pthread_mutex_consistent", "pthread_mutex_unlock"]
