"""Configurations production users run, each in real workers against the tests' SQS.

* ``predefined_queues`` with per-queue credentials: kombu neither creates nor looks up
  the queue, and the heartbeat's client takes that queue's keys;
* ``queue_name_prefix``: the SQS queue's name is not the Celery queue's;
* Django-style settings: ``config_from_object(settings, namespace="CELERY")`` with
  ``CELERY_SQS_HEARTBEAT_ENABLED = True``;
* kombu's ``backoff_policy`` / ``backoff_tasks``: a failed task's message comes back
  after kombu's backoff delay, which no late beat may shorten to the heartbeat's window.

Each exactly-once test has a twin with the heartbeat off that runs the task twice.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from ..conftest import RECEIVE_SLACK, Scenario
from .test_worker_integration import QUEUE_TIMEOUT, TASK_SECONDS, beats_for

pytestmark = pytest.mark.timeout(120)

INTERVAL = 0.5
VISIBILITY = 2
#: Beats a task of TASK_SECONDS gets at least (one per interval after the first, some shared).
MIN_BEATS = TASK_SECONDS / INTERVAL / 2
#: kombu's backoff for the first failure: longer than the heartbeat's window by far,
#: shorter than the queue's own timeout (30 s), so what brings the message back is kombu.
BACKOFF = 8


def runs_once_or_twice(
    scenario: Scenario, conf: dict[str, Any], heartbeat: bool, **send: Any
) -> None:
    """Send a task 3x the queue's timeout to two workers: once with beats, twice without."""
    task_id = scenario.send(conf, "sleep", TASK_SECONDS, **send)
    if heartbeat:
        runs = scenario.wait_settled(timeout=TASK_SECONDS + 30)
        starts = [r for r in runs if r.event == "start" and r.task_id == task_id]
        assert len(starts) == 1, f"ran {len(starts)} times: {starts}"
        assert len(beats_for(scenario, starts[0].receipt_handle, VISIBILITY)) >= MIN_BEATS
    else:
        assert len(scenario.wait_starts(task_id, 2, timeout=TASK_SECONDS + 20)) >= 2
        assert not scenario.beats()


def predefined(scenario: Scenario, conf: dict[str, Any], **queue: Any) -> None:
    """Create the scenario's queue as an operator would, and name it in predefined_queues
    with its own keys (the tests' endpoints accept the environment's keys, so those)."""
    client = scenario.sqs.client()
    url = client.create_queue(
        QueueName=scenario.queue, Attributes={"VisibilityTimeout": str(QUEUE_TIMEOUT)}
    )["QueueUrl"]
    conf["broker_transport_options"]["predefined_queues"] = {
        scenario.queue: {
            "url": url,
            "access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
            "secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"],
            **queue,
        }
    }


@pytest.mark.parametrize("heartbeat", [True, False])
def test_predefined_queues_with_per_queue_credentials(scenario: Scenario, heartbeat: bool) -> None:
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=heartbeat, interval=INTERVAL, visibility=VISIBILITY
    )
    predefined(scenario, conf)
    scenario.start_workers(conf, 2, pool="threads")
    runs_once_or_twice(scenario, conf, heartbeat)


@pytest.mark.parametrize("heartbeat", [True, False])
def test_queue_name_prefix(scenario: Scenario, heartbeat: bool) -> None:
    """Celery's queue ``jobs`` is the SQS queue ``<scenario queue>-jobs``."""
    logical = "jobs"
    prefix = f"{scenario.queue}-"
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT,
        heartbeat=heartbeat,
        interval=INTERVAL,
        visibility=VISIBILITY,
        task_default_queue=logical,
    )
    conf["broker_transport_options"]["queue_name_prefix"] = prefix
    scenario.queue = f"{prefix}{logical}"  # what SQS knows it by: counts and beats use it
    scenario.start_workers(conf, 2, pool="prefork")
    runs_once_or_twice(scenario, conf, heartbeat, queue=logical)


@pytest.mark.parametrize("heartbeat", [True, False])
def test_django_style_settings(scenario: Scenario, heartbeat: bool) -> None:
    """The workers read CELERY_SQS_HEARTBEAT_ENABLED and the other CELERY_* settings only."""
    conf = scenario.config(
        queue_timeout=QUEUE_TIMEOUT, heartbeat=heartbeat, interval=INTERVAL, visibility=VISIBILITY
    )
    scenario.start_workers(conf, 2, pool="prefork", env={"SQSHB_DJANGO_STYLE": "1"})
    runs_once_or_twice(scenario, conf, heartbeat)


def test_kombu_backoff_policy_brings_a_failed_task_back_after_its_delay(
    scenario: Scenario,
) -> None:
    """A task that fails with ``task_acks_on_failure_or_timeout=False`` is rejected; kombu
    hides its message for the backoff policy's delay. The heartbeat stopped at postrun,
    so no beat cuts that delay down to the heartbeat's 2 s window."""
    conf = scenario.config(
        queue_timeout=30,
        heartbeat=True,
        interval=INTERVAL,
        visibility=VISIBILITY,
        task_acks_on_failure_or_timeout=False,
    )
    predefined(
        scenario,
        conf,
        backoff_policy={n: BACKOFF for n in range(1, 5)},
        backoff_tasks=["worker_app.fail"],
    )
    scenario.start_workers(conf, 1, pool="threads")
    task_id = scenario.send(conf, "fail", 2 * INTERVAL + 0.2)

    first, second = scenario.wait_starts(task_id, 2, timeout=BACKOFF + 30)[:2]
    first_end = next(r.at for r in scenario.runs(task_id) if r.event == "end")
    came_back = second.at - first_end
    assert BACKOFF - 1 <= came_back <= BACKOFF + RECEIVE_SLACK + 1, came_back
    assert beats_for(scenario, first.receipt_handle, VISIBILITY), "the first run was beaten"
