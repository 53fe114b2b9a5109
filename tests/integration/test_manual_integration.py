"""``celery_sqs_heartbeat.current()`` from inside real tasks, in prefork and threads pools.

The queue hides a message for two seconds and the task sleeps six: without the heartbeat
it runs twice (the twins in test_worker_integration), so these also show that manual
control leaves the message covered.
"""

from __future__ import annotations

import itertools
import json

import pytest

from ..conftest import Scenario
from .test_worker_integration import QUEUE_TIMEOUT, TASK_SECONDS, timeouts

pytestmark = pytest.mark.timeout(120)

INTERVAL = 0.5
VISIBILITY = 2


def manual_events(scenario: Scenario, task_id: str) -> list[dict[str, object]]:
    lines = scenario.events_path.read_text().splitlines()
    found = [json.loads(line) for line in lines]
    return [e for e in found if e["event"] == "manual" and e["task_id"] == task_id]


def changes(scenario: Scenario, receipt_handle: str) -> list[tuple[float, set[int]]]:
    return [
        (r.at, timeouts(r))
        for r in scenario.sqs.visibility_changes([receipt_handle])
        if r.status == 200
    ]


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_one_long_extension_replaces_the_regular_beats(scenario: Scenario, pool: str) -> None:
    """extend(10) at the start of a 6 s task: one call, and no regular beat is needed
    until the message has only (window - interval) left, after the task ended."""
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=True, interval=INTERVAL, visibility=VISIBILITY
    )
    scenario.start_workers(conf, 2, pool=pool, concurrency=2)
    task_id = scenario.send(conf, "manual", TASK_SECONDS, 10)

    runs = scenario.wait_settled(timeout=TASK_SECONDS + 30)

    assert [r.event for r in runs if r.task_id == task_id] == ["manual", "start", "end"]
    (event,) = manual_events(scenario, task_id)
    assert event["found"] and event["extended"] is True
    seen = changes(scenario, str(event["receipt_handle"]))
    assert [t for _, t in seen] == [{10}], seen


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_another_pace_for_the_rest_of_the_task(scenario: Scenario, pool: str) -> None:
    """configure(interval=1.5, visibility_timeout=4): later beats ask for 4 s, ~1.5 s apart."""
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=True, interval=INTERVAL, visibility=VISIBILITY
    )
    scenario.start_workers(conf, 2, pool=pool)
    task_id = scenario.send(conf, "manual", TASK_SECONDS, None, [1.5, 4])

    runs = scenario.wait_settled(timeout=TASK_SECONDS + 30)

    assert len([r for r in runs if r.event == "start" and r.task_id == task_id]) == 1
    (event,) = manual_events(scenario, task_id)
    assert event["configured"] is True
    assert (event["interval"], event["visibility_timeout"]) == (1.5, 4)
    seen = changes(scenario, str(event["receipt_handle"]))
    assert seen and all(t == {4} for _, t in seen), seen
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(seen)]
    assert 3 <= len(seen) <= 5, seen  # ~6 s / 1.5 s, the first one interval after start
    assert all(1.0 < g < 2.5 for g in gaps), gaps


def test_current_is_none_without_a_heartbeat(scenario: Scenario) -> None:
    conf = scenario.config(queue_timeout=30, heartbeat=False)
    scenario.start_workers(conf, 1, pool="threads")
    task_id = scenario.send(conf, "manual", 0.1, 5)

    scenario.wait_settled(timeout=30)

    (event,) = manual_events(scenario, task_id)
    assert event["found"] is False
    assert not scenario.beats()
