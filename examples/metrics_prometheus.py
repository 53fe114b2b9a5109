"""Recipe: Prometheus metrics for celery-sqs-heartbeat (``pip install prometheus-client``).

Add this module to the worker's imports (``app.conf.imports = [..., "metrics_prometheus"]``
or ``celery worker --include metrics_prometheus``). The worker's main process serves
``/metrics`` on ``SQS_HEARTBEAT_METRICS_PORT`` (default 9808).

Every heartbeat signal fires in the worker's main process, whatever the pool. If your
own metrics also come from prefork pool children, set ``PROMETHEUS_MULTIPROC_DIR`` to an
empty directory in the worker's environment, and the counts of every process are added
up (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from typing import Any

from celery import signals as celery_signals
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)

from celery_sqs_heartbeat import signals

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

ACTIVE = Gauge(
    "celery_sqs_heartbeat_active",
    "Task heartbeats running now.",
    multiprocess_mode="livesum",
)
BEATS = Counter("celery_sqs_heartbeat_beats", "Beats SQS accepted.", ["queue"])
LATENESS = Histogram(
    "celery_sqs_heartbeat_beat_lateness_seconds",
    "From a beat's due time to SQS's answer.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FAILURES = Counter("celery_sqs_heartbeat_beat_failures", "Failed beats, by class.", ["failure"])
LOST = Counter(
    "celery_sqs_heartbeat_messages_lost",
    "Heartbeats that ended before their task: the message may run again.",
    ["reason"],
)
REDELIVERED = Counter(
    "celery_sqs_heartbeat_messages_redelivered",
    "Messages received that SQS had handed out before: a retry, or a task run twice.",
    ["queue"],
)


def queue_name(queue_url: str) -> str:
    return queue_url.rstrip("/").rsplit("/", 1)[-1]


@signals.heartbeat_started.connect
def _started(**_: Any) -> None:
    ACTIVE.inc()


@signals.heartbeat_stopped.connect
def _stopped(**_: Any) -> None:
    ACTIVE.dec()


@signals.beat_sent.connect
def _beat_sent(queue_url: str, lateness: float, **_: Any) -> None:
    BEATS.labels(queue=queue_name(queue_url)).inc()
    LATENESS.observe(lateness)


@signals.beat_failed.connect
def _beat_failed(failure: str, **_: Any) -> None:
    FAILURES.labels(failure=failure).inc()


@signals.message_lost.connect
def _message_lost(reason: str, **_: Any) -> None:
    LOST.labels(reason=reason).inc()


@signals.message_redelivered.connect
def _message_redelivered(queue_url: str, **_: Any) -> None:
    REDELIVERED.labels(queue=queue_name(queue_url)).inc()


@celery_signals.worker_ready.connect
def _serve(**_: Any) -> None:
    port = int(os.environ.get("SQS_HEARTBEAT_METRICS_PORT", "9808"))
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        start_http_server(port, registry=registry)
    else:
        start_http_server(port)


@celery_signals.worker_process_shutdown.connect
def _child_gone(pid: int | None = None, **_: Any) -> None:
    if MULTIPROCESS and pid is not None:
        multiprocess.mark_process_dead(pid)
