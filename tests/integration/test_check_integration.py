"""`celery sqs-heartbeat check` against the tests' SQS endpoint, with real queues."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from celery_sqs_heartbeat.testing import SQSServer

from ..conftest import SUPPORT, Scenario

pytestmark = pytest.mark.timeout(120)


def run_check(scenario: Scenario, conf: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    worker = scenario.worker(conf, start=False)
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker_app", "sqs-heartbeat", "check", "--json"],
        env=worker.env,
        cwd=SUPPORT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, json.loads(result.stdout)


def test_a_good_setup_passes(scenario: Scenario, sqs: SQSServer) -> None:
    client = sqs.client()
    dlq = client.create_queue(QueueName=f"{scenario.queue}-dlq")["QueueUrl"]
    dlq_arn = client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    client.create_queue(
        QueueName=scenario.queue,
        Attributes={
            "VisibilityTimeout": "60",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 5}),
        },
    )
    conf = scenario.config(
        queue_timeout=60, heartbeat=True, interval=5, visibility=20, worker_prefetch_multiplier=1
    )

    status, report = run_check(scenario, conf)

    assert status == 0, report["problems"]
    (queue,) = report["queues"]
    assert queue["name"] == scenario.queue and queue["exists"]
    assert (queue["visibility_timeout"], queue["max_receive_count"]) == (60, 5)
    assert queue["permission"] == "allowed" and not queue["fifo"]
    sleep = next(t for t in report["tasks"] if t["task"] == "worker_app.sleep")
    assert sleep["queue"] == scenario.queue and sleep["acks_late"]


def test_misconfigurations_are_problems(scenario: Scenario, sqs: SQSServer) -> None:
    """A queue whose timeout runs out before the first beat and a heartbeat-enabled task
    without acks_late each make the check fail; prefetching is only a note."""
    client = sqs.client()
    short = f"{scenario.queue}-short"
    client.create_queue(QueueName=scenario.queue, Attributes={"VisibilityTimeout": "60"})
    client.create_queue(QueueName=short, Attributes={"VisibilityTimeout": "2"})
    conf = scenario.config(
        queue_timeout=60,
        heartbeat=True,
        interval=5,
        visibility=20,
        worker_prefetch_multiplier=4,
        task_routes={"worker_app.plain": {"queue": short}},
        task_annotations={"worker_app.fail": {"acks_late": False}},
    )

    status, report = run_check(scenario, conf)

    assert status == 1
    problems = "\n".join(report["problems"])
    assert f"queue {short} hides a message for 2 s" in problems
    assert "worker_prefetch_multiplier" not in problems
    assert any("worker_prefetch_multiplier=4" in n for n in report["notes"])
    assert "worker_app.fail" in problems and "acks_late" in problems
    assert f"queue {scenario.queue} hides" not in problems


def test_a_queue_not_created_yet_is_judged_by_kombus_timeout(scenario: Scenario) -> None:
    conf = scenario.config(
        queue_timeout=3, heartbeat=True, interval=5, visibility=20, worker_prefetch_multiplier=1
    )
    status, report = run_check(scenario, conf)
    assert status == 1
    assert any("does not exist yet" in n for n in report["notes"])
    assert any("created with a visibility timeout of 3 s" in p for p in report["problems"])
