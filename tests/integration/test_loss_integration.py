"""A running task learns through ``current()`` that its message is no longer its own, in
every pool: from the sidecar's own heartbeat, or from the slot the beating process wrote
(a prefork child, a worker with a heartbeat process)."""

from __future__ import annotations

import json

import kombu
import pytest

from ..conftest import Scenario

pytestmark = pytest.mark.timeout(120)

INTERVAL = 0.5
VISIBILITY = 3
MAX_DURATION = 1.5
#: The queue hides a message longer than the test: only the heartbeat's end can lose it.
QUEUE_TIMEOUT = 60


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
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT,
        heartbeat=True,
        interval=INTERVAL,
        visibility=VISIBILITY,
        sqs_heartbeat_max_duration=MAX_DURATION,
        sqs_heartbeat_own_process=own_process,
    )
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
