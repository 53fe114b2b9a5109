"""``MessageLost`` reaches a running task, in a thread and in a prefork pool child: with
its loss, never inside this package's own code (the shield), and never after the task.
Each worst instant is paused at; each twin shows what the guard prevents."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from celery_sqs_heartbeat import Loss, LossReason, MessageLost
from celery_sqs_heartbeat._interrupt import SIGNAL, Armed
from celery_sqs_heartbeat._loss import CODES
from celery_sqs_heartbeat._settings import HeartbeatOptions
from celery_sqs_heartbeat._slots import Slots, available, key_of
from celery_sqs_heartbeat._tasks import SlotTasks

pytestmark = pytest.mark.timeout(30)

LOSS = Loss(LossReason.MAX_DURATION, datetime(2026, 12, 4, tzinfo=timezone.utc))
#: Long enough for an exception pending in a thread to land: thousands of bytecodes.
BYTECODES = 200_000


def _spin() -> None:
    for _ in range(BYTECODES):
        pass


class TaskThread:
    """A task in a thread of its own: armed as it starts, disarmed as it ends; what
    reached it, and where, in ``seen``."""

    def __init__(self, body: Callable[[Armed], None]) -> None:
        self.seen: list[str] = []
        self.caught: list[MessageLost] = []
        self.decided: bool | None = None
        self._armed: list[Armed] = []
        self._started = threading.Event()
        self._body = body
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(5)

    @property
    def armed(self) -> Armed:
        return self._armed[0]

    def _run(self) -> None:
        armed = Armed()
        self._armed.append(armed)
        self._started.set()
        try:
            self._body(armed)
        except MessageLost as exc:
            self.caught.append(exc)
            self.seen.append("raised")
        finally:
            self.decided = armed.disarm()
        _spin()  # the executor's loop after the task: nothing may land here
        self.seen.append("after the task")

    def join(self) -> None:
        self._thread.join(10)
        assert not self._thread.is_alive()


def test_a_thread_gets_it_where_it_runs_with_its_loss_once() -> None:
    go = threading.Event()

    def body(armed: Armed) -> None:
        while not go.is_set():
            time.sleep(0.005)

    task = TaskThread(body)
    assert task.armed.decide(LOSS)
    task.armed.deliver()
    task.join()
    go.set()
    assert task.seen == ["raised", "after the task"]
    assert task.caught[0].loss == LOSS and "sqs_heartbeat_max_duration" in str(task.caught[0])
    assert task.decided is True
    assert not task.armed.decide(LOSS)  # once


def _paused_inside(wrap: Callable[[Armed], AbstractContextManager[None]]) -> TaskThread:
    """A task that calls into the package (*wrap*) and is interrupted while inside, at
    the worst instant: paused there, then running bytecode."""
    inside, go_on = threading.Event(), threading.Event()

    def body(armed: Armed) -> None:
        with wrap(armed):
            inside.set()
            go_on.wait(10)
            _spin()  # a pending exception lands here, if any is sent
            task.seen.append("left the package")
        task.seen.append("back in the task")

    task = TaskThread(body)
    return _interrupted_while_inside(task, inside, go_on)


def _interrupted_while_inside(
    task: TaskThread, inside: threading.Event, go_on: threading.Event
) -> TaskThread:
    """Decide and deliver once something is *inside* the package, then let it go on."""
    assert inside.wait(5)
    assert task.armed.decide(LOSS)
    task.armed.deliver()
    go_on.set()
    task.join()
    return task


def test_one_that_comes_inside_the_package_is_raised_as_the_call_returns() -> None:
    task = _paused_inside(lambda armed: armed.shield())
    assert task.seen == ["left the package", "raised", "after the task"]
    assert task.caught[0].loss == LOSS and task.decided is True


def test_twin_without_the_shield_it_lands_in_the_middle_of_the_package() -> None:
    task = _paused_inside(lambda armed: contextlib.nullcontext())
    assert task.seen == ["raised", "after the task"]  # "left the package" never came


def test_a_task_that_ends_before_it_is_delivered_is_told_and_nothing_lands_after() -> None:
    """Decided, the message given up, then the task ends before the delivery: its end
    knows it was decided (and, not failed with MessageLost, warns), and the late
    delivery sends nothing."""
    decided = threading.Event()

    def body(armed: Armed) -> None:
        assert decided.wait(5)

    task = TaskThread(body)
    assert task.armed.decide(LOSS)
    decided.set()
    while task.decided is None:
        time.sleep(0.005)
    task.armed.deliver()
    task.join()
    assert task.decided is True
    assert task.seen == ["after the task"]


def test_a_helper_thread_of_the_task_passes_through_the_shield() -> None:
    """The task's own helper thread calls into the package while the interrupt is
    decided: it is not the one interrupted; the task is."""
    inside, go_on = threading.Event(), threading.Event()
    helper_saw: list[str] = []

    def body(armed: Armed) -> None:
        def helper() -> None:
            try:
                with armed.shield():
                    inside.set()
                    go_on.wait(10)
                helper_saw.append("returned")
            except MessageLost:
                helper_saw.append("raised")

        thread = threading.Thread(target=helper, daemon=True)
        thread.start()
        while True:
            time.sleep(0.005)

    task = _interrupted_while_inside(TaskThread(body), inside, go_on)
    assert task.seen == ["raised", "after the task"]
    deadline = time.monotonic() + 5
    while not helper_saw and time.monotonic() < deadline:
        time.sleep(0.005)
    assert helper_saw == ["returned"]


def test_it_crosses_the_pools_pipe_and_the_result_backend_with_its_loss() -> None:
    again = pickle.loads(pickle.dumps(MessageLost(LOSS)))
    assert again.loss == LOSS and str(again) == str(MessageLost(LOSS))
    as_stored = MessageLost(*MessageLost(LOSS).args)  # a backend rebuilds it from args
    assert str(as_stored) == str(MessageLost(LOSS)) and as_stored.loss is None


# -- a prefork pool child: the signal ---------------------------------------------------


def _task() -> Any:
    request = SimpleNamespace(properties={"delivery_tag": "rh"}, id="tid", task="t")
    return SimpleNamespace(name="t", acks_late=True, request=request)


def _child_interrupted_inside_its_lock(shielded: bool) -> list[str]:
    """Fork a pool child whose task holds its slot's mutex (as in ``extend()``) when the
    main process signals it; what the child saw, in order."""
    options = {"t": HeartbeatOptions(True, 1.0, 4, None, interrupt=True)}
    slots = Slots(1)
    ready, go, paused, said = os.pipe(), os.pipe(), os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        seen: list[str] = []
        try:
            tasks = SlotTasks(None, options, slots, [0], interruptible=True)
            signal.signal(signal.SIGUSR2, lambda *_: tasks.signalled())
            tasks.started(_task(), "tid")
            os.write(ready[1], b"x")
            os.read(go[0], 1)  # the main process found the loss, and decided
            shield = tasks.armings.shield("rh") if shielded else contextlib.nullcontext
            try:
                with shield(), slots._locked(0):
                    os.write(paused[1], b"x")
                    time.sleep(0.5)  # the signal comes here; its handler runs after
                    _spin()
                    seen.append("left the package")
                seen.append("back in the task")
            except MessageLost as exc:
                seen.append(f"raised {exc.loss.reason.name if exc.loss else None}")
            tasks.ended("tid")
        finally:
            os.write(said[1], ",".join(seen).encode())
            os._exit(0)
    os.read(ready[0], 1)
    key = key_of("rh")
    slots.lose(0, key, CODES[LossReason.MAX_DURATION], time.monotonic() + 4)
    target = slots.interrupt(0, key)
    assert target is not None and target[0] == pid
    os.write(go[1], b"x")
    os.read(paused[0], 1)  # the child holds its slot's mutex now
    assert SIGNAL is not None and slots.signal(*target, SIGNAL)
    os.waitpid(pid, 0)
    assert slots.loss(0, key) is not None  # the mutex is free
    return os.read(said[0], 1000).decode().split(",")


@pytest.mark.skipif(not available(), reason="no process-shared robust mutexes here")
def test_a_pool_child_signalled_inside_its_slots_lock_raises_only_as_it_leaves() -> None:
    assert _child_interrupted_inside_its_lock(shielded=True) == [
        "left the package",
        "raised MAX_DURATION",
    ]


@pytest.mark.skipif(not available(), reason="no process-shared robust mutexes here")
def test_twin_a_pool_child_without_the_shield_raises_with_its_lock_held() -> None:
    assert _child_interrupted_inside_its_lock(shielded=False) == ["raised MAX_DURATION"]


@pytest.mark.skipif(not available(), reason="no process-shared robust mutexes here")
def test_no_signal_reaches_a_child_whose_task_ended_or_that_handles_none() -> None:
    slots = Slots(2)
    slots.attach(0, os.getpid(), interruptible=True)
    slots.attach(1, os.getpid())  # its SIGUSR2 is another's
    slots.started(0, key_of("a"))
    slots.started(1, key_of("b"))
    assert slots.interrupt(1, key_of("b")) is None
    assert slots.interrupt(0, key_of("other")) is None
    assert slots.ended(0) is False
    assert slots.interrupt(0, key_of("a")) is None  # it ended
