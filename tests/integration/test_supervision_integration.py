"""No silent failure, with real workers: each helper process that stops, dies or cannot
be made is healed within the margin (window - interval), or the worker beats from its
own process and says so. Each task runs once; the twins with the heartbeat or the heartbeat
process off (``test_worker_integration``) show the duplicate.

Window 4 s and interval 1 s: the margin is 3 s, so a heartbeat process or keeper that stops
ticking is killed after 1 s (the hang limit's floor).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from celery_sqs_heartbeat.testing import WorkerProcess, wait_for

from ..conftest import Scenario
from .test_heartbeat_process_integration import (
    INTERVAL,
    QUEUE_TIMEOUT,
    TASK_SECONDS,
    VISIBILITY,
    beat_pid,
)
from .test_worker_integration import beats_for

pytestmark = pytest.mark.timeout(120)

#: How soon after a helper stops the worker must have replaced it and said so: the hang
#: limit (1 s), a fork, and the first beats, well within the 3 s margin.
REPLACED_WITHIN = 2.5


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return ""


def running_one(
    scenario: Scenario, pool: str, task: str = "sleep", env: dict[str, str] | None = None
) -> tuple[dict[str, object], str, str, WorkerProcess]:
    """Two workers, one long task: (its settings, its id, its receipt handle, the worker
    that runs it), once two beats went out."""
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=True, interval=INTERVAL, visibility=VISIBILITY
    )
    scenario.start_workers(conf, 2, pool=pool, env=env)
    task_id = scenario.send(conf, task, TASK_SECONDS)
    (start,) = scenario.wait_starts(task_id, 1, timeout=20)
    worker = next(w for w in scenario.workers if w.name == start.worker)
    wait_for(lambda: len(scenario.beats()) >= 2, timeout=10, what="two beats")
    assert start.receipt_handle
    return conf, task_id, start.receipt_handle, worker


def runs_once(scenario: Scenario, task_id: str, receipt_handle: str, since: float) -> None:
    found = scenario.wait_settled(timeout=60)
    assert [r.event for r in found if r.task_id == task_id] == ["start", "end"]
    after = [b for b in beats_for(scenario, receipt_handle, VISIBILITY) if b > since]
    assert len(after) >= 2, "nothing beat the message after the fault"


def test_a_stopped_heartbeat_process_is_replaced_within_the_margin(scenario: Scenario) -> None:
    """SIGSTOP the heartbeat process of a threads worker: it ticks no more, so its keeper
    kills it and forks another, the worker says so, and the task runs once."""
    _, task_id, receipt_handle, worker = running_one(scenario, "threads")
    old = beat_pid(worker)
    os.kill(old, signal.SIGSTOP)
    stopped = time.time()
    wait_for(lambda: worker.log_lines("stopped ticking"), timeout=REPLACED_WITHIN, what="a new one")
    (line,) = worker.log_lines("stopped ticking")
    assert "WARNING" in line and f"(pid {old})" in line and "holds (1)" in line, line
    runs_once(scenario, task_id, receipt_handle, stopped)


def test_a_stopped_keeper_is_replaced_within_the_margin(scenario: Scenario) -> None:
    """SIGSTOP the keeper of a threads worker: the worker's link thread hears no tick,
    kills it (and so its heartbeat process), forks another, and the task runs once."""
    _, task_id, receipt_handle, worker = running_one(scenario, "threads")
    (keeper,) = children(worker.pid)
    os.kill(keeper, signal.SIGSTOP)
    stopped = time.time()
    wait_for(
        lambda: worker.log_lines(f"keeper (pid {keeper}) stopped ticking"),
        timeout=REPLACED_WITHIN,
        what="a new keeper",
    )
    runs_once(scenario, task_id, receipt_handle, stopped)


def test_a_killed_keeper_in_a_green_worker_falls_back_to_beating_in_the_worker(
    scenario: Scenario,
) -> None:
    """SIGKILL the keeper of a gevent worker, which cannot fork again once its
    greenlets run: the worker beats from a greenlet of its own, says so at WARNING
    with the margin, and the task runs once."""
    pytest.importorskip("gevent")
    _, task_id, receipt_handle, worker = running_one(scenario, "gevent")
    (keeper,) = children(worker.pid)
    os.kill(keeper, signal.SIGKILL)
    killed = time.time()
    wait_for(
        lambda: worker.log_lines("a green worker cannot fork"),
        timeout=REPLACED_WITHIN,
        what="the fallback",
    )
    (line,) = worker.log_lines("a green worker cannot fork")
    assert "WARNING" in line and "greenlet of the worker's own process" in line, line
    assert f"keeper (pid {keeper}) was killed by SIGKILL" in line and "for 3 s" in line, line
    runs_once(scenario, task_id, receipt_handle, killed)


@pytest.mark.needs_request_log("the beats of a starved worker: it records its own only later")
def test_a_heartbeat_process_killed_while_the_worker_is_starved_is_replaced(
    scenario: Scenario,
) -> None:
    """SIGKILL the heartbeat process while the task holds the worker's GIL in one C call:
    the keeper forks another and hands it the message itself (the worker's threads
    cannot run), so the task runs once."""
    _, task_id, receipt_handle, worker = running_one(scenario, "threads", task="hold_gil")
    os.kill(beat_pid(worker), signal.SIGKILL)
    killed = time.time()
    runs_once(scenario, task_id, receipt_handle, killed)
    assert worker.log_lines("was killed by SIGKILL")


def test_no_heartbeat_process_can_be_forked(scenario: Scenario) -> None:
    """Every fork fails (a cgroup's pids.max reached): the worker beats from a thread of
    its own, says so at WARNING with the cause and the margin, and the task runs once."""
    _, task_id, receipt_handle, worker = running_one(
        scenario, "threads", env={"SQSHB_FAIL_FORK": "1"}
    )
    (line,) = worker.log_lines("no heartbeat process could be started")
    assert "WARNING" in line and "Errno 11" in line and "for 3 s" in line, line
    runs_once(scenario, task_id, receipt_handle, 0.0)


def test_a_worker_that_reaps_orphans_leaves_no_zombie(scenario: Scenario) -> None:
    """A worker that is PID 1 (here a child subreaper: the same for orphans) inherits
    the heartbeat process when its keeper dies: it reaps it, so no zombie stays."""
    _, task_id, receipt_handle, worker = running_one(
        scenario, "threads", env={"SQSHB_SUBREAPER": "1"}
    )
    old = beat_pid(worker)
    (keeper,) = children(worker.pid)
    os.kill(keeper, signal.SIGKILL)
    wait_for(lambda: worker.log_lines("a new one (pid"), timeout=5, what="a new keeper")
    wait_for(lambda: state(old) == "", timeout=5, what=f"heartbeat process {old} reaped")
    assert all(state(pid) != "Z" for pid in children(worker.pid))
    runs_once(scenario, task_id, receipt_handle, 0.0)
