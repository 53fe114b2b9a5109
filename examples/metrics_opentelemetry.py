"""Recipe: OpenTelemetry metrics for celery-sqs-heartbeat (``pip install opentelemetry-api``).

Add this module to the worker's imports (``app.conf.imports = [..., "metrics_opentelemetry"]``
or ``celery worker --include metrics_opentelemetry``). It records through OpenTelemetry's
global meter provider: whatever SDK and exporter your project sets up
(``opentelemetry-instrument``, or your own ``metrics.set_meter_provider(...)``) exports
it. Before one is set, recording costs next to nothing and goes nowhere.

The metrics are the Prometheus recipe's, with OpenTelemetry's names and units: exported
to Prometheus (the Collector's ``prometheus`` exporter, or opentelemetry-exporter-
prometheus) they become the same series (``celery_sqs_heartbeat_beats_total{queue=...}``,
``celery_sqs_heartbeat_beat_lateness_seconds_bucket``...), so the Grafana dashboard and
the alerts work as they are.

Prefork: every heartbeat signal fires in the worker's main process, so that process
needs a meter provider. The usual Celery recipe configures OpenTelemetry in
``worker_process_init``, in the pool children only: then these metrics go nowhere. Set
one up in the main process too (``opentelemetry-instrument celery -A proj worker`` does,
or your code at ``worker_init``). A task's own ``extend()`` sends ``beat_sent`` from its
pool child: it is counted there if the child has a provider of its own.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics

from celery_sqs_heartbeat import signals

meter = metrics.get_meter("celery_sqs_heartbeat")

ACTIVE = meter.create_up_down_counter(
    "celery_sqs_heartbeat.active", unit="{heartbeat}", description="Task heartbeats running now."
)
BEATS = meter.create_counter(
    "celery_sqs_heartbeat.beats", unit="{beat}", description="Beats SQS accepted."
)
LATENESS = meter.create_histogram(
    "celery_sqs_heartbeat.beat.lateness",
    unit="s",
    description="From a beat's due time to SQS's answer.",
    explicit_bucket_boundaries_advisory=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
)
FAILURES = meter.create_counter(
    "celery_sqs_heartbeat.beat.failures", unit="{beat}", description="Failed beats, by class."
)
LOST = meter.create_counter(
    "celery_sqs_heartbeat.messages.lost",
    unit="{message}",
    description="Heartbeats that ended before their task: the message may run again.",
)
REDELIVERED = meter.create_counter(
    "celery_sqs_heartbeat.messages.redelivered",
    unit="{message}",
    description="Messages received that SQS had handed out before: a retry, or a task run twice.",
)


def queue_name(queue_url: str) -> str:
    return queue_url.rstrip("/").rsplit("/", 1)[-1]


@signals.heartbeat_started.connect
def _started(**_: Any) -> None:
    ACTIVE.add(1)


@signals.heartbeat_stopped.connect
def _stopped(**_: Any) -> None:
    ACTIVE.add(-1)


@signals.beat_sent.connect
def _beat_sent(queue_url: str, lateness: float, **_: Any) -> None:
    BEATS.add(1, {"queue": queue_name(queue_url)})
    LATENESS.record(lateness)


@signals.beat_failed.connect
def _beat_failed(failure: str, **_: Any) -> None:
    FAILURES.add(1, {"failure": failure})


@signals.message_lost.connect
def _message_lost(reason: str, **_: Any) -> None:
    LOST.add(1, {"reason": reason})


@signals.message_redelivered.connect
def _message_redelivered(queue_url: str, **_: Any) -> None:
    REDELIVERED.add(1, {"queue": queue_name(queue_url)})
