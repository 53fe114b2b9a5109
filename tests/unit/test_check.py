"""`celery sqs-heartbeat check` against moto's server, and its permission probe."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from celery_sqs_heartbeat._check import PROBE_RECEIPT_HANDLE, _probe

from ..conftest import SUPPORT, Scenario

pytestmark = pytest.mark.timeout(120)


def test_a_non_sqs_broker_fails_the_check(scenario: Scenario) -> None:
    conf = {"sqs_heartbeat_enabled": True}
    worker = scenario.worker(conf, start=False, broker_url="memory://")
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker_app", "sqs-heartbeat", "check"],
        env=worker.env,
        cwd=SUPPORT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "is not SQS" in result.stderr


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AccessDenied", 403, "denied"),
        ("ReceiptHandleIsInvalid", 400, "allowed"),
        ("InvalidParameterValue", 400, "unknown"),
    ],
)
def test_permission_probe_touches_no_message(code: str, status: int, expected: str) -> None:
    client = boto3.client(
        "sqs", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    )
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/jobs"
    with Stubber(client) as stubber:
        stubber.add_client_error(
            "change_message_visibility",
            code,
            "no",
            status,
            expected_params={
                "QueueUrl": url,
                "ReceiptHandle": PROBE_RECEIPT_HANDLE,
                "VisibilityTimeout": 30,
            },
        )
        assert _probe(client, url).startswith(expected)


def test_the_check_and_the_cli_leave_the_signal_handlers_alone() -> None:
    """They compute what they need themselves: importing them connects nothing."""
    code = (
        "import sys, celery_sqs_heartbeat._check, celery_sqs_heartbeat._cli\n"
        "assert 'celery_sqs_heartbeat._handlers' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("series", "settings", "said"),
    [
        ((5, 4), {}, ["deletes the message of each running task"]),
        ((5, 4), {"worker_soft_shutdown_timeout": 60}, ["no effect on Celery 5.4", "deletes"]),
        ((5, 4), {"task_reject_on_worker_lost": True}, []),
        ((5, 5), {"worker_soft_shutdown_timeout": 60}, []),
        ((5, 7), {}, []),
    ],
)
def test_a_shutdown_recipe_that_would_lose_the_task_is_said(
    series: tuple[int, int], settings: dict[str, Any], said: list[str]
) -> None:
    """Celery 5.4 has no soft shutdown, and its cold shutdown deletes the running tasks'
    messages unless task_reject_on_worker_lost is set: the check says so."""
    from celery import Celery

    from celery_sqs_heartbeat._check import shutdown_notes

    app = Celery(set_as_current=False)
    app.conf.update(settings)
    notes = shutdown_notes(app.conf, series)
    assert len(notes) == len(said)
    for note, words in zip(notes, said, strict=True):
        assert words in note


@pytest.mark.parametrize(
    ("series", "visibility", "interval", "wait", "said"),
    [
        ((5, 6), 120, 30, 10, False),
        ((5, 6), 12, 4, 10, True),
        ((5, 6), 12, 4, 5, False),
        ((5, 7), 12, 4, 10, False),
    ],
)
def test_a_margin_that_an_ack_waiting_for_the_event_loop_outlasts_is_said(
    series: tuple[int, int], visibility: int, interval: int, wait: int, said: bool
) -> None:
    """Before 5.7 a threads or green worker acks a finished task at its event loop's next
    turn, up to kombu's long poll later: a margin shorter than that is said."""
    from celery_sqs_heartbeat._check import ack_lag_notes
    from celery_sqs_heartbeat._settings import HeartbeatOptions

    options = HeartbeatOptions(
        enabled=True, interval=interval, visibility_timeout=visibility, max_duration=None
    )
    notes = ack_lag_notes([options], wait, series)
    assert bool(notes) is said
    if said:
        assert f"window - interval, {visibility - interval} s" in notes[0]
        assert f"wait_time_seconds ({wait} s)" in notes[0]
