"""A running task learns through ``current()`` that its message is no longer its own, in
every pool: from the sidecar's own heartbeat, or from the slot the beating process wrote
(a prefork child, a worker with a heartbeat process)."""

from __future__ import annotations

import json

import kombu
import pytest

from celery_sqs_heartbeat.testing import wait_for

from ..conftest import Scenario

pytestmark = pytest.mark.timeout(120)

INTERVAL = 0.5
VISIBILITY = 3
MAX_DURATION = 1.5
#: The queue hides a message longer than the test: only the heartbeat's end can lose it.
QUEUE_TIMEOUT = 60


def lossy(scenario: Scenario, **options: object) -> dict[str, object]:
    """A configuration whose tasks lose their message at ``max_duration``."""
    return scenario.config(
        queue_timeout=QUEUE_TIMEOUT,
        heartbeat=True,
        interval=INTERVAL,
        visibility=VISIBILITY,
        sqs_heartbeat_max_duration=MAX_DURATION,
        **options,
    )


def lost_event(scenario: Scenario, task_id: str) -> dict[str, object]:
    found = [json.loads(line) for line in scenario.events_path.read_text().splitlines()]
    (event,) = [e for e in found if e["event"] == "lost" and e["task_id"] == task_id]
    return event


@pytest.mark.parametrize(
    ("pool", "own_process"),
    [("prefork", True), ("threads", True), ("solo", True), ("gevent", True), ("threads", False)],
)
def test_a_task_learns_that_max_duration_was_reached(
    scenario: Scenario, pool: str, own_process: bool
) -> None:
    """Within one beat after ``max_duration``: the reason, when another worker may
    receive the message (within the deadline known from the start), and no longer
    active. The task ends then, so it runs once."""
    conf = lossy(scenario, sqs_heartbeat_own_process=own_process)
    scenario.start_workers(conf, 1, pool=pool, concurrency=1)
    task_id = scenario.send(conf, "until_lost", 30)

    runs = scenario.wait_settled(timeout=40)

    mine = [r.event for r in runs if r.task_id == task_id and r.event in ("start", "end")]
    assert mine == ["start", "end"]  # once
    event = lost_event(scenario, task_id)
    assert event["found"] and event["reason"] == "MAX_DURATION", event
    assert event["active"] is False
    noticed, visible_at, deadline = float(event["at"]), event["visible_at"], event["deadline"]
    assert isinstance(visible_at, float) and isinstance(deadline, float), event
    (start,) = [r.at for r in runs if r.task_id == task_id and r.event == "start"]
    # Noticed within one beat (and a poll) after max_duration from the task's start.
    assert noticed - start <= MAX_DURATION + INTERVAL + 1.0, (noticed - start, event)
    # Its last beat kept it hidden a window at most past max_duration, as said in advance.
    assert noticed - 0.5 <= visible_at <= deadline + 0.5, event


@pytest.mark.skipif(
    tuple(kombu.VERSION[:2]) < (5, 5), reason="kombu 5.4 asks SQS for no receive count"
)
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_copy_received_while_the_first_runs_is_counted_and_said(
    scenario: Scenario, pool: str
) -> None:
    """The heartbeat stops at ``max_duration`` while the task runs on: its message comes
    back to the same worker (a free pool slot) while the first copy still runs. The
    worker counts it as redelivered (``ApproximateReceiveCount`` 2) and says so, once."""
    conf = scenario.config(
        queue_timeout=2,
        heartbeat=True,
        interval=INTERVAL,
        visibility=2,
        sqs_heartbeat_max_duration=1,
    )
    (worker,) = scenario.start_workers(conf, 1, pool=pool, concurrency=2)
    task_id = scenario.send(conf, "stats_after", 6)

    scenario.wait_settled(timeout=40)

    found = [json.loads(line) for line in scenario.events_path.read_text().splitlines()]
    stats = [e["stats"] for e in found if e["event"] == "stats" and e["task_id"] == task_id]
    assert len(stats) == 2, stats  # it ran twice: the heartbeat let it go on purpose
    assert max(s["messages_redelivered"] for s in stats) == 1, stats
    (line,) = worker.log_lines(f"[{task_id}] was received again")
    assert "received 2 times" in line and "WARNING" in line, line


@pytest.mark.needs_request_log("the worker's DeleteMessage and visibility changes by handle")
@pytest.mark.parametrize(
    ("pool", "own_process"),
    [
        ("prefork", True),
        ("threads", True),
        ("threads", False),
        ("solo", True),
        ("gevent", True),
        ("eventlet", True),
    ],
)
def test_with_interrupt_on_a_lost_task_is_stopped_and_its_handle_never_used_again(
    scenario: Scenario, pool: str, own_process: bool
) -> None:
    """``MessageLost`` is raised in the task at ``max_duration``; Celery records it as
    an expected failure, and neither its failure handling nor kombu's release at exit
    deletes the message or changes its visibility with the stale handle. The next copy
    runs once, after the first stopped, and is deleted with its own handle."""
    conf = lossy(scenario, sqs_heartbeat_interrupt=True, sqs_heartbeat_own_process=own_process)
    (worker,) = scenario.start_workers(conf, 1, pool=pool, concurrency=1)
    task_id = scenario.send(conf, "until_interrupted", 30)

    # The lost copy never ends: it was stopped. The next one does, and the queue empties.
    wait_for(
        lambda: (
            [r for r in scenario.runs(task_id) if r.event == "end"]
            and scenario.queue_counts() == (0, 0)
        ),
        timeout=40,
        what="the next copy to end and the queue to empty",
    )
    runs = scenario.runs(task_id)
    scenario.stop()

    found = [json.loads(line) for line in scenario.events_path.read_text().splitlines()]
    starts = [e for e in found if e["event"] == "start" and e["task_id"] == task_id]
    (stopped,) = [e for e in found if e["event"] == "interrupted" and e["task_id"] == task_id]
    assert stopped["reason"] == "MAX_DURATION", stopped
    first, second = (str(e["receipt_handle"]) for e in starts)  # the lost copy, the next
    assert stopped["receipt_handle"] == first
    assert float(stopped["at"]) - float(starts[0]["at"]) <= MAX_DURATION + INTERVAL + 1.0
    assert float(starts[1]["at"]) >= float(stopped["at"])  # one at a time
    assert [r.event for r in runs if r.event == "end"] == ["end"]  # the next copy ran on
    # Nothing was sent with the stale handle once it was lost (its beats were earlier).
    stale = [
        r
        for r in scenario.requests(
            "DeleteMessage", "ChangeMessageVisibility", "ChangeMessageVisibilityBatch"
        )
        if first in r.receipt_handles and r.at >= float(stopped["at"])
    ]
    assert not stale, [(r.action, r.at) for r in stale]
    assert any(second in r.receipt_handles for r in scenario.requests("DeleteMessage"))
    (said,) = worker.log_lines(f"[{task_id}] is interrupted with MessageLost")
    assert "WARNING" in said and "sqs_heartbeat_max_duration reached" in said, said
    assert worker.log_lines("raised expected: MessageLost"), worker.log()  # its state
    assert not worker.log_lines("raised unexpected"), worker.log()
    assert not worker.log_lines("was received again"), worker.log()  # given up: no duplicate
