"""The prefork channel: what a pool child writes in its slot, and what the main process
makes of it before each beat. The child's side runs in a real forked process."""

from __future__ import annotations

import os
import threading
import time

import pytest

from celery_sqs_heartbeat._heartbeat import STOP_WAIT, Ended, Heartbeat, State
from celery_sqs_heartbeat._settings import HeartbeatOptions
from celery_sqs_heartbeat._slots import Slots
from celery_sqs_heartbeat.testing import wait_for

pytestmark = pytest.mark.timeout(30)

OPTIONS = HeartbeatOptions(enabled=True, interval=1.0, visibility_timeout=10, max_duration=None)


def heartbeat(rh: str = "rh") -> Heartbeat:
    return Heartbeat(rh, "q", OPTIONS, time.monotonic() - 5)


def in_child(*steps: object) -> None:
    """Run *steps* (callables) in a forked child, and wait for it to exit."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            for step in steps:
                step()  # type: ignore[operator]
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def test_a_task_not_yet_started_is_beaten_unfenced() -> None:
    slots = Slots(2)
    hb = heartbeat()
    assert slots.begin(hb, time.monotonic())
    assert hb.slot is None and hb.state is State.WAITING


def test_a_running_task_is_fenced_and_its_end_is_final() -> None:
    """Postrun waits for the beat in flight; after it, no beat begins."""
    slots = Slots(2)
    slots.started(1, "rh", os.getpid())  # as the child with index 1 would, at prerun
    hb = heartbeat()
    assert slots.begin(hb, time.monotonic())
    assert hb.slot == 1 and hb.state is State.RUNNING

    ended = threading.Event()
    postrun = threading.Thread(target=lambda: (slots.ended(1), ended.set()))
    postrun.start()
    assert not ended.wait(STOP_WAIT / 3), "postrun returned while a beat was in flight"
    slots.finish(hb)
    assert ended.wait(5)
    postrun.join()

    assert not slots.begin(hb, time.monotonic())
    assert hb.ended is Ended.TASK_ENDED


def test_postrun_does_not_wait_for_ever_on_a_stalled_beat() -> None:
    slots = Slots(1)
    slots.started(0, "rh", os.getpid())
    assert slots.begin(heartbeat(), time.monotonic())
    began = time.monotonic()
    slots.ended(0)
    assert STOP_WAIT <= time.monotonic() - began < STOP_WAIT + 0.2


def test_the_next_task_in_the_slot_ends_the_previous_ones_heartbeat() -> None:
    slots = Slots(1)
    slots.started(0, "first", os.getpid())
    slots.ended(0)
    slots.started(0, "second", os.getpid())
    first, second = heartbeat("first"), heartbeat("second")
    assert not slots.begin(first, time.monotonic()) and first.ended is Ended.TASK_ENDED
    assert slots.begin(second, time.monotonic()) and second.state is State.RUNNING


def test_a_child_written_slot_is_read_by_the_parent() -> None:
    """The mapping and the lock really are shared across the fork."""
    slots = Slots(2)
    in_child(lambda: slots.started(0, "rh", os.getpid()))
    hb = heartbeat()
    # The child that wrote the slot has exited: its process is gone.
    assert not slots.begin(hb, time.monotonic())
    assert hb.ended is Ended.SETTLED


def test_a_dead_pool_process_ends_the_heartbeat_before_it_is_reaped() -> None:
    slots = Slots(1)
    go = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        slots.started(0, "rh", os.getpid())
        os.write(go[1], b"x")
        time.sleep(0.3)
        os._exit(0)
    os.read(go[0], 1)
    hb = heartbeat()
    assert slots.begin(hb, time.monotonic())
    slots.finish(hb)
    # Dead but not reaped yet (a zombie): the main process must see it gone at once.
    wait_for(lambda: not slots.begin(hb, time.monotonic()), timeout=5, what="the death")
    assert hb.ended is Ended.SETTLED
    os.waitpid(pid, 0)


def test_a_task_sets_its_own_pace_and_extension_through_its_slot() -> None:
    slots = Slots(1)
    slots.started(0, "rh", os.getpid())
    slots.configure(0, 5.0, 60)
    hb = heartbeat()
    now = time.monotonic()
    assert slots.begin(hb, now)
    slots.finish(hb)
    assert (hb.interval, hb.visibility_timeout) == (5.0, 60)

    with slots.extending(0):
        assert not slots.begin(hb, now + 100), "a regular beat during the task's extension"
    slots.extended(0, now, 600)
    assert not slots.begin(hb, now + 100)  # the next regular beat is 600 - 55 s away
    assert now + 545 - hb.step < hb.next_due <= now + 545


def test_a_beat_put_off_by_its_task_is_still_sent_later() -> None:
    """The loop wakes for a beat whose task, through its slot, set a slower pace."""
    from .fake_sidecar import World

    slots = Slots(1)
    w = World(fence=slots)
    w.add("rh", interval=0.5, visibility_timeout=2)
    slots.started(0, "rh", os.getpid())
    slots.configure(0, 1.5, 4)
    w.advance(5)
    assert [c.entries for c in w.calls][:2] == [[("rh", 4)], [("rh", 4)]]
    assert w.calls[0].at == pytest.approx(1.5, abs=0.05)
