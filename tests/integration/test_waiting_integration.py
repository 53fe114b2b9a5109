"""Messages the worker holds before their task runs: prefetched, or waiting for an ETA.

Kombu has received them, so SQS counts their visibility timeout from then; a message that
waits longer than the queue's timeout is delivered again while the first worker still
holds it. The worker's main process beats them while they wait, and hands each over to its
task's own heartbeat when the task starts. Each test has a twin with the heartbeat off.
"""

from __future__ import annotations

import collections

import pytest

from celery_sqs_heartbeat.testing import wait_for

from ..conftest import Scenario
from .test_worker_integration import QUEUE_TIMEOUT

pytestmark = pytest.mark.timeout(120)

INTERVAL = 0.5
VISIBILITY = 2
#: Each task outlives the queue's timeout, so the second and third wait past it too.
TASK_SECONDS = 1.5 * QUEUE_TIMEOUT
TASKS = 3
#: Longer than the queue's timeout: without a heartbeat the message is delivered again.
COUNTDOWN = 3 * QUEUE_TIMEOUT


def prefetching(scenario: Scenario, heartbeat: bool) -> dict[str, object]:
    return scenario.config(
        queue_timeout=QUEUE_TIMEOUT,
        heartbeat=heartbeat,
        interval=INTERVAL,
        visibility=VISIBILITY,
        worker_prefetch_multiplier=4,
    )


def send_before_worker(scenario: Scenario, conf: dict[str, object], pool: str) -> list[str]:
    """Queue the tasks first, so that the worker receives them all in one call."""
    ids = [scenario.send(conf, "sleep", TASK_SECONDS) for _ in range(TASKS)]
    scenario.start_workers(conf, 1, pool=pool, concurrency=1)
    return ids


# Not the solo pool: it runs each task inside the consumer's own loop, which receives
# nothing meanwhile, so its messages never wait reserved (it passes with no heartbeat).
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_prefetched_messages_run_exactly_once(scenario: Scenario, pool: str) -> None:
    conf = prefetching(scenario, heartbeat=True)
    ids = send_before_worker(scenario, conf, pool)

    runs = scenario.wait_settled(timeout=TASKS * TASK_SECONDS + 30)

    starts = collections.Counter(r.task_id for r in runs if r.event == "start")
    assert starts == {task_id: 1 for task_id in ids}, starts
    assert receipts(scenario, ids) == {task_id: 1 for task_id in ids}
    assert not [r for r in scenario.beats() if r.status != 200]
    # The waiting heartbeat hands over to the task's own: about one beat per interval
    # from receipt to the end, not two (a waiting and a running heartbeat at once).
    handles = {r.receipt_handle for r in runs if r.event == "start"}
    for receipt_handle in handles:
        assert receipt_handle
        beats = [r for r in scenario.sqs.visibility_changes([receipt_handle]) if r.status == 200]
        received = min(r.at for r in runs if r.receipt_handle == receipt_handle) - TASKS * (
            TASK_SECONDS
        )
        ended = max(r.at for r in runs if r.receipt_handle == receipt_handle)
        assert len(beats) <= (ended - received) / INTERVAL + 3, (receipt_handle, len(beats))


def receipts(scenario: Scenario, ids: list[str]) -> collections.Counter[str]:
    """How many times the workers received each task's message (their INFO log)."""
    logs = scenario.logs()
    return collections.Counter({task_id: logs.count(f"[{task_id}] received") for task_id in ids})


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_prefetched_messages_are_delivered_twice_without_heartbeat(
    scenario: Scenario, pool: str
) -> None:
    conf = prefetching(scenario, heartbeat=False)
    ids = send_before_worker(scenario, conf, pool)

    runs = scenario.wait_settled(timeout=3 * TASKS * TASK_SECONDS + 30)

    starts = collections.Counter(r.task_id for r in runs if r.event == "start")
    assert set(starts) == set(ids)
    # SQS delivered a held message again. Whether Celery then runs the copy depends on
    # when it arrives (a copy kombu receives while the first delivery still waits may be
    # dropped once that one is acknowledged), so the delivery is what is counted.
    assert max(receipts(scenario, ids).values()) >= 2, (receipts(scenario, ids), starts)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_countdown_longer_than_the_queue_timeout_runs_once(scenario: Scenario, pool: str) -> None:
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=True, interval=INTERVAL, visibility=VISIBILITY
    )
    scenario.start_workers(conf, 2, pool=pool)
    task_id = scenario.send(conf, "sleep", 0.2, countdown=COUNTDOWN)

    runs = scenario.wait_settled(timeout=COUNTDOWN + 30)

    assert [r.event for r in runs if r.task_id == task_id] == ["start", "end"]
    assert not [r for r in scenario.beats() if r.status != 200]


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_countdown_runs_twice_without_heartbeat(scenario: Scenario, pool: str) -> None:
    conf = scenario.config(queue_timeout=QUEUE_TIMEOUT, heartbeat=False)
    scenario.start_workers(conf, 2, pool=pool)
    task_id = scenario.send(conf, "sleep", 0.2, countdown=COUNTDOWN)

    starts = scenario.wait_starts(task_id, 2, timeout=COUNTDOWN + 30)

    assert len(starts) >= 2


#: The words of the start warning of a solo or green worker that prefetches.
PREFETCH_WARNING = "Set worker_prefetch_multiplier = 1 for this worker"
#: Long enough that a message waiting in kombu's hands outlives the queue's timeout by
#: more than the spare worker's start.
INLINE_TASK_SECONDS = 3 * QUEUE_TIMEOUT


def one_receive_then_a_spare(scenario: Scenario, pool: str, multiplier: int) -> list[str]:
    """Tasks queued first, so that one worker's first receive may take them all, then a
    spare worker that would take any message whose visibility ran out."""
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT,
        heartbeat=True,
        interval=INTERVAL,
        visibility=VISIBILITY,
        worker_prefetch_multiplier=multiplier,
    )
    ids = [scenario.send(conf, "sleep", INLINE_TASK_SECONDS) for _ in range(TASKS)]
    scenario.start_workers(conf, 1, pool=pool, concurrency=1)
    wait_for(scenario.runs, timeout=20, what="the first worker to start a task")
    scenario.start_workers(conf, 1, pool=pool, concurrency=1)
    return ids


# The solo pool runs a task where kombu delivers it, and the green pools wait there for a
# free greenlet: the rest of that receive's messages wait in kombu's hands, where no
# heartbeat knows them. One message per receive avoids it, and the worker says so.
@pytest.mark.parametrize("pool", ["solo", "gevent"])
def test_a_solo_or_green_worker_without_prefetch_runs_each_task_once(
    scenario: Scenario, pool: str
) -> None:
    ids = one_receive_then_a_spare(scenario, pool, multiplier=1)

    runs = scenario.wait_settled(timeout=TASKS * INLINE_TASK_SECONDS + 30)

    starts = collections.Counter(r.task_id for r in runs if r.event == "start")
    assert starts == {task_id: 1 for task_id in ids}, starts
    assert PREFETCH_WARNING not in scenario.logs()


@pytest.mark.parametrize("pool", ["solo", "gevent"])
def test_a_solo_or_green_worker_that_prefetches_is_warned_and_runs_a_task_twice(
    scenario: Scenario, pool: str
) -> None:
    ids = one_receive_then_a_spare(scenario, pool, multiplier=4)
    scenario.wait_settled(timeout=2 * TASKS * INLINE_TASK_SECONDS + 30)

    # The queue can empty while the first worker still holds a copy it received before
    # the other deleted the message: that copy's run may begin just after the others end.
    def twice() -> collections.Counter[str] | None:
        starts = collections.Counter(r.task_id for r in scenario.runs() if r.event == "start")
        return starts if max(starts.values()) >= 2 else None

    starts = wait_for(twice, timeout=2 * INLINE_TASK_SECONDS, what="a task to run twice")
    assert set(starts) == set(ids)
    assert scenario.logs().count(PREFETCH_WARNING) == 2  # each worker, once
