"""Recipe: CloudWatch metrics for celery-sqs-heartbeat in embedded metric format (EMF).

Add this module to the worker's imports (``app.conf.imports = [..., "metrics_cloudwatch"]``
or ``celery worker --include metrics_cloudwatch``). Each heartbeat event becomes one JSON
line on the worker's standard output, which CloudWatch Logs turns into metrics when the
output reaches it (ECS or EKS with the awslogs driver or Fluent Bit, Lambda, or the
CloudWatch agent): no SDK and no API call from the worker.

The lines go to the process's real standard output, not ``print``: Celery's worker
redirects ``sys.stdout`` into its log, which would prefix each line.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from celery_sqs_heartbeat import signals

NAMESPACE = os.environ.get("SQS_HEARTBEAT_EMF_NAMESPACE", "CelerySQSHeartbeat")
_lock = threading.Lock()


def emit(metrics: dict[str, tuple[float, str]], queue_url: str, **properties: Any) -> None:
    """Write one EMF record: *metrics* maps a name to (value, unit), by queue."""
    record = {
        "_aws": {
            "Timestamp": int(time.time() * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": NAMESPACE,
                    "Dimensions": [["Queue"]],
                    "Metrics": [{"Name": n, "Unit": unit} for n, (_, unit) in metrics.items()],
                }
            ],
        },
        "Queue": queue_url.rstrip("/").rsplit("/", 1)[-1],
        **{name: value for name, (value, _) in metrics.items()},
        **properties,
    }
    line = json.dumps(record, separators=(",", ":")) + "\n"
    stream = sys.__stdout__
    if stream is None:
        return
    with _lock:  # one whole line at a time, from any thread
        stream.write(line)
        stream.flush()


@signals.beat_sent.connect
def _beat_sent(queue_url: str, lateness: float, task_name: str, **_: Any) -> None:
    emit(
        {"Beats": (1, "Count"), "BeatLateness": (lateness, "Seconds")},
        queue_url,
        TaskName=task_name,
    )


@signals.beat_failed.connect
def _beat_failed(queue_url: str, failure: str, task_name: str, **_: Any) -> None:
    emit({"BeatFailures": (1, "Count")}, queue_url, TaskName=task_name, Failure=failure)


@signals.message_lost.connect
def _message_lost(queue_url: str, reason: str, task_name: str, **_: Any) -> None:
    emit({"MessagesLost": (1, "Count")}, queue_url, TaskName=task_name, Reason=reason)


@signals.message_redelivered.connect
def _message_redelivered(queue_url: str, task_name: str, **_: Any) -> None:
    emit({"MessagesRedelivered": (1, "Count")}, queue_url, TaskName=task_name)
