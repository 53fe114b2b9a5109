"""The heartbeat process's own machinery (``_beat``), without a worker: real forks, fake SQS."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

#: A green worker's main process with a task asleep in a greenlet when it forks its
#: heartbeat process (through the keeper), whose heartbeat process is then killed and forked
#: again. The task greenlet writes the pid it runs in when it wakes up.
GREEN_FORK = """
import sys
pool = sys.argv[1]
if pool == "gevent":
    from gevent import monkey
    monkey.patch_all()
else:
    import eventlet
    eventlet.monkey_patch()
import logging, os, threading, time
from types import SimpleNamespace
from celery_sqs_heartbeat._beat import HeartbeatProcess
from celery_sqs_heartbeat._report import Counters, Reporter
from celery_sqs_heartbeat._slots import Slots

out = sys.argv[2]
def task():
    time.sleep(0.5)
    with open(out, "a") as f:
        f.write(f"{os.getpid()}\\n")

slots = Slots(2)
reporter = Reporter(Counters(*slots.counter_blocks(None)), region=lambda: None)
clients = lambda: SimpleNamespace(for_queue=lambda url: None, timeout=1.0)
beats = HeartbeatProcess(slots, reporter, clients, {})
for index in range(2):
    slots.attach(index, os.getpid())
green = threading.Thread(target=task)
green.start()
time.sleep(0.05)
beats.spawn()  # with a greenlet of the worker's alive
beats.start()
while not beats.pid:
    time.sleep(0.01)
first = beats.pid
os.kill(first, 9)
while beats.pid == first:
    time.sleep(0.01)
green.join()
time.sleep(1.0)
print(os.getpid(), beats.keeper, first, beats.pid)
beats.close()
"""


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_a_heartbeat_process_forked_from_a_green_worker_runs_none_of_its_greenlets(
    tmp_path: Path, pool: str
) -> None:
    """A fork keeps the worker's greenlets (its tasks, its consumer): none of them may
    run on in the keeper or in a heartbeat process, the first or one forked again."""
    pytest.importorskip(pool)
    out = tmp_path / "ran"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(GREEN_FORK), pool, str(out)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    worker, *others = (int(p) for p in done.stdout.split())
    ran = [int(p) for p in out.read_text().split()]
    assert ran == [worker], f"the task's greenlet ran in {others} too: {ran}"


def test_a_task_that_ended_is_not_beaten_after_its_slot_ran_two_more() -> None:
    """In a worker with a heartbeat process, the heartbeat process learns that a message's task
    ended only from the task's slot (it cannot ask Celery's message whether it was
    settled): ``task_postrun`` stays final only if the slot still says so when the
    message's next beat is due. The worker hands the slot that was freed last to the
    next task, so a slot runs two more short tasks before Celery's acknowledgement (or
    requeue) of the first reaches the heartbeat process."""
    import os

    from celery_sqs_heartbeat._slots import Slots, key_of

    from ..support.fake_sidecar import World

    slots = Slots(1, ended=16)  # as a worker with a heartbeat process maps them
    slots.attach(0, os.getpid())
    world = World(fence=slots)
    world.add("a")  # as the heartbeat process adds it: no is_settled
    slots.started(0, key_of("a"))
    slots.ended(0)  # task_postrun of a's task has returned
    for other in ("b", "c"):
        slots.started(0, key_of(other))
        slots.ended(0)
    world.advance(31)  # a's first beat is due
    assert not [c for c in world.calls if "a" in c.handles], "a beat after task_postrun"


def test_a_replaced_heartbeat_process_counts_each_message_it_is_handed_once() -> None:
    """SIGKILL the heartbeat process: its replacement is handed the message the worker holds,
    and ``stats()`` still counts one heartbeat started for one message received."""
    import os
    import signal
    import time
    from types import SimpleNamespace

    from celery_sqs_heartbeat._beat import HeartbeatProcess, wire
    from celery_sqs_heartbeat._heartbeat import Ended, Heartbeat
    from celery_sqs_heartbeat._report import Counters, Reporter
    from celery_sqs_heartbeat._slots import Slots
    from celery_sqs_heartbeat.testing import wait_for

    from ..support.fake_sidecar import OPTIONS

    slots = Slots(1)
    counters = Counters(*slots.counter_blocks(None))
    clients = lambda: SimpleNamespace(for_queue=lambda url: None, timeout=1.0)  # noqa: E731
    beats = HeartbeatProcess(slots, Reporter(counters, region=lambda: None), clients, {})
    slots.attach(0, os.getpid())
    beats.spawn()
    beats.start()
    try:
        hb = Heartbeat("rh", "q", OPTIONS, time.monotonic(), "t", "id")  # due in 30 s
        beats.add(hb, SimpleNamespace(acknowledged=False))
        wait_for(lambda: counters.stats().active == 1, timeout=5, what="the heartbeat")
        first = wait_for(lambda: beats.pid, timeout=5, what="the heartbeat process")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: beats.pid != first, timeout=5, what="a new heartbeat process")
        # The new one holds the message: asked to end every heartbeat, it ends one.
        assert beats.ask(wire.StopAll(Ended.HANDED_BACK, frozenset()), 5) == 1
        stats = counters.stats()
        assert (stats.active, stats.started, stats.stopped) == (0, 1, 1), stats
    finally:
        beats.close()
