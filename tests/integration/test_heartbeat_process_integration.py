"""The heartbeat process of a threads, solo, gevent or eventlet worker, with real workers.

The heartbeat process dies with the worker, and one that dies is replaced. (That a task
holding the GIL in one C call, or a green task that never yields, cannot starve it, is
tested in ``test_worker_integration``.)
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from celery_sqs_heartbeat.testing import WorkerProcess, wait_for

from ..conftest import RECEIVE_SLACK, Scenario
from .test_worker_integration import beats_for

pytestmark = pytest.mark.timeout(120)

INTERVAL = 1
VISIBILITY = 4
#: The queue's own timeout, where the heartbeat must keep the message: well below the task.
QUEUE_TIMEOUT = 4
#: How soon a message whose heartbeat died is received again at the latest.
COMES_BACK = VISIBILITY + INTERVAL + RECEIVE_SLACK
#: Three windows: a task this long runs twice unless it is beaten.
TASK_SECONDS = 3 * VISIBILITY
HEARTBEAT_PROCESS = re.compile(r"heartbeat process \(pid (\d+)\)")


def beat_pid(worker: WorkerProcess) -> int:
    """The pid of *worker*'s heartbeat process, as its start-up line names it."""
    wait_for(
        lambda: HEARTBEAT_PROCESS.search(worker.log()), timeout=10, what="the heartbeat process"
    )
    match = HEARTBEAT_PROCESS.search(worker.log())
    assert match is not None
    return int(match.group(1))


def gone(pid: int) -> bool:
    """Whether process *pid* has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_a_killed_worker_takes_its_heartbeat_process_with_it(scenario: Scenario, pool: str) -> None:
    """SIGKILL the worker mid-task: its heartbeat process is gone within a second, sends no
    beat after the kill, and the message is back on a spare worker within one window."""
    conf = scenario.config(
        queue_timeout=30, heartbeat=True, interval=INTERVAL, visibility=VISIBILITY
    )
    (first,) = scenario.start_workers(conf, 1, pool=pool)
    beats = beat_pid(first)
    task_id = scenario.send(conf, "sleep", 60)
    (start,) = scenario.wait_starts(task_id, 1, timeout=20)
    wait_for(lambda: len(scenario.beats()) >= 2, timeout=10, what="two beats")
    (spare,) = scenario.start_workers(conf, 1, pool=pool)

    first.kill()
    killed_at = time.monotonic()
    killed_wall = time.time()
    wait_for(lambda: gone(beats), timeout=5, what="the heartbeat process gone")
    assert time.monotonic() - killed_at <= 1.0

    starts = scenario.wait_starts(task_id, 2, timeout=COMES_BACK + 10)
    assert starts[1].worker == spare.name
    assert starts[1].at - killed_wall <= COMES_BACK
    late = [b for b in beats_for(scenario, start.receipt_handle, VISIBILITY) if b > killed_wall]
    assert not late, "a beat for the message after the worker was killed"


@pytest.mark.parametrize("pool", ["threads", "gevent"])
def test_a_killed_heartbeat_process_is_replaced_and_the_task_runs_once(
    scenario: Scenario, pool: str
) -> None:
    """SIGKILL only the heartbeat process: the worker says so, starts another within the
    interval, and the new one beats the message on; the task runs once."""
    if pool == "gevent":
        pytest.importorskip("gevent")
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=True, interval=INTERVAL, visibility=VISIBILITY
    )
    scenario.start_workers(conf, 2, pool=pool)
    task_id = scenario.send(conf, "sleep", TASK_SECONDS)
    (start,) = scenario.wait_starts(task_id, 1, timeout=20)
    worker = next(w for w in scenario.workers if w.name == start.worker)
    wait_for(lambda: len(scenario.beats()) >= 2, timeout=10, what="two beats")

    old = beat_pid(worker)
    os.kill(old, signal.SIGKILL)
    killed_at = time.time()
    wait_for(lambda: worker.log_lines("A new one (pid"), timeout=INTERVAL + 2, what="the new one")
    (line,) = worker.log_lines("A new one (pid")
    assert "WARNING" in line and "SIGKILL" in line and "holds (1)" in line, line

    found = scenario.wait_settled(timeout=60)
    assert [r.event for r in found if r.task_id == task_id] == ["start", "end"]
    after = [b for b in beats_for(scenario, start.receipt_handle, VISIBILITY) if b > killed_at]
    assert len(after) >= 2, "the new heartbeat process did not beat the message"


def test_a_killed_keeper_is_replaced_in_a_threads_worker(scenario: Scenario) -> None:
    """SIGKILL the keeper, the worker's child that forks the heartbeat process: the heartbeat
    process dies with it, the threads worker forks another keeper, and the task runs
    once."""
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=True, interval=INTERVAL, visibility=VISIBILITY
    )
    scenario.start_workers(conf, 2, pool="threads")
    task_id = scenario.send(conf, "sleep", TASK_SECONDS)
    (start,) = scenario.wait_starts(task_id, 1, timeout=20)
    worker = next(w for w in scenario.workers if w.name == start.worker)
    wait_for(lambda: len(scenario.beats()) >= 2, timeout=10, what="two beats")
    assert worker.process is not None
    (keeper,) = (
        Path(f"/proc/{worker.process.pid}/task/{worker.process.pid}/children").read_text().split()
    )

    os.kill(int(keeper), signal.SIGKILL)
    killed_at = time.time()
    wait_for(lambda: worker.log_lines("keeper (pid"), timeout=INTERVAL + 2, what="a new keeper")

    found = scenario.wait_settled(timeout=60)
    assert [r.event for r in found if r.task_id == task_id] == ["start", "end"]
    after = [b for b in beats_for(scenario, start.receipt_handle, VISIBILITY) if b > killed_at]
    assert len(after) >= 2, "the new heartbeat process did not beat the message"
