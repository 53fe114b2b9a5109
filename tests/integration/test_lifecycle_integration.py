"""Shutdowns, a pool child killed mid-task, and FIFO queues, with real workers.

The queue's own timeout is 30 s here wherever the test is about how soon a message comes
back: the heartbeat's 2 s window must be what brings it back, not the queue.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import celery
import pytest

from celery_sqs_heartbeat.testing import WorkerProcess, wait_for

from ..conftest import RECEIVE_SLACK, Run, Scenario
from .test_worker_integration import QUEUE_TIMEOUT, TASK_SECONDS, beats_for, timeouts

pytestmark = pytest.mark.timeout(120)

INTERVAL = 0.5
VISIBILITY = 2
#: How soon a message whose heartbeat died is received again at the latest.
COMES_BACK = VISIBILITY + INTERVAL + RECEIVE_SLACK
#: The window for the pool-child tests: longer than Celery takes to notice a dead child
#: (billiard polls for it; up to ~4 s seen here), so the message is still hidden when
#: Celery settles it and the test sees Celery's decision, not the window running out.
CHILD_VISIBILITY = 10
#: Celery's requeue of a lost task: noticing the dead child, kombu's requeue (visible
#: again after its wait time) and a new receive; far less than the queue's 30 s.
REQUEUED_WITHIN = 10


def task_pid(scenario: Scenario, task_id: str) -> int:
    lines = [json.loads(line) for line in scenario.events_path.read_text().splitlines()]
    return int(next(e["pid"] for e in lines if e["task_id"] == task_id and e["event"] == "start"))


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_warm_shutdown_keeps_beating_until_the_task_ends(scenario: Scenario, pool: str) -> None:
    """SIGTERM mid-task: the worker finishes the task first, beats go on meanwhile, and a
    second worker never gets the message."""
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=True, interval=INTERVAL, visibility=VISIBILITY
    )
    first, _ = scenario.start_workers(conf, 2, pool=pool)
    task_id = scenario.send(conf, "sleep", TASK_SECONDS)
    (start,) = scenario.wait_starts(task_id, 1, timeout=20)
    if start.worker != first.name:
        first = next(w for w in scenario.workers if w.name == start.worker)

    assert first.process is not None
    first.process.send_signal(signal.SIGTERM)
    term_at = time.time()
    assert first.wait(TASK_SECONDS + 20) == 0

    runs = scenario.wait_settled(timeout=30)
    assert [r.event for r in runs if r.task_id == task_id] == ["start", "end"]
    beats = beats_for(scenario, start.receipt_handle, VISIBILITY)
    assert len([b for b in beats if b > term_at + INTERVAL]) >= 2, (term_at, beats)


#: Celery 5.4's cold shutdown deletes the running tasks' messages unless this is set
#: (the Deploying page's recipe for 5.4); later series hand them back by themselves.
COLD_SHUTDOWN_RECIPE = {"task_reject_on_worker_lost": True} if celery.VERSION < (5, 5) else {}


def test_cold_shutdown_exits_at_once_and_the_message_comes_back(scenario: Scenario) -> None:
    """SIGQUIT mid-task: the worker exits at once (the heartbeat thread is a daemon) and
    the message is back within one window, though the queue's timeout is 30 s."""
    conf = scenario.config(
        queue_timeout=30,
        heartbeat=True,
        interval=INTERVAL,
        visibility=VISIBILITY,
        **COLD_SHUTDOWN_RECIPE,
    )
    (first,) = scenario.start_workers(conf, 1)
    task_id = scenario.send(conf, "sleep", 60)
    scenario.wait_starts(task_id, 1, timeout=20)
    wait_for(lambda: len(scenario.beats()) >= 2, timeout=10, what="two beats")

    assert first.process is not None
    first.process.send_signal(signal.SIGQUIT)
    quit_at = time.time()
    first.wait(10)
    assert time.time() - quit_at < 5
    (second,) = scenario.start_workers(conf, 1)

    starts = scenario.wait_starts(task_id, 2, timeout=COMES_BACK + 30)
    assert starts[1].worker == second.name
    assert starts[1].at - quit_at <= COMES_BACK + 10  # includes the second worker's start


#: The soft-shutdown test's window: far longer than the test waits for the message, so a
#: beat landing after kombu's hand-back would keep it hidden past the test's bound.
SOFT_VISIBILITY = 30
#: How long Celery's soft shutdown lets running tasks go on before cancelling them.
SOFT_TIMEOUT = 2
#: From the draining worker's exit to the spare worker's start of the cancelled task.
BACK_WITHIN = 8


SOFT_SHUTDOWN = pytest.mark.skipif(
    celery.VERSION < (5, 5), reason="worker_soft_shutdown_timeout: Celery 5.5+"
)


def start_soft_shutdown(
    scenario: Scenario, pool: str, interval: float, visibility: int
) -> tuple[dict[str, Any], WorkerProcess, str, Run]:
    """A worker set up for a soft shutdown as fleets run it, with a long task running;
    its settings, the worker, the task's id and its start."""
    conf = scenario.config(
        queue_timeout=60,
        heartbeat=True,
        interval=interval,
        visibility=visibility,
        worker_soft_shutdown_timeout=SOFT_TIMEOUT,
    )
    draining = scenario.worker(conf, pool=pool, env={"REMAP_SIGTERM": "SIGQUIT"})
    draining.wait_ready(60)
    task_id = scenario.send(conf, "sleep", 120)
    (start,) = scenario.wait_starts(task_id, 1, timeout=20)
    return conf, draining, task_id, start


@SOFT_SHUTDOWN
def test_soft_shutdown_hands_the_cancelled_task_back(scenario: Scenario) -> None:
    """The recipe for a deploy with long tasks: ``REMAP_SIGTERM=SIGQUIT`` and
    ``worker_soft_shutdown_timeout``. SIGTERM gives the running task the soft timeout,
    then Celery cancels it unacknowledged: its message is back on a spare worker within
    seconds of the exit (not after the heartbeat's 30 s window, nor the queue's), and no
    beat lands after kombu hands it back."""
    conf, draining, task_id, start = start_soft_shutdown(scenario, "prefork", 1, SOFT_VISIBILITY)
    wait_for(
        lambda: len(beats_for(scenario, start.receipt_handle, SOFT_VISIBILITY)) >= 2,
        timeout=10,
        what="two beats",
    )
    (spare,) = scenario.start_workers(conf, 1, pool="prefork")

    assert draining.process is not None
    draining.process.send_signal(signal.SIGTERM)
    draining.wait(SOFT_TIMEOUT + 20)
    exited_at = time.time()

    starts = scenario.wait_starts(task_id, 2, timeout=BACK_WITHIN + 10)
    assert starts[1].worker == spare.name
    assert starts[1].at - exited_at <= BACK_WITHIN
    assert [r.event for r in scenario.runs(task_id) if r.worker == draining.name] == ["start"]
    beats = beats_for(scenario, start.receipt_handle, SOFT_VISIBILITY)
    assert not [b for b in beats if b > exited_at], "a beat after the worker exited"
    handed_back = [
        r.at
        for r in scenario.sqs.visibility_changes([start.receipt_handle])
        if r.status == 200 and timeouts(r) == {0}
    ]
    assert not [b for b in beats if handed_back and b > min(handed_back)], (beats, handed_back)


@SOFT_SHUTDOWN
def test_soft_shutdown_cannot_cancel_a_threads_task_and_the_kill_brings_it_back(
    scenario: Scenario,
) -> None:
    """In the threads pool Celery's cold shutdown cannot cancel a running task (the pool
    has no ``kill_job``: Celery logs an unrecoverable error), so the worker keeps it, and
    its heartbeat, until the task ends or the orchestrator kills the worker. After that
    SIGKILL the message is back on a spare worker within one window."""
    conf, draining, task_id, start = start_soft_shutdown(scenario, "threads", INTERVAL, VISIBILITY)
    (spare,) = scenario.start_workers(conf, 1, pool="threads")

    assert draining.process is not None
    draining.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "kill_job" in draining.log(), timeout=SOFT_TIMEOUT + 10, what="the error")
    cancelled_at = time.time()
    wait_for(
        lambda: any(
            b > cancelled_at + 2 * INTERVAL
            for b in beats_for(scenario, start.receipt_handle, VISIBILITY)
        ),
        timeout=10,
        what="beats after the failed cancel",
    )
    assert draining.process.poll() is None, "the worker exited with its task still running"
    draining.kill()  # the orchestrator's SIGKILL after its grace period
    killed_at = time.time()

    starts = scenario.wait_starts(task_id, 2, timeout=COMES_BACK + 10)
    assert starts[1].worker == spare.name
    assert starts[1].at - killed_at <= COMES_BACK


@pytest.mark.parametrize("reject_on_worker_lost", [False, True])
def test_pool_child_killed_mid_task(scenario: Scenario, reject_on_worker_lost: bool) -> None:
    """SIGKILL the pool child that runs the task: its heartbeat dies with it.

    Celery then settles the message in the main process: by default it records the task
    as failed (WorkerLostError) and deletes the message, so it never runs again; with
    ``task_reject_on_worker_lost`` it requeues it at once and it runs again.
    """
    conf = scenario.config(
        queue_timeout=30,
        heartbeat=True,
        interval=INTERVAL,
        visibility=CHILD_VISIBILITY,
        task_reject_on_worker_lost=reject_on_worker_lost,
    )
    scenario.start_workers(conf, 1, pool="prefork", concurrency=1)
    task_id = scenario.send(conf, "sleep", TASK_SECONDS)
    (start,) = scenario.wait_starts(task_id, 1, timeout=20)
    wait_for(lambda: len(scenario.beats()) >= 2, timeout=10, what="two beats")

    os.kill(task_pid(scenario, task_id), signal.SIGKILL)
    killed_at = time.time()

    if reject_on_worker_lost:
        starts = scenario.wait_starts(task_id, 2, timeout=REQUEUED_WITHIN + 10)
        assert starts[1].at - killed_at <= REQUEUED_WITHIN
        assert starts[1].receipt_handle != start.receipt_handle
    else:
        wait_for(lambda: scenario.queue_counts() == (0, 0), timeout=10, what="the message deleted")
        with pytest.raises(TimeoutError):
            scenario.wait_starts(task_id, 2, timeout=CHILD_VISIBILITY + INTERVAL + RECEIVE_SLACK)
    beats = beats_for(scenario, start.receipt_handle, CHILD_VISIBILITY)
    late = [b for b in beats if b > killed_at + 0.2]
    assert not late, "a beat for the killed task's message after its process died"


#: The FIFO test's window: its threads worker's ack of the ended task waits, on kombu
#: before 5.7, for the event loop's next turn (up to kombu's 1 s long poll, more on a
#: loaded machine), and the message must stay hidden until then.
FIFO_VISIBILITY = 4


def fifo_conf(scenario: Scenario, heartbeat: bool) -> dict[str, object]:
    scenario.queue = f"{scenario.queue}.fifo"
    return scenario.config(
        queue_timeout=QUEUE_TIMEOUT,
        heartbeat=heartbeat,
        interval=INTERVAL,
        visibility=FIFO_VISIBILITY,
    )


def test_fifo_queue_long_task_runs_once_and_holds_its_group(scenario: Scenario) -> None:
    """On a FIFO queue the heartbeat works the same; while the task runs, SQS delivers no
    other message of its group (kombu sends every task in the group ``default``)."""
    conf = fifo_conf(scenario, heartbeat=True)
    # One worker with room for both tasks: moto decides which groups are held when a long
    # poll begins, so a second worker already polling could get the group's next message.
    scenario.start_workers(conf, 1, pool="threads", concurrency=2)
    long_id = scenario.send(conf, "sleep", TASK_SECONDS)
    scenario.wait_starts(long_id, 1, timeout=20)
    short_id = scenario.send(conf, "sleep", 0.1)

    runs = scenario.wait_settled(timeout=TASK_SECONDS + 30)

    assert [r.event for r in runs if r.task_id == long_id] == ["start", "end"]
    long_end = next(r.at for r in runs if r.task_id == long_id and r.event == "end")
    short_start = next(r.at for r in runs if r.task_id == short_id and r.event == "start")
    assert short_start >= long_end, "the group was not held while the long task ran"
    assert len(beats_for(scenario, runs[0].receipt_handle, FIFO_VISIBILITY)) >= 2


def test_fifo_queue_long_task_runs_twice_without_heartbeat(scenario: Scenario) -> None:
    conf = fifo_conf(scenario, heartbeat=False)
    scenario.start_workers(conf, 1, pool="threads", concurrency=2)
    long_id = scenario.send(conf, "sleep", TASK_SECONDS)

    assert len(scenario.wait_starts(long_id, 2, timeout=TASK_SECONDS + 20)) >= 2


#: The hard time limit of the time-limit test, far shorter than its task.
TIME_LIMIT = 3


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_hard_time_limit_stops_the_heartbeat_and_releases_the_message(
    scenario: Scenario, pool: str
) -> None:
    """The task is killed (prefork) or interrupted (gevent) at its hard time limit: no
    beat follows, and Celery settles the message (deleted, as failed) at once; the
    queue's 30 s timeout plays no part and the task never runs again."""
    conf = scenario.config(
        queue_timeout=30,
        heartbeat=True,
        interval=INTERVAL,
        visibility=VISIBILITY,
        task_annotations={"worker_app.sleep": {"time_limit": TIME_LIMIT}},
    )
    scenario.start_workers(conf, 1, pool=pool)
    task_id = scenario.send(conf, "sleep", 4 * TASK_SECONDS)
    (start,) = scenario.wait_starts(task_id, 1, timeout=20)

    wait_for(
        lambda: "Hard time limit" in scenario.logs(), timeout=TIME_LIMIT + 10, what="the limit"
    )
    limited_at = time.time()
    wait_for(lambda: scenario.queue_counts() == (0, 0), timeout=10, what="the message deleted")
    with pytest.raises(TimeoutError):
        scenario.wait_starts(task_id, 2, timeout=VISIBILITY + INTERVAL + RECEIVE_SLACK)
    assert [r.event for r in scenario.runs(task_id)] == ["start"]
    beats = beats_for(scenario, start.receipt_handle, VISIBILITY)
    assert len(beats) >= 2, "the task was beaten until its limit"
    assert not [b for b in beats if b > limited_at], "a beat after the time limit"


def test_revoke_does_not_reach_a_worker_on_sqs(scenario: Scenario) -> None:
    """Celery's remote control needs fanout exchanges, and kombu's SQS transport declares
    only direct ones (even with ``supports_fanout``), so Celery leaves the worker's
    control consumer out: ``revoke(terminate=True)`` never reaches it and the task runs
    to its end, kept once by its heartbeat. If this ever fails, remote control came to
    SQS, and terminate must be tested like the hard time limit above."""
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=True, interval=INTERVAL, visibility=VISIBILITY
    )
    scenario.start_workers(conf, 1, pool="prefork")
    task_id = scenario.send(conf, "sleep", TASK_SECONDS)
    scenario.wait_starts(task_id, 1, timeout=20)

    app = scenario.app(conf)
    app.control.revoke(task_id, terminate=True)
    assert app.control.ping(timeout=1) == []

    runs = scenario.wait_settled(timeout=TASK_SECONDS + 30)
    assert [r.event for r in runs if r.task_id == task_id] == ["start", "end"]
    assert "Terminating" not in scenario.logs()
